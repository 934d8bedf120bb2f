"""The energy wrapper: its prediction is the gradient of its per-frame energies, it trains, it saves and loads."""

import dataclasses

import numpy as np
import pytest
import torch

from improved_diffusion.checkpoints import load_checkpoint
from improved_diffusion.data.datasets import get_dataset
from improved_diffusion.diffusion import DiffusionConfig, create_diffusion
from improved_diffusion.errors import ConfigError
from improved_diffusion.models import DFUNet3D, EnergyModel, ModelConfig, UNetVideoModel, create_model, is_energy_model
from improved_diffusion.precision import PrecisionModel
from improved_diffusion.sampling.mcmc import MCMCStats
from improved_diffusion.sampling.sampler import preview_rollout
from improved_diffusion.training import launch
from improved_diffusion.training.config import TrainConfig

SIZE = 8
ARCHITECTURES = {
    "fdm_unet": dict(image_size=SIZE, num_channels=32, channel_mult="1,2", attention_resolutions="4", num_heads=2,
                     num_res_blocks=1),
    "df_unet3d": dict(architecture="df_unet3d", image_size=SIZE, network_size=8, dim_mults="1,2",
                      attn_resolutions="8,4", attn_heads=2, attn_dim_head=4),
}


def randomize(model, seed=0, std=0.05):
    """Non-zero weights everywhere (zero-initialised output layers would make f = 0 and hide the Jacobian)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def energy_model(architecture="fdm_unet", seed=0, **overrides):
    return randomize(create_model(ModelConfig(**ARCHITECTURES[architecture], energy=True, **overrides)), seed)


def inputs(B=2, T=4, seed=1, dtype=torch.float32):
    """Frame 0 observed, frame T - 1 padding (in neither mask), the others latent; per-frame timesteps."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.zeros(B, T, 1, 1, 1, dtype=dtype)
    obs[:, 0] = 1
    latent = torch.ones(B, T, 1, 1, 1, dtype=dtype) - obs
    latent[:, -1] = 0
    return dict(x=torch.randn(B, T, 3, SIZE, SIZE, generator=g, dtype=dtype),
                timesteps=torch.tensor([[0.0, 100.0, 450.0, 900.0], [0.0, 20.0, 20.0, 300.0]])[:B, :T],
                x0=torch.rand(B, T, 3, SIZE, SIZE, generator=g, dtype=dtype) * 2 - 1,
                frame_indices=torch.tensor([[0, 3, 4, 9], [2, 5, 6, 7]])[:B, :T], obs_mask=obs, latent_mask=latent)


def call(model, kw, **extra):
    kw = dict(kw)
    return model(kw.pop("x"), kw.pop("timesteps"), **kw, **extra)


def total_energy(model, kw, x):
    kw = dict(kw, x=x)
    with torch.no_grad():
        return model.energy(kw.pop("x"), kw.pop("timesteps"), **kw).sum()


# FDM's UNet runs in float64, so the differences can be tight; DF's 3D-UNet embeds noise levels in float32
# only, so it is checked in float32 with a larger step.
PRECISION = {"fdm_unet": (torch.float64, 1e-6, 1e-6), "df_unet3d": (torch.float32, 1e-2, 2e-3)}


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_prediction_is_the_gradient_of_the_energy(architecture, one_thread):
    """grad_x sum E (autograd) against central finite differences of E."""
    dtype, h, rel = PRECISION[architecture]
    model = energy_model(architecture).to(dtype)
    kw = inputs(dtype=dtype)
    with torch.no_grad():
        prediction = call(model, kw)
    latent = kw["latent_mask"].bool().expand_as(prediction)
    assert prediction[~latent].abs().max() == 0  # observed and padding frames: no prediction
    assert prediction[latent].abs().min() > 0
    g = torch.Generator().manual_seed(2)
    for _ in range(3):  # random directions over the latent frames
        v = torch.randn(prediction.shape, generator=g, dtype=dtype) * latent
        fd = (total_energy(model, kw, kw["x"] + h * v) - total_energy(model, kw, kw["x"] - h * v)) / (2 * h)
        assert fd.item() == pytest.approx((prediction * v).sum().item(), rel=rel)
    if dtype == torch.float64:
        for index in [(0, 1, 0, 2, 3), (1, 2, 2, 7, 0), (0, 2, 1, 0, 0)]:  # single coordinates
            e = torch.zeros_like(kw["x"])
            e[index] = 1
            fd = (total_energy(model, kw, kw["x"] + h * e) - total_energy(model, kw, kw["x"] - h * e)) / (2 * h)
            assert fd.item() == pytest.approx(prediction[index].item(), rel=1e-5, abs=1e-9)
    # Observed frames are inputs only: moving their x changes no energy.
    v = torch.randn(prediction.shape, generator=g, dtype=dtype) * kw["obs_mask"]
    assert total_energy(model, kw, kw["x"] + v) == total_energy(model, kw, kw["x"])


