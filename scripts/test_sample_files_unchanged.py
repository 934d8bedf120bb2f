"""Sample files pinned byte for byte: every preset, and the settings each update path reads.

A restructuring of the sampling code must not change what a user's samples are. Each case below
runs scripts/video_sample.py on tiny seeded random checkpoints (plain, conditional, energy, causal)
and compares the SHA-256 of every sample file with test_sample_files_unchanged.json, written by
the code the pin was taken from. A change that is meant to alter samples rewrites that file on
purpose (`python scripts/test_sample_files_unchanged.py --write`) and says why in its commit.
"""

import dataclasses
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS.parent))
sys.path.insert(0, str(SCRIPTS))

from conftest import load_script  # noqa: E402

from improved_diffusion import cli  # noqa: E402
from improved_diffusion.script_util import DiffusionConfig, ModelConfig, create_model  # noqa: E402

PINNED = SCRIPTS / "test_sample_files_unchanged.json"
T, K, SIZE, VIDEOS = 12, 6, 16, 2
PRESETS = ["autoreg", "long-range", "hierarchy-2", "hierarchy-3", "hierarchy-4", "hierarchy-5", "adaptive-autoreg",
           "adaptive-hierarchy-2", "adaptive-hierarchy-3", "optimal", "sliding-window", "df-pyramid",
           "stabilized-autoreg"]

# name -> (checkpoint kind, video_sample.py flags besides the common ones)
CASES = {
    **{name: ("plain", ["--sampling_scheme", name]) for name in PRESETS},
    "hierarchy-2_pyramid2": ("plain", ["--sampling_scheme", "hierarchy-2", "--noise_schedule", "pyramid",
                                       "--uncertainty_scale", "2"]),
    "autoreg_ddim3_eta0.5": ("plain", ["--sampling_steps", "3", "--use_ddim", "True", "--eta", "0.5"]),
    "autoreg_stab40": ("plain", ["--stabilization_level", "40"]),
    "autoreg_ddpm_clipnoise2": ("plain", ["--clip_noise", "2", "--clip_denoised", "False"]),
    "df-pyramid_generated": ("plain", ["--sampling_scheme", "df-pyramid", "--stabilization", "generated"]),
    "df-pyramid_ddim2": ("plain", ["--sampling_scheme", "df-pyramid", "--sampling_steps", "2", "--use_ddim", "True"]),
    "stabilized-autoreg_eta1_clipnoise3": ("plain", ["--sampling_scheme", "stabilized-autoreg", "--use_ddim", "True",
                                                     "--eta", "1", "--clip_noise", "3"]),
    "cond_dataset_actions": ("cond", []),
    "cond_cfg2": ("cond", ["--guidance_scale", "2"]),
    "cond_cfg2_df-pyramid": ("cond", ["--sampling_scheme", "df-pyramid", "--guidance_scale", "2"]),
    "energy_mcmc2": ("energy", ["--mcmc_steps", "2", "--mcmc_step_size", "0.02"]),
    "energy_langevin2_df": ("energy", ["--sampling_scheme", "df-pyramid", "--mcmc_steps", "2", "--mcmc_noise",
                                       "True"]),
    "causal_kv_cache": ("causal", ["--sampling_scheme", "sliding-window", "--batch_invariant", "True"]),
    "causal_no_cache": ("causal", ["--sampling_scheme", "sliding-window", "--kv_cache", "False"]),
}


def random_model(model_cfg, seed=0):
    """The network of `model_cfg` with seeded weights: N(0, 0.05²) added everywhere, so no output is trivially zero."""
    torch.manual_seed(seed)
    model = create_model(model_cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def save_checkpoint(folder, kind):
    """A tiny checkpoint of `kind` saved as training saves an EMA checkpoint (100 diffusion steps)."""
    base = dict(image_size=SIZE, num_channels=32, channel_mult="1,2", attention_resolutions="8")
    model_cfg, dataset = {
        "plain": (ModelConfig(**base), "bouncing_balls"),
        "cond": (ModelConfig(**base, cond_dim=5, cond_drop_prob=0.1), "bouncing_balls_actions"),
        "energy": (ModelConfig(**base, num_heads=2, num_res_blocks=1, energy=True), "bouncing_balls"),
        "causal": (ModelConfig(**base, causal=True), "bouncing_balls"),
    }[kind]
    config = {**dataclasses.asdict(model_cfg), **dataclasses.asdict(DiffusionConfig(diffusion_steps=100)),
              "dataset": dataset, "T": T, "max_frames": K, "wandb_id": kind}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ema_0.9999_000000.pt"
    torch.save({"config": config, "state_dict": random_model(model_cfg).state_dict(), "step": 0}, path)
    return path


def sample_hashes(folder, case):
    """{sample file name: SHA-256} of `case` sampled into folder/<case>."""
    kind, argv = CASES[case]
    checkpoint = folder / "checkpoints" / kind / "ema_0.9999_000000.pt"
    if not checkpoint.exists():
        save_checkpoint(checkpoint.parent, kind)
    extra = []
    if "optimal" in argv:
        schedule = folder / "optimal.json"  # observe the two newest frames at every stage
        schedule.write_text(json.dumps({str(s): [3 * s + 1, 3 * s + 2] for s in range(3)}))
        extra = ["--optimality", str(schedule)]
    out = folder / case
    script = load_script("video_sample")
    code = cli.run(script.main, script.create_argparser(),
                   [str(checkpoint), "--n_obs", "-1", "--timestep_respacing", "4", "--stop_index", str(VIDEOS),
                    "--batch_size", str(VIDEOS), "--eval_dir", str(out), *argv, *extra])
    assert code == 0, f"video_sample.py failed on case {case}"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "samples").glob("*.npy"))}


@pytest.mark.parametrize("case", list(CASES))
def test_sample_files_are_the_pinned_bytes(tmp_path_factory, case):
    pinned = json.loads(PINNED.read_text())
    folder = tmp_path_factory.getbasetemp() / "pinned_samples"
    folder.mkdir(exist_ok=True)
    hashes = sample_hashes(folder, case)
    assert len(hashes) == VIDEOS
    assert hashes == pinned[case], f"the samples of {case} are not the pinned bytes"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python scripts/test_sample_files_unchanged.py --write  (re-pins every case's hashes)")
    with tempfile.TemporaryDirectory() as tmp:
        hashes = {case: sample_hashes(Path(tmp), case) for case in CASES}
    PINNED.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    print(f"wrote {PINNED}")
