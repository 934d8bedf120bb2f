"""Tests for scripts/video_sample.py on a tiny random checkpoint: every preset and some plan x schedule
combinations end to end, the saved scheme, files equal to the stage sampler's output, reproducibility
across batch splits (--batch_invariant True), --precision and --compile, --just_visualise, and one-line
errors (scripts/test_sampling_errors.py has the full table of bad flags and paths)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import load_script

from improved_diffusion import cli
from improved_diffusion.checkpoints import load_checkpoint
from improved_diffusion.data import datasets
from improved_diffusion.data.datasets import get_dataset
from improved_diffusion.sampling import run as sampling_run
from improved_diffusion.sampling.noise_schedules import noise_levels
from improved_diffusion.sampling.plans import plan_stages
from improved_diffusion.sampling.sampler import sample_with_scheme, video_generator
from improved_diffusion.sampling.scheme import PRESETS, Scheme
from improved_diffusion.script_util import DiffusionConfig, ModelConfig, create_model

SCRIPTS = Path(__file__).resolve().parent


video_sample = load_script("video_sample")
video_schedule = load_script("video_schedule")

T, K, SIZE = 12, 6, 16  # default plan: max_latent_frames K // 2 = 3, n_obs = 3


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """video_sample.main sets up a (single-process) process group; remove it again after these tests."""
    was_initialized = dist.is_initialized()
    env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    yield
    if dist.is_initialized() and not was_initialized:
        dist.destroy_process_group()
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model with random weights everywhere, saved as script_util.load_checkpoint reads it."""
    model_cfg = ModelConfig(image_size=SIZE, num_channels=32, channel_mult="1,2", attention_resolutions="8")
    return save_checkpoint(tmp_path_factory.mktemp("run"), model_cfg, fill_zero_weights(model_cfg))


def fill_zero_weights(model_cfg):
    """The model of `model_cfg` (seed 0), its all-zero parameters drawn from N(0, 0.05²): zero-initialised output
    layers would make every sample trivial."""
    torch.manual_seed(0)
    model = create_model(model_cfg)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model


def save_checkpoint(folder, model_cfg, model, dataset="bouncing_balls", **config):
    """`model` saved as training saves an EMA checkpoint (100 diffusion steps, T and K of these tests)."""
    config = {**dataclasses.asdict(model_cfg), **dataclasses.asdict(DiffusionConfig(diffusion_steps=100)),
              "dataset": dataset, "T": T, "max_frames": K, **config}
    path = folder / "ema_0.9999_000000.pt"
    torch.save({"config": config, "state_dict": model.state_dict(), "step": 0}, path)
    return str(path)