def test_energy_is_half_the_squared_residual_of_the_network_per_latent_frame(one_thread):
    model = energy_model()
    kw = inputs()
    with torch.no_grad():
        energies = model.energy(kw["x"], kw["timesteps"], x0=kw["x0"], frame_indices=kw["frame_indices"],
                                obs_mask=kw["obs_mask"], latent_mask=kw["latent_mask"])
        f = call(model.net, kw)
    expected = 0.5 * (kw["x"] - f).pow(2).sum(dim=(2, 3, 4)) * kw["latent_mask"].view(2, 4)
    assert energies.shape == (2, 4)
    torch.testing.assert_close(energies, expected)
    assert (energies[:, 0] == 0).all() and (energies[:, -1] == 0).all() and (energies[:, 1:3] > 0).all()


def test_no_graph_is_kept_under_no_grad_and_values_agree(one_thread):
    model = energy_model()
    kw = inputs()
    with torch.no_grad():
        evaluated, energies = call(model, kw, return_energy=True)
        none, energies_only = call(model, kw, return_energy=True, gradient=False)
    assert not evaluated.requires_grad and not energies.requires_grad and none is None
    torch.testing.assert_close(energies_only, energies)
    trained = call(model, kw)  # the caller records gradients: the prediction is differentiable in the weights
    assert trained.requires_grad and trained.grad_fn is not None
    torch.testing.assert_close(trained.detach(), evaluated)


