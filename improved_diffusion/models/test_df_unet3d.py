"""Diffusion Forcing's 3D-UNet: DF's outputs on the fixture, causality, frame positions, flags."""

import math
from pathlib import Path

import pytest
import torch

from improved_diffusion.checkpoints import load_checkpoint
from improved_diffusion.cli import dataclass_from_dict
from improved_diffusion.errors import ConfigError
from improved_diffusion.models import DFUNet3D, ModelConfig, create_model

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference"
needs_reference = pytest.mark.skipif(not (REFERENCE / "df_small32.ckpt").exists(), reason="../shared/reference absent")

TINY = dict(architecture="df_unet3d", image_size=16, network_size=8, dim_mults="1,2", attn_resolutions="16,8",
            attn_heads=2, attn_dim_head=4, causal=True)


def randomize(model, seed=0, std=0.2):
    """Non-zero weights everywhere (zero-initialised layers would hide paths)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def tiny(**overrides):
    return randomize(create_model(ModelConfig(**{**TINY, **overrides})))


def frames_first(t):
    return t.transpose(0, 1)


@pytest.fixture(scope="module")
def df_fixture():
    ref = torch.load(REFERENCE / "df_small32_ref.pt", weights_only=True)
    model, _, config = load_checkpoint(REFERENCE / "df_small32.ckpt", df_config=REFERENCE / "df_small32_config.json")
    return ref, model, config


def run_df_layout(model, x, noise_levels, **kw):
    """Call our model with DF's frames-first tensors; return frames-first."""
    with torch.no_grad():
        return frames_first(model(frames_first(x), frames_first(noise_levels), **kw))


# ----------------------------------------------------------------------------- DF fixture

@needs_reference
def test_df_checkpoint_outputs_match_reference(df_fixture):
    ref, model, config = df_fixture
    assert isinstance(model, DFUNet3D) and config["architecture"] == "df_unet3d" and config["causal"]
    # DF counts its one (shared) rotary `freqs` parameter; ours is a buffer.
    assert sum(p.numel() for p in model.parameters()) + model.rotary_time_pos_embedding.freqs.numel() == 555_575
    for x, out in (("x", "out"), ("x_last_perturbed", "out_last_perturbed")):
        assert (run_df_layout(model, ref[x], ref["noise_levels"]) - ref[out]).abs().max() < 1e-5
    # Explicit consecutive frame indices and all-latent masks are the same call.
    B, F = ref["x"].shape[1], ref["x"].shape[0]
    kw = dict(frame_indices=torch.arange(F).expand(B, F), obs_mask=torch.zeros(B, F, 1, 1, 1),
              latent_mask=torch.ones(B, F, 1, 1, 1))
    assert (run_df_layout(model, ref["x"], ref["noise_levels"], **kw) - ref["out"]).abs().max() < 1e-5


@needs_reference
def test_df_causal_mode_is_not_causal_and_strict_causal_is(df_fixture):
    ref, model, config = df_fixture
    # DF's "causal" network: the last frame changes earlier frames (DF_MODEL.md: up to 0.86 on frame 0).
    change = (ref["out_last_perturbed"] - ref["out"])[:-1].abs().amax(dim=(1, 2, 3, 4))
    ours = (run_df_layout(model, ref["x_last_perturbed"], ref["noise_levels"])
            - run_df_layout(model, ref["x"], ref["noise_levels"]))[:-1].abs().amax(dim=(1, 2, 3, 4))
    assert change.min() > 0.5 and torch.allclose(ours, change, atol=1e-5)
    strict = create_model(dataclass_from_dict(ModelConfig, {**config, "strict_causal": True})).eval()
    strict.load_state_dict(model.state_dict())
    out = run_df_layout(strict, ref["x"], ref["noise_levels"])
    out_perturbed = run_df_layout(strict, ref["x_last_perturbed"], ref["noise_levels"])
    assert torch.equal(out[:-1], out_perturbed[:-1])
    assert (out[-1] - out_perturbed[-1]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- causality, masks

def inputs(B=2, T=4, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 3, size, size, generator=g), torch.tensor([[0, 300, 600, 900], [999, 10, 500, 20]])


def test_strict_causal_outputs_never_depend_on_later_frames():
    x, t = inputs()
    for strict, expect_unchanged in ((True, True), (False, False)):
        model = tiny(strict_causal=strict)
        with torch.no_grad():
            base = model(x, t)
            for k in range(1, 4):
                moved = x.clone()
                moved[:, k] += 1
                out = model(moved, t)
                assert torch.equal(base[:, :k], out[:, :k]) == expect_unchanged, (strict, k)
                assert (base[:, k] - out[:, k]).abs().max() > 1e-3


def test_causality_follows_frame_indices_not_slot_order():
    model = tiny(strict_causal=True)
    x, t = inputs()
    frame_indices = torch.tensor([[3, 0, 2, 1], [3, 0, 2, 1]])  # slot 0 holds the video's last frame
    with torch.no_grad():
        base = model(x, t, frame_indices=frame_indices)
        moved = x.clone()
        moved[:, 0] += 1
        out = model(moved, t, frame_indices=frame_indices)
    assert torch.equal(base[:, 1:], out[:, 1:])


def test_observed_slots_show_x0_and_padding_slots_are_invisible_in_strict_causal_mode():
    model = tiny(strict_causal=True, causal=True)
    x, t = inputs()
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(x.shape, generator=g) * 2 - 1
    obs = torch.tensor([1.0, 0, 0, 0]).view(1, 4, 1, 1, 1).expand(2, 4, 1, 1, 1)
    latent = torch.tensor([0.0, 1, 1, 0]).view(1, 4, 1, 1, 1).expand(2, 4, 1, 1, 1)  # slot 3: padding
    fi = torch.tensor([[0, 5, 6, 1], [2, 3, 4, 0]])
    with torch.no_grad():
        out = model(x, t, x0=x0, frame_indices=fi, obs_mask=obs, latent_mask=latent)
        shown = torch.cat([x0[:, :1], x[:, 1:]], dim=1)
        assert torch.equal(out, model(shown, t, frame_indices=fi, latent_mask=latent + obs))
        padded = x.clone()
        padded[:, 3] += 1
        again = model(padded, t, x0=x0, frame_indices=fi, obs_mask=obs, latent_mask=latent)
    assert torch.equal(out[:, :3], again[:, :3])


def test_timesteps_per_video_equal_per_frame():
    model = tiny(causal=False)
    x, _ = inputs()
    with torch.no_grad():
        a = model(x, torch.tensor([40, 700]))
        b = model(x, torch.tensor([[40] * 4, [700] * 4]))
    assert torch.allclose(a, b, atol=0, rtol=0)


# ----------------------------------------------------------------------------- frame positions

def rotary_attention_slow(q, k, v, positions, freqs):
    """Softmax attention whose logit for (i, j) is q_i . R((p_j - p_i) f) k_j per feature pair, by loops.

    q, k, v: [T x d] for one head; rotary angles of pair m are position x freqs[m].
    """
    T, d = q.shape
    out = torch.zeros_like(v, dtype=torch.float64)
    for i in range(T):
        logits = []
        for j in range(T):
            s = 0.0
            for m in range(d // 2):
                theta = float(positions[j] - positions[i]) * float(freqs[m])
                rot = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]],
                                   dtype=torch.float64)
                s += float(q[i, 2 * m:2 * m + 2].double() @ rot @ k[j, 2 * m:2 * m + 2].double())
            logits.append(s / math.sqrt(d))
        w = torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=0)
        out[i] = (w[:, None] * v.double()).sum(0)
    return out


