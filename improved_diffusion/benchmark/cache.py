"""The key/value cache's speed-up by window size (scripts/benchmark.py --cache_windows).

Apart from the variant table: a causal model's stabilized-autoreg rollout with and without
sampling.kv_cache.CausalCache, for a list of windows, since the cache's gain grows with the window.
"""

import dataclasses
import statistics
import sys
import time

import torch

from ..cli import device_flag
from ..diffusion import DiffusionConfig, create_diffusion
from ..errors import ConfigError
from ..models.build import ModelConfig, create_model
from ..sampling.kv_cache import CausalCache
from ..sampling.sampler import sample_video, video_generator
from ..sampling.scheme import Scheme
from .configs import bench_config
from .memory import synchronize
from .workload import randomize_zero_parameters


def cache_by_window(config, windows, T=64, sampling_steps=20, reps=2, device=None, seed=0, log=None, videos=None):
    """Frames/s of a causal `stabilized-autoreg` rollout (DDIM, 1 new frame per stage) to T frames, with and
    without the key/value cache, for each window (max_frames) in `windows`; returns a markdown table.

    Uncached and cached rollouts of one window alternate (reps each) and the median is reported; the
    cached sampler computes the window's frames once per stage and then only the new frame, so the
    ratio grows with the window and with the number of steps per stage. videos: how many videos are
    sampled at once (None: the config's sample_batch).
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    bench = bench_config(config, quick=False, sampling_steps=sampling_steps)
    if videos is not None:
        if videos < 1:
            raise ConfigError(f"--videos must be a positive integer, got {videos}.")
        bench = dataclasses.replace(bench, sample_batch=videos)
    device = device_flag(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not windows or min(windows) < 2 or max(windows) >= T:
        raise ConfigError(f"--cache_windows must be window sizes between 2 and T - 1 = {T - 1}, got {windows}.")
    torch.manual_seed(seed)
    model = create_model(ModelConfig(**{**bench.model, "causal": True})).to(device).eval()
    randomize_zero_parameters(model, seed)
    diffusion = create_diffusion(DiffusionConfig(), timestep_respacing=str(sampling_steps))
    size = bench.model["image_size"]
    videos = (torch.rand(bench.sample_batch, T, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
              * 2 - 1).to(device)
    lines = [f"causal {config} model, stabilized-autoreg (DDIM, {sampling_steps} steps per stage, 1 new frame per "
             f"stage), {bench.sample_batch} video(s) to {T} frames, median of {reps}:", "",
             "| window | frames/s uncached | frames/s cached | speed-up | frame slots computed |", "|---|---|---|---|---|"]
    for window in windows:
        scheme = Scheme.from_preset("stabilized-autoreg", T=T, n_obs=window - 1, max_frames=window, use_ddim=True,
                                    sampling_steps=sampling_steps)
        frames = bench.sample_batch * (T - scheme.n_obs)
        seconds = {"uncached": [], "cached": []}
        for rep in range(reps):
            for kind in seconds:
                net = CausalCache(model) if kind == "cached" else model
                generators = [video_generator(0, 0, b) for b in range(len(videos))]
                start = time.perf_counter()
                with torch.no_grad():
                    sample_video(net, diffusion, videos, scheme.n_obs, scheme.make_plan(), scheme.stage, generators)
                synchronize(device)
                seconds[kind].append(time.perf_counter() - start)
                if kind == "cached":
                    computed = net.frames_computed / net.frames_requested
                log(f"window {window} rep {rep + 1}: {kind} {seconds[kind][-1]:.1f} s")
        fps = {kind: frames / statistics.median(s) for kind, s in seconds.items()}
        lines.append(f"| {window} | {fps['uncached']:.2f} | {fps['cached']:.2f} | "
                     f"{fps['cached'] / fps['uncached']:.2f}x | {computed:.0%} |")
    return "\n".join(lines) + "\n"
