import sys
import types

import numpy as np
import pytest
import torch

from improved_diffusion.evaluation import metrics


def random_frames(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# ---------------------------------------------------------------------------
# PSNR
# ---------------------------------------------------------------------------


def test_psnr_identical_frames_is_inf():
    a = random_frames((2, 3, 3, 8, 8))
    assert np.all(np.isinf(metrics.psnr(a, a.copy())))


def test_psnr_constant_offset_closed_form():
    a = random_frames((4, 3, 8, 8)) // 2  # room for the offset without clipping
    for offset in (1, 5, 40):
        b = a + np.uint8(offset)
        expected = 20 * np.log10(255 / offset)
        np.testing.assert_allclose(metrics.psnr(a, b), np.full(4, expected))


def test_psnr_float_inputs_use_pixel_scale():
    a = random_frames((3, 3, 8, 8)) // 2
    b = a + np.uint8(10)
    to_float = lambda x: x.astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(metrics.psnr(to_float(a), to_float(b)), metrics.psnr(a, b), rtol=1e-5)
    # Tensors are accepted too, with [B x T x C x H x W] giving [B x T] values.
    out = metrics.psnr(torch.from_numpy(a[None]), torch.from_numpy(b[None]))
    assert out.shape == (1, 3)


def test_psnr_rejects_mixed_kinds_and_shapes():
    a = random_frames((2, 3, 8, 8))
    with pytest.raises(ValueError, match="same kind"):
        metrics.psnr(a, a.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(a, a[:1])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        metrics.psnr(a.astype(np.float32), a.astype(np.float32))


# ---------------------------------------------------------------------------
# SSIM
# ---------------------------------------------------------------------------


def slow_ssim(x, y):
    """SSIM of one frame [C x H x W] in pixel scale by an explicit loop over windows."""
    r = 5
    k = np.arange(-r, r + 1)
    w = np.exp(-(k[:, None] ** 2 + k[None, :] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    C, H, W = x.shape
    values = []
    for c in range(C):
        for i in range(r, H - r):
            for j in range(r, W - r):
                px = x[c, i - r:i + r + 1, j - r:j + r + 1]
                py = y[c, i - r:i + r + 1, j - r:j + r + 1]
                mx, my = (w * px).sum(), (w * py).sum()
                vx = (w * (px - mx) ** 2).sum()
                vy = (w * (py - my) ** 2).sum()
                cxy = (w * (px - mx) * (py - my)).sum()
                values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return np.mean(values)


def test_ssim_identical_frames_is_one():
    a = random_frames((2, 3, 16, 16))
    np.testing.assert_allclose(metrics.ssim(a, a.copy()), [1.0, 1.0], atol=1e-12)


def test_ssim_constant_offset_is_luminance_term():
    # Constant frames: every window has mean c (resp. c + d) and zero variance, so
    # only the luminance term (2 c (c+d) + C1) / (c^2 + (c+d)^2 + C1) remains.
    c1 = (0.01 * 255) ** 2
    for c, d in [(100, 10), (30, 60), (0, 255)]:
        a = np.full((1, 3, 12, 12), c, dtype=np.uint8)
        b = np.full((1, 3, 12, 12), c + d, dtype=np.uint8)
        expected = (2 * c * (c + d) + c1) / (c**2 + (c + d) ** 2 + c1)
        np.testing.assert_allclose(metrics.ssim(a, b), [expected], rtol=1e-12)


def test_ssim_matches_slow_loop_on_blurred_frame():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(3, 18, 17)).astype(np.float64)
    # A 3x3 box blur (edges replicated) as the distortion.
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
    y = sum(padded[:, i:i + 18, j:j + 17] for i in range(3) for j in range(3)) / 9
    x8, y8 = x.astype(np.uint8), np.round(y).astype(np.uint8)
    expected = slow_ssim(x8.astype(np.float64), y8.astype(np.float64))
    got = metrics.ssim(x8[None], y8[None])
    np.testing.assert_allclose(got, [expected], rtol=1e-10)
    assert 0 < expected < 1


def test_ssim_shapes_and_small_frames():
    a = random_frames((2, 3, 1, 12, 12), seed=2)
    b = random_frames((2, 3, 1, 12, 12), seed=3)
    out = metrics.ssim(a, b)
    assert out.shape == (2, 3)
    # Per-frame values do not depend on how frames are batched.
    np.testing.assert_allclose(out[1, 2], metrics.ssim(a[1, 2:3], b[1, 2:3])[0])
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(a[..., :10, :10], b[..., :10, :10])


# ---------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------


def samples_with_moments(mean, cov, n, seed):
    """n samples whose sample mean and unbiased covariance are exactly mean and cov."""
    rng = np.random.default_rng(seed)
    d = len(mean)
    z = rng.standard_normal((n, d))
    z -= z.mean(axis=0)
    # Whiten so the unbiased covariance is exactly the identity.
    s = np.atleast_2d(np.cov(z, rowvar=False))
    z = z @ np.linalg.inv(np.linalg.cholesky(s)).T
    return mean + z @ np.linalg.cholesky(cov).T


def test_frechet_distance_1d_closed_form():
    m1, s1, m2, s2 = 0.5, 2.0, -1.0, 0.5
    a = samples_with_moments(np.array([m1]), np.array([[s1**2]]), 50, seed=0)
    b = samples_with_moments(np.array([m2]), np.array([[s2**2]]), 70, seed=1)
    expected = (m1 - m2) ** 2 + (s1 - s2) ** 2
    np.testing.assert_allclose(metrics.frechet_distance(a, b), expected, rtol=1e-9)


def test_frechet_distance_commuting_covariances():
    rng = np.random.default_rng(0)
    d = 4
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam, nu = np.array([1.0, 2.0, 0.5, 3.0]), np.array([0.2, 2.0, 4.0, 1.0])
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
    a = samples_with_moments(mu_a, q @ np.diag(lam) @ q.T, 40, seed=1)
    b = samples_with_moments(mu_b, q @ np.diag(nu) @ q.T, 60, seed=2)
    # Shared eigenvectors: Tr(Sa + Sb - 2 (Sa Sb)^1/2) = sum (sqrt(lam) - sqrt(nu))^2.
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(lam) - np.sqrt(nu)) ** 2)
    np.testing.assert_allclose(metrics.frechet_distance(a, b), expected, rtol=1e-9)


def test_frechet_distance_non_commuting_2d():
    cov_a = np.array([[2.0, 0.8], [0.8, 1.0]])
    cov_b = np.array([[0.5, -0.3], [-0.3, 1.5]])
    mu_a, mu_b = np.array([1.0, 0.0]), np.array([0.0, 2.0])
    a = samples_with_moments(mu_a, cov_a, 30, seed=3)
    b = samples_with_moments(mu_b, cov_b, 30, seed=4)
    # For 2x2 M with positive eigenvalues, Tr sqrt(M) = sqrt(Tr M + 2 sqrt(det M)).
    m = cov_a @ cov_b
    trace_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    np.testing.assert_allclose(metrics.frechet_distance(a, b), expected, rtol=1e-9)


def test_frechet_distance_singular_and_identical():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((5, 20))  # rank-deficient covariances
    b = rng.standard_normal((6, 20)) + 1
    d = metrics.frechet_distance(a, b)
    assert np.isfinite(d) and d > 0
    assert metrics.frechet_distance(a, a.copy()) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.frechet_distance(a[:1], b)
    with pytest.raises(ValueError, match="same D"):
        metrics.frechet_distance(a, b[:, :3])


# ---------------------------------------------------------------------------
# FVD with a stand-in for i3d_torchscript.pt
# ---------------------------------------------------------------------------


class TinyI3D(torch.nn.Module):
    """Same call signature as i3d_torchscript.pt; records what it is fed."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 5)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        # Fail loudly unless called like StyleGAN-V: uint8 [B x C x T x H x W] in [0, 255].
        assert x.dtype == torch.uint8
        assert rescale and resize and return_features
        x = x.float() / 127.5 - 1
        stats = torch.stack([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))], dim=1)  # [B x 2 x C]
        return self.proj(stats).flatten(1)  # [B x 10]


@pytest.fixture
def detector(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "i3d_tiny.pt"
    torch.jit.script(TinyI3D()).save(str(path))
    return metrics.load_i3d(path)


def test_fvd_with_scripted_stand_in(detector):
    rng = np.random.default_rng(0)
    videos_a = rng.integers(0, 256, size=(6, 4, 3, 8, 8), dtype=np.uint8)
    videos_b = rng.integers(0, 128, size=(5, 4, 3, 8, 8), dtype=np.uint8)
    feats = metrics.i3d_features(videos_a, detector, batch_size=4)
    assert feats.shape == (6, 10)
    # Features match calling the network directly on the [B x C x T x H x W] layout.
    direct = detector(torch.from_numpy(videos_a).permute(0, 2, 1, 3, 4), rescale=True, resize=True,
                      return_features=True)
    np.testing.assert_allclose(feats, direct.detach().double().numpy(), rtol=1e-6)

    result = metrics.fvd(videos_a, videos_b, detector, batch_size=4)
    assert result["n_videos"] == 6 and result["n_videos_b"] == 5
    expected = metrics.frechet_distance(feats, metrics.i3d_features(videos_b, detector))
    assert result["fvd"] == pytest.approx(expected)
    assert result["fvd"] > 0
    assert metrics.fvd(videos_a, videos_a, detector)["fvd"] == pytest.approx(0.0, abs=1e-6)

    # Float videos in [-1, 1] are rounded to the same uint8 videos.
    as_float = torch.from_numpy(videos_a).float() / 127.5 - 1
    np.testing.assert_allclose(metrics.i3d_features(as_float, detector), feats, rtol=1e-6)


def test_fvd_refuses_fewer_than_two_videos(detector):
    videos = np.zeros((1, 4, 3, 8, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match="at least 2 videos"):
        metrics.fvd(videos, np.zeros((3, 4, 3, 8, 8), dtype=np.uint8), detector)


def test_load_i3d_unreadable_file(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a torchscript archive")
    with pytest.raises(ValueError, match="Could not load an I3D TorchScript model"):
        metrics.load_i3d(path)
    with pytest.raises(ValueError, match="Could not load"):
        metrics.load_i3d(tmp_path / "missing.pt")


# ---------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------


def test_lpips_unavailable_without_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # makes `import lpips` fail
    a = random_frames((2, 3, 16, 16))
    with pytest.raises(metrics.MetricUnavailable, match="skipped.*not installed"):
        metrics.lpips_distance(a, a)


def test_lpips_unavailable_when_weights_fail(monkeypatch):
    def no_weights(**kwargs):
        raise OSError("no network")

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=no_weights))
    with pytest.raises(metrics.MetricUnavailable, match="skipped.*weights"):
        metrics.load_lpips()


def test_lpips_calls_network_on_minus_one_one_frames(monkeypatch):
    class FakeLPIPS(torch.nn.Module):
        def __init__(self, net="alex", verbose=True):
            super().__init__()

        def forward(self, x, y):
            assert x.min() >= -1 and x.max() <= 1
            return (x - y).abs().mean(dim=(1, 2, 3), keepdim=True)  # [N x 1 x 1 x 1] like lpips

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    a = random_frames((2, 3, 3, 8, 8), seed=1)
    b = random_frames((2, 3, 3, 8, 8), seed=2)
    d = metrics.lpips_distance(a, b, batch_size=4)
    assert d.shape == (2, 3)
    expected = np.abs(a.astype(np.float64) - b).mean(axis=(2, 3, 4)) / 127.5
    np.testing.assert_allclose(d, expected, rtol=1e-5)