def run(capsys, *argv):
    # --n_obs -1 (max_frames - max_latent_frames) instead of FDM's default 36, which these short videos cannot take;
    # a later --n_obs in argv wins.
    argv = [argv[0], "--n_obs", -1, *argv[1:]] if argv else argv
    code = cli.run(video_sample.main, video_sample.create_argparser(), [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def sample_and_check(capsys, checkpoint, eval_dir, *argv, videos=1):
    """Run the script on the first `videos` test videos and check what it writes; returns the samples."""
    code, _, err = run(capsys, checkpoint, "--timestep_respacing", "4", "--stop_index", videos,
                       "--eval_dir", eval_dir, *argv)
    assert code == 0, err
    config = json.loads((Path(eval_dir) / "sampling_config.json").read_text())
    n_obs, length = config["n_obs"], config["T"]
    data = get_dataset("bouncing_balls", split="test", T=n_obs, image_size=SIZE)
    samples = []
    for i in range(videos):
        sample = np.load(Path(eval_dir) / "samples" / f"sample_{i:04d}-0.npy")
        assert sample.shape == (length, 3, SIZE, SIZE) and sample.dtype == np.uint8
        assert np.array_equal(sample[:n_obs], data.frames(i)[:n_obs].transpose(0, 3, 1, 2))
        assert sample[n_obs:].std() > 0
        samples.append(sample)
    return samples


# What each preset must run, written out independently of scheme.py: (plan, step size, noise schedule,
# stabilized) for T = 12, max_frames K = 6 (FDM plans: max_latent_frames K // 2 = 3).
PRESET_EXPECTATIONS = {
    **{name: (name, 3, "full_sequence", False) for name in
       ["autoreg", "long-range", "hierarchy-2", "hierarchy-3", "hierarchy-4", "hierarchy-5", "adaptive-autoreg",
        "adaptive-hierarchy-2", "adaptive-hierarchy-3", "optimal", "sliding-window"]},
    "df-pyramid": ("sliding-window", 3, "pyramid", True),  # K // 2 new frames, DF's pyramid, stabilization 15
    "stabilized-autoreg": ("sliding-window", 1, "full_sequence", True),  # one new frame per stage
}
COUNTERPARTS = {"adaptive-autoreg": "autoreg", "adaptive-hierarchy-2": "hierarchy-2",
                "adaptive-hierarchy-3": "hierarchy-3"}


@pytest.fixture
def model_calls(monkeypatch):
    """Records every model call of video_sample.py, as the sampler makes it (on the model prepare_model returns)."""
    calls = []
    real = sampling_run.prepare_model

    def spying(model, device, **wrapping):
        wrapped = real(model, device, **wrapping)

        def call(x, t, **kwargs):
            calls.append({"t": t.clone(), "frame_indices": kwargs["frame_indices"].clone(),
                          "obs": kwargs["obs_mask"].flatten(1).bool(), "latent": kwargs["latent_mask"].flatten(1).bool()})
            return wrapped(x, t, **kwargs)

        return call

    monkeypatch.setattr(sampling_run, "prepare_model", spying)
    return calls


def stages_seen(calls):
    """Group consecutive model calls into stages by the frames shown: [(obs, latent, calls)] of video 0."""
    stages = []
    for c in calls:
        frames = c["frame_indices"][0].tolist()
        if not stages or stages[-1][0] != frames:
            stages.append((frames, []))
        stages[-1][1].append(c)
    seen = []
    for frames, group in stages:
        first = group[0]  # no latent frame has finished yet, so the masks split obs from latent
        obs = [f for f, o in zip(frames, first["obs"][0].tolist()) if o]
        latent = [f for f, l in zip(frames, first["latent"][0].tolist()) if l]
        seen.append((obs, latent, group))
    return seen


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_runs(capsys, tmp_path, checkpoint, model_calls, name):
    """Every preset runs, saves its scheme, and samples with its own plan, noise schedule and stabilization."""
    extra = []
    schedule_file = None
    if name == "optimal":  # observe the two newest frames at every stage
        schedule = {str(s): [3 * s + 1, 3 * s + 2] for s in range(3)}
        schedule_file = tmp_path / "optimal.json"
        schedule_file.write_text(json.dumps(schedule))
        extra = ["--optimality", schedule_file]
    sample_and_check(capsys, checkpoint, tmp_path / "out", "--sampling_scheme", name, *extra)
    plan, step, scheduling_matrix, stabilized = PRESET_EXPECTATIONS[name]
    n_obs = K - step

    # The saved JSON names the preset's plan and schedule, and rebuilds the scheme that sampled.
    config = json.loads((tmp_path / "out" / "sampling_config.json").read_text())
    assert (config["plan"], config["step_size"], config["n_obs"], config["T"], config["max_frames"]) == (
        plan, step, n_obs, T, K)
    assert config["scheduling_matrix"] == scheduling_matrix and (config["stabilization_level"] > 0) == stabilized
    expected = Scheme.from_preset(name, T=T, max_frames=K, timestep_respacing="4",
                                  optimality=None if not extra else str(extra[1]))
    assert Scheme.from_dict(config) == expected

    # The model saw the plan's stages: observed then latent frames, as the plan lists them.
    seen = stages_seen(model_calls)
    planned = plan_stages(COUNTERPARTS.get(plan, plan), T, n_obs, K, step, schedule_file)
    assert [latent for _, latent, _ in seen] == [latent for _, latent in planned]
    for (obs, _, _), (planned_obs, _) in zip(seen, planned):
        assert obs == planned_obs if plan not in COUNTERPARTS else len(obs) == len(planned_obs)
    # ... and one model call per changing row of the schedule's matrix, over the diffusion's 4 steps.
    for obs, latent, group in seen:
        levels = noise_levels(scheduling_matrix, len(latent), 4)
        assert len(group) == sum(not np.array_equal(a, b) for a, b in zip(levels[:-1], levels[1:]))
        for c in group:
            t, is_obs, is_latent = c["t"][0], c["obs"][0], c["latent"][0]
            if scheduling_matrix == "pyramid" and c is group[1]:
                assert len(set(t[is_latent].tolist())) > 1  # staggered: the frames fall one after another
            if obs and stabilized:  # DF's stabilization: context at timestep 14, i.e. 0 of the 4 kept steps
                assert (t[is_obs] == 0).all()
            elif obs:  # FDM: observed frames are told the timestep being denoised
                assert (t[is_obs] == t[is_latent].max()).all()
        # The first call starts from pure noise: training step 99 of 100, scaled to 1000 steps.
        assert group[0]["t"][0][group[0]["latent"][0]].max() == 990


def test_a_stabilization_level_the_respacing_cannot_show_is_recorded_and_warned(capsys, tmp_path, checkpoint):
    """Respacing 100 steps to 4 keeps timesteps 0, 33, 66, 99: levels 15 and 30 both show stabilized frames at
    timestep 0 (identical samples, a warning, the timestep recorded); --sampling_steps on the whole chain shows
    them at the level asked for, and the two levels then differ."""
    samples = {}
    for level in (15, 30):
        code, _, err = run(capsys, checkpoint, "--sampling_scheme", "stabilized-autoreg", "--stabilization_level",
                           level, "--timestep_respacing", "4", "--stop_index", 1, "--eval_dir", tmp_path / f"r{level}")
        assert code == 0 and f"asks for timestep {level - 1}" in err and "shown at timestep 0;" in err, err
        assert json.loads((tmp_path / f"r{level}" / "sampling_config.json").read_text())["stabilization_timestep"] == 0
        samples[level] = np.load(tmp_path / f"r{level}" / "samples" / "sample_0000-0.npy")
    assert np.array_equal(samples[15], samples[30])
    for level in (15, 30):
        code, _, err = run(capsys, checkpoint, "--sampling_scheme", "stabilized-autoreg", "--stabilization_level",
                           level, "--sampling_steps", 4, "--use_ddim", "True", "--stop_index", 1,
                           "--eval_dir", tmp_path / f"s{level}")
        assert code == 0 and "warning" not in err, err
        config = json.loads((tmp_path / f"s{level}" / "sampling_config.json").read_text())
        assert config["stabilization_timestep"] == level - 1
        samples[level] = np.load(tmp_path / f"s{level}" / "samples" / "sample_0000-0.npy")
    assert not np.array_equal(samples[15], samples[30])
    code, _, _ = run(capsys, checkpoint, "--timestep_respacing", "4", "--stop_index", 1, "--eval_dir", tmp_path / "a")
    assert code == 0 and json.loads((tmp_path / "a" / "sampling_config.json").read_text())["stabilization_timestep"] is None


def test_files_equal_the_stage_sampler_output(capsys, tmp_path, checkpoint):
    """A sample file is the stage sampler's output for the same scheme and generator, as uint8.

    One video, so the default (batched) model calls are the plain model's calls on that video."""
    argv = ["--sampling_scheme", "long-range", "--scheduling_matrix", "pyramid", "--stabilization_level", "5",
            "--seed", "3", "--sample_idx", "1", "--start_index", "1"]
    code, _, err = run(capsys, checkpoint, "--timestep_respacing", "4", "--stop_index", 2, "--eval_dir",
                       tmp_path, *argv)
    assert code == 0, err
    scheme = Scheme.from_preset("long-range", T=T, max_frames=K, scheduling_matrix="pyramid", stabilization_level=5)
    model, diffusion, _ = load_checkpoint(checkpoint, "4")
    videos = torch.zeros(1, T, 3, SIZE, SIZE)
    videos[0, :scheme.n_obs] = get_dataset("bouncing_balls", split="test", T=scheme.n_obs, image_size=SIZE).video(1)
    out = sample_with_scheme(model, diffusion, scheme, videos, [video_generator(3, 1, 1)])
    expected = ((out[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(np.load(tmp_path / "samples" / "sample_0001-1.npy"), expected)


@pytest.mark.parametrize("argv", [
    ["--sampling_scheme", "hierarchy-2", "--scheduling_matrix", "pyramid"],
    ["--sampling_scheme", "long-range", "--scheduling_matrix", "trapezoid", "--uncertainty_scale", "2"],
    ["--sampling_scheme", "autoreg", "--scheduling_matrix", "autoregressive", "--stabilization_level", "10"],
    ["--sampling_scheme", "adaptive-hierarchy-2", "--scheduling_matrix", "pyramid", "--use_ddim", "True",
     "--sampling_steps", "2"],
    ["--sampling_scheme", "autoreg", "--chunk_size", "2", "--stabilization_level", "15", "--T", "60"],
], ids=["hierarchy2-pyramid", "long-range-trapezoid", "autoreg-autoregressive", "adaptive-ddim",
        "stabilized-10x-window"])
def test_plans_compose_with_schedules(capsys, tmp_path, checkpoint, argv):
    sample_and_check(capsys, checkpoint, tmp_path / "out", *argv)
    config = json.loads((tmp_path / "out" / "sampling_config.json").read_text())
    if "--scheduling_matrix" in argv:
        assert config["scheduling_matrix"] == argv[argv.index("--scheduling_matrix") + 1]
    if "--chunk_size" in argv:
        assert (config["plan"], config["step_size"]) == ("sliding-window", 2)


def test_samples_do_not_depend_on_batching_and_reruns_skip(capsys, tmp_path, checkpoint):
    """With --batch_invariant True, batch size 2, batch size 1, and another split of the indices give the same files."""
    argv = ["--sampling_scheme", "hierarchy-2", "--scheduling_matrix", "pyramid", "--stabilization_level", "5",
            "--batch_invariant", "True"]
    together = sample_and_check(capsys, checkpoint, tmp_path / "b2", *argv, "--batch_size", 2, videos=2)
    alone = sample_and_check(capsys, checkpoint, tmp_path / "b1", *argv, "--batch_size", 1, videos=2)
    assert all(np.array_equal(a, b) for a, b in zip(together, alone))
    assert not np.array_equal(together[0][3:], together[1][3:])
    code, _, _ = run(capsys, checkpoint, "--timestep_respacing", "4", "--start_index", 1, "--stop_index", 2,
                     "--eval_dir", tmp_path / "split", *argv)
    assert code == 0
    assert np.array_equal(np.load(tmp_path / "split" / "samples" / "sample_0001-0.npy"), together[1])

    # A second run leaves existing samples alone.
    path = tmp_path / "b2" / "samples" / "sample_0000-0.npy"
    np.save(path, np.zeros(1, dtype=np.uint8))
    code, _, err = run(capsys, checkpoint, "--timestep_respacing", "4", "--stop_index", 2, "--eval_dir",
                       tmp_path / "b2", *argv, "--batch_size", 2)
    assert code == 0 and "0 of 2 videos" in err
    assert np.load(path).shape == (1,)


def test_precision_and_compile_flags_reach_the_model(capsys, tmp_path, checkpoint, monkeypatch):
    """--precision bf16 --compile True: the network is compiled (a spy here: inductor takes minutes on a small CPU)
    and run in bf16; both are recorded in sampling_config.json, and the folder is not resumed at fp32."""
    compiled = []

    def spy_compile(model):
        compiled.append(model)
        return model

    monkeypatch.setattr(sampling_run, "compile_model", spy_compile)
    argv = ["--timestep_respacing", "2", "--stop_index", 1, "--eval_dir", tmp_path]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny network runs fastest on one thread, and does not stall on a busy machine
    try:
        code, _, err = run(capsys, checkpoint, *argv, "--precision", "bf16", "--compile", "True")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Module)
    config = json.loads((tmp_path / "sampling_config.json").read_text())
    assert (config["precision"], config["compiled"], config["batch_invariant"]) == ("bf16", True, False)
    assert Scheme.from_dict(config) == Scheme.from_preset("autoreg", T=T, max_frames=K, timestep_respacing="2")
    assert np.load(tmp_path / "samples" / "sample_0000-0.npy")[3:].std() > 0

    code, _, err = run(capsys, checkpoint, *argv, "--stop_index", 2)
    assert code == 2 and "made with --precision bf16, not fp32" in err, err


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sampling_run, "load_checkpoint", refuse)


def test_just_visualise_draws_the_same_png_as_video_schedule(capsys, tmp_path, checkpoint, no_model_loading):
    code, out, err = run(capsys, checkpoint, "--just_visualise", "--sampling_scheme", "hierarchy-2",
                         "--scheduling_matrix", "pyramid", "--eval_dir", tmp_path / "vis")
    assert code == 0, err
    assert out.strip() == str(tmp_path / "vis" / "plan.png")
    assert cli.run(video_schedule.main, video_schedule.create_argparser(),
                   ["--sampling_scheme", "hierarchy-2", "--T", str(T), "--n_obs", "3", "--max_frames", str(K),
                    "--format", "png", "--out", str(tmp_path / "ref.png")]) == 0
    assert (tmp_path / "vis" / "plan.png").read_bytes() == (tmp_path / "ref.png").read_bytes()


@pytest.mark.parametrize("argv, message", [
    (["--n_obs", "12"], "--n_obs 12 given frames leave none to generate"),
    (["--max_latent_frames", "6"], "must be smaller than max_frames"),
    (["--chunk_size", "6"], "must be smaller than max_frames"),
    (["--sampling_scheme", "hierarchy-2", "--max_frames", "3", "--max_latent_frames", "2"], "max_frames >= 4"),
    (["--sampling_scheme", "hierarchy-4", "--max_frames", "4", "--max_latent_frames", "2"], "cannot fit frames"),
    (["--sampling_scheme", "optimal", "--optimality", "no/such/file.pt"], "does not exist"),
    (["--sampling_scheme", "hierarchy-2", "--chunk_size", "2"], "chunk_size applies to"),
    (["--sampling_steps", "2", "--timestep_respacing", "4"], "only DDIM"),
    (["--sampling_steps", "8", "--timestep_respacing", "4"], "sampling_steps must be between"),
    (["--just_visualise", "--sampling_scheme", "adaptive-autoreg"], "cannot be drawn"),
    (["--sampling_scheme", "nope"], "df-pyramid"),  # argparse names the valid choices
    (["--scheduling_matrix", "nope"], "trapezoid"),
    (["--precision", "fp64"], "--precision must be one of fp32, bf16, fp16"),
])
def test_impossible_settings_fail_before_loading_the_model(capsys, checkpoint, no_model_loading, argv, message):
    try:
        code, _, err = run(capsys, checkpoint, *argv)
    except SystemExit as e:  # argparse
        code, err = e.code, capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_wrong_files_fail_in_one_line(capsys, tmp_path):
    torch.save(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1).state_dict(), tmp_path / "opt000010.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    for path, message in [(tmp_path / "missing.pt", "does not exist"), (tmp_path / "opt000010.pt", "optimizer state"),
                          (tmp_path / "notes.pt", "is corrupt or not a checkpoint")]:
        code, _, err = run(capsys, path)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_script_exits_2_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPTS / "video_sample.py"), str(tmp_path / "missing.pt")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"video_sample.py: error: Checkpoint '{tmp_path / 'missing.pt'}' does not exist.\n"


REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def test_a_df_checkpoint_samples_with_dfs_sampler_and_any_plan(capsys, tmp_path):
    """--df_config loads DF's checkpoint; unset sampler flags take DF's config, given ones win; FDM plans run."""
    if not (REFERENCE / "df_small32.ckpt").is_file():
        pytest.skip("../shared/reference is absent")
    ckpt, df_config = REFERENCE / "df_small32.ckpt", REFERENCE / "df_small32_config.json"
    # One stage of DF's 10 levels (11 network calls of ~0.4 s on a CPU core).
    code, _, err = run(capsys, ckpt, "--df_config", df_config, "--sampling_scheme", "df-pyramid", "--T", 4,
                       "--max_frames", 6, "--max_latent_frames", 2, "--n_obs", 2, "--stop_index", 1,
                       "--eval_dir", tmp_path / "df")
    assert code == 0, err
    config = json.loads((tmp_path / "df" / "sampling_config.json").read_text())
    assert config["df_config"] == str(df_config)
    assert {k: config[k] for k in ("stabilization", "stabilization_level", "sampling_steps", "use_ddim", "eta",
                                   "clip_noise", "clip_denoised")} == dict(
        stabilization="df", stabilization_level=15, sampling_steps=10, use_ddim=True, eta=0.0, clip_noise=6.0,
        clip_denoised=False)
    sample = np.load(tmp_path / "df" / "samples" / "sample_0000-0.npy")
    given = get_dataset("bouncing_balls", split="test", T=2, image_size=32).frames(0)[:2].transpose(0, 3, 1, 2)
    assert sample.shape == (4, 3, 32, 32) and np.array_equal(sample[:2], given) and sample[2:].std() > 0

    code, _, err = run(capsys, ckpt, "--df_config", df_config, "--sampling_scheme", "hierarchy-2", "--T", 6,
                       "--max_frames", 4, "--n_obs", 2, "--sampling_steps", 2, "--stop_index", 1,
                       "--eval_dir", tmp_path / "h2")
    assert code == 0, err
    config = json.loads((tmp_path / "h2" / "sampling_config.json").read_text())
    assert (config["plan"], config["stabilization"], config["sampling_steps"]) == ("hierarchy-2", "df", 2)
    assert np.load(tmp_path / "h2" / "samples" / "sample_0000-0.npy").shape == (6, 3, 32, 32)


@pytest.fixture(scope="module")
def conditional_checkpoint(tmp_path_factory):
    """A tiny random model conditioned on bouncing_balls_actions' 5 one-hot actions, with null conditions."""
    model_cfg = ModelConfig(image_size=SIZE, num_channels=32, channel_mult="1,2", attention_resolutions="8",
                            cond_dim=5, cond_drop_prob=0.1)
    torch.manual_seed(0)
    model = create_model(model_cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return save_checkpoint(tmp_path_factory.mktemp("cond_run"), model_cfg, model, "bouncing_balls_actions",
                           wandb_id="cond")


def test_a_conditional_checkpoint_samples_with_each_source_of_actions(capsys, tmp_path, conditional_checkpoint,
                                                                     monkeypatch):
    """The test videos' own actions by default, --actions for every video, --uncond; each source and guidance
    scale has its own folder and is recorded; a folder is never resumed with other conditions."""
    monkeypatch.chdir(tmp_path)
    seen = {}
    real = sampling_run.sample_with_scheme

    def spy(model, diffusion, scheme, videos, generators=None, progress=False, conditions=None):
        seen.setdefault(scheme.stage.guidance_scale, []).append(conditions)
        return real(model, diffusion, scheme, videos, generators, progress, conditions=conditions)

    monkeypatch.setattr(sampling_run, "sample_with_scheme", spy)
    other = datasets.test_actions("bouncing_balls_actions", 7, T=T, image_size=SIZE).numpy()
    np.save(tmp_path / "other.npy", other.argmax(axis=1))  # as integers: made one-hot again
    common = ["--timestep_respacing", "2", "--use_ddim", "True", "--stop_index", 2]
    folders = {}
    for key, argv in (("own", []), ("cfg", ["--guidance_scale", "3"]), ("file", ["--actions", tmp_path / "other.npy"]),
                      ("null", ["--uncond", "True"])):
        code, out, err = run(capsys, conditional_checkpoint, *common, *argv)
        assert code == 0, err
        folders[key] = Path(out.strip())
    assert len(set(folders.values())) == 4 and all(f.parent.name == "ema_0.9999_000000" for f in folders.values())
    assert folders["cfg"].name.endswith("_cfg3_2") and folders["file"].name.endswith("_actions-other")
    assert folders["null"].name.endswith("_uncond") and folders["own"].name == "autoreg_K6_S3_obs3_T12_ddim_2"
    configs = {k: json.loads((f / "sampling_config.json").read_text()) for k, f in folders.items()}
    assert [configs[k]["conditions"] for k in ("own", "cfg", "null")] == ["dataset actions", "dataset actions", "null"]
    assert configs["file"]["conditions"] == f"actions from {tmp_path / 'other.npy'}"
    assert (configs["cfg"]["guidance_scale"], configs["own"]["guidance_scale"]) == (3.0, 1.0)

    own, guided_own = seen[1.0][0], seen[3.0][0]
    for conditions in (own, guided_own):
        for b, i in enumerate([0, 1]):  # each video its own actions, over all T frames
            assert torch.equal(conditions.actions[b], datasets.test_actions("bouncing_balls_actions", i, T=T, image_size=SIZE))
    from_file = seen[1.0][1]
    assert all(torch.equal(a, torch.from_numpy(other)) for a in from_file.actions)
    assert seen[1.0][2].null
    samples = {k: np.load(f / "samples" / "sample_0000-0.npy") for k, f in folders.items()}
    assert not np.array_equal(samples["own"], samples["file"]) and not np.array_equal(samples["own"], samples["cfg"])

    code, _, err = run(capsys, conditional_checkpoint, *common, "--eval_dir", folders["own"], "--guidance_scale", "3")
    assert code == 2 and "--guidance_scale 1.0, not 3.0" in err
    code, _, err = run(capsys, conditional_checkpoint, *common, "--eval_dir", folders["own"], "--uncond", "True")
    assert code == 2 and "conditions 'dataset actions', not 'null'" in err


# ----------------------------------------------------------------------------- energy checkpoints and MCMC

@pytest.fixture(scope="module")
def energy_checkpoint(tmp_path_factory):
    """A tiny energy model (--energy True) with random weights, saved as training saves it."""
    model_cfg = ModelConfig(image_size=SIZE, num_channels=32, channel_mult="1,2", attention_resolutions="8",
                            num_heads=2, num_res_blocks=1, energy=True)
    return save_checkpoint(tmp_path_factory.mktemp("energy_run"), model_cfg, fill_zero_weights(model_cfg),
                           wandb_id="energy")


def test_an_energy_checkpoint_samples_with_mcmc_and_reports_acceptance(capsys, tmp_path, energy_checkpoint,
                                                                       monkeypatch):
    """Files equal the stage sampler's output on the loaded energy model; the counts are saved and printed."""
    monkeypatch.chdir(tmp_path)
    argv = ["--timestep_respacing", "4", "--use_ddim", "True", "--stop_index", 2, "--batch_size", 2,
            "--mcmc_steps", 2, "--mcmc_step_size", "0.02"]
    code, out, err = run(capsys, energy_checkpoint, *argv)
    assert code == 0, err
    eval_dir = Path(out.strip())
    assert eval_dir.name == "autoreg_K6_S3_obs3_T12_ddim_mcmc2x0.02_4"
    config = json.loads((eval_dir / "sampling_config.json").read_text())
    assert (config["mcmc_steps"], config["mcmc_step_size"], config["mcmc_noise"]) == (2, 0.02, False)
    summary = config["mcmc"]
    # 3 stages x 3 rows whose frames stay noisy (4 levels, the last row ends clean) x 3 frames x 2 steps, per video
    assert summary["proposed"] == 2 * 3 * 3 * 3 * 2 and summary["videos"] == 2
    assert summary["acceptance_rate"] == summary["accepted"] / summary["proposed"]
    assert f"MCMC acceptance rate {summary['acceptance_rate']:.3f}" in err
    per_video = json.loads((eval_dir / "mcmc" / "sample_0001-0.json").read_text())
    assert per_video["proposed"] == summary["proposed"] // 2

    model, diffusion, _ = load_checkpoint(energy_checkpoint, "4")
    scheme = Scheme.from_dict(config)
    videos = torch.zeros(2, T, 3, SIZE, SIZE)
    data = get_dataset("bouncing_balls", split="test", T=scheme.n_obs, image_size=SIZE)
    for i in range(2):
        videos[i, :scheme.n_obs] = data.video(i)
    out = sample_with_scheme(model, diffusion, scheme, videos, [video_generator(0, 0, i) for i in range(2)])
    expected = ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    for i in range(2):
        assert np.array_equal(np.load(eval_dir / "samples" / f"sample_{i:04d}-0.npy"), expected[i])

    # Without --mcmc_steps the energy model samples plainly, into its own folder, with no counts.
    code, out, err = run(capsys, energy_checkpoint, "--timestep_respacing", "4", "--use_ddim", "True",
                         "--stop_index", 1)
    assert code == 0, err
    plain_dir = Path(out.strip())
    assert plain_dir.name == "autoreg_K6_S3_obs3_T12_ddim_4" and "MCMC" not in err
    assert "mcmc" not in json.loads((plain_dir / "sampling_config.json").read_text())
    assert not np.array_equal(np.load(plain_dir / "samples" / "sample_0000-0.npy"), expected[0])


def test_mcmc_on_a_checkpoint_without_energy_is_refused(capsys, checkpoint, no_model_loading):
    code, _, err = run(capsys, checkpoint, "--mcmc_steps", 3)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert "--mcmc_steps 3" in err and "trained without --energy True" in err


def test_compare_schemes_counts_the_cost_of_mcmc(capsys, tmp_path, energy_checkpoint):
    """An energy checkpoint with and without MCMC in one comparison: NFE differs by the MCMC evaluations."""
    compare_script = load_script("compare_schemes")
    out_dir = tmp_path / "compare"
    code = cli.run(compare_script.main, compare_script.create_argparser(),
                   [energy_checkpoint, "--schemes", "autoreg,autoreg:mcmc_steps=2", "--n_videos", "1",
                    "--timestep_respacing", "4", "--use_ddim", "True", "--metrics", "psnr",
                    "--out_dir", str(out_dir)])
    capsys.readouterr()
    assert code == 0
    runs = json.loads((out_dir / "runs.json").read_text())
    mcmc = json.loads((out_dir / "autoreg_mcmc_steps=2" / "sampling_config.json").read_text())["mcmc"]
    assert runs["autoreg"]["nfe_per_video"] == 12  # 3 stages x 4 denoising calls
    assert runs["autoreg"]["gradient_evaluations_per_video"] == 12  # each call of an energy model is a gradient
    refined = runs["autoreg:mcmc_steps=2"]
    assert refined["nfe_per_video"] == 12 + mcmc["mcmc_nfe_per_video"] > 12
    assert refined["gradient_evaluations_per_video"] == 12 + mcmc["gradient_evaluations"]
    report = (out_dir / "report.md").read_text()
    assert "grad evals / video" in report and "MCMC acceptance" in report


def test_langevin_refinement_does_not_depend_on_batching(capsys, tmp_path, energy_checkpoint):
    """With --batch_invariant True each video's chain (its noise and its Metropolis uniforms) is its own."""
    argv = ["--timestep_respacing", "4", "--use_ddim", "True", "--stop_index", 2, "--batch_invariant", "True",
            "--mcmc_steps", 2, "--mcmc_noise", "True", "--mcmc_step_size", "0.05"]
    samples, rates = [], []
    for batch_size in (1, 2):
        eval_dir = tmp_path / f"batch{batch_size}"
        code, _, err = run(capsys, energy_checkpoint, *argv, "--batch_size", batch_size, "--eval_dir", eval_dir)
        assert code == 0, err
        samples.append([np.load(eval_dir / "samples" / f"sample_{i:04d}-0.npy") for i in range(2)])
        rates.append(json.loads((eval_dir / "sampling_config.json").read_text())["mcmc"]["acceptance_rate"])
    assert all(np.array_equal(a, b) for a, b in zip(*samples))
    assert rates[0] == rates[1] and 0 < rates[0] < 1
