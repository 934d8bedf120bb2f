"""Frame and video quality metrics: PSNR, SSIM, LPIPS, Fréchet distance and FVD.

Frames come as arrays or tensors [... x C x H x W], either uint8 in [0, 255] or
float in [-1, 1] (the package convention). Per-frame metrics return one value per
frame, shaped like the leading dimensions (e.g. [T] or [B x T]).

Sources for the formulas:
- PSNR: 10 log10(MAX^2 / MSE) with MAX = 255.
- SSIM: Wang, Bovik, Sheikh, Simoncelli (2004), "Image quality assessment: from error
  visibility to structural similarity", eq. 13, with their 11x11 Gaussian window
  (sigma 1.5), K1 = 0.01, K2 = 0.03, L = 255.
- Fréchet distance: Dowson & Landau (1982); as used by FID (Heusel et al. 2017) and
  FVD (Unterthiner et al. 2018).
- FVD feature extraction: the TorchScript port of the Kinetics-400 I3D network used by
  StyleGAN-V (Skorokhodov et al. 2022, `src/metrics/frechet_video_distance.py`).
"""

import numpy as np
import torch

from ..data.pixels import check_float_frames, to_numpy, to_pixel_scale, to_uint8

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
DATA_RANGE = 255.0


class MetricUnavailable(RuntimeError):
    """An optional metric was skipped because its dependency is missing."""


# ---------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------


def _is_uint8(x):
    return x.dtype == np.uint8


def _pair_to_pixel_scale(a, b):
    a, b = to_numpy(a), to_numpy(b)
    if _is_uint8(a) != _is_uint8(b):
        raise ValueError(f"Both inputs must be the same kind (uint8 or float), got {a.dtype} and {b.dtype}.")
    if a.shape != b.shape:
        raise ValueError(f"Both inputs must have the same shape, got {a.shape} and {b.shape}.")
    if a.ndim < 3:
        raise ValueError(f"Frames must have shape [... x C x H x W], got {a.shape}.")
    return to_pixel_scale(a), to_pixel_scale(b)


# ---------------------------------------------------------------------------
# PSNR and SSIM
# ---------------------------------------------------------------------------


def psnr(a, b):
    """Peak signal-to-noise ratio in dB per frame, with data range 255.

    Float inputs in [-1, 1] are mapped to [0, 255] first, so uint8 and float frames
    give comparable numbers. Identical frames have zero error and give +inf.
    """
    a, b = _pair_to_pixel_scale(a, b)
    mse = np.mean((a - b) ** 2, axis=(-3, -2, -1))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(DATA_RANGE**2 / mse)


def gaussian_window(size=SSIM_WINDOW, sigma=SSIM_SIGMA):
    """The normalised 1-D Gaussian whose outer product is the SSIM window."""
    k = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(k**2) / (2.0 * sigma**2))
    return g / g.sum()


def _filter_valid(x, g):
    """Separable 'valid' 2-D filtering of the last two axes (no padding)."""
    n = len(g)
    x = np.lib.stride_tricks.sliding_window_view(x, n, axis=-1) @ g
    x = np.lib.stride_tricks.sliding_window_view(x, n, axis=-2) @ g
    return x


def ssim(a, b, chunk_size=64):
    """Structural similarity per frame (Wang et al. 2004), averaged over channels and pixels.

    Local statistics use an 11x11 Gaussian window (sigma 1.5) applied as a 'valid'
    convolution, i.e. only where the window fits inside the frame, as in the
    authors' MATLAB `ssim_index` (`filter2(..., 'valid')`). This equals
    skimage's `structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255)` per channel: skimage filters with
    reflected borders but then discards the 5-pixel border where they matter.
    Variances use 1/N weights (`use_sample_covariance=False`). Unlike the MATLAB
    script we never downsample large frames first.
    """
    a, b = _pair_to_pixel_scale(a, b)
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {a.shape[-2:]}.")
    lead = a.shape[:-3]
    a = a.reshape(-1, *a.shape[-3:])
    b = b.reshape(-1, *b.shape[-3:])
    g = gaussian_window()
    c1 = (SSIM_K1 * DATA_RANGE) ** 2
    c2 = (SSIM_K2 * DATA_RANGE) ** 2
    out = np.empty(len(a))
    for start in range(0, len(a), chunk_size):
        x, y = a[start:start + chunk_size], b[start:start + chunk_size]
        mu_x, mu_y = _filter_valid(x, g), _filter_valid(y, g)
        var_x = _filter_valid(x * x, g) - mu_x**2
        var_y = _filter_valid(y * y, g) - mu_y**2
        cov_xy = _filter_valid(x * y, g) - mu_x * mu_y
        ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
            (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
        )
        out[start:start + chunk_size] = ssim_map.mean(axis=(-3, -2, -1))
    return out.reshape(lead)


# ---------------------------------------------------------------------------
# LPIPS (optional dependency)
# ---------------------------------------------------------------------------


def load_lpips(net="alex"):
    """The `lpips` package's network, or MetricUnavailable saying why it is skipped."""
    try:
        import lpips  # optional; imported lazily so the package never needs it
    except ImportError:
        raise MetricUnavailable("LPIPS skipped: the optional `lpips` package is not installed.") from None
    try:
        model = lpips.LPIPS(net=net, verbose=False)
    except Exception as e:  # weights are downloaded on first use and may be unreachable
        raise MetricUnavailable(f"LPIPS skipped: its network weights could not be loaded ({e}).") from None
    return model.eval()


