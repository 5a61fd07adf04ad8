"""Pieces shared by the ``pyro-svae`` commands: option types, exit codes, signal handling."""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType

__all__ = [
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
    "UsageError",
    "positive_int",
    "non_negative_int",
    "positive_float",
    "add_device_arg",
    "InterruptGuard",
]

EXIT_USAGE = 2  # bad input or options (as argparse does)
EXIT_INTERRUPTED = 130  # stopped by SIGINT (Ctrl-C): 128 + 2; SIGTERM gives 128 + 15 = 143


class UsageError(ValueError):
    """Options that contradict each other or do not apply."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got '{text}'") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def add_device_arg(parser: argparse.ArgumentParser, default: str | None = "auto") -> None:
    parser.add_argument(
        "-d",
        "--device",
        default=default,
        metavar="DEVICE",
        help="'auto' (CUDA when torch sees a GPU, else the CPU), 'cpu', 'cuda' or 'cuda:N' (default: auto)",
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
