"""Bad input to the sampling scripts: every case ends with exit code 2 and one line naming the flag or path.

A table of bad flags and paths is driven through video_sample.py, compare_schemes.py and
video_schedule.py in-process (`cli.run`, as the scripts' `__main__` does). Each case must exit with
code 2 before a model is loaded or anything is sampled, print exactly one line on stderr, name the
offending flag or path in it, and finish within a few seconds (a hang fails the test). One tiny
checkpoint serves the whole module.
"""

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_script, run_in_process

from improved_diffusion.evaluation import compare
from improved_diffusion.sampling import run as sampling_run
from improved_diffusion.script_util import DiffusionConfig, ModelConfig, create_model

SCRIPTS = Path(__file__).resolve().parent
T, K, STEPS = 12, 6, 100  # the checkpoint's video length, max_frames and diffusion steps
SECONDS = 20  # far more than any case needs; a case that takes longer hangs


video_sample, compare_schemes, video_schedule = map(load_script, ["video_sample", "compare_schemes",
                                                                   "video_schedule"])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model checkpoint and an assortment of wrong files, by name."""
    d = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    model_cfg = ModelConfig(image_size=16, num_channels=32, channel_mult="1,2", attention_resolutions="8")
    model = create_model(model_cfg)
    config = {**dataclasses.asdict(model_cfg), **dataclasses.asdict(DiffusionConfig(diffusion_steps=STEPS)),
              "dataset": "bouncing_balls", "T": T, "max_frames": K}
    torch.save({"config": config, "state_dict": model.state_dict(), "step": 0}, d / "ema_0.9999_000000.pt")
    good = (d / "ema_0.9999_000000.pt").read_bytes()
    (d / "truncated.pt").write_bytes(good[: len(good) // 2])
    (d / "empty.pt").write_bytes(b"")
    (d / "noise.pt").write_bytes(os.urandom(4096))
    torch.save(torch.optim.SGD(model.parameters(), lr=0.1).state_dict(), d / "opt000000.pt")
    torch.save({"weights": torch.zeros(2)}, d / "no_config.pt")
    (d / "folder.pt").mkdir()
    (d / "unreadable.pt").write_bytes(good)
    os.chmod(d / "unreadable.pt", 0)
    (d / "a_file").write_text("not a folder")
    (d / "schedule.json").write_text("{not json")
    (d / "list.json").write_text("[1, 2]")
    (d / "df_config.json").write_text('{"diffusion": {"timesteps": 100, "architecture": {}}}')
    # Conditional checkpoints (the weights are never loaded: every case fails before) and actions files.
    for name, dataset, conditioning in (("cond.pt", "bouncing_balls_actions", dict(cond_dim=5)),
                                        ("cond_null.pt", "bouncing_balls_actions", dict(cond_dim=5, cond_drop_prob=0.1)),
                                        ("cond_no_actions.pt", "bouncing_balls", dict(cond_dim=5)),
                                        ("label.pt", "bouncing_balls", dict(num_classes=3, cond_drop_prob=0.1))):
        torch.save({"config": {**config, **conditioning, "dataset": dataset}, "state_dict": {}, "step": 0}, d / name)
    np.save(d / "good.npy", np.zeros(T, dtype=np.int64))
    np.save(d / "short.npy", np.zeros(T - 1, dtype=np.int64))
    np.save(d / "wide.npy", np.zeros((T, 3), dtype=np.float32))
    np.save(d / "big.npy", np.full(T, 5, dtype=np.int64))
    np.save(d / "nan.npy", np.full((T, 5), np.nan, dtype=np.float32))
    return d


@pytest.fixture(autouse=True)
def nothing_expensive(monkeypatch):
    """Loading a model or sampling inside a case is a failure: every check must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("reached the expensive part")

    monkeypatch.setattr(sampling_run, "load_checkpoint", refuse)
    monkeypatch.setattr(compare, "sample_schemes", refuse)


def run_case(capsys, script, argv):
    """(exit code, stderr) of `script` on argv, failing if it runs past SECONDS."""
    code, _, err = run_in_process(capsys, script.__name__, *argv, seconds=SECONDS)
    return code, err


FILE = "{dir}/"  # prefix of a file in the files fixture


def fill(argv, files):
    """argv with FILE prefixes pointing into the files fixture."""
    return [str(a).replace(FILE, f"{files}/") for a in argv]


def case_id(value):
    return " ".join(value) if isinstance(value, list) else ""


