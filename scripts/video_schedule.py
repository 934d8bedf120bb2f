"""Show a sampling scheme without a model: its frame plan and each stage's noise-level matrix.

    python scripts/video_schedule.py --sampling_scheme hierarchy-2 --T 300 --n_obs 36 --max_frames 20 --format text
    python scripts/video_schedule.py --sampling_scheme df-pyramid --T 100 --n_obs 4 --max_frames 16 --format json
    python scripts/video_schedule.py --sampling_scheme autoreg --T 100 --n_obs 36 --max_frames 20 --format png --out plan.png

Adaptive plans choose their observed frames from the videos, so this script refuses them (exit 2);
their non-adaptive counterparts (autoreg, hierarchy-N) show the same kind of plan. Stabilization
and chunk size are applied by the video sampler; here they are only recorded (a chunk size turns
autoreg into the sliding-window plan).
"""

import json
import sys
from pathlib import Path

# Lets the script run from a checkout that was not pip-installed; an installed package is the same code.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from improved_diffusion.sampling.noise_schedules import ScheduleError, noise_levels, noise_schedules  # noqa: E402
from improved_diffusion.sampling.plan_picture import draw_plan  # noqa: E402
from improved_diffusion.script_util import ArgumentParser  # noqa: E402
from improved_diffusion.sampling.plans import ADAPTIVE_PLANS, PlanError, plan_stages, presets, resolve_scheme  # noqa: E402


def parse_args(argv=None):
    parser = ArgumentParser(prog="video_schedule.py", description=__doc__.splitlines()[0])
    parser.add_argument("--sampling_scheme", required=True, choices=list(presets))
    parser.add_argument("--T", type=int, required=True, help="Video length.")
    parser.add_argument("--n_obs", type=int, required=True, help="Number of given frames at the start.")
    parser.add_argument("--max_frames", type=int, required=True, help="K: most frames in the model at once.")
    parser.add_argument("--max_latent_frames", type=int, default=None, help="S: new frames per stage (default K // 2).")
    parser.add_argument("--noise_schedule", default=None, choices=list(noise_schedules),
                        help="Within-stage schedule (default: the scheme's preset, full_sequence for FDM plans).")
    parser.add_argument("--sampling_steps", type=int, default=10, help="Denoising steps per stage (noise levels S..0).")
    parser.add_argument("--uncertainty_scale", type=float, default=None, help="Pyramid/trapezoid lag per frame (default 1).")
    parser.add_argument("--stabilization_level", type=int, default=None, help="Recorded only; applied by the sampler.")
    parser.add_argument("--chunk_size", type=int, default=None, help="Sliding-window chunk; > 0 turns autoreg into sliding-window.")
    parser.add_argument("--optimality", default=None, metavar="PATH", help="Optimal schedule file (stage -> observed frames).")
    parser.add_argument("--format", default="text", choices=["json", "text", "png"])
    parser.add_argument("--out", default=None, help="Output file (default stdout; required for png).")
    args = parser.parse_args(argv)
    if args.format == "png" and args.out is None:
        parser.error("--format png needs --out FILE.")
    return args


def describe(args):
    """The JSON-able description of the requested scheme: settings plus one entry per stage."""
    config = resolve_scheme(
        args.sampling_scheme, args.max_frames, args.max_latent_frames,
        noise_schedule=args.noise_schedule, uncertainty_scale=args.uncertainty_scale,
        stabilization_level=args.stabilization_level, chunk_size=args.chunk_size,
    )
    if config["plan"] in ADAPTIVE_PLANS:
        raise PlanError(
            f"{config['plan']} chooses observed frames from the videos, so it cannot be shown without them; "
            "use its non-adaptive counterpart instead."
        )
    stages = plan_stages(config["plan"], args.T, args.n_obs, config["max_frames"], config["step_size"], args.optimality)
    return {
        "sampling_scheme": args.sampling_scheme,
        "plan": config["plan"],
        "T": args.T,
        "n_obs": args.n_obs,
        "max_frames": config["max_frames"],
        "max_latent_frames": config["step_size"],
        "noise_schedule": config["noise_schedule"],
        "sampling_steps": args.sampling_steps,
        "uncertainty_scale": config["uncertainty_scale"],
        "stabilization_level": config["stabilization_level"],
        "chunk_size": config["chunk_size"],
        "optimality": args.optimality,
        "stages": [
            {
                "obs": sorted(obs),
                "latent": sorted(latent),
                "noise_levels": noise_levels(
                    config["noise_schedule"], len(latent), args.sampling_steps, config["uncertainty_scale"]
                ).tolist(),
            }
            for obs, latent in stages
        ],
    }


def as_text(doc):
    lines = [
        f"{doc['sampling_scheme']} (plan {doc['plan']}): T={doc['T']}, n_obs={doc['n_obs']}, "
        f"max_frames={doc['max_frames']}, max_latent_frames={doc['max_latent_frames']}, "
        f"noise schedule {doc['noise_schedule']} ({doc['sampling_steps']} steps, "
        f"uncertainty scale {doc['uncertainty_scale']}), stabilization level {doc['stabilization_level']}, "
        f"chunk size {doc['chunk_size']}, {len(doc['stages'])} stages"
    ]
    for i, stage in enumerate(doc["stages"]):
        calls = len(stage["noise_levels"]) - 1
        lines.append(f"stage {i:3d}: observe {stage['obs']} -> generate {stage['latent']} ({calls} model calls)")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    try:
        doc = describe(args)
        if args.format == "png":
            stages = [(s["obs"], s["latent"]) for s in doc["stages"]]
            draw_plan(stages, args.T, args.out)
            return 0
        text = json.dumps(doc) + "\n" if args.format == "json" else as_text(doc)
        if args.out is None:
            sys.stdout.write(text)
        else:
            Path(args.out).write_text(text)
    except (PlanError, ScheduleError, OSError) as e:
        print(f"video_schedule.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
