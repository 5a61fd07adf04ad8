"""Pieces shared by the ``pyro-svae`` commands: option types, exit codes, signal handling."""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Callable
from types import FrameType

from ..runtime import resolve_device

__all__ = [
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
    "UsageError",
    "positive_int",
    "non_negative_int",
    "positive_float",
    "non_negative_float",
    "add_device_arg",
    "add_input_args",
    "add_output_args",
    "device_type",
    "DEVICE_HELP",
    "InterruptGuard",
]

EXIT_USAGE = 2  # bad input or options (as argparse does)
EXIT_INTERRUPTED = 130  # stopped by SIGINT (Ctrl-C): 128 + 2; SIGTERM gives 128 + 15 = 143


class UsageError(ValueError):
    """Options that contradict each other or do not apply."""


def _number_type(convert: Callable[[str], float], accept: Callable[[float], bool], expected: str):
    """An argparse ``type=`` that converts with ``convert`` and refuses values ``accept`` rejects."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got '{text}'") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = expected  # argparse names the type in its messages
    return parse


positive_int = _number_type(int, lambda value: value >= 1, "a positive integer")
non_negative_int = _number_type(int, lambda value: value >= 0, "an integer >= 0")
positive_float = _number_type(float, lambda value: 0 < value < float("inf"), "a positive finite number")
non_negative_float = _number_type(float, lambda value: 0 <= value < float("inf"), "a finite number >= 0")


def _device(text: str) -> str:
    """An argparse ``type=`` that refuses devices torch cannot use here; keeps the text (``auto`` stays)."""
    try:
        resolve_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


device_type = _device
DEVICE_HELP = "'auto' (CUDA when torch sees a GPU, else the CPU), 'cpu', 'cuda' or 'cuda:N' (default: auto)"


def add_device_arg(parser: argparse.ArgumentParser, default: str | None = "auto") -> None:
    parser.add_argument("-d", "--device", type=_device, default=default, metavar="DEVICE", help=DEVICE_HELP)


def add_input_args(parser: argparse.ArgumentParser, verb: str) -> None:
    """The images a command reads besides its run's own: ``--particles`` or ``--data``, and the particle
    options ``--ctf``, ``--pixel-size``, ``--project-dir`` and ``--ind`` (``verb``: what it does to them)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--particles",
        metavar="FILE",
        help=f"{verb} these cryo-EM particles: a RELION .star, cryoSPARC .cs or .mrcs/.mrc/.npy stack "
        "(a run trained on particles)",
    )
    source.add_argument("--data", metavar="FILE|DIR", help=f"{verb} these images: a file or a folder")
    parser.add_argument("--ctf", metavar="FILE.star", help="CTF rows of a --particles stack")
    parser.add_argument(
        "--pixel-size", type=positive_float, metavar="A", help="pixel size in Å where the files lack it"
    )
    parser.add_argument(
        "--project-dir",
        metavar="DIR",
        help="where relative image paths of a .star/.cs file start (RELION's or cryoSPARC's project "
        "directory; default: the working directory for .star, the .cs file's job folder's parent for .cs)",
    )
    parser.add_argument(
        "--ind", metavar="FILE", help=f"{verb} these particles only: 0-based indices, .npy or .txt"
    )


def add_output_args(parser: argparse.ArgumentParser, default_out: str) -> None:
    """``--batch-size``, ``--device``, ``--seed``, ``--out`` (default ``default_out``) and ``--overwrite``
    of a command that writes results beside a run."""
    parser.add_argument(
        "--batch-size", type=positive_int, default=100, metavar="B", help="images per batch (default: 100)"
    )
    add_device_arg(parser)
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, metavar="N", help="random seed (default: 0)"
    )
    parser.add_argument("-o", "--out", metavar="DIR", help=f"output folder (default: {default_out})")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace earlier results in the output folder"
    )


class InterruptGuard:
    """Within the ``with`` block, SIGINT and SIGTERM raise ``KeyboardInterrupt``; ``.exit_code`` is
    then 130 (SIGINT) or 143 (SIGTERM). Outside the main thread it does nothing."""

    def __init__(self) -> None:
        self.signal_number = signal.SIGINT
        self._previous: dict[int, object] = {}

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signal_number)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.signal_number = signal.Signals(signum)
        raise KeyboardInterrupt

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handler)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