def check(capsys, script, argv, named, files):
    """One bad case: exit code 2 and one line on stderr that names `named` (FILE-prefixed paths filled in)."""
    argv, (named,) = fill(argv, files), fill([named], files)
    code, err = run_case(capsys, script, argv)
    assert code == 2, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"{script.__name__}.py: error: ") and named in err, err


VIDEO_SAMPLE_FLAGS = [
    (["--T", "-4"], "--T"),  # once silently the checkpoint's T, sampling every test video at full length
    (["--T", "0"], "--T"),
    (["--T", "abc"], "--T"),
    (["--n_obs", "-3"], "--n_obs"),
    (["--n_obs", "12"], "n_obs"),
    (["--max_frames", "0"], "--max_frames"),
    (["--max_frames", "8"], "--max_frames 8"),
    (["--max_latent_frames", "0"], "--max_latent_frames"),
    (["--max_latent_frames", "6"], "max_latent_frames"),
    (["--chunk_size", "-2"], "chunk_size"),
    (["--chunk_size", "6"], "chunk_size"),
    (["--sampling_scheme", "hierarchy-2", "--chunk_size", "2"], "chunk_size"),
    (["--sampling_scheme", "nope"], "--sampling_scheme"),
    (["--scheduling_matrix", "nope"], "--scheduling_matrix"),
    (["--noise_schedule", "nope"], "--noise_schedule"),
    (["--uncertainty_scale", "-1"], "uncertainty_scale"),
    (["--uncertainty_scale", "nan"], "uncertainty_scale"),
    (["--stabilization_level", "-1"], "stabilization_level"),
    (["--stabilization_level", str(STEPS + 1)], "stabilization_level"),
    (["--sampling_steps", "-1"], "sampling_steps"),
    (["--sampling_steps", "10"], "sampling_steps"),  # skips steps without DDIM
    (["--sampling_steps", str(STEPS + 1), "--use_ddim", "True"], "sampling_steps"),
    (["--timestep_respacing", str(STEPS + 1)], "timestep_respacing"),
    (["--timestep_respacing", "abc"], "timestep_respacing"),
    (["--use_ddim", "maybe"], "--use_ddim"),
    (["--clip_denoised", "perhaps"], "--clip_denoised"),
    (["--eta", "-0.5"], "eta"),
    (["--eta", "inf"], "eta"),
    (["--stabilization", "sometimes"], "--stabilization"),
    (["--stabilization", "df"], "stabilization_level"),  # df needs a level >= 1
    (["--sampling_scheme", "df-pyramid", "--stabilization_level", "0"], "stabilization_level"),
    (["--clip_noise", "-1"], "clip_noise"),
    (["--clip_noise", "nan"], "clip_noise"),
    (["--df_config", FILE + "missing.json"], "missing.json"),
    (["--df_config", FILE + "schedule.json"], "schedule.json"),  # not JSON
    (["--df_config", FILE + "list.json"], "list.json"),  # JSON, but not DF's config
    (["--df_config", FILE + "df_config.json"], "resolution"),  # DF's config without the image size
    (["--batch_size", "0"], "--batch_size"),
    (["--batch_invariant", "sometimes"], "--batch_invariant"),
    (["--precision", "fp8"], "--precision"),  # checked before the model is loaded
    (["--precision", "FP32"], "--precision"),
    (["--compile", "maybe"], "--compile"),
    (["--kv_cache", "often"], "--kv_cache"),
    (["--start_index", "-1"], "--start_index"),
    (["--start_index", "100"], "--start_index"),  # the dataset has 100 test videos
    (["--start_index", "3", "--stop_index", "2"], "--stop_index"),
    (["--stop_index", "-5"], "--stop_index"),
    (["--sample_idx", "-1"], "--sample_idx"),
    (["--seed", "-1"], "--seed"),
    (["--dataset", "no_such_dataset"], "no_such_dataset"),
    (["--device", "toaster"], "--device"),
    (["--eval_dir", FILE + "a_file"], "a_file"),
    (["--sampling_scheme", "optimal"], "--optimality"),
    (["--optimality", FILE + "missing.pt"], "missing.pt"),
    (["--optimality", FILE + "folder.pt"], "folder.pt"),
    (["--optimality", FILE + "schedule.json"], "schedule.json"),
    (["--sampling_scheme", "adaptive-autoreg", "--optimality", FILE + "noise.pt"], "adaptive-autoreg"),
    (["--just_visualise", "--sampling_scheme", "adaptive-autoreg"], "adaptive-autoreg"),
    # Conditions given to this unconditional checkpoint (conditional ones: CONDITIONAL_CASES).
    (["--guidance_scale", "3"], "--guidance_scale 3"),
    (["--guidance_scale", "-1"], "guidance_scale"),
    (["--guidance_scale", "nan"], "guidance_scale"),
    (["--actions", FILE + "good.npy"], "--actions"),
    (["--label", "1"], "--label 1"),
    (["--uncond", "maybe"], "--uncond"),
    (["--uncond", "True"], "unconditional already"),
    # MCMC refinement: bad values, and any refinement of this checkpoint, trained without --energy True.
    (["--mcmc_steps", "2"], "--mcmc_steps 2"),
    (["--mcmc_steps", "-1"], "mcmc_steps"),
    (["--mcmc_step_size", "0"], "mcmc_step_size"),
    (["--mcmc_step_size", "nan"], "mcmc_step_size"),
    (["--mcmc_noise", "maybe"], "--mcmc_noise"),
    (["--mcmc_clamp", "tight"], "--mcmc_clamp"),
]
if not torch.cuda.is_available():
    VIDEO_SAMPLE_FLAGS.append((["--device", "cuda"], "--device"))