def test_energy_weights_weight_each_frame_in_the_gradient(one_thread):
    """energy_weights w: the prediction is grad sum_k w_k E_k (what MCMC descends), linear in w."""
    model = energy_model()
    kw = inputs()
    w1 = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    w2 = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    with torch.no_grad():
        g1 = call(model, kw, energy_weights=w1)
        g2 = call(model, kw, energy_weights=w2)
        both = call(model, kw, energy_weights=2 * w1 - 3 * w2)
        plain = call(model, kw)
    torch.testing.assert_close(both, 2 * g1 - 3 * g2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, g1 + g2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_a_training_step_gives_the_energy_network_gradients(architecture, one_thread):
    """From the networks' own initialisation (zero output layer): the loss on grad E trains every parameter."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(**ARCHITECTURES[architecture], energy=True)).train()
    plain_init = create_model(ModelConfig(**ARCHITECTURES[architecture]))
    assert isinstance(model, EnergyModel) and is_energy_model(model)
    assert isinstance(model.net, DFUNet3D if architecture == "df_unet3d" else UNetVideoModel)
    diffusion = create_diffusion(DiffusionConfig(diffusion_steps=100))
    kw = inputs()
    x_start = kw["x"].clamp(-1, 1)
    t = torch.tensor([[0, 10, 45, 90], [0, 2, 2, 30]])
    model_kwargs = {k: kw[k] for k in ("x0", "frame_indices", "obs_mask", "latent_mask")}
    noise = torch.randn(x_start.shape, generator=torch.Generator().manual_seed(3))
    before = diffusion.training_losses(model, x_start, t, model_kwargs=model_kwargs, noise=noise)["loss"].mean()
    before.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    out_layer = "net.out.2.weight" if architecture == "fdm_unet" else "net.out.1.weight"
    assert out_layer in grads and grads[out_layer].abs().max() > 0  # the zero-initialised output layer moves
    # One optimizer step along that gradient lowers the loss on the same batch and noise.
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    with torch.no_grad():
        after = diffusion.training_losses(model, x_start, t, model_kwargs=model_kwargs, noise=noise)["loss"].mean()
    assert after < before
    # the same initial weights as the plain network (the wrapper has no parameters of its own)
    assert len(list(model.parameters())) == len(list(plain_init.parameters()))


def test_bf16_autocast_keeps_autograd(one_thread):
    model = energy_model()
    kw = inputs()
    with torch.no_grad():
        full = call(model, kw)
        half = call(PrecisionModel(model, "bf16", "cpu"), kw)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert (half - full).abs().max() < 0.1 * full.abs().max()
    model.train()
    diffusion = create_diffusion(DiffusionConfig(diffusion_steps=100))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = diffusion.training_losses(model, kw["x0"], torch.tensor([5, 50]),
                                         model_kwargs={"obs_mask": kw["obs_mask"],
                                                       "latent_mask": kw["latent_mask"]})["loss"].mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_learned_variance_channels_pass_through(one_thread):
    model = randomize(create_model(ModelConfig(**ARCHITECTURES["fdm_unet"], energy=True), learn_sigma=True))
    kw = inputs()
    with torch.no_grad():
        out = call(model, kw)
        raw = call(model.net, kw)
    assert out.shape[2] == 6
    torch.testing.assert_close(out[:, :, 3:], raw[:, :, 3:])


def test_checkpoint_with_energy_round_trips(tmp_path, one_thread):
    """The flag is saved with the config; loading builds the wrapper and the same function."""
    model_cfg = ModelConfig(**ARCHITECTURES["fdm_unet"], energy=True)
    source = randomize(create_model(model_cfg))
    config = {**dataclasses.asdict(model_cfg), **dataclasses.asdict(DiffusionConfig(diffusion_steps=100))}
    path = tmp_path / "ema_0.9999_000010.pt"
    torch.save({"config": config, "state_dict": source.state_dict(), "step": 10}, path)
    loaded, _, saved = load_checkpoint(str(path))
    assert saved["energy"] is True and isinstance(loaded, EnergyModel)
    assert all(k.startswith("net.") for k in loaded.state_dict())
    kw = inputs()
    with torch.no_grad():
        torch.testing.assert_close(call(loaded, kw), call(source, kw))
    # An older config without the field builds the plain network.
    del config["energy"]
    plain = create_model(ModelConfig(**ARCHITECTURES["fdm_unet"]))
    torch.save({"config": config, "state_dict": plain.state_dict(), "step": 0}, path)
    assert isinstance(load_checkpoint(str(path))[0], UNetVideoModel)


class RecordingLogger:
    def __init__(self):
        self.rows, self.videos = [], []

    def log_row(self, row, step):
        self.rows.append((step, dict(row)))

    def log_video(self, key, frames, step):
        self.videos.append((key, step))


def test_training_previews_of_an_energy_model_refine_and_log_their_acceptance(tmp_path, monkeypatch, one_thread):
    counted = []

    class KeptStats(MCMCStats):  # the counts the preview collected, kept for the test
        def __init__(self, batch_size):
            super().__init__(batch_size)
            counted.append(self)

    monkeypatch.setattr(launch, "MCMCStats", KeptStats)
    model_cfg = ModelConfig(**ARCHITECTURES["fdm_unet"], energy=True)
    model = randomize(create_model(model_cfg))
    diffusion_cfg = DiffusionConfig(diffusion_steps=50)
    # A preview of 2 x max_frames = 4 frames from max_frames // 2 = 1 given frame: 3 stages of DDIM 25.
    train_cfg = TrainConfig(dataset="bouncing_balls", max_frames=2, T=8, sample_interval=1, preview_mcmc_steps=1)
    logger = RecordingLogger()
    launch.make_preview(train_cfg, model_cfg, diffusion_cfg, str(tmp_path), logger)(3, model)
    (step, row), = logger.rows
    assert step == 3 and row["step"] == 3 and logger.videos == [("preview", 3)]
    # One MCMC step per latent frame after each of the 24 steps that leave it noisy, in each of the 3 stages.
    (stats,), = [counted]
    assert int(stats.proposed.sum()) == 3 * 24 and row["preview_mcmc_acceptance"] == stats.acceptance_rate()
    # Refinement changed the frames.
    saved = torch.from_numpy(np.load(tmp_path / "previews" / "step000003.npy"))
    given = get_dataset("bouncing_balls", split="test", T=1, image_size=SIZE).video(0)
    plain = preview_rollout(model, create_diffusion(diffusion_cfg, timestep_respacing="ddim25"), given, 4, 2)
    assert saved.shape == plain.shape and torch.equal(saved[0], plain[0]) and not torch.equal(saved, plain)
    with pytest.raises(ConfigError, match="--preview_mcmc_steps 1 refines previews .* pass --energy True"):
        launch.check_preview_mcmc(train_cfg, dataclasses.replace(model_cfg, energy=False))
