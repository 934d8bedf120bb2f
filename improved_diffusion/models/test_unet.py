"""The video UNet: FDM compatibility, causality, relative positions, checkpoint loading."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from improved_diffusion.script_util import (
    CheckpointError,
    DiffusionConfig,
    ModelConfig,
    create_model,
    infer_channel_mult,
    load_checkpoint,
)
from .video_attention import TemporalAttention

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference"
needs_reference = pytest.mark.skipif(not (REFERENCE / "fdm_small32.pt").exists(), reason="../shared/reference absent")

TINY = dict(image_size=16, num_channels=32, channel_mult="1,2", attention_resolutions="8", num_heads=2)


def randomize(model, seed=0, std=0.05):
    """Non-zero weights everywhere (zero-initialised layers would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def video_inputs(B=2, T=5, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 3, size, size, generator=g)
    x0 = torch.rand(B, T, 3, size, size, generator=g) * 2 - 1
    obs = torch.zeros(B, T, 1, 1, 1)
    obs[:, :2] = 1
    return dict(x=x, timesteps=torch.tensor([30.0, 600.0])[:B], x0=x0,
                frame_indices=torch.tensor([[0, 2, 3, 7, 9], [4, 5, 6, 7, 20]])[:B, :T],
                obs_mask=obs, latent_mask=1 - obs)


def run(model, inputs):
    with torch.no_grad():
        return model(inputs["x"], inputs["timesteps"], x0=inputs["x0"], frame_indices=inputs["frame_indices"],
                     obs_mask=inputs["obs_mask"], latent_mask=inputs["latent_mask"])


# ----------------------------------------------------------------------------- FDM fixture

@needs_reference
def test_fdm_checkpoint_model_outputs_match_reference():
    ref = torch.load(REFERENCE / "fdm_small32_ref.pt", weights_only=True)
    model, _, config = load_checkpoint(REFERENCE / "fdm_small32.pt")
    assert config["channel_mult"] == "1,2,2,2"
    kw = dict(x0=ref["x0"], frame_indices=ref["frame_indices"], obs_mask=ref["obs_mask"])
    with torch.no_grad():
        out = model(ref["x"], ref["timesteps_scaled"], latent_mask=ref["latent_mask"], **kw)
        out_pad = model(ref["x"], ref["timesteps_scaled"], latent_mask=ref["latent_mask_pad"], **kw)
    assert (out - ref["model_out"]).abs().max() <= 1e-5
    assert (out_pad - ref["model_out_pad"]).abs().max() <= 1e-5


@needs_reference
def test_fdm_checkpoint_sampler_matches_reference():
    ref = torch.load(REFERENCE / "fdm_small32_ref.pt", weights_only=True)
    model, base, _ = load_checkpoint(REFERENCE / "fdm_small32.pt")
    _, ddim, _ = load_checkpoint(REFERENCE / "fdm_small32.pt", timestep_respacing="ddim10")
    kw = dict(x0=ref["x0"], frame_indices=ref["frame_indices"], obs_mask=ref["obs_mask"],
              latent_mask=ref["latent_mask"])
    assert torch.equal(torch.from_numpy(base.alphas_cumprod), ref["alphas_cumprod"])
    assert ddim.timestep_map == ref["ddim_timestep_map"].tolist()
    with torch.no_grad():
        pmv = base.p_mean_variance(model, ref["x"], ref["timesteps_raw"], clip_denoised=True, model_kwargs=kw)
    for key in ("mean", "variance", "log_variance", "pred_xstart"):
        assert (pmv[key] - ref[f"pmv_{key}"]).abs().max() <= 1e-5, key

    latent = ref["latent_mask"]
    trajectory = []
    sample = ddim.ddim_sample_loop(model, ref["x"].shape, noise=ref["ddim_noise"].clone(), model_kwargs=kw,
                                   eta=0.0, callback=lambda out: trajectory.append(out["sample"]))
    assert len(trajectory) == 10
    for ours, theirs in zip(trajectory, ref["ddim_trajectory"]):
        assert ((ours - theirs) * latent).abs().max() <= 1e-4
    assert ((sample - ref["ddim_sample"]) * latent).abs().max() <= 1e-4

    # Ancestral sampling consumes one full-shape randn per step, like FDM.
    torch.manual_seed(4)
    sample = ddim.p_sample_loop(model, ref["x"].shape, noise=ref["ddim_noise"].clone(), model_kwargs=kw)
    assert ((sample - ref["psample_sample"]) * latent).abs().max() <= 1e-4


# ----------------------------------------------------------------------------- temporal attention

def slow_temporal_attention(module, x, temb, frame_indices, attn_mask):
    """FDM's temporal attention written out with loops (FDM_MODEL.md, (f) and (g))."""
    B, T, C, H, W = x.shape
    heads, hd = module.num_heads, C // module.num_heads
    groups = module.norm.num_groups
    out = torch.zeros(B, T, C, H, W, dtype=torch.float64)
    x64 = x.double()

    def rpe(net, i_frame, j_frame, b):
        d = float(frame_indices[b, i_frame] - frame_indices[b, j_frame])
        feat = torch.tensor([math.log(1 + max(d, 0)), math.log(1 + max(-d, 0)), float(d == 0)], dtype=torch.float64)
        h = (net.embed_distances.weight.double() @ feat + net.embed_distances.bias.double()
             + net.embed_diffusion_time.weight.double() @ temb[b * T + i_frame].double()
             + net.embed_diffusion_time.bias.double())
        h = F.silu(h)
        return (net.out.weight.double() @ h + net.out.bias.double()).view(heads, hd)

    for b in range(B):
        for py in range(H):
            for px in range(W):
                v_in = x64[b, :, :, py, px]  # [T x C]
                normed = torch.empty_like(v_in)
                per = C // groups
                for g in range(groups):
                    block = v_in[:, g * per:(g + 1) * per]
                    mu, var = block.mean(), block.var(unbiased=False)
                    normed[:, g * per:(g + 1) * per] = (block - mu) / torch.sqrt(var + module.norm.eps)
                normed = normed * module.norm.weight.double() + module.norm.bias.double()
                qkv = normed @ module.qkv.weight.double().T + module.qkv.bias.double()
                q, k, v = (qkv[:, i * C:(i + 1) * C].view(T, heads, hd) for i in range(3))
                result = torch.zeros(T, C, dtype=torch.float64)
                for h in range(heads):
                    scale = hd ** -0.5
                    logits = torch.zeros(T, T, dtype=torch.float64)
                    for i in range(T):
                        for j in range(T):
                            value = scale * q[i, h] @ k[j, h]
                            value += scale * q[i, h] @ rpe(module.rpe_k.rpe_net, i, j, b)[h]
                            value += scale * k[j, h] @ rpe(module.rpe_q.rpe_net, j, i, b)[h]
                            if attn_mask is not None and attn_mask[b, i] != attn_mask[b, j]:
                                value = -math.inf
                            logits[i, j] = value
                    weights = torch.softmax(logits, dim=-1)
                    for i in range(T):
                        acc = torch.zeros(hd, dtype=torch.float64)
                        for j in range(T):
                            acc += weights[i, j] * (v[j, h] + rpe(module.rpe_v.rpe_net, i, j, b)[h])
                        result[i, h * hd:(h + 1) * hd] = acc
                proj = result @ module.proj_out.weight.double().T + module.proj_out.bias.double()
                out[b, :, :, py, px] = normed + proj
    return out


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
def test_temporal_attention_matches_slow_reference(heads):
    C, T = 32, 4
    module = randomize(TemporalAttention(C, heads, time_embed_dim=16), seed=heads, std=0.2)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, T, C, 2, 2, generator=g)
    temb = torch.randn(T, 16, generator=g)
    idx = torch.tensor([[0, 3, 4, 30]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    with torch.no_grad():
        fast = module(x, temb, idx, mask).double()
    slow = slow_temporal_attention(module, x, temb, idx, mask)
    assert (fast - slow).abs().max() < 1e-5


# ----------------------------------------------------------------------------- properties

def test_shifting_all_frame_indices_leaves_outputs_unchanged():
    for causal in (False, True):
        model = randomize(create_model(ModelConfig(causal=causal, **TINY)))
        inputs = video_inputs()
        shifted = dict(inputs, frame_indices=inputs["frame_indices"] + 5)
        assert (run(model, inputs) - run(model, shifted)).abs().max() < 1e-6


def test_frame_positions_matter():
    model = randomize(create_model(ModelConfig(**TINY)))
    inputs = video_inputs()
    moved = dict(inputs, frame_indices=inputs["frame_indices"] * 3)
    assert (run(model, inputs) - run(model, moved)).abs().max() > 1e-4


@pytest.mark.parametrize("causal", [True, False])
def test_causal_model_ignores_later_frames(causal):
    model = randomize(create_model(ModelConfig(causal=causal, **TINY)))
    inputs = video_inputs()
    # Perturb the frame with the largest index in each video (the last one here).
    perturbed = dict(inputs, x=inputs["x"].clone())
    perturbed["x"][:, -1] += 1.0
    diff = (run(model, inputs) - run(model, perturbed))[:, :-1].abs().max()
    if causal:
        assert diff == 0
    else:
        assert diff > 1e-4  # the same test catches a model that is not causal


def test_batch_and_per_frame_timesteps_agree():
    model = randomize(create_model(ModelConfig(**TINY)))
    inputs = video_inputs()
    per_frame = dict(inputs, timesteps=inputs["timesteps"][:, None].expand(2, 5))
    assert torch.equal(run(model, inputs), run(model, per_frame))
    different = dict(inputs, timesteps=torch.tensor([[30.0] * 4 + [500.0], [600.0] * 5]))
    assert (run(model, inputs) - run(model, different))[0].abs().max() > 1e-4


def test_observed_frames_use_x0_and_ignore_x():
    model = randomize(create_model(ModelConfig(**TINY)))
    inputs = video_inputs()
    changed = dict(inputs, x=inputs["x"].clone())
    changed["x"][:, :2] += 3  # observed frames: the model must read x0 there
    assert torch.equal(run(model, inputs), run(model, changed))


# ----------------------------------------------------------------------------- checkpoints

def fdm_style_config(**overrides):
    config = dict(image_size=64, num_channels=64, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
                  attention_resolutions="16,8", dropout=0.0, learn_sigma=False, sigma_small=False, class_cond=False,
                  diffusion_steps=1000, noise_schedule="linear", timestep_respacing="", use_kl=False,
                  predict_xstart=False, rescale_timesteps=True, rescale_learned_sigmas=True, use_checkpoint=False,
                  use_scale_shift_norm=True, use_rpe_net=True, dataset="minerl", max_frames=10, T=500)
    config.update(overrides)
    return config


@pytest.mark.parametrize("size,mult,extra", [
    (64, "1,2,3,4", dict(learn_sigma=True, noise_schedule="cosine", num_heads=2, num_res_blocks=1)),
    (128, "1,1,2,3,4", dict(num_channels=32, num_res_blocks=1, num_heads=8)),
    (128, "1,2,3,4,4", dict(num_channels=32, num_res_blocks=1, num_heads=1)),
])
def test_fdm_format_checkpoints_of_other_configs_load_exactly(tmp_path, size, mult, extra):
    config = fdm_style_config(image_size=size, **extra)
    model_cfg = ModelConfig(**{k: v for k, v in config.items() if k in ModelConfig.__dataclass_fields__},
                            channel_mult=mult)
    source = randomize(create_model(model_cfg, learn_sigma=config["learn_sigma"]), std=0.02)
    assert infer_channel_mult(source.state_dict(), config["num_channels"]) == mult
    path = tmp_path / "ema_0.9999_000100.pt"
    torch.save({"config": config, "state_dict": source.state_dict(), "step": 100}, path)  # no channel_mult key
    model, diffusion, loaded = load_checkpoint(path, timestep_respacing="ddim5")
    assert loaded["step"] == 100 and loaded["channel_mult"] == mult
    inputs = video_inputs(B=1, T=3, size=size)
    assert torch.equal(run(model, inputs), run(source, inputs))
    if config["learn_sigma"]:
        x = inputs["x"]
        kw = {k: inputs[k] for k in ("x0", "frame_indices", "obs_mask", "latent_mask")}
        out = diffusion.p_mean_variance(model, x, torch.tensor([3]), model_kwargs=kw)
        t_orig = diffusion.timestep_map[3]
        assert out["variance"].shape == x.shape
        assert torch.isfinite(out["mean"]).all()
        assert diffusion.ddim_sample_loop(model, x.shape, model_kwargs=kw).shape == x.shape
        assert t_orig == 600


def test_loading_the_wrong_kind_of_file_is_a_clear_error(tmp_path):
    opt = tmp_path / "opt000010.pt"
    torch.save({"optimizer": {}, "step": 10}, opt)
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        load_checkpoint(opt)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="is corrupt or not a checkpoint"):
        load_checkpoint(junk)


def test_our_checkpoint_round_trip(tmp_path):
    config = {**ModelConfig(causal=True, **TINY).__dict__, **DiffusionConfig(predict_v=True).__dict__,
              "dataset": "bouncing_balls"}
    source = randomize(create_model(ModelConfig(causal=True, **TINY)))
    torch.save({"config": config, "state_dict": source.state_dict(), "step": 7}, tmp_path / "model000007.pt")
    model, diffusion, loaded = load_checkpoint(tmp_path / "model000007.pt")
    assert model.config.causal and loaded["predict_v"]
    assert diffusion.model_mean_type.value == "v"
    for (k, a), (_, b) in zip(source.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
