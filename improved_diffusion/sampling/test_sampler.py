"""Tests for the long-video sampler: FDM equivalence, schedule mechanics, stabilization, rollouts.

A tiny random UNet checks exact agreement with the diffusion's own loops; a cheap spy model
(a plain function that records what it is shown) checks the bookkeeping.
"""

import numpy as np
import pytest
import torch

from improved_diffusion.sampling import noise_schedules as ns
from improved_diffusion.sampling.noise_schedules import levels_to_timesteps
from improved_diffusion.sampling.plans import Stage, plan_stages, sampling_schemes
from improved_diffusion.sampling.scheme import Scheme, StageSettings
from improved_diffusion.sampling.stage_updates import StageSlots
from improved_diffusion.script_util import DiffusionConfig, ModelConfig, UserError, create_diffusion, create_model
from improved_diffusion.sampling.sampler import (
    run_rows,
    sample_stage,
    stage_levels,
    one_video_at_a_time,
    preview_rollout,
    sample_video,
    sample_with_scheme,
    stabilization_timestep,
    video_generator,
)

C, H = 3, 16


@pytest.fixture(scope="module")
def unet():
    """Tiny UNet with every weight random: the zero-initialised output layers would hide the inputs."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(image_size=H, num_channels=32, channel_mult="1,2", attention_resolutions="8"))
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model.eval()


class FixedPlan:
    """A plan given as its list of (obs, latent) stages, the same for every video."""

    def __init__(self, stages):
        self.stages = list(stages)

    def next_stage(self, videos):
        if not self.stages:
            return None
        obs, latent = self.stages.pop(0)
        return Stage([obs] * len(videos), [latent] * len(videos))


class Spy:
    """Model stand-in that records every call; its eps prediction depends on all frames it is shown."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, x0=None, frame_indices=None, obs_mask=None, latent_mask=None):
        self.calls.append({"t": t.clone(), "x0": x0.clone(), "obs_mask": obs_mask.clone(),
                           "latent_mask": latent_mask.clone(), "frame_indices": frame_indices.clone()})
        shown = x * (1 - obs_mask) + x0 * obs_mask
        return 0.5 * shown + 0.3 * shown.mean(dim=1, keepdim=True)


def random_videos(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, T, C, H, H, generator=g) * 2 - 1


def diffusion_with(steps=100, respacing="4", rescale=True):
    return create_diffusion(DiffusionConfig(diffusion_steps=steps, rescale_timesteps=rescale), respacing)


# ---------- FDM's sampler


@pytest.mark.parametrize("use_ddim", [False, True])
def test_full_sequence_equals_fdm_sampler(unet, use_ddim):
    """A full_sequence stage is exactly p_sample_loop / ddim_sample_loop on its frames, per video.

    The model is called per video: batched kernels differ from unbatched ones in the last bits.
    """
    diffusion = diffusion_with(respacing="5")
    videos = random_videos(2, 8)
    obs_lists, latent_lists = [[0, 1, 2], [3, 0, 1]], [[4, 5], [6, 7]]
    seeds = [11, 12]
    out = videos.clone()
    settings = StageSettings(use_ddim=use_ddim)
    sample_stage(one_video_at_a_time(unet), diffusion, out, obs_lists, latent_lists, settings,
                 generators=[torch.Generator().manual_seed(s) for s in seeds])
    for b in range(2):
        idx = obs_lists[b] + latent_lists[b]
        n = len(obs_lists[b])
        mask = torch.zeros(1, len(idx), 1, 1, 1)
        mask[:, :n] = 1
        kwargs = {"x0": videos[b, idx][None], "frame_indices": torch.tensor([idx]), "obs_mask": mask,
                  "latent_mask": 1 - mask}
        loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
        expected = loop(unet, (1, len(idx), C, H, H), model_kwargs=kwargs,
                        generator=torch.Generator().manual_seed(seeds[b]))
        assert torch.equal(out[b, latent_lists[b]], expected[0, n:])
        assert torch.equal(out[b, obs_lists[b]], videos[b, obs_lists[b]])


# ---------- schedule mechanics


