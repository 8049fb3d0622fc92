"""What every program of laminar does alike on its command line: the CONFIG and `--set` arguments,
how errors are printed (one line naming the rank, no traceback, unless --debug), and the `__main__`
tail. Programs import this; the library (sim) raises typed errors and never prints them.

Every program ends the same way:

    if __name__ == "__main__":
        run_program(main)
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from layers.model import PoolingError
from sim.data.datasets import DatasetCorrupt, DatasetMissing
from sim.errors import ConfigError
from sim.pipeline.placement import PlacementError
from sim.pipeline.stage import NonFiniteLoss
from sim.pipeline.transport import PeerFailure
from sim.run.checkpoint import CheckpointWriteError

USER_ERRORS = (ConfigError, PlacementError, PoolingError, DatasetMissing, DatasetCorrupt)  # exit 2: fix the input
RUN_ERRORS = (NonFiniteLoss, PeerFailure, CheckpointWriteError)  # exit code 1: the run failed


class ProgramErrors:
    """What a program's main does with the errors of a run:

        with ProgramErrors(world.rank, args.debug) as errors:
            ...
        return errors.exit_code

    An error in what the user gave (config, files, command line: exit code 2) or a failed run (1)
    becomes one or two lines on stderr that name this rank, without a traceback; so does anything
    unexpected (1), which asks for `--debug` (or LAMINAR_DEBUG=1): with it, every traceback is kept."""

    def __init__(self, rank: int, debug: bool = False):
        self.rank, self.exit_code = rank, 0
        self.debug = debug or os.environ.get("LAMINAR_DEBUG", "") not in ("", "0")

    def __enter__(self) -> ProgramErrors:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: object) -> bool:
        if error is None or self.debug or not isinstance(error, Exception):
            return False  # KeyboardInterrupt and SystemExit keep their meaning
        if isinstance(error, RUN_ERRORS):
            self.exit_code, text = 1, str(error)
        elif isinstance(error, USER_ERRORS + (OSError, ValueError)):
            self.exit_code, text = 2, str(error)
        else:
            self.exit_code = 1
            text = (f"unexpected {type(error).__name__}: {error}\n(a bug in laminar, or an input it does not "
                    "check yet: rerun with --debug for the traceback, and report it)")
        print(f"error (rank {self.rank}): {text}", file=sys.stderr, flush=True)
        return True


def run_program(main: Callable[[], int | None]) -> NoReturn:
    """A program's `__main__` tail: `main()`'s exit code, and what escapes it as one line (rank 0's
    policy; programs that run on several ranks catch their own errors with their rank). `--debug` on
    the command line keeps the traceback here too."""
    with ProgramErrors(rank=0, debug="--debug" in sys.argv[1:]) as errors:
        code = main()
    sys.exit(errors.exit_code or code or 0)


def add_config_arguments(parser: argparse.ArgumentParser, *, config_required: bool = True,
                         default: Path | None = None) -> None:
    """A program's CONFIG argument and its repeatable `--set key=value` overrides (`load_config`'s).
    CONFIG may be left out when it is not required, or when it has a `default`."""
    optional = default is not None or not config_required
    parser.add_argument("config", nargs="?" if optional else None, type=Path if default else None, default=default,
                        help="TOML config, e.g. launch/configs/tiny.toml (shipped ones are in launch/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, value read as TOML (repeatable)")
