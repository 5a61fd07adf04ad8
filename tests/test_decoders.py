import pytest
import torch
import torch.nn.functional as F

from pyro_svae import decoders
from pyro_svae.coords import pixel_grid
from pyro_svae.decoders import SpatialDecoder, _spatial_forward
from pyro_svae.runtime import onednn_bf16_supported


def _outputs_and_grads(
    decoder: SpatialDecoder, fuse: bool, autocast: bool, bf16_primitives: bool | None = None
):
    torch.manual_seed(1)
    grid = pixel_grid(7, 7)
    theta = torch.randn(3, requires_grad=True)
    dx = 0.1 * torch.randn(3, 2)
    latent, linears = decoder._weights(torch.randn(3, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        bf16 = onednn_bf16_supported() if bf16_primitives is None else bf16_primitives
        out = _spatial_forward(
            grid, theta, dx, None, latent, linears, "tanh", fuse_tanh=fuse, bf16_primitives=bf16
        )
    out.float().square().sum().backward()
    grads = [theta.grad] + [p.grad.clone() for p in decoder.parameters()]
    decoder.zero_grad()
    return out.float(), grads


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_fused_linear_tanh_computes_the_same_outputs_and_gradients(autocast):
    torch.manual_seed(0)
    decoder = SpatialDecoder(2, 1, hidden_dim=16, num_layers=3)
    plain, plain_grads = _outputs_and_grads(decoder, False, autocast)
    fused, fused_grads = _outputs_and_grads(decoder, True, autocast)
    tolerance = {"rtol": 3e-2, "atol": 3e-2} if autocast else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(fused, plain, **tolerance)
    for got, expected in zip(fused_grads, plain_grads, strict=True):
        scale = expected.abs().max().clamp_min(1.0)
        torch.testing.assert_close(got / scale, expected / scale, **tolerance)


def test_compiled_decoder_trains_with_the_same_gradients():
    torch.manual_seed(0)
    plain = SpatialDecoder(2, 1, hidden_dim=16, num_layers=2)
    compiled = SpatialDecoder(2, 1, hidden_dim=16, num_layers=2, compile=True)
    compiled.load_state_dict(plain.state_dict())
    grid, z, theta = pixel_grid(6, 6), torch.randn(3, 2), torch.randn(3)
    grads = []
    for decoder in (plain, compiled):
        decoder.render(grid, z, theta).square().sum().backward()
        grads.append([p.grad for p in decoder.parameters()])
    for got, expected in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_the_fused_bf16_path_is_taken_only_where_onednn_builds_bf16_primitives(monkeypatch):
    cpu = torch.device("cpu")
    assert decoders._fusable_tanh(cpu, torch.float32, "tanh", 3, False)
    assert decoders._fusable_tanh(cpu, torch.bfloat16, "tanh", 3, True)
    assert not decoders._fusable_tanh(cpu, torch.bfloat16, "tanh", 3, False)
    # a CPU without oneDNN bf16 (an AVX2-only machine): bf16 runs the plain layers, fp32 stays fused
    calls = []

    def recording(x, weight, bias):
        calls.append(x.dtype)
        return torch.tanh(F.linear(x, weight, bias))

    monkeypatch.setattr(decoders, "_linear_tanh_op", recording)
    decoder = SpatialDecoder(2, 1, hidden_dim=16, num_layers=3)
    _outputs_and_grads(decoder, True, autocast=True, bf16_primitives=False)
    assert calls == []
    _outputs_and_grads(decoder, True, autocast=False, bf16_primitives=False)
    assert calls == [torch.float32, torch.float32]
    _outputs_and_grads(decoder, True, autocast=True, bf16_primitives=True)
    assert calls[2:] == [torch.bfloat16, torch.bfloat16]


def test_the_compiled_decoder_asks_for_bf16_primitives_once_outside_the_traced_function(monkeypatch):
    asked = []
    monkeypatch.setattr(decoders, "onednn_bf16_supported", lambda: asked.append(1) or False)
    decoder = SpatialDecoder(2, 1, hidden_dim=8, compile=True)
    assert asked == [1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoder.render(pixel_grid(4, 4), torch.randn(2, 2), torch.randn(2)).float().sum().backward()
    assert asked == [1]
