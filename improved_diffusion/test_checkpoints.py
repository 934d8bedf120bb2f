"""Reading checkpoint files: every bad file is one sentence naming it; DF's checkpoints and ours load."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from improved_diffusion.checkpoints import (
    df_to_config,
    load_checkpoint,
    read_checkpoint_file,
    read_df_checkpoint,
    read_df_config,
    read_model_checkpoint,
)
from improved_diffusion.cli import dataclass_from_dict
from improved_diffusion.diffusion import DiffusionConfig
from improved_diffusion.errors import CheckpointError, ConfigError
from improved_diffusion.models import ModelConfig, create_model


def one_sentence(text):
    return text.count(". ") == 0 and text.endswith(".") and "\n" not in text


def test_bad_files_each_get_one_sentence(tmp_path):
    good = tmp_path / "model000010.pt"
    torch.save({"config": {"image_size": 8}, "state_dict": {"w": torch.ones(3)}, "step": 10}, good)
    data = good.read_bytes()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "folder.pt").mkdir()
    cases = {"empty.pt": "is empty", "truncated.pt": "is corrupt or not a checkpoint",
             "folder.pt": "is a directory", "missing.pt": "does not exist"}
    for name, expected in cases.items():
        with pytest.raises(CheckpointError) as info:
            read_checkpoint_file(str(tmp_path / name))
        message = str(info.value)
        assert expected in message and name in message and one_sentence(message), message
    assert read_model_checkpoint(str(good))["step"] == 10


# ----------------------------------------------------------------------------- Diffusion Forcing checkpoints

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
needs_reference = pytest.mark.skipif(not (REFERENCE / "df_small32.ckpt").exists(), reason="../shared/reference absent")

EXPECTED_DF_CONFIG = dict(
    architecture="df_unet3d", image_size=32, causal=True, strict_causal=False, network_size=16, dim_mults="1,2,4",
    attn_resolutions="8,16,32", attn_heads=2, attn_dim_head=8, use_linear_attn=True, use_init_temporal_attn=True,
    time_emb_type="rotary", diffusion_steps=1000, noise_schedule="sigmoid", predict_v=True, predict_xstart=False,
    loss_weighting="fused_snr", snr_clip=5.0, cum_snr_decay=0.96, clip_noise=6.0, sampling_timesteps=10,
    ddim_sampling_eta=0.0, stabilization_level=15,
)

CALLS = []


def record_call(*args):
    """Stands for code a pickle could name: loading must never call it."""
    CALLS.append(args)
    return "ran"


class HyperParameters:
    """A class outside the allow-list, pickled by reference like OmegaConf's DictConfig."""

    def __init__(self):
        self.content = {"lr": 1e-4}

    def __reduce__(self):
        return (record_call, ("hyper-parameters",))


def df_outputs(model):
    ref = torch.load(REFERENCE / "df_small32_ref.pt", weights_only=True)
    with torch.no_grad():
        out = model(ref["x"].transpose(0, 1), ref["noise_levels"].T).transpose(0, 1)
    return (out - ref["out"]).abs().max()


@needs_reference
def test_df_checkpoint_loads_with_either_config_nesting_and_file_format(tmp_path):
    flat = json.loads((REFERENCE / "df_small32_config.json").read_text())
    nested = {"algorithm": {"causal": flat["causal"], "diffusion": flat["diffusion"]}}
    import yaml  # optional dependency (pyyaml), as in checkpoints.py: only YAML configurations need it

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(nested))
    for source in (REFERENCE / "df_small32_config.json", str(tmp_path / "config.yaml"), nested, flat):
        model, diffusion, config = load_checkpoint(REFERENCE / "df_small32.ckpt", df_config=source)
        assert {k: config[k] for k in EXPECTED_DF_CONFIG} == EXPECTED_DF_CONFIG, source
        assert config["step"] == 1234 and diffusion.num_timesteps == 1000
    assert df_outputs(model) < 1e-5


