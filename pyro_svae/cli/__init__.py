"""The ``pyro-svae`` command: ``train``, ``evaluate``, ``sample``, ``encode``, ``analyze`` and
``simulate-particles`` (one module per command).

Each command module has ``add_args(parser)`` and ``main(args) -> int``. :func:`main` dispatches, turns
every expected failure (bad data, bad options, a run folder that does not match its checkpoint) into one
line on stderr and exit status 2, and never shows a traceback for them.
"""

from __future__ import annotations

import argparse
import errno
import sys
import warnings
from collections.abc import Sequence

from ..checkpoint import CheckpointError
from ..data import DataError
from . import analyze, encode, evaluate, sample, simulate_particles, train
from ._common import EXIT_INTERRUPTED, EXIT_USAGE, UsageError

__all__ = ["main", "build_parser", "UsageError", "EXIT_USAGE", "EXIT_INTERRUPTED"]

COMMANDS = {
    "train": (train, "train spatial-VAE; writes a run folder"),
    "evaluate": (evaluate, "re-evaluate a saved run on its test data or a given file"),
    "sample": (sample, "decode new images from a saved run"),
    "encode": (encode, "posterior pose, shift and z of every image of a file, stack or folder"),
    "analyze": (analyze, "PCA, UMAP, k-means clusters, trajectories and a report of a run's z"),
    "simulate-particles": (
        simulate_particles,
        "simulate cryo-EM particles with ground truth as RELION .mrcs + .star files",
    ),
}


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line: ``pyro-svae train: error: ... (see --help)``."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyro-svae",
        description="spatial-VAE as a Pyro program: learn image content separately from rotation "
        "and translation.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"pyro-svae {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_args(sub)
        sub.set_defaults(command_main=module.main)
    return parser


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        if error.errno == errno.ENOENT:
            return f"no such file: {error.filename}"
        return f"{error.filename}: {error.strerror}"
    text = str(error) or type(error).__name__
    if isinstance(error, KeyError):
        text = f"missing entry {text}"
    return " ".join(text.split())


def _one_line_warning(command: str):
    """A ``warnings.showwarning`` that prints ``pyro-svae COMMAND: warning: ...`` on one line of stderr
    (instead of Python's two lines with the source file)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        stream = sys.stderr if file is None else file
        print(f"pyro-svae {command}: warning: {' '.join(str(message).split())}", file=stream, flush=True)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pyro-svae`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error already printed
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    if getattr(args, "command_main", None) is None:
        parser.print_usage(sys.stderr)
        print(f"pyro-svae: error: give a command: {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(args.command)
            return int(args.command_main(args) or 0)
    except KeyboardInterrupt:
        print(f"pyro-svae {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (DataError, CheckpointError, FileNotFoundError, ValueError, OSError, KeyError) as error:
        print(f"pyro-svae {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
