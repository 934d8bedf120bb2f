"""Compare sampling schemes on one checkpoint: what scripts/compare_schemes.py runs.

Every scheme samples test videos 0..n_videos-1 with `sample_dataset` into <out_dir>/<scheme>/
(existing samples are kept, so an interrupted comparison resumes), is scored as by video_eval.py,
and report.md / report.html are written (report.py). Every scheme gets the same n_obs (default
max_frames - max_latent_frames), so all are conditioned on the same frames. All settings, and
every scheme, are checked before anything is sampled. Every scheme samples with the same run options
(`sampling.run.SampleOptions`: batch size, seed, a Diffusion Forcing checkpoint's `df_config`,
precision, compile, batch_invariant, kv_cache, a conditional checkpoint's actions and uncond) and the
same `sampling.request.SchemeRequest` (geometry, respacing, stage settings such as guidance_scale). A
scheme may be given with its own settings, "stabilized-autoreg:stabilization_level=50"
(SchemeRequest.with_spec), so one comparison holds a scheme at several settings; its samples go to
<out_dir>/<spec, ':' as '_'>/.
MCMC refinement of an energy checkpoint is such a setting ("autoreg:mcmc_steps=5"); a scheme asking
for it on any other checkpoint is refused before anything is sampled.

`compare_runs` repeats the comparison for several checkpoints (training seeds) and sampling seeds, run r
into <out_dir>/run<r>/, and reports each metric as mean ± standard error across runs (aggregate.py).
"""

import dataclasses
import os
import sys

import torch.distributed as dist

from .. import dist_util
from ..data.datasets import get_dataset
from ..errors import ConfigError, UserError
from ..sampling.condition_sources import sampling_conditions
from ..sampling.request import SchemeRequest, checkpoint_config, sampler_defaults, scheme_for_checkpoint, size_flag
from ..sampling.run import SampleOptions, check_folder, check_options, default_eval_dir, sample_dataset
from .aggregate import write_aggregate_report
from .evaluate import parse_metrics
from .on_manifold import TOLERANCES
from .report import (SETTINGS_FILE, check_settings_file, evaluate_schemes, load_runs, parse_schemes,
                     sample_schemes, write_report)

DEFAULT_SCHEMES = "autoreg,long-range,hierarchy-2,df-pyramid"