@pytest.mark.parametrize("schedule", ["pyramid", "autoregressive", "trapezoid", "full_sequence"])
@pytest.mark.parametrize("use_ddim", [False, True])
def test_schedule_mechanics(monkeypatch, schedule, use_ddim):
    diffusion = diffusion_with(respacing="4")
    S = 2 if use_ddim else 4  # DDIM may skip steps; DDPM needs one level per step
    h, u = 4, 1.0
    original = ns.noise_schedules[schedule]
    asked = []

    def spy_schedule(*args):
        asked.append(args)
        return original(*args)

    monkeypatch.setitem(ns.noise_schedules, schedule, spy_schedule)
    steps = []
    videos = random_videos(1, 6)
    out = videos.clone()
    settings = StageSettings(scheduling_matrix=schedule, uncertainty_scale=u, sampling_steps=S, use_ddim=use_ddim)
    sample_stage(Spy(), diffusion, out, [[0, 1]], [[2, 3, 4, 5]], settings, callback=steps.append)

    # The stage runs exactly the matrix that noise_schedules returns, row by row.
    assert asked == [(h, S, u)]
    rows = levels_to_timesteps(original(h, S, u), S, diffusion.num_timesteps)
    transitions = [(rows[m], rows[m + 1]) for m in range(len(rows) - 1) if not torch.equal(rows[m], rows[m + 1])]
    assert len(steps) == len(transitions)
    for step, (t_from, t_to) in zip(steps, transitions):
        assert torch.equal(step["t_from"][0, 2:], t_from) and torch.equal(step["t_to"][0, 2:], t_to)
        assert (step["t_from"][0, :2] == -1).all()
        moving = step["t_from"] != step["t_to"]
        # Frames whose level does not change are untouched, bit for bit.
        assert torch.equal(step["x"][~moving], step["previous"][~moving])
        assert not torch.equal(step["x"][moving], step["previous"][moving])
        if not use_ddim:
            assert ((step["t_from"] - step["t_to"])[moving] == 1).all()
    # Every frame finishes clean, and the stage writes the final state into the video.
    assert (steps[-1]["t_to"][0, 2:] == -1).all()
    assert torch.equal(out[0, 2:], steps[-1]["x"][0, 2:])
    assert torch.equal(out[0, :2], videos[0, :2])


def test_skipping_steps_without_ddim_is_a_user_error():
    spy = Spy()
    videos = random_videos(1, 4)
    with pytest.raises(UserError, match="only DDIM"):
        sample_stage(spy, diffusion_with(respacing="4"), videos, [[0]], [[1, 2]], StageSettings(sampling_steps=2))
    for bad in (StageSettings(sampling_steps=5), StageSettings(scheduling_matrix="nope"),
                StageSettings(scheduling_matrix="pyramid", uncertainty_scale=-1),
                StageSettings(stabilization_level=101)):
        with pytest.raises(UserError):
            sample_stage(spy, diffusion_with(respacing="4"), videos, [[0]], [[1, 2]], bad)
    assert spy.calls == []  # refused before any model call


# ---------- known frames


@pytest.mark.parametrize("stabilization, use_ddim", [("generated", False), ("df", False), ("df", True)])
def test_known_frames_are_never_modified(stabilization, use_ddim):
    """Given frames come out bit-identical; a generated frame never changes after its stage."""
    diffusion = diffusion_with(respacing="4")
    T, n_obs = 12, 2
    videos = random_videos(2, T)
    plan = sampling_schemes["hierarchy-2"](video_length=T, num_obs=n_obs, max_frames=6, step_size=3)
    settings = StageSettings(scheduling_matrix="pyramid", stabilization_level=5, stabilization=stabilization,
                             use_ddim=use_ddim, clip_noise=2.0 if stabilization == "df" else 0.0)
    last = {}

    def record(info):
        last[info["stage"]] = info["x"]

    out = sample_video(Spy(), diffusion, videos, n_obs, plan, settings, callback=record)
    assert torch.equal(out[:, :n_obs], videos[:, :n_obs])
    assert torch.isfinite(out).all()
    stages = plan_stages("hierarchy-2", T, n_obs, 6, 3)
    assert len(stages) == len(last) > 2
    for s, (obs, latent) in enumerate(stages):
        assert torch.equal(out[:, latent], last[s][:, len(obs):])


# ---------- stabilization


