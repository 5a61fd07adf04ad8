"""The machine a process trains on (no Pyro): the device, the precision of the networks' products, what the
CPU multiplies natively, and how glibc hands freed memory back."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import warnings

import torch

__all__ = [
    "resolve_device",
    "PRECISIONS",
    "EmulatedPrecisionWarning",
    "resolve_precision",
    "check_precision",
    "precision_context",
    "retain_freed_memory",
    "cpu_has_native_bf16",
    "onednn_bf16_supported",
]

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that include native bf16 dot products
_NATIVE_BF16_CAPS = ("BF16", "AMX", "FP16", "AVX10", "ALL", "DEFAULT")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return cpuinfo.read()
    except OSError:
        return ""


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX) and oneDNN may use it.

    ``ONEDNN_MAX_CPU_ISA`` (or its older name ``DNNL_MAX_CPU_ISA``) set below ``AVX512_CORE_BF16``
    counts as a CPU without it: that is how the test suite emulates an AVX2-only machine.
    """
    flags = _cpu_flags()
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        return False
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    return not cap or any(tag in cap for tag in _NATIVE_BF16_CAPS)


@functools.cache
def onednn_bf16_supported() -> bool:
    """Whether oneDNN can build its bf16 primitives here (AVX-512 or better, natively or emulated).

    Where it cannot (an AVX2-only CPU, or ``ONEDNN_MAX_CPU_ISA=AVX2``), oneDNN's bf16 inner product
    fails with "could not create a primitive descriptor": callers take the plain path instead.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else the CPU; ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as
    ``torch.device``. Any other device type (``"mps"``, ``"xla"``, a typo) is a ``ValueError``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = "expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {str(device)!r}: {expected}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported (only CPUs and CUDA GPUs): {expected}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for but torch sees no CUDA device")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(device)!r} was asked for but torch sees "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return parsed


# glibc's mallopt parameters and their defaults (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def retain_freed_memory(enabled: bool = True) -> bool:
    """Keep the memory a training step frees for the next step instead of handing it back to the OS.

    glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps
    it when freed, so every step page-faults and zeroes its large activations anew: at the paper's size
    (batch 100, 28 x 28, hidden 500) about 1.3 GB per fp32 step, a third of the step's time on a CPU.
    ``enabled=True`` serves large blocks from the heap and keeps freed memory there (resident memory
    then stays at the process's peak); ``enabled=False`` restores glibc's defaults and returns the free
    memory to the OS. Process-wide; the mmap threshold stays where glibc's dynamic rule had put it.
    Returns ``False`` and does nothing where the C library is not glibc (macOS, Windows, musl).
    """
    libc = _glibc()
    if libc is None:
        return False
    settings = {_M_TRIM_THRESHOLD: 2**31 - 1, _M_MMAP_MAX: 0} if enabled else _GLIBC_DEFAULTS
    for parameter, value in settings.items():
        if libc.mallopt(parameter, value) != 1:
            raise RuntimeError(f"glibc refused mallopt({parameter}, {value})")
    if not enabled:
        libc.malloc_trim(0)
    return True


PRECISIONS = ("fp32", "bf16", "fp16")


class EmulatedPrecisionWarning(UserWarning):
    """bf16 asked for on a CPU that multiplies bf16 only by emulation (slower than fp32)."""


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bf16"`` where the hardware multiplies bf16 natively (CPUs with AVX512-BF16 or
    AMX, CUDA devices that support bf16), else ``"fp32"``; other values are returned as they are."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def check_precision(precision: str, device: torch.device) -> str:
    """The precision ``"auto"`` resolves to (:func:`resolve_precision`), after checking that ``device``
    can run it: a ``ValueError`` for an unknown name or ``"fp16"`` off CUDA."""
    precision = resolve_precision(precision, device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or 'auto', got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA device; on the CPU use 'bf16'")
    return precision


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for the networks' matrix products: ``"fp32"`` (none), ``"bf16"`` (CPU or CUDA) or
    ``"fp16"`` (CUDA only); ``"auto"`` as :func:`resolve_precision` says. Coordinates, pose transforms,
    the CTF, likelihoods and KL terms stay float32 (the model and guides cast network outputs back), and
    parameters and optimizer state stay float32. bf16 on a CPU that only emulates it warns
    (:class:`EmulatedPrecisionWarning`)."""
    precision = check_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(
            "precision 'bf16' on a CPU without native bf16 (AVX512-BF16 or AMX): its matrix products are "
            "emulated and slower than fp32; use precision 'fp32' (or 'auto') here",
            EmulatedPrecisionWarning,
            stacklevel=3,
        )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
