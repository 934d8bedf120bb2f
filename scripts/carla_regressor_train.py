"""Train the CARLA Town01 frame-to-coordinates classifier or regressor (FDM's WD and PO metrics).

Both are needed: the classifier picks a grid cell, the regressor's head for that
cell gives (x, y). Train each once per dataset (FDM's `--is_classifier True/False` and
`--num_epochs` work too; without --out the weights go to FDM's released file names under
checkpoints/carla-regressor/):

    python scripts/carla_regressor_train.py --data_dir datasets/carla/no-traffic \
        --kind classifier --out checkpoints/carla-regressor/classifier.pt
    python scripts/carla_regressor_train.py --data_dir datasets/carla/no-traffic \
        --kind regressor --out checkpoints/carla-regressor/regressor.pt

FDM's released `classifier_checkpoint.pth` / `regressor_checkpoint.pth` work as they
are (video_eval.py --carla_classifier/--carla_regressor, video_to_world_coords.py).
The loss history is written beside the weights (`<out>.history.json`).
"""

import argparse
import sys
from pathlib import Path

# Lets the script run from a checkout that was not pip-installed; an installed package is the same code.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from improved_diffusion import cli  # noqa: E402
from improved_diffusion.errors import ConfigError  # noqa: E402
from improved_diffusion.evaluation.carla_regressor import KINDS, RESNET152_LAYERS  # noqa: E402
from improved_diffusion.evaluation.carla_training import train_and_save  # noqa: E402


def create_argparser():
    p = cli.ArgumentParser(prog="carla_regressor_train.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="CARLA folder with video_<split>.csv and coords_<i>.npy files")
    p.add_argument("--kind", default=None, choices=KINDS, help="what to train (default: regressor, as FDM)")
    p.add_argument("--is_classifier", type=cli.str2bool, default=None, help="FDM's spelling: True = --kind classifier")
    p.add_argument("--out", default=None,
                   help="checkpoint path to write (default: checkpoints/carla-regressor/<kind>_checkpoint.pth)")
    p.add_argument("--epochs", "--num_epochs", type=int, default=25)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--videos_per_chunk", type=int, default=8, help="videos held in memory at once")
    p.add_argument("--frames_per_video", type=int, default=None,
                   help="random frames used per video each epoch (default: all)")
    p.add_argument("--layers", type=int, nargs=4, default=list(RESNET152_LAYERS),
                   help="bottleneck blocks per ResNet stage (default: ResNet-152)")
    p.add_argument("--width", type=int, default=64, help="channels of the first ResNet stage")
    p.add_argument("--init_from", default=None,
                   help="optional ResNet state dict (e.g. torchvision's ImageNet weights) to start from")
    return p


def main(args):
    from_flag = None if args.is_classifier is None else KINDS[0] if args.is_classifier else KINDS[1]
    if args.kind and from_flag and args.kind != from_flag:
        raise ConfigError(f"--kind {args.kind} contradicts --is_classifier {args.is_classifier}; pass one of them.")
    args.kind = args.kind or from_flag or "regressor"
    args.out = args.out or f"checkpoints/carla-regressor/{args.kind}_checkpoint.pth"
    train_and_save(args.out, args.data_dir, args.kind, layers=args.layers, width=args.width, init_from=args.init_from,
                   epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=args.device, seed=args.seed,
                   videos_per_chunk=args.videos_per_chunk, frames_per_video=args.frames_per_video)
    print(f"Saved the {args.kind} with the lowest test loss to {args.out}.")


if __name__ == "__main__":
    sys.exit(cli.run(main, create_argparser()))