def test_stabilization_shows_generated_frames_noisy_at_level_k():
    diffusion = diffusion_with(respacing="", rescale=False)  # the spy then receives raw timesteps
    k = 5
    videos = random_videos(1, 6)
    spy = Spy()
    done_at_stage = []
    plan = FixedPlan([([0, 1], [2, 3]), ([1, 2, 3], [4, 5])])
    out = sample_video(spy, diffusion, videos, 2, plan, StageSettings(stabilization_level=k),
                       callback=lambda info: done_at_stage.append((info["stage"], info["x"].clone())))
    calls_0 = [c for c in spy.calls if c["frame_indices"][0, 0] == 0]
    calls_1 = [c for c in spy.calls if c["frame_indices"][0, 0] == 1]
    assert len(calls_0) == len(calls_1) == diffusion.num_timesteps
    for c in calls_0:  # given frames: clean, at the timestep being denoised
        assert torch.equal(c["t"][0, :2], c["t"][0, 2:])
        assert torch.equal(c["x0"][0, :2], videos[0, :2])
    stage_0_result = [x for s, x in done_at_stage if s == 0][-1][0, 2:]
    for c in calls_1:
        t = c["t"][0]
        assert t[0] == t[3] and t[3] >= 0  # given frame 1: the current timestep
        assert (t[1:3] == k - 1).all()  # generated frames 2, 3: timestep k - 1
        assert torch.equal(c["x0"][0, 0], videos[0, 1])
        # ... and shown noised to it, not clean.
        shown = c["x0"][0, 1:3]
        assert not torch.equal(shown, stage_0_result)
        assert (shown - stage_0_result * diffusion.sqrt_alphas_cumprod[k - 1]).abs().max() < 10 * np.sqrt(
            1 - diffusion.alphas_cumprod[k - 1])
    # Their stored pixels never change.
    assert torch.equal(out[0, 2:4], stage_0_result)
    assert torch.equal(out[0, :2], videos[0, :2])


def test_stabilization_marks_frames_finished_within_a_stage():
    """With a staggered schedule, frames that finish early in a stage are conditioned on, stabilized."""
    diffusion = diffusion_with(respacing="", rescale=False)
    spy = Spy()
    sample_stage(spy, diffusion, random_videos(1, 3), [[0]], [[1, 2]],
                 StageSettings(scheduling_matrix="autoregressive", stabilization_level=3))
    late = [c for c in spy.calls if c["obs_mask"][0, 1] == 1]  # frame 1 done, frame 2 still denoising
    assert len(late) == diffusion.num_timesteps
    assert all(c["t"][0, 1] == 2 and c["latent_mask"][0, 1] == 0 for c in late)


def test_stabilization_timestep_respaced():
    assert stabilization_timestep(diffusion_with(respacing=""), 5) == 4
    respaced = diffusion_with(respacing="4")
    assert respaced.timestep_map == [0, 33, 66, 99]
    assert [stabilization_timestep(respaced, k) for k in (1, 33, 34, 66, 100)] == [0, 0, 1, 1, 3]


# ---------- rollouts and reproducibility


class GaussianVideoDenoiser:
    """The exact eps prediction for videos whose pixels are independent stationary Gaussian AR(1) processes.

    Data: every pixel of frame f is N(0, s^2) and Corr(frame f, frame g) = rho^|f - g|. A slot shown
    at timestep t is taken as y = sqrt(abar_t) x + sqrt(1 - abar_t) e (the told timestep, as a trained
    network reads it), except frames below `n_clean` shown as observed, which are clean (the given
    frames under "generated" stabilization). The posterior mean of all slots' x given all shown
    values is Gaussian conditioning; eps follows from it.
    """

    def __init__(self, alphas_cumprod, s, rho, n_clean):
        self.abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.s, self.rho, self.n_clean = s, rho, n_clean

    def __call__(self, x, t, x0=None, frame_indices=None, obs_mask=None, latent_mask=None):
        shown = torch.where(obs_mask.bool(), x0, x).double()
        out = torch.zeros_like(shown)
        for b in range(x.shape[0]):
            f = frame_indices[b].double()
            cov = self.s ** 2 * self.rho ** (f[:, None] - f[None, :]).abs()
            abar = self.abar[t[b].long()].clone()
            clean = obs_mask[b].flatten().bool() & (frame_indices[b] < self.n_clean)
            abar[clean] = 1.0
            a = abar.sqrt()
            gain = (cov * a[None, :]) @ torch.linalg.inv(a[:, None] * cov * a[None, :] + torch.diag(1 - abar))
            x0_hat = torch.einsum("ij,jchw->ichw", gain, shown[b])
            noisy = ~clean
            out[b, noisy] = (shown[b, noisy] - a[noisy, None, None, None] * x0_hat[noisy]) / (
                1 - abar[noisy]).sqrt()[:, None, None, None]
        return out.float()


def ar1_video(T, s, rho, shape, generator):
    x = torch.empty(T, *shape)
    x[0] = s * torch.randn(shape, generator=generator)
    for f in range(1, T):
        x[f] = rho * x[f - 1] + s * np.sqrt(1 - rho ** 2) * torch.randn(shape, generator=generator)
    return x