def compare_schemes(checkpoint_path, schemes=DEFAULT_SCHEMES, *, request=SchemeRequest(), options=SampleOptions(),
                    n_videos=8, metrics="", i3d_path=None, out_dir=None, on_manifold_tolerance="generator",
                    check_only=False):
    """Sample, score and report each scheme of the comma-separated `schemes`; returns (report.md, report.html).

    request: what every scheme shares (a SchemeRequest: geometry, respacing, stage settings; each scheme
    spec names its preset and may set its own settings on top). options: the run options every scheme
    samples with (SampleOptions: batch_size, seed, df_config, model call, actions, uncond); precision
    and the conditions are settings of out_dir (samples made differently are not mixed), compile,
    batch_invariant and kv_cache are not. on_manifold_tolerance: a name of on_manifold.TOLERANCES
    (scoring only). check_only: check every setting (and out_dir's recorded ones), then return None
    without writing anything, so that compare_runs can check all its runs first. Under MPI every rank
    calls this and samples its share; rank 0 scores and writes the report (other ranks return None).
    """
    had_process_group = dist.is_initialized()

    # ---- every setting is checked before anything is sampled
    names = parse_schemes(schemes)
    if n_videos < 1:
        raise ConfigError(f"--n_videos must be at least 1, got {n_videos}.")
    check_options(options)
    config, _ = checkpoint_config(checkpoint_path, options.df_config)
    K = size_flag("max_frames", request.max_frames, int(config.get("max_frames") or 20))
    S = size_flag("max_latent_frames", request.max_latent_frames, None)
    n_obs = size_flag("n_obs", request.n_obs, K - (S or K // 2), minimum=0)
    request = dataclasses.replace(request, n_obs=n_obs)  # every scheme is conditioned on the same frames
    for spec in names:
        try:
            scheme = scheme_for_checkpoint(config, request.with_spec(spec))
            sampling_conditions(config, checkpoint_path, actions=options.actions, uncond=bool(options.uncond),
                                guidance_scale=scheme.stage.guidance_scale)
        except UserError as e:
            raise type(e)(f"Scheme {spec}: {e}") from None
    dataset = config.get("dataset") or "bouncing_balls"
    n_test = len(get_dataset(dataset, split="test", T=max(n_obs, 1), image_size=int(config["image_size"])))
    if n_videos > n_test:
        raise ConfigError(f"--n_videos {n_videos} exceeds the {n_test} test videos of {dataset}.")
    metric_names = parse_metrics(metrics, config.get("dataset"), have_i3d=bool(i3d_path))
    if on_manifold_tolerance not in TOLERANCES:
        raise ConfigError(f"--on_manifold_tolerance must be one of {', '.join(TOLERANCES)}, "
                          f"got {on_manifold_tolerance!r}.")
    if "fvd" in metric_names and n_videos < 2:
        raise ConfigError(f"FVD needs at least 2 videos; pass --n_videos 2 or more (got {n_videos}).")
    if i3d_path is not None and not os.path.isfile(i3d_path):
        raise ConfigError(f"--i3d_path {i3d_path} is not a file.")
    out_dir = out_dir or default_eval_dir(checkpoint_path, config, "compare_schemes")
    check_folder("out_dir", out_dir)
    if os.path.isfile(os.path.join(out_dir, "run0", SETTINGS_FILE)):
        raise ConfigError(f"{out_dir} holds a comparison over several runs; use another --out_dir.")
    settings = comparison_settings(checkpoint_path, config, request, options, T=scheme.T, K=K, S=S)
    rank, _ = dist_util.setup_dist()
    check_settings_file(out_dir, settings, write=rank == 0 and not check_only)
    if check_only:
        return None

    # ---- sample every scheme (each rank its share of the videos)
    def sample(spec, eval_dir):
        sample_dataset(checkpoint_path, request.with_spec(spec),
                       dataclasses.replace(options, eval_dir=eval_dir, stop_index=n_videos))

    sample_schemes(names, sample, out_dir, n_videos)

    # ---- score and report (rank 0)
    paths = None
    if rank == 0:
        results = evaluate_schemes(names, out_dir, metric_names, i3d_path, n_videos,
                                   on_manifold_tolerance=on_manifold_tolerance)
        paths = write_report(out_dir, names, results, load_runs(out_dir), settings)
    if dist.is_initialized() and not had_process_group:  # gloo may abort at exit if its group is left open
        dist_util.barrier()
        dist.destroy_process_group()
    return paths


def comparison_settings(checkpoint_path, config, request, options, *, T, K, S):
    """What compare_config.json records: the settings every scheme shares, checked again on resume.

    Every scheme has the same T. use_ddim is recorded as resolved (the checkpoint's default when not
    given); other stage settings only when given, and actions/uncond, guidance and a DF config only when
    used, so that comparisons written before they could be given still match.
    """
    given = dict(request.settings)
    use_ddim = given.pop("use_ddim", None)
    if use_ddim is None:
        use_ddim = sampler_defaults(config).get("use_ddim", False)
    if given.get("guidance_scale", 1.0) == 1.0:
        given.pop("guidance_scale", None)
    settings = dict(checkpoint=os.path.abspath(checkpoint_path), T=T, n_obs=request.n_obs, max_frames=K,
                    max_latent_frames=S, timestep_respacing=request.timestep_respacing, use_ddim=use_ddim,
                    seed=options.seed, precision=options.precision, **given)
    if options.actions is not None or options.uncond:
        settings.update(actions=None if options.actions is None else os.path.abspath(options.actions),
                        uncond=bool(options.uncond))
    if options.df_config is not None:
        df_config = options.df_config
        settings["df_config"] = df_config if isinstance(df_config, dict) else os.path.abspath(df_config)
    return settings


def parse_seeds(text):
    """Sampling seeds from "0,1,2": integers of at least 0, without repeats; ConfigError otherwise."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}.") from None
    if not seeds:
        raise ConfigError("--seeds names no seed.")
    if min(seeds) < 0:
        raise ConfigError(f"--seeds must be at least 0, got {min(seeds)}.")
    if len(set(seeds)) < len(seeds):
        raise ConfigError(f"--seeds names a seed twice: {text}.")
    return seeds


def compare_runs(checkpoint_paths, seeds, schemes=DEFAULT_SCHEMES, *, options=SampleOptions(), n_videos=8,
                 out_dir=None, **kwargs):
    """Compare schemes over every (checkpoint, seed) run; returns (report.md, report.html) on rank 0.

    One run is exactly `compare_schemes` (same folders, same report). Several: run r = (checkpoint
    r // len(seeds), seed r % len(seeds)) is a whole comparison in <out_dir>/run<r>/ (so each resumes on
    its own), and <out_dir>/report.md, report.html, report.json and runs.json give every metric as
    mean ± standard error across runs and each run's values (aggregate.py). Every run's settings are
    checked before anything is sampled. options: the run options (their seed is each run's); kwargs:
    compare_schemes's other settings.
    """
    checkpoint_paths, seeds = list(checkpoint_paths), list(seeds)
    kwargs.update(schemes=schemes, n_videos=n_videos)
    if len(checkpoint_paths) == 1 and len(seeds) == 1:
        return compare_schemes(checkpoint_paths[0], options=dataclasses.replace(options, seed=seeds[0]),
                               out_dir=out_dir, **kwargs)
    if len(set(map(os.path.abspath, checkpoint_paths))) < len(checkpoint_paths):
        raise ConfigError("A checkpoint is given twice; give each training run's checkpoint once.")
    if out_dir is None:
        raise ConfigError("Comparing several runs needs --out_dir, the folder of their run<r>/ folders and the "
                          "aggregate report.")
    check_folder("out_dir", out_dir)
    if os.path.isfile(os.path.join(out_dir, SETTINGS_FILE)):
        raise ConfigError(f"{out_dir} holds a single-run comparison; use another --out_dir.")
    runs = [dict(folder=f"run{r}", checkpoint=os.path.abspath(path), seed=seed)
            for r, (path, seed) in enumerate((p, s) for p in checkpoint_paths for s in seeds)]
    had_process_group = dist.is_initialized()
    rank, _ = dist_util.setup_dist()  # once, so that the runs below share the process group
    for run in runs:
        compare_schemes(run["checkpoint"], options=dataclasses.replace(options, seed=run["seed"]),
                        out_dir=os.path.join(out_dir, run["folder"]), check_only=True, **kwargs)
    for k, run in enumerate(runs):
        if rank == 0:
            print(f"run {k + 1} of {len(runs)}: {run['checkpoint']}, seed {run['seed']}", file=sys.stderr, flush=True)
        compare_schemes(run["checkpoint"], options=dataclasses.replace(options, seed=run["seed"]),
                        out_dir=os.path.join(out_dir, run["folder"]), **kwargs)
    paths = None
    if rank == 0:
        paths = write_aggregate_report(out_dir, runs, parse_schemes(schemes), n_videos)
    if dist.is_initialized() and not had_process_group:
        dist_util.barrier()
        dist.destroy_process_group()
    return paths
