import json
import subprocess
import sys
import warnings

import pytest
import torch

from pyro_svae import runtime
from pyro_svae.runtime import resolve_device, retain_freed_memory


@pytest.fixture
def fresh_probe(monkeypatch):
    runtime.cpu_has_native_bf16.cache_clear()
    yield monkeypatch
    runtime.cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize(
    ("flags", "cap", "native"),
    [
        ("fpu avx2 avx512f avx512_bf16", None, True),
        ("fpu avx2 amx_bf16 amx_tile", None, True),
        ("fpu avx2 avx512f", None, False),
        ("fpu avx2 avx512f avx512_bf16", "AVX2", False),
        ("fpu avx2 avx512f avx512_bf16", "avx512_core_vnni", False),
        ("fpu avx2 avx512f avx512_bf16", "AVX512_CORE_BF16", True),
        ("fpu avx2 avx512f avx512_bf16", "ALL", True),
    ],
)
def test_native_bf16_needs_the_cpu_flag_and_no_onednn_cap_below_it(fresh_probe, flags, cap, native):
    fresh_probe.setattr(runtime, "_cpu_flags", lambda: flags)
    fresh_probe.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        fresh_probe.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        fresh_probe.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert runtime.cpu_has_native_bf16() is native


def test_onednn_bf16_probe_agrees_with_onednn():
    """Where the probe says yes, oneDNN builds a bf16 linear+tanh primitive; where no, it is never asked."""
    supported = runtime.onednn_bf16_supported()
    if not supported:
        pytest.skip("oneDNN builds no bf16 primitives on this CPU (or under ONEDNN_MAX_CPU_ISA)")
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    weight, bias = torch.randn(8, 8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16)
    out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "tanh", [], "")
    torch.testing.assert_close(
        out.float(), torch.tanh(x.float() @ weight.float().t() + bias.float()), rtol=0.05, atol=0.05
    )


def test_auto_precision_resolves_from_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.resolve_precision("auto", cpu) == "fp32"
    assert runtime.resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ValueError, match="precision"):
        runtime.precision_context("fp64", cpu)


_REALLOCATION_FAULTS = """
import json, resource, torch
from pyro_svae.runtime import retain_freed_memory

def faults(numel=25_000_000):  # 100 MB: above glibc's largest mmap threshold
    torch.ones(numel)  # allocated, filled and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(numel)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
glibc = retain_freed_memory()
retained = min(faults() for _ in range(3))  # the heap may take a step to settle
print(json.dumps({"glibc": glibc, "default": default, "retained": retained}))
"""


def test_retained_memory_serves_large_blocks_without_page_faults():
    # a fresh process: what this one freed earlier may already sit in its heap
    found = subprocess.run(
        [sys.executable, "-c", _REALLOCATION_FAULTS], capture_output=True, text=True, check=True
    )
    faults = json.loads(found.stdout)
    if not faults["glibc"]:
        pytest.skip("the C library is not glibc")
    assert faults["default"] > 0  # every reallocation is mapped and faulted in anew
    assert faults["retained"] < faults["default"] / 10, faults
    assert retain_freed_memory(False)  # and back to the C library's rule


def test_bf16_on_a_cpu_without_native_bf16_warns_that_it_is_emulated(monkeypatch):

    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(runtime.EmulatedPrecisionWarning, match="emulated"):
        runtime.precision_context("bf16", cpu)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime.precision_context("bf16", cpu)


@pytest.mark.parametrize(
    ("device", "message"),
    [("tpu", "unknown device"), ("mps", "not supported"), ("meta", "not supported"), ("cuda:x", "unknown")],
)
def test_devices_other_than_cpu_and_cuda_are_refused(device, message):
    with pytest.raises(ValueError, match=message):
        resolve_device(device)
    assert resolve_device("cpu") == torch.device("cpu")