def test_df_config_interpolations_defaults_and_errors(tmp_path):
    hydra = {"dataset": {"resolution": 64},
             "algorithm": {"causal": False, "diffusion": {"use_fused_snr": False,
                                                         "architecture": {"resolution": "${dataset.resolution}"}}}}
    df = read_df_config(hydra)
    assert df["causal"] is False and df["diffusion"]["architecture"]["resolution"] == 64
    config = df_to_config(df)  # every other entry: df_video.yaml's value
    assert (config["image_size"], config["network_size"], config["dim_mults"], config["attn_resolutions"],
            config["sampling_timesteps"], config["loss_weighting"], config["predict_v"]) == (
        64, 64, "1,2,4,8", "16,32,64,128", 100, "min_snr", True)
    dataclass_from_dict(ModelConfig, config).validate()
    (tmp_path / "broken.yaml").write_text("diffusion: [unclosed")
    unresolved = {"diffusion": {"architecture": {"resolution": "${dataset.resolution}"}}}
    cases = [({"causal": True}, "has no 'diffusion' block"), (str(tmp_path / "missing.json"), "does not exist"),
             (str(tmp_path / "broken.yaml"), "is not valid YAML"), (unresolved, "resolution must be"),
             ({"diffusion": {"objective": "pred_eps", "architecture": {"resolution": 32}}}, "objective must be")]
    for source, expected in cases:
        with pytest.raises(ConfigError) as info:
            df_to_config(read_df_config(source))
        message = str(info.value)
        assert expected in message and one_sentence(message), message


@needs_reference
def test_df_lightning_checkpoint_with_python_objects_loads_without_running_them(tmp_path):
    fixture = torch.load(REFERENCE / "df_small32.ckpt", weights_only=True)
    path = tmp_path / "lightning.ckpt"
    torch.save({**fixture, "hyper_parameters": {"cfg": HyperParameters(), "name": "df"}}, path)
    with pytest.raises(Exception):  # the reason a restricted reader is needed
        torch.load(path, weights_only=True)
    data = read_df_checkpoint(str(path))
    assert CALLS == [] and data["hyper_parameters"]["name"] == "df"
    assert type(data["hyper_parameters"]["cfg"]).__name__.endswith("record_call")
    model, _, config = load_checkpoint(str(path), df_config=REFERENCE / "df_small32_config.json")
    assert CALLS == [] and df_outputs(model) < 1e-5

    # Weights that only code could build cannot be read this way: one sentence, nothing run.
    bad = tmp_path / "bad.ckpt"
    weights = dict(fixture["state_dict"])
    weights["diffusion_model.model.module.init_conv.bias"] = HyperParameters()
    torch.save({"state_dict": weights}, bad)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(bad), df_config=REFERENCE / "df_small32_config.json")
    message = str(info.value)
    assert "cannot be read without running code" in message and one_sentence(message) and CALLS == [], message
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError) as info:
        read_df_checkpoint(str(tmp_path / "junk.ckpt"))
    assert one_sentence(str(info.value)), str(info.value)
    torch.load(path, weights_only=False)  # an unrestricted load does run what the file names
    assert CALLS == [("hyper-parameters",)]
    CALLS.clear()


def test_df_unet3d_checkpoint_round_trip(tmp_path):
    model_cfg = ModelConfig(architecture="df_unet3d", image_size=16, network_size=8, dim_mults="1,2",
                            attn_resolutions="16,8", attn_heads=2, attn_dim_head=4, causal=True, strict_causal=True)
    diffusion_cfg = DiffusionConfig(noise_schedule="sigmoid", predict_v=True)
    model = create_model(model_cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model.eval()
    config = {**dataclasses.asdict(model_cfg), **dataclasses.asdict(diffusion_cfg)}
    torch.save({"config": config, "state_dict": model.state_dict(), "step": 7}, tmp_path / "model000007.pt")
    loaded, diffusion, loaded_config = load_checkpoint(str(tmp_path / "model000007.pt"))
    assert loaded_config["architecture"] == "df_unet3d" and loaded_config["step"] == 7
    assert loaded.config.strict_causal and loaded.config.dim_mults == (1, 2)
    x = torch.randn(2, 3, 3, 16, 16, generator=g)
    t = torch.tensor([[0, 10, 500], [999, 3, 40]])
    fi = torch.tensor([[0, 4, 5], [1, 2, 9]])
    with torch.no_grad():
        assert torch.equal(model(x, t, frame_indices=fi), loaded(x, t, frame_indices=fi))


def test_a_lightning_checkpoint_without_df_config_says_what_to_pass(tmp_path):
    path = tmp_path / "epoch=3.ckpt"
    torch.save({"epoch": 3, "global_step": 10, "pytorch-lightning_version": "2.1.0",
                "state_dict": {"diffusion_model.model.module.w": torch.ones(2)}}, path)
    with pytest.raises(CheckpointError, match="--df_config"):
        read_model_checkpoint(str(path))
