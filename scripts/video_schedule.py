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
from improved_diffusion.sampling.request import SchemeRequest, add_request_flags  # noqa: E402


def create_argparser():
    p = cli.ArgumentParser(prog="video_schedule.py", description=__doc__.splitlines()[0])
    add_request_flags(p, only=("sampling_scheme", "T", "n_obs", "max_frames", "max_latent_frames", "chunk_size",
                               "optimality"), required=("sampling_scheme", "T", "n_obs", "max_frames"))
    p.add_argument("--format", default="text", choices=FORMATS)
    p.add_argument("--out", default=None, help="Output file (default stdout; required for png).")
    return p


def main(args):
    text = show_scheme(SchemeRequest.from_args(args), format=args.format, out=args.out)
    if text is not None:
        sys.stdout.write(text)


if __name__ == "__main__":
    sys.exit(cli.run(main, create_argparser()))
