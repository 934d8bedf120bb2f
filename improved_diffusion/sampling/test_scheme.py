"""Tests for the Scheme: presets and overrides, validation before any model, folder names, JSON round trips."""

import json

import pytest

from improved_diffusion.diffusion import DiffusionConfig
from improved_diffusion.errors import ConfigError, PlanError, ScheduleError, UserError
from improved_diffusion.sampling.plans import plan_stages, sampling_schemes
from improved_diffusion.sampling.scheme import PRESETS, Scheme, StageSettings


@pytest.fixture(scope="module")
def schedule_file(tmp_path_factory):
    """An optimal schedule observing the two newest frames in every stage (T=40, n_obs=10, step 10)."""
    path = tmp_path_factory.mktemp("optimal") / "schedule.json"
    path.write_text(json.dumps({str(s): [10 * s + 8, 10 * s + 9] for s in range(3)}))
    return str(path)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_round_trips_through_json(name, schedule_file):
    def build(name, **overrides):
        if name == "optimal":
            overrides["optimality"] = schedule_file
        return Scheme.from_preset(name, T=40, max_frames=20, **overrides)

    scheme = build(name, scheduling_matrix="trapezoid", uncertainty_scale=0.5, sampling_steps=3, use_ddim=True,
                   eta=0.25, timestep_respacing="10")
    again = Scheme.from_json(scheme.to_json())
    assert again == scheme and again.stages() == scheme.stages() and again.folder_name() == scheme.folder_name()
    assert isinstance(again.stage, StageSettings)
    plain = build(name)
    assert Scheme.from_dict(json.loads(json.dumps(plain.to_dict()))) == plain


def test_optimal_round_trips_with_its_file(tmp_path):
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps({"0": [0, 1], "1": [2, 3]}))
    scheme = Scheme.from_preset("optimal", T=8, max_frames=4, n_obs=2, optimality=path)
    assert Scheme.from_json(scheme.to_json()) == scheme
    assert scheme.stages() == [([0, 1], [2, 3]), ([2, 3], [4, 5]), ([], [6, 7])]


def test_df_presets_use_dfs_sampler_and_ours_is_one_flag_away():
    for name in ("df-pyramid", "stabilized-autoreg"):
        stage = Scheme.from_preset(name, T=40, max_frames=16).stage
        assert (stage.stabilization, stage.clip_denoised, stage.stabilization_level) == ("df", False, 15)
        ours = Scheme.from_preset(name, T=40, max_frames=16, stabilization="generated").stage
        assert ours.stabilization == "generated"
    assert Scheme.from_preset("hierarchy-2", T=40, max_frames=16).stage.stabilization == "generated"
    scheme = Scheme.from_preset("hierarchy-2", T=40, max_frames=16, stabilization="df", stabilization_level=3,
                                clip_noise=6.0, clip_denoised=False)
    assert Scheme.from_json(scheme.to_json()) == scheme
    assert json.loads(scheme.to_json())["stabilization"] == "df"


def test_presets_resolve_to_plan_and_settings():
    assert set(sampling_schemes) < set(PRESETS)
    h = Scheme.from_preset("hierarchy-2", T=40, max_frames=20)
    assert (h.plan, h.step_size, h.n_obs, h.stage) == ("hierarchy-2", 10, 10, StageSettings())
    df = Scheme.from_preset("df-pyramid", T=40, max_frames=16)
    assert (df.plan, df.stage.scheduling_matrix, df.step_size, df.stage.stabilization_level) == (
        "sliding-window", "pyramid", 8, 15)
    sa = Scheme.from_preset("stabilized-autoreg", T=40, max_frames=16, max_latent_frames=5)
    assert (sa.plan, sa.stage.scheduling_matrix, sa.step_size, sa.n_obs) == ("sliding-window", "full_sequence", 1, 15)
    chunked = Scheme.from_preset("autoreg", T=40, max_frames=16, chunk_size=3)
    assert (chunked.plan, chunked.step_size) == ("sliding-window", 3)
    assert Scheme.from_preset("autoreg", T=40, max_frames=16, scheduling_matrix="pyramid").stage.scheduling_matrix == "pyramid"


def test_adaptive_scheme_is_checked_and_drawn_through_its_counterpart():
    scheme = Scheme.from_preset("adaptive-hierarchy-2", T=20, max_frames=6)
    assert scheme.adaptive and scheme.stages() == plan_stages("hierarchy-2", 20, 3, 6, 3)
    with pytest.raises(PlanError, match="hierarchy-2 generates the same frames"):
        scheme.describe()
    with pytest.raises(PlanError, match="no frame to generate"):  # fails where hierarchy-5 would
        Scheme.from_preset("hierarchy-5", T=37, max_frames=20, n_obs=0, max_latent_frames=5)