def test_temporal_attention_uses_frame_index_differences():
    model = tiny(causal=False)
    block = model.init_temporal_attn.wrapper.module  # _TemporalAttention over [B x HW x T x C]
    attn = block.attn_block.attn
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 4, 8, generator=g)
    positions = torch.tensor([[0, 3, 4, 11]])

    class Frames:
        mask = None

    Frames.positions = positions
    with torch.no_grad():
        out = block(x, Frames)
        h = block.attn_block.norm(x)
        q, k, v = attn.to_qkv(h).chunk(3, dim=-1)
        heads = []
        for pixel in range(2):
            per_head = [rotary_attention_slow(q[0, pixel, :, 4 * n:4 * n + 4], k[0, pixel, :, 4 * n:4 * n + 4],
                                              v[0, pixel, :, 4 * n:4 * n + 4], positions[0], attn.rotary_emb.freqs)
                        for n in range(2)]
            heads.append(torch.cat(per_head, dim=-1))
        expected = x + attn.to_out(torch.stack(heads)[None].float())
    assert (out - expected).abs().max() < 1e-5


def test_only_frame_index_differences_matter():
    model = tiny(causal=True)
    x, t = inputs()
    fi = torch.tensor([[0, 2, 3, 9], [1, 4, 5, 6]])
    with torch.no_grad():
        a = model(x, t, frame_indices=fi)
        b = model(x, t, frame_indices=fi + torch.tensor([[100], [37]]))
        c = model(x, t, frame_indices=torch.arange(4).expand(2, 4))
    assert (a - b).abs().max() < 1e-5
    assert (a - c).abs().max() > 1e-3


def test_sinusoidal_frame_positions_build_and_run():
    model = tiny(time_emb_type="sinusoidal", use_linear_attn=False, use_init_temporal_attn=False)
    assert model.rotary_time_pos_embedding is None
    x, t = inputs()
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("overrides, flag", [
    (dict(architecture="dit"), "--architecture"),
    (dict(strict_causal=True, causal=False), "--strict_causal"),
    (dict(network_size=12), "--network_size"),
    (dict(attn_heads=0), "--attn_heads"),
    (dict(time_emb_type="learned"), "--time_emb_type"),
    (dict(dim_mults="1,x"), "--dim_mults"),
    (dict(dim_mults="1,2,2,2,2,2"), "--image_size"),
    (dict(attn_resolutions="8,-1"), "--attn_resolutions"),
])
def test_bad_df_flags_get_one_sentence(overrides, flag):
    with pytest.raises(ConfigError) as info:
        ModelConfig(**{**TINY, **overrides}).validate()
    message = str(info.value)
    assert message.startswith(flag) and message.endswith(".") and ". " not in message, message


def test_strict_causal_is_refused_for_fdm_unet_and_defaults_are_df_video():
    with pytest.raises(ConfigError, match="--strict_causal"):
        ModelConfig(causal=True, strict_causal=True).validate()
    cfg = ModelConfig(architecture="df_unet3d")
    assert (cfg.network_size, cfg.dim_mults, cfg.attn_resolutions, cfg.attn_heads, cfg.attn_dim_head,
            cfg.use_linear_attn, cfg.use_init_temporal_attn, cfg.time_emb_type) == (
        64, "1,2,4,8", "16,32,64,128", 4, 64, True, True, "rotary")
    cfg.validate()
