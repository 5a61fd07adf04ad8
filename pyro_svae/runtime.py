"""What the processor this process runs on can do (no Pyro): native bf16 and oneDNN's bf16 kernels."""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["cpu_has_native_bf16", "onednn_bf16_supported"]

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
