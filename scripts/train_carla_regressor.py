"""Train the CARLA Town01 frame-to-coordinates classifier or regressor (FDM's metrics).

Both are needed: the classifier picks a grid cell, the regressor's head for that
cell gives (x, y). Train each once per dataset:

    python scripts/train_carla_regressor.py --data_dir datasets/carla/no-traffic \
        --kind classifier --out checkpoints/carla-regressor/classifier.pt
    python scripts/train_carla_regressor.py --data_dir datasets/carla/no-traffic \
        --kind regressor --out checkpoints/carla-regressor/regressor.pt

FDM's released `classifier_checkpoint.pth` / `regressor_checkpoint.pth` load with
`improved_diffusion.evaluation.carla_coords.load_models` without retraining.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from improved_diffusion.evaluation import carla_coords


def main(args):
    config = carla_coords.CoordinateModelConfig(layers=tuple(args.layers), width=args.width)
    init_state = None
    if args.init_from is not None:
        try:
            init_state = torch.load(args.init_from, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"Could not read --init_from {args.init_from} ({type(e).__name__}).") from None
    model, history = carla_coords.train_coordinate_model(
        args.data_dir,
        args.kind,
        config=config,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        videos_per_chunk=args.videos_per_chunk,
        frames_per_video=args.frames_per_video,
        init_state=init_state,
    )
    carla_coords.save_model(args.out, model, args.kind, config)
    Path(args.out).with_suffix(".history.json").write_text(json.dumps(history, indent=1))
    print(f"Saved the {args.kind} with the lowest test loss to {args.out}.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="CARLA directory with video_<split>.csv files.")
    parser.add_argument("--kind", required=True, choices=carla_coords.KINDS)
    parser.add_argument("--out", required=True, help="Checkpoint path to write.")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--videos_per_chunk", type=int, default=8, help="Videos held in memory at once.")
    parser.add_argument("--frames_per_video", type=int, default=None,
                        help="Random frames used per video each epoch (default: all).")
    parser.add_argument("--layers", type=int, nargs=4, default=list(carla_coords.RESNET152_LAYERS),
                        help="Bottleneck blocks per ResNet stage (default: ResNet-152).")
    parser.add_argument("--width", type=int, default=64, help="Channels of the first ResNet stage.")
    parser.add_argument("--init_from", default=None,
                        help="Optional ResNet state dict (e.g. torchvision ImageNet weights) to start from.")
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as e:
        sys.exit(f"error: {e}")