@pytest.mark.parametrize("stabilization", ["generated", "df"])
def test_stabilized_rollout_ten_times_the_window_does_not_drift(stabilization):
    """A stabilized sliding-window rollout to 10x the window keeps the data's statistics to its end.

    The model is the exact denoiser of a known video distribution (Gaussian AR(1) frames), so the
    sampler, not the model, is under test: its late frames must look like its early ones and like
    the data (std s, mean 0, neighbour correlation rho, no memory of the given frames 30 frames
    back). Wrong stabilization noise or timesteps, or generated frames fed back wrongly, shift these.
    With DDPM over 100 steps the sampler under-disperses slightly (fixed variances; with the
    1000-step chain the late std is s within 1%), hence the one-sided band on the std.
    """
    s, rho, K = 0.5, 0.9, 4
    diffusion = create_diffusion(DiffusionConfig(diffusion_steps=100, rescale_timesteps=False), "")
    scheme = Scheme.from_preset("df-pyramid", T=10 * K, max_frames=K, stabilization=stabilization)
    T, n_obs = scheme.T, scheme.n_obs
    assert scheme.stage.stabilization_level == 15 and scheme.plan == "sliding-window"
    videos = ar1_video(T, s, rho, (C, H, H), torch.Generator().manual_seed(0))[None]
    model = GaussianVideoDenoiser(diffusion.alphas_cumprod, s, rho, n_obs if stabilization == "generated" else 0)
    widest = []
    out = sample_video(model, diffusion, videos, n_obs, scheme.make_plan(), scheme.stage,
                       generators=[video_generator(0, 0, 0)], callback=lambda info: widest.append(info["x"].shape[1]))
    assert max(widest) == K
    assert torch.equal(out[:, :n_obs], videos[:, :n_obs])
    frames = out[0].flatten(1).double()
    early, late = frames[n_obs + 2: n_obs + 12], frames[-10:]
    late_std, early_std = late.std(dim=1).mean().item(), early.std(dim=1).mean().item()
    assert abs(late_std / early_std - 1) < 0.04, (early_std, late_std)  # no drift along the rollout
    assert 0.85 * s < late_std < 1.02 * s, late_std
    assert abs(late.mean().item()) < 0.05

    def corr(a, b):
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    # Frames generated in the same stage (pairs n_obs + 2i, n_obs + 2i + 1) are neighbours of the AR(1).
    within = [corr(frames[f], frames[f + 1]) for f in range(T - 10, T, 2)]
    assert all(abs(c - rho) < 0.06 for c in within), within
    assert all(abs(corr(frames[f], frames[0])) < 0.15 for f in range(T - 10, T))  # rho^30 ~ 0.04


def test_video_generator_seed_is_the_first_two_words_of_numpys_seed_sequence():
    for key in [(0, 0, 0), (3, 1, 7), (2**31, 5, 123456)]:
        high, low = (int(w) for w in np.random.SeedSequence(list(key)).generate_state(2))
        assert video_generator(*key).initial_seed() == high * 2**32 + low


def test_stabilization_timestep_of_a_diffusion_without_respacing():
    """A diffusion object with no timestep_map (not respaced) keeps every step: level k is timestep k - 1."""
    import types

    plain = types.SimpleNamespace(num_timesteps=100)
    assert [stabilization_timestep(plain, k) for k in (1, 5, 100)] == [0, 4, 99]


def test_sample_video_checks_the_settings_against_the_diffusion():
    plan = sampling_schemes["autoreg"](video_length=6, num_obs=2, max_frames=4, step_size=2)
    with pytest.raises(UserError, match="stabilization_level must be between 0 .* and the 100 training"):
        sample_video(Spy(), diffusion_with(), random_videos(1, 6), 2, plan, StageSettings(stabilization_level=101))


def test_one_video_at_a_time_wraps_each_slot_once_and_passes_other_arguments_whole():
    made = []

    def wrap(model):
        made.append(model)
        return lambda x, t, **kwargs: model(x, t, **kwargs)

    def base(x, t, scale=None, shift=None):
        assert x.shape[0] == 1 and scale.shape[0] == 1 and shift == 0.5  # one video; a float passed as is
        return x * scale + t.view(-1, 1, 1, 1, 1) + shift

    call = one_video_at_a_time(base, wrap)
    x, t = torch.randn(3, 2, 1, 2, 2), torch.tensor([1.0, 2.0, 3.0])
    scale = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1, 1)
    for _ in range(2):
        out = call(x, t, scale=scale, shift=0.5)
    assert made == [base] * 3  # one wrapped callable per batch slot, reused by later calls
    assert torch.allclose(out, x * scale + t.view(3, 1, 1, 1, 1) + 0.5)