# (checkpoint, flags, text of the one line): conditional checkpoints given the wrong conditions.
CONDITIONAL_CASES = [
    ("cond.pt", ["--guidance_scale", "3"], "--guidance_scale 3"),  # trained without --cond_drop_prob
    ("cond.pt", ["--uncond", "True"], "--uncond True"),
    ("cond_null.pt", ["--uncond", "True", "--guidance_scale", "2"], "--uncond True"),
    ("cond_null.pt", ["--uncond", "True", "--actions", FILE + "good.npy"], "--uncond True"),
    ("cond_no_actions.pt", [], "--actions"),  # its dataset has no actions
    ("cond.pt", ["--dataset", "bouncing_balls"], "--actions"),
    ("cond.pt", ["--actions", FILE + "short.npy"], "short.npy"),  # fewer actions than --T frames
    ("cond.pt", ["--actions", FILE + "wide.npy"], "wide.npy"),  # 3 values per frame, cond_dim 5
    ("cond.pt", ["--actions", FILE + "big.npy"], "big.npy"),  # action 5 of 5 (0..4)
    ("cond.pt", ["--actions", FILE + "nan.npy"], "nan.npy"),
    ("cond.pt", ["--actions", FILE + "missing.npy"], "missing.npy"),
    ("cond.pt", ["--actions", FILE + "a_file"], "a_file"),
    ("cond.pt", ["--label", "0"], "--label 0"),  # no labels in this model
    ("label.pt", [], "--label"),  # a label model needs a label (the datasets have none)
    ("label.pt", ["--label", "3"], "--label 3"),
    ("label.pt", ["--label", "-2"], "--label -2"),
    ("label.pt", ["--actions", FILE + "good.npy"], "--actions"),
]


@pytest.mark.parametrize("checkpoint, argv, named", CONDITIONAL_CASES,
                         ids=[f"{c} {' '.join(a)}" for c, a, _ in CONDITIONAL_CASES])
def test_conditional_checkpoints_refuse_wrong_conditions(capsys, files, checkpoint, argv, named):
    check(capsys, video_sample, [files / checkpoint, "--n_obs", "-1", *argv], named, files)


BAD_CHECKPOINTS = ["missing.pt", "empty.pt", "folder.pt", "truncated.pt", "noise.pt", "opt000000.pt",
                   "no_config.pt", "unreadable.pt"]


@pytest.mark.parametrize("argv, named", VIDEO_SAMPLE_FLAGS, ids=case_id)
def test_video_sample_flags(capsys, files, argv, named):
    # --n_obs -1 (max_frames - max_latent_frames): FDM's default 36 does not fit these short videos; argv may override.
    check(capsys, video_sample, [files / "ema_0.9999_000000.pt", "--n_obs", "-1", *argv], named, files)


@pytest.mark.parametrize("name", BAD_CHECKPOINTS)
def test_bad_checkpoints(capsys, files, name):
    if name == "unreadable.pt" and os.geteuid() == 0:
        pytest.skip("root reads files without read permission")
    for script, extra in ((video_sample, []), (compare_schemes, ["--out_dir", files / "out"])):
        check(capsys, script, [files / name, *extra], name, files)
    assert not (files / "out").exists()


