import pytest
import torch

from pyro_svae import runtime


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
