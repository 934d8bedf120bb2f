"""Conditioning inputs of both networks: they change the output, the null condition ignores them,
unconditional networks are unchanged, and checkpoints record the layout."""

import dataclasses

import pytest
import torch

from improved_diffusion.checkpoints import load_checkpoint
from improved_diffusion.diffusion import DiffusionConfig
from improved_diffusion.errors import ConfigError
from improved_diffusion.models import ModelConfig, create_model

FDM = dict(image_size=16, num_channels=32, channel_mult="1,2", attention_resolutions="8", num_heads=2)
DF = dict(architecture="df_unet3d", image_size=16, network_size=8, dim_mults="1,2", attn_resolutions="16,8",
          attn_heads=2, attn_dim_head=4)
ARCHITECTURES = {"fdm_unet": FDM, "df_unet3d": DF}
B, T, D, CLASSES = 2, 5, 4, 3


def random_model(arch="fdm_unet", seed=0, **conditioning):
    """A network with every weight random (zero-initialised layers would hide the conditions)."""
    model = create_model(ModelConfig(**ARCHITECTURES[arch], **conditioning))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    obs = torch.zeros(B, T, 1, 1, 1)
    obs[:, :2] = 1
    return dict(x=torch.randn(B, T, 3, 16, 16, generator=g), timesteps=torch.tensor([30, 600]),
                x0=torch.rand(B, T, 3, 16, 16, generator=g) * 2 - 1,
                frame_indices=torch.tensor([[0, 2, 3, 7, 9], [4, 5, 6, 7, 20]]), obs_mask=obs, latent_mask=1 - obs)


def run(model, kw, **conditions):
    kw = dict(kw)
    with torch.no_grad():
        return model(kw.pop("x"), kw.pop("timesteps"), **kw, **conditions)