@pytest.mark.parametrize("argv, named", [
    (["--n_videos", "0"], "--n_videos"),
    (["--n_videos", "101"], "--n_videos"),
    (["--batch_size", "0"], "--batch_size"),
    (["--batch_invariant", "sometimes"], "--batch_invariant"),
    (["--precision", "half"], "--precision"),
    (["--compile", "maybe"], "--compile"),
    (["--kv_cache", "often"], "--kv_cache"),
    (["--seed", "-1"], "--seed"),
    (["--schemes", ","], "--schemes"),
    (["--schemes", "autoreg,nope"], "nope"),
    (["--schemes", "autoreg,hierarchy-2", "--max_frames", "3", "--max_latent_frames", "2"], "hierarchy-2"),
    (["--schemes", "autoreg,autoreg:mcmc_steps=2"], "--energy True"),
    (["--schemes", "autoreg:mcmc_noise=maybe"], "mcmc_noise"),
    (["--T", "-4"], "--T"),
    (["--n_obs", "12"], "n_obs"),
    (["--max_frames", "8"], "--max_frames"),
    (["--max_latent_frames", "6"], "max_latent_frames"),
    (["--timestep_respacing", "abc"], "timestep_respacing"),
    (["--use_ddim", "maybe"], "--use_ddim"),
    (["--df_config", FILE + "missing.json"], "missing.json"),
    (["--metrics", "nope"], "--metrics"),
    (["--metrics", "fvd"], "--i3d_path"),
    (["--metrics", "fvd", "--i3d_path", FILE + "missing_i3d.pt"], "missing_i3d.pt"),
    (["--out_dir", FILE + "a_file"], "a_file"),
], ids=case_id)
def test_compare_schemes_flags(capsys, files, tmp_path, argv, named):
    if "--out_dir" not in argv:
        argv = [*argv, "--out_dir", tmp_path / "compare"]
    check(capsys, compare_schemes, [files / "ema_0.9999_000000.pt", *argv], named, files)
    assert not (tmp_path / "compare").exists()


SCHEDULE = ["--sampling_scheme", "autoreg", "--T", "10", "--n_obs", "2", "--max_frames", "4"]


@pytest.mark.parametrize("argv, named", [
    (["--T", "0"], "T"),
    (["--T", "-4"], "T"),
    (["--n_obs", "-1"], "n_obs"),
    (["--n_obs", "10"], "n_obs"),
    (["--max_frames", "0"], "max_frames"),
    (["--max_frames", "1"], "max_frames"),
    (["--max_latent_frames", "0"], "max_latent_frames"),
    (["--max_latent_frames", "4"], "max_latent_frames"),
    (["--sampling_steps", "0"], "sampling_steps"),
    (["--sampling_steps", "-2"], "sampling_steps"),
    (["--uncertainty_scale", "-1"], "uncertainty_scale"),
    (["--stabilization_level", "-1"], "stabilization_level"),
    (["--chunk_size", "-1"], "chunk_size"),
    (["--chunk_size", "4"], "chunk_size"),
    (["--sampling_scheme", "adaptive-autoreg"], "adaptive-autoreg"),
    (["--sampling_scheme", "optimal"], "--optimality"),
    (["--optimality", FILE + "missing.pt"], "missing.pt"),
    (["--optimality", FILE + "schedule.json"], "schedule.json"),
    (["--format", "gif"], "--format"),
    (["--format", "png"], "--out"),
    (["--out", FILE + "folder.pt"], "folder.pt"),
    (["--format", "png", "--out", FILE + "no/such/folder/plan.png"], "plan.png"),
], ids=case_id)
def test_video_schedule_flags(capsys, files, argv, named):
    check(capsys, video_schedule, [*SCHEDULE, *argv], named, files)


def test_the_table_covers_every_flag_of_video_sample():
    """A new flag of video_sample.py needs a bad-value case here (or a reason it has none)."""
    parser = video_sample.create_argparser()
    flags = {a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"}
    tested = {a for argv, _ in VIDEO_SAMPLE_FLAGS for a in argv if a.startswith("--")}
    no_bad_value = {"--just_visualise"}  # a switch: tested with an adaptive plan above
    assert flags - tested <= no_bad_value, sorted(flags - tested - no_bad_value)
