"""Command-line plumbing shared by the scripts: flags from dataclasses, and one way to fail.

`run(main, parser)` is how every script starts: it parses the arguments, calls `main(args)`
and turns a `UserError` into one sentence on stderr and exit code 2. Under MPI a failing
rank takes the others down with it, so a job never hangs on a rank that gave up.
"""

import argparse
import dataclasses
import sys
import traceback

import torch

from . import dist_util
from .errors import ConfigError, UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error style: one line on stderr and exit code 2, no usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got '{v}'")


def add_dataclass_args(parser, cls, overrides=None, choices=None, only=None, required=()):
    """One --flag per field (or per field named in `only`), typed by the field's default; `required` must be given.

    Booleans accept true/false. A field's `metadata` may give its `help`, its `choices` (argparse's
    `choices=`, also given by the `choices` argument, a dict of field name -> values), its `type`
    (needed when the default is None) and `store_true` (a flag without a value, as FDM's
    --just_visualise). `overrides` maps field names to other defaults.
    """
    for field in dataclasses.fields(cls):
        if only is not None and field.name not in only:
            continue
        meta = field.metadata
        default = (overrides or {}).get(field.name, field.default)
        if meta.get("store_true"):
            parser.add_argument(f"--{field.name}", action="store_true", help=meta.get("help"))
            continue
        kind = meta.get("type") or type(default)
        kind = str2bool if kind is bool else kind
        parser.add_argument(f"--{field.name}", default=default, type=kind, required=field.name in required,
                            choices=(choices or {}).get(field.name, meta.get("choices")), help=meta.get("help"))


def dataclass_from_dict(cls, values):
    """An instance of `cls` from the entries of `values` that are its fields (others are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def device_flag(value):
    """The torch.device a --device flag names (None: this rank's default), or a ConfigError naming it.

    Checked before any model is built: a malformed name or a GPU this machine lacks is one sentence.
    """
    if value is None:
        return dist_util.dev()
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"--device {value!r} is not a device name such as cpu or cuda:0.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {value} asks for a GPU, but torch sees none on this machine.")
    return device


def run(main, parser, argv=None):
    """Parse, run `main(args)`, and return the exit code: 0, or 2 after one sentence for a UserError.

    Use as `sys.exit(run(main, create_argparser()))`. Any other exception prints its traceback
    and exits 1; under MPI both take every other rank down (`dist_util.exit_all`).
    """
    args = parser.parse_args(argv)
    try:
        main(args)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        code = 2
    except Exception:  # noqa: BLE001 - under MPI one failed rank must take the others down
        traceback.print_exc()
        code = 1
    else:
        return 0
    if dist_util.launched_with_several_ranks():
        dist_util.exit_all(code)
    return code