def actions(seed):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_condition_changes_the_output(arch):
    model = random_model(arch, cond_dim=D, num_classes=CLASSES)
    kw = inputs()
    base = run(model, kw, cond=actions(0), y=torch.tensor([0, 1]))
    other_actions = run(model, kw, cond=actions(1), y=torch.tensor([0, 1]))
    other_labels = run(model, kw, cond=actions(0), y=torch.tensor([2, 1]))
    assert (base - other_actions).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-4  # every video
    assert (base[0] - other_labels[0]).abs().max() > 1e-4 and torch.equal(base[1], other_labels[1])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_null_condition_ignores_the_dropped_inputs(arch):
    """Video 0 dropped: its output is the same whatever its actions and label; video 1 still follows them."""
    model = random_model(arch, cond_dim=D, num_classes=CLASSES, cond_drop_prob=0.1)
    kw, drop = inputs(), torch.tensor([True, False])
    a = run(model, kw, cond=actions(0), y=torch.tensor([0, 1]), drop_cond=drop)
    b = run(model, kw, cond=actions(1) * 5, y=torch.tensor([2, 0]), drop_cond=drop)
    assert torch.equal(a[0], b[0])
    assert (a[1] - b[1]).abs().max() > 1e-4
    # No conditions at all means the null ones; dropping changes the output.
    null = run(model, kw)
    assert torch.allclose(null[0], a[0], atol=1e-6, rtol=0)
    assert (run(model, kw, cond=actions(0), y=torch.tensor([0, 1]))[0] - a[0]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_frame_keeps_its_own_vector_in_any_slot_order(arch):
    """Permuting the slots together with their vectors permutes the outputs: the vector travels with the frame."""
    model = random_model(arch, cond_dim=D)
    kw, cond = inputs(), actions(0)
    perm = torch.tensor([3, 0, 4, 2, 1])
    shuffled = {k: v[:, perm] if k != "timesteps" else v for k, v in kw.items()}
    out, out_shuffled = run(model, kw, cond=cond), run(model, shuffled, cond=cond[:, perm])
    assert torch.allclose(out[:, perm], out_shuffled, atol=1e-5, rtol=0)
    # The same permutation without moving the vectors gives other outputs.
    assert (run(model, shuffled, cond=cond)[:, perm.argsort()] - out).abs().max() > 1e-4


def test_conditions_are_refused_where_they_cannot_work():
    unconditional, strict = random_model(), random_model(cond_dim=D, num_classes=CLASSES)
    kw = inputs()
    for given in (dict(cond=actions(0)), dict(y=torch.tensor([0, 1])), dict(drop_cond=torch.tensor([True, True]))):
        with pytest.raises(ValueError, match="unconditional"):
            run(unconditional, kw, **given)
    with pytest.raises(ValueError, match="no null condition"):
        run(strict, kw, cond=actions(0), y=torch.tensor([0, 1]), drop_cond=torch.tensor([False, True]))
    with pytest.raises(ValueError, match="no null condition"):
        run(strict, kw, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        run(strict, kw, cond=actions(0), y=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="cond must be"):
        run(strict, kw, cond=actions(0)[:, :, :2], y=torch.tensor([0, 1]))


def test_an_unconditional_network_has_no_conditioning_parameters():
    """Same parameter names, shapes and initial values as before conditioning existed."""
    for arch, flags in ARCHITECTURES.items():
        torch.manual_seed(0)
        plain = create_model(ModelConfig(**flags))
        assert plain.conditioning is None and not any("cond" in k or "label" in k for k in plain.state_dict())
        torch.manual_seed(0)
        conditional = create_model(ModelConfig(**flags, cond_dim=D, num_classes=CLASSES, cond_drop_prob=0.1))
        extra = set(conditional.state_dict()) - set(plain.state_dict())
        assert extra == {"conditioning.cond_mlp.0.weight", "conditioning.cond_mlp.0.bias",
                         "conditioning.cond_mlp.2.weight", "conditioning.cond_mlp.2.bias",
                         "conditioning.null_cond_emb", "conditioning.label_emb.weight"}, arch
        assert conditional.conditioning.label_emb.num_embeddings == CLASSES + 1  # row CLASSES: the null label


@pytest.mark.parametrize("overrides, flag", [
    (dict(cond_dim=-2), "--cond_dim"),
    (dict(num_classes=-1), "--num_classes"),
    (dict(cond_drop_prob=1.0, cond_dim=2), "--cond_drop_prob"),
    (dict(cond_drop_prob=-0.1, cond_dim=2), "--cond_drop_prob"),
    (dict(cond_drop_prob=0.1), "--cond_drop_prob"),  # nothing to drop
    (dict(class_cond=True), "--num_classes"),
])
def test_bad_conditioning_flags_get_one_sentence(overrides, flag):
    with pytest.raises(ConfigError, match=flag):
        ModelConfig(**FDM, **overrides).validate()
    with pytest.raises(ConfigError, match="resolved"):
        create_model(ModelConfig(**FDM, cond_dim=-1))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_conditional_checkpoint_round_trip_records_the_layout(tmp_path, arch):
    model_cfg = ModelConfig(**ARCHITECTURES[arch], cond_dim=D, num_classes=CLASSES, cond_drop_prob=0.25)
    source = random_model(arch, cond_dim=D, num_classes=CLASSES, cond_drop_prob=0.25)
    config = {**dataclasses.asdict(model_cfg), **dataclasses.asdict(DiffusionConfig())}
    torch.save({"config": config, "state_dict": source.state_dict(), "step": 3}, tmp_path / "model000003.pt")
    model, _, loaded = load_checkpoint(tmp_path / "model000003.pt")
    assert (loaded["cond_dim"], loaded["num_classes"], loaded["cond_drop_prob"]) == (D, CLASSES, 0.25)
    assert (model.config.cond_dim, model.config.num_classes, model.config.null_cond) == (D, CLASSES, True)
    kw = inputs()
    given = dict(cond=actions(0), y=torch.tensor([1, 2]), drop_cond=torch.tensor([False, True]))
    assert torch.equal(run(model, kw, **given), run(source, kw, **given))


def test_a_config_written_before_conditioning_builds_an_unconditional_network(tmp_path):
    """Old (and FDM's) configs have no cond_dim / num_classes / cond_drop_prob: they load unchanged."""
    model_cfg = ModelConfig(**FDM)
    config = {k: v for k, v in {**dataclasses.asdict(model_cfg), **dataclasses.asdict(DiffusionConfig())}.items()
              if k not in ("cond_dim", "num_classes", "cond_drop_prob")}
    source = random_model()
    torch.save({"config": config, "state_dict": source.state_dict(), "step": 0}, tmp_path / "old.pt")
    model, _, _ = load_checkpoint(tmp_path / "old.pt")
    assert model.conditioning is None
    assert torch.equal(run(model, inputs()), run(source, inputs()))
