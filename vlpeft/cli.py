"""The ``vlpeft`` command.

Every sub-command lives in a module that exposes ``add_parser(subparsers)``; it registers its parser(s) and sets
``handler`` (a function ``args -> exit code``) with ``set_defaults``. Adding a command is one line in
:data:`COMMAND_MODULES`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import torch

from vlpeft import __version__
from vlpeft.tasks.bad_input import BadInputError
from vlpeft.training.config import ConfigError

__all__ = ["COMMAND_MODULES", "build_parser", "main"]

#: Modules registering sub-commands, in help order.
COMMAND_MODULES: list[str] = [
    "vlpeft.training.commands",  # train, eval, predict
    "vlpeft.training.sweep",  # sweep (learning-rate selection)
    "vlpeft.report",  # report
    "vlpeft.data.synth",  # data synth
    "vlpeft.demo.base",  # pretrain (the demo's base)
    "vlpeft.demo.run",  # demo
    "vlpeft.benchmarking.suite",  # bench
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlpeft", description="Parameter-efficient fine-tuning of vision-language models."
    )
    parser.add_argument("--version", action="version", version=f"vlpeft {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; user errors (bad config, missing run folder, bad input data) print ``error: ...`` without a
    traceback and exit with status 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ConfigError, BadInputError) as error:
        print(f"vlpeft {args.command}: error: {error}", file=sys.stderr)
        return 2
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Destroy the default process group a launched run (``torchrun`` / ``accelerate launch``) created, so that its
    communication threads are joined before the interpreter exits (left running, a process could end with
    "terminate called without an active exception", seen on a loaded 2-core machine with gloo)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
