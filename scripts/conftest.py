"""What the scripts' tests share: load a script as a module and run it in-process, as its `__main__` does."""

import functools
import importlib.util
import signal
from pathlib import Path

import pytest

from improved_diffusion import cli

SCRIPTS = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def load_script(name):
    """scripts/<name>.py as a module (scripts are not a package, so they are loaded by path)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ScriptHung(BaseException):
    """Raised by the time limit; a BaseException so that cli.run cannot turn it into an exit code."""


def run_in_process(capsys, name, *argv, seconds=60):
    """(exit code, stdout, stderr) of `python scripts/<name>.py argv...`; a run past `seconds` fails the test."""
    module = load_script(name)

    def hung(signum, frame):
        raise ScriptHung(f"{name}.py {' '.join(map(str, argv))} ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        code = cli.run(module.main, module.create_argparser(), [str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors (types, choices)
        code = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def run_script(capsys):
    """run_script(name, *argv, seconds=60) -> (exit code, stdout, stderr); see `run_in_process`."""
    return functools.partial(run_in_process, capsys)