@torch.no_grad()
def lpips_distance(a, b, model=None, net="alex", batch_size=32):
    """LPIPS distance (Zhang et al. 2018) per frame; lower means more similar.

    Pass `model=load_lpips()` when calling repeatedly, to load the network once.
    Raises MetricUnavailable when `lpips` or its weights are unavailable.
    """
    a, b = _pair_to_pixel_scale(a, b)
    if model is None:
        model = load_lpips(net)
    lead = a.shape[:-3]
    # LPIPS expects float frames in [-1, 1].
    a = torch.from_numpy(a.reshape(-1, *a.shape[-3:]) / 127.5 - 1.0).float()
    b = torch.from_numpy(b.reshape(-1, *b.shape[-3:]) / 127.5 - 1.0).float()
    device = next(model.parameters(), torch.zeros(0)).device
    out = []
    for start in range(0, len(a), batch_size):
        d = model(a[start:start + batch_size].to(device), b[start:start + batch_size].to(device))
        out.append(d.reshape(-1).cpu().double())
    return torch.cat(out).numpy().reshape(lead)


# ---------------------------------------------------------------------------
# Fréchet distance and FVD
# ---------------------------------------------------------------------------


def _psd_sqrt(m):
    """Square root of a symmetric positive semi-definite matrix via eigh."""
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(features_a, features_b):
    """Fréchet distance between Gaussians fitted to two N x D feature sets.

    d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}).
    Covariances are unbiased (1/(N-1), as `numpy.cov`). The trace term uses
    Tr (S_a S_b)^{1/2} = Tr (S_a^{1/2} S_b S_a^{1/2})^{1/2}, whose argument is
    symmetric positive semi-definite, so symmetric eigendecompositions in float64
    suffice (no scipy) and singular covariances (N <= D) stay finite. Tiny negative
    eigenvalues from round-off are clipped to zero, as is a tiny negative result.
    """
    a = np.asarray(to_numpy(features_a), dtype=np.float64)
    b = np.asarray(to_numpy(features_b), dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"Features must be two N x D arrays with the same D, got {a.shape} and {b.shape}.")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"A Fréchet distance needs at least 2 samples per set, got {len(a)} and {len(b)}.")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    sqrt_a = _psd_sqrt(cov_a)
    middle = sqrt_a @ cov_b @ sqrt_a
    middle = (middle + middle.T) / 2.0
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0.0, None)).sum()
    d = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt
    return float(max(d, 0.0))


def load_i3d(path, device="cpu"):
    """Load the I3D TorchScript file (`i3d_torchscript.pt` from StyleGAN-V) for FVD."""
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except Exception as e:
        raise ValueError(f"Could not load an I3D TorchScript model from {path} ({type(e).__name__}).") from None


def _videos_to_uint8(videos):
    """Videos [B x T x C x H x W] as a uint8 tensor in [0, 255], float ones rounded as samples are saved."""
    x = to_numpy(videos)
    if x.ndim != 5:
        raise ValueError(f"Videos must have shape [B x T x C x H x W], got {x.shape}.")
    if not _is_uint8(x):
        check_float_frames(x)
        x = to_uint8(x)
    return torch.from_numpy(np.ascontiguousarray(x))


@torch.no_grad()
def i3d_features(videos, detector, batch_size=8, device=None):
    """I3D features (N x 400 for the real detector) of videos [B x T x C x H x W].

    We call the detector the way StyleGAN-V's FVD does: input [B x C x T x H x W]
    uint8 in [0, 255] (float [-1, 1] videos are rounded to uint8 first, as samples
    are saved) with `rescale=True` (the network maps [0, 255] to [-1, 1]),
    `resize=True` (it resizes frames to 224 x 224) and `return_features=True`
    (the 400 Kinetics logits before the softmax, the embedding of the original
    TensorFlow FVD). Single-channel videos are repeated to RGB. I3D needs enough
    frames for its temporal pooling; the original FVD used 16.
    """
    x = _videos_to_uint8(videos)
    if x.shape[2] == 1:
        x = x.repeat(1, 1, 3, 1, 1)
    if x.shape[2] != 3:
        raise ValueError(f"Videos must have 1 or 3 channels, got {x.shape[2]}.")
    if device is None:
        device = next(detector.parameters(), torch.zeros(0)).device
    feats = []
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size].permute(0, 2, 1, 3, 4).contiguous().to(device)
        f = detector(batch, rescale=True, resize=True, return_features=True)
        feats.append(f.detach().cpu().double().reshape(len(batch), -1))
    return torch.cat(feats).numpy()


def fvd(videos_a, videos_b, detector, batch_size=8):
    """Fréchet Video Distance between two sets of videos [B x T x C x H x W].

    Returns dict(fvd=..., n_videos=len(videos_a), n_videos_b=len(videos_b)).
    FVD is biased by the number of videos, so compare scores computed from equal
    counts (FDM used 100 samples against 100 test videos).
    """
    n_a, n_b = len(videos_a), len(videos_b)
    if n_a < 2 or n_b < 2:
        raise ValueError(f"FVD needs at least 2 videos per set, got {n_a} and {n_b}.")
    feats_a = i3d_features(videos_a, detector, batch_size=batch_size)
    feats_b = i3d_features(videos_b, detector, batch_size=batch_size)
    return dict(fvd=frechet_distance(feats_a, feats_b), n_videos=n_a, n_videos_b=n_b)
