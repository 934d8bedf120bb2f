"""Show a sampling scheme without a model: its frame plan and each stage's noise-level matrix.

    python scripts/video_schedule.py --sampling_scheme hierarchy-2 --T 300 --n_obs 36 --max_frames 20 --format text
    python scripts/video_schedule.py --sampling_scheme df-pyramid --T 100 --n_obs 4 --max_frames 16 --format json
    python scripts/video_schedule.py --sampling_scheme autoreg --T 100 --n_obs 36 --max_frames 20 --format png --out plan.png

Adaptive plans choose their observed frames from the videos, so this script refuses them (exit 2);
their non-adaptive counterparts (autoreg, hierarchy-N) show the same kind of plan. Stabilization
is applied by the video sampler; here it is only recorded (a chunk size turns autoreg into the
sliding-window plan). The JSON is the scheme as video_sample.py saves it, plus its stages
(improved_diffusion.sampling.describe.show_scheme).
"""

import sys
from pathlib import Path

# Lets the script run from a checkout that was not pip-installed; an installed package is the same code.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from improved_diffusion import cli  # noqa: E402
from improved_diffusion.sampling.describe import FORMATS, show_scheme  # noqa: E402
from improved_diffusion.sampling.noise_schedules import noise_schedules  # noqa: E402
from improved_diffusion.sampling.scheme import PRESETS  # noqa: E402


def create_argparser():
    p = cli.ArgumentParser(prog="video_schedule.py", description=__doc__.splitlines()[0])
    p.add_argument("--sampling_scheme", required=True, choices=list(PRESETS))
    p.add_argument("--T", type=int, required=True, help="Video length.")
    p.add_argument("--n_obs", type=int, required=True, help="Number of given frames at the start.")
    p.add_argument("--max_frames", type=int, required=True, help="K: most frames in the model at once.")
    p.add_argument("--max_latent_frames", type=int, default=None, help="S: new frames per stage (default K // 2).")
    p.add_argument("--noise_schedule", default=None, choices=list(noise_schedules),
                   help="Within-stage schedule (default: the scheme's preset, full_sequence for FDM plans).")
    p.add_argument("--sampling_steps", type=int, default=10, help="Denoising steps per stage (noise levels S..0).")
    p.add_argument("--uncertainty_scale", type=float, default=None, help="Pyramid/trapezoid lag per frame (default 1).")
    p.add_argument("--stabilization_level", type=int, default=None, help="Recorded only; applied by the sampler.")
    p.add_argument("--chunk_size", type=int, default=None, help="Sliding-window chunk; > 0 turns autoreg into sliding-window.")
    p.add_argument("--optimality", default=None, metavar="PATH", help="Optimal schedule file (stage -> observed frames).")
    p.add_argument("--format", default="text", choices=FORMATS)
    p.add_argument("--out", default=None, help="Output file (default stdout; required for png).")
    return p


def main(args):
    text = show_scheme(**vars(args))
    if text is not None:
        sys.stdout.write(text)


if __name__ == "__main__":
    sys.exit(cli.run(main, create_argparser()))