@pytest.mark.parametrize("u", [0.5, 2.0])
def test_the_stage_runs_the_rows_of_its_uncertainty_scale(u):
    """One model call per row change of the pyramid matrix with this uncertainty scale."""
    spy = Spy()
    settings = StageSettings(scheduling_matrix="pyramid", uncertainty_scale=u, sampling_steps=5, use_ddim=True)
    sample_stage(spy, diffusion_with(respacing=""), random_videos(1, 6), [[0, 1]], [[2, 3, 4, 5]], settings)
    rows = ns.noise_levels("pyramid", 4, 5, u)
    assert len(spy.calls) == len(rows) - 1 != len(ns.noise_levels("pyramid", 4, 5, 1.0)) - 1


def test_video_generator_depends_on_seed_sample_and_video_only():
    draw = [torch.randn(4, generator=video_generator(*key)) for key in [(0, 0, 3), (0, 0, 3), (1, 0, 3),
                                                                         (0, 1, 3), (0, 0, 4)]]
    assert torch.equal(draw[0], draw[1])
    assert all(not torch.equal(draw[0], d) for d in draw[2:])


def test_batch_composition_does_not_change_a_video(unet):
    diffusion = diffusion_with(respacing="3")
    videos = random_videos(2, 6)

    def run(batch):
        plan = sampling_schemes["autoreg"](video_length=6, num_obs=2, max_frames=4, step_size=2)
        settings = StageSettings(scheduling_matrix="pyramid")
        return sample_video(one_video_at_a_time(unet), diffusion, videos[batch], 2, plan, settings,
                            generators=[video_generator(0, 0, i) for i in batch])

    together = run([0, 1])
    assert torch.equal(together[1], run([1])[0])


def test_scheme_sampling_equals_driving_the_stage_sampler_by_hand(unet):
    """sample_with_scheme (what sample_dataset and previews run) equals sample_stage called stage by stage."""
    diffusion = diffusion_with(respacing="3")
    scheme = Scheme.from_preset("hierarchy-2", T=8, max_frames=4, scheduling_matrix="pyramid", stabilization_level=5)
    videos = random_videos(2, 8)
    got = sample_with_scheme(unet, diffusion, scheme, videos, [video_generator(7, 0, i) for i in range(2)])

    expected = videos.clone()
    expected[:, scheme.n_obs:] = 0
    generated = torch.zeros(2, 8, dtype=torch.bool)
    generators = [video_generator(7, 0, i) for i in range(2)]
    for obs, latent in plan_stages("hierarchy-2", 8, scheme.n_obs, 4, scheme.step_size):
        sample_stage(unet, diffusion, expected, [obs] * 2, [latent] * 2, scheme.stage, generated, generators)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("n_given, seed", [(2, 3), (1, None)])