def test_folder_names():
    assert Scheme.from_preset("hierarchy-2", T=12, max_frames=6).folder_name() == "hierarchy-2_K6_S3_obs3_T12"
    df = Scheme.from_preset("df-pyramid", T=64, max_frames=16, sampling_steps=5, use_ddim=True, eta=0.5,
                            timestep_respacing="ddim10")
    assert df.folder_name() == "df-pyramid_K16_S8_obs8_T64_pyramid1_dfstab15_steps5_ddim0.5_noclip_ddim10"
    ours = Scheme.from_preset("df-pyramid", T=64, max_frames=16, stabilization="generated", clip_denoised=True,
                              clip_noise=6)
    assert ours.folder_name() == "df-pyramid_K16_S8_obs8_T64_pyramid1_stab15_clipnoise6"
    assert Scheme.from_preset("hierarchy-2", T=12, max_frames=6, stabilization="df", stabilization_level=3,
                              clip_denoised=False).folder_name() == "hierarchy-2_K6_S3_obs3_T12_dfstab3_noclip"
    assert Scheme.from_preset("autoreg", T=12, max_frames=6, use_ddim=True).folder_name().endswith("_T12_ddim")


@pytest.mark.parametrize("overrides, error, message", [
    (dict(name="hierarchy-2", chunk_size=2), PlanError, "chunk_size applies"),
    (dict(chunk_size=8), PlanError, r"chunk_size \(8\) must be smaller than max_frames"),
    (dict(chunk_size=-1), PlanError, "chunk_size must be 0"),
    (dict(name="nope"), PlanError, "valid names"),
    (dict(n_obs=40), PlanError, "n_obs must be between"),
    (dict(uncertainty_scale=float("nan")), ConfigError, "uncertainty_scale"),
    (dict(eta=-0.1), ConfigError, "eta must be"),
    (dict(stabilization_level=-1), ConfigError, "stabilization_level"),
    (dict(sampling_steps=-2), ConfigError, "sampling_steps"),
    (dict(stabilization="sometimes"), ConfigError, "unknown stabilization 'sometimes'"),
    (dict(name="df-pyramid", stabilization_level=0), ConfigError, "needs stabilization_level >= 1"),
    (dict(clip_noise=-1.0), ConfigError, "clip_noise"),
    (dict(clip_noise=float("nan")), ConfigError, "clip_noise"),
    (dict(scheduling_matrix="nope"), ConfigError, "unknown scheduling_matrix 'nope'"),
    (dict(sampling_steps=5, diffusion_config=DiffusionConfig(diffusion_steps=100)), ConfigError, "only DDIM"),
    (dict(sampling_steps=11, use_ddim=True, timestep_respacing="10",
          diffusion_config=DiffusionConfig(diffusion_steps=100)), ConfigError, "between 1 and the diffusion's 10 "),
    (dict(stabilization_level=101, diffusion_config=DiffusionConfig(diffusion_steps=100)), ConfigError,
     "stabilization_level"),
    (dict(timestep_respacing="200", diffusion_config=DiffusionConfig(diffusion_steps=100)), ConfigError,
     "timestep_respacing"),
])
def test_impossible_schemes_are_one_sentence(overrides, error, message):
    name = overrides.pop("name", "autoreg")
    with pytest.raises(error, match=message) as info:
        Scheme.from_preset(name, T=40, max_frames=8, **overrides)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_describe_lists_stages_with_their_noise_levels():
    doc = Scheme.from_preset("autoreg", T=6, n_obs=2, max_frames=4, sampling_steps=2,
                             scheduling_matrix="pyramid").describe()
    assert [(s["obs"], s["latent"]) for s in doc["stages"]] == [([0, 1], [2, 3]), ([2, 3], [4, 5])]
    assert doc["stages"][0]["noise_levels"] == [[2, 2], [1, 2], [0, 1], [0, 0]]
    assert Scheme.from_dict(doc) == Scheme.from_preset("autoreg", T=6, n_obs=2, max_frames=4, sampling_steps=2,
                                                       scheduling_matrix="pyramid")
    with pytest.raises(ScheduleError, match="sampling_steps must be a positive"):
        Scheme.from_preset("autoreg", T=6, n_obs=2, max_frames=4).describe()


def test_from_dict_reads_old_sampling_configs_and_names_missing_entries():
    old = {"sampling_scheme": "df-pyramid", "plan": "sliding-window", "T": 12, "n_obs": 3, "max_frames": 6,
           "step_size": 3, "chunk_size": 3, "noise_schedule": "pyramid", "uncertainty_scale": 1.0,
           "stabilization_level": 15, "timestep_respacing": "4", "checkpoint": "x.pt",
           "settings": {"noise_schedule": "pyramid", "uncertainty_scale": 1.0, "sampling_steps": 0,
                        "stabilization_level": 15, "use_ddim": True, "eta": 0.0, "clip_denoised": True}}
    # Written before `stabilization` existed: sampled with our variant, and read back as it.
    assert Scheme.from_dict(old) == Scheme.from_preset("df-pyramid", T=12, max_frames=6, use_ddim=True,
                                                       timestep_respacing="4", stabilization="generated",
                                                       clip_denoised=True)
    with pytest.raises(ConfigError, match="no 'T' entry"):
        Scheme.from_dict({k: v for k, v in old.items() if k != "T"})