def test_preview_rollout_is_autoreg_with_ddim_from_the_given_frames(unet, n_given, seed):
    """Each stage fills the window: max_frames - n_given new frames; the default seed is 0."""
    diffusion = diffusion_with(respacing="3")
    given = random_videos(1, n_given)[0]
    options = {} if seed is None else {"seed": seed}
    preview = preview_rollout(unet, diffusion, given, T=8, max_frames=4, **options)
    videos = torch.zeros(1, 8, C, H, H)
    videos[0, :n_given] = given
    plan = sampling_schemes["autoreg"](video_length=8, num_obs=n_given, max_frames=4, step_size=4 - n_given)
    out = sample_video(unet, diffusion, videos, n_given, plan, StageSettings(use_ddim=True),
                       generators=[video_generator(seed or 0, 0, 0)])
    assert preview.dtype == torch.uint8 and preview.shape == (8, C, H, H)
    assert torch.equal(preview, ((out[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))


def test_a_schedule_the_noise_levels_refuse_is_a_user_error_with_their_message():
    settings = StageSettings(scheduling_matrix="full_sequence", uncertainty_scale=float("nan"))
    with pytest.raises(UserError, match=r"^uncertainty_scale must be a finite number >= 0, got nan\.$"):
        stage_levels(settings, 3, 100)
    levels, S = stage_levels(StageSettings(scheduling_matrix="full_sequence"), 3, 100)
    assert S == 100 and np.array_equal(levels, ns.noise_levels("full_sequence", 3, 100, 1.0))


# ---------- the stage loop and its update rules


class RecordingRule:
    """An update rule that records what the stage loop asks of it, in order; its update moves frames by -1."""

    def __init__(self, slots):
        self.slots, self.log = slots, []

    def context_noise(self, noise_like):
        self.log.append("context_noise")
        return "context"

    def model_inputs(self, x, t_state, active, noise):
        self.log.append(("model_inputs", noise, active.tolist()))
        return x + 100, t_state.clamp(min=0), {"shown": x + 100}

    def step_noise(self, noise_like):
        self.log.append("step_noise")
        return "step"

    def update(self, model, x, shown, t_model, t_next, moving, kwargs, noise):
        self.log.append(("update", noise, t_next.tolist()))
        assert torch.equal(shown, kwargs["shown"])
        return torch.where(self.slots.as_mask(moving), x - 1, x), shown


def test_the_stage_loop_asks_its_rule_row_by_row_and_skips_rows_where_nothing_moves():
    slots = StageSlots(torch.zeros(1, 3, 1, 1, 1), torch.tensor([[0, 1, 2]]), torch.tensor([[True, False, False]]),
                       torch.tensor([[-1, 0, 1]]), {})
    rule = RecordingRule(slots)
    timesteps = torch.tensor([[3, 3], [2, 3], [2, 3], [-1, 2], [-1, -1]])
    steps = []
    x = run_rows(None, None, rule, timesteps, torch.zeros(1, 3, 1, 1, 1), None, steps.append)
    assert [s["row"] for s in steps] == [0, 2, 3]  # row 1 -> 2 changes no level
    assert all(list(s) == ["row", "previous", "x", "t_from", "t_to", "t_model", "pred_xstart"] for s in steps)
    moving = [[False, True, False], [False, True, True], [False, False, True]]
    expected = []
    for row, m in zip([0, 2, 3], moving):
        t_next = torch.where(torch.tensor([m]), slots.at_row(timesteps[row + 1]),
                             slots.at_row(timesteps[row]).clamp(min=0))
        expected += ["context_noise", ("model_inputs", "context", [m]), "step_noise",
                     ("update", "step", t_next.tolist())]
    assert rule.log == expected
    assert x.flatten().tolist() == [0, -2, -2]
    assert torch.equal(steps[1]["t_from"], torch.tensor([[-1, 2, 3]]))
    assert torch.equal(steps[1]["pred_xstart"], steps[1]["previous"] + 100)


@pytest.mark.parametrize("use_ddim, eta", [(False, 0.0), (True, 0.0), (True, 0.5)])
@pytest.mark.parametrize("stabilization, k", [("generated", 0), ("generated", 5), ("df", 5)])
def test_each_row_draws_its_context_noise_then_its_step_noise(stabilization, k, use_ddim, eta):
    """A video's generator gives the stage's initial noise, then per row the context noise (ours: with
    stabilization; DF's: on its ancestral path, whose context is shown with fresh noise) and then the step
    noise (DDPM, or DDIM with eta > 0). Ours shows its generated observed frames noised with the row's
    context noise; every sample depends on this order."""
    diffusion = diffusion_with(respacing="", rescale=False)
    videos, spy = random_videos(1, 4), Spy()
    settings = StageSettings(stabilization=stabilization, stabilization_level=k, use_ddim=use_ddim, eta=eta,
                             sampling_steps=0 if not use_ddim else 4)
    generator = torch.Generator().manual_seed(3)
    generated = torch.tensor([[False, True, False, False]])
    sample_stage(spy, diffusion, videos.clone(), [[0, 1]], [[2, 3]], settings, generated, [generator])
    context = k > 0 if stabilization == "generated" else not use_ddim
    step = not use_ddim or eta > 0
    replay = torch.Generator().manual_seed(3)
    draws = [torch.randn(4, C, H, H, generator=replay) for _ in range(1 + len(spy.calls) * (context + step))]
    assert torch.equal(generator.get_state(), replay.get_state())
    if stabilization == "generated" and k:
        for n, call in enumerate(spy.calls):  # observed frame 1 is generated: shown noised with the row's draw
            t = torch.full((1, 4), k - 1)
            noisy = diffusion.q_sample(videos[:, [0, 1, 2, 3]], t, draws[1 + n * (1 + step)][None])
            assert torch.equal(call["x0"][0, 1], noisy[0, 1]) and torch.equal(call["x0"][0, 0], videos[0, 0])
