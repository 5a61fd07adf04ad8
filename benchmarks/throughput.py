"""Throughput of one training step: ``pyro_svae`` (Pyro SVI) against a hand-written PyTorch reference.

Headline (``--speed``, the paper's size, two threads): the compiled bf16 step runs 3.30x the images/s of
the raw-PyTorch fp32 step, pyro_svae's fp32 step 1.10x. Full account: docs/performance.md.

One step = forward + backward + Adam update on a batch of images. The Pyro side is the real library:
``SpatialVAE`` + ``AmortizedGuide`` driven by ``SVI.step`` with ``Trace_ELBO`` and ``pyro.optim.Adam``.
The reference is the same math written out by hand, as the original spatial-VAE code did: plain
``nn.Linear`` encoder and decoder of the same shapes, reparameterized Gaussian samples, Bernoulli
reconstruction by ``binary_cross_entropy_with_logits`` and the analytic Gaussian KL, one
``torch.optim.Adam`` over all weights.

The two are timed interleaved (alternating which goes first), after a warm-up, and the median of
``--repeats`` timings each is reported with the ratio ``pyro time / reference time`` (target at the
paper's size: at most 1.15). Before timing, the reference is loaded with the Pyro model's weights and
its loss (with the KL sampled like ``Trace_ELBO`` does) is checked against Pyro's on the same noise, so
the two really compute the same thing.

    python benchmarks/throughput.py                       # paper size (500x2) and 2x128
    python benchmarks/throughput.py --threads 1 --repeats 9
    python benchmarks/throughput.py --profile             # torch.profiler tables of both at 500x2
    python benchmarks/throughput.py --speed               # precision / compile / subsample table

``--speed`` prints, in one run, images/s of the paper-size training step (500x2, batch 100, 28x28) in
fp32 and bf16 autocast, with and without ``torch.compile`` of the decoder, with every pixel and with
pixel-subsampled ELBOs (50 %, 25 %), with the pose folded into the first layer's weights (the library)
and applied to every coordinate ("posed coords"), against the raw-PyTorch fp32 reference of the same
math; the GFLOP/s of the bare products at the dominant shape (batch x pixels rows by hidden x hidden:
forward, input and weight gradient, into preallocated outputs) as the ceiling and the step's
effective matmul GFLOP/s; and the peak resident memory of one step (Linux:
``VmHWM`` after resetting it through ``/proc/self/clear_refs``). On the CPU every step is timed twice,
interleaved: with the C library's allocator (glibc maps every block above 32 MiB afresh and unmaps it
when freed, so each step page-faults its large activations again) and with freed memory retained
(``pyro_svae.retain_freed_memory``, what ``pyro-svae train`` does), each against the reference under the
same setting. On CUDA (``--device cuda``) the same table with fp32, bf16 and fp16 and peak memory from
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import time
import types

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from pyro_svae import AmortizedGuide, SpatialVAE
from pyro_svae.coords import pixel_grid, pose_coordinates
from pyro_svae.data import posed_mnist
from pyro_svae.infer import precision_context, retain_freed_memory
from pyro_svae.likelihoods import BernoulliLikelihood

DATA_SIZE = 4000  # training-set size used for the plate scaling (the reference figures' 4,000 digits)


# --------------------------------------------------------------------------------------------------
# The raw-PyTorch reference
# --------------------------------------------------------------------------------------------------
def _mlp(sizes: list[int], final_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if final_activation or i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class RawVAE(nn.Module):
    """spatial-VAE (or the vanilla VAE) with a hand-coded ELBO, as in the original code.

    The encoder's last layer emits ``[mu, log_std]`` for the latents ``[z, theta, dx]`` (those switched on)
    in one ``Linear``; theta is in radians and dx in grid units, each with its normal prior; the spatial
    decoder's first layer is ``coords @ W_c + z @ W_z + b`` broadcast over pixels; coordinates are
    ``(grid - dx) @ R(theta)`` (``pyro_svae``'s pose convention).
    """

    def __init__(
        self,
        *,
        hidden: int,
        layers: int,
        z_dim: int = 2,
        vanilla: bool = False,
        rotate: bool = True,
        translate: bool = True,
        theta_prior_std: float = math.pi / 4,
        dx_prior_std: float = 0.1,
        height: int = 28,
        width: int = 28,
    ) -> None:
        super().__init__()
        self.z_dim, self.vanilla = z_dim, vanilla
        self.rotate, self.translate = rotate and not vanilla, translate and not vanilla
        self.theta_prior_std, self.dx_prior_std = theta_prior_std, dx_prior_std
        self.num_pixels = height * width
        self.num_latent = z_dim + int(self.rotate) + 2 * int(self.translate)
        self.encoder = _mlp([self.num_pixels] + [hidden] * layers + [2 * self.num_latent], False)
        if vanilla:
            self.decoder = _mlp([z_dim] + [hidden] * layers + [self.num_pixels], False)
        else:
            self.coord_linear = nn.Linear(2, hidden)
            self.latent_linear = nn.Linear(z_dim, hidden, bias=False)
            self.tail = _mlp([hidden] * layers + [1], False)
            self.tail.insert(0, nn.Tanh())
        self.register_buffer("grid", pixel_grid(height, width))

    @torch.no_grad()
    def init_output_bias(self, images: torch.Tensor) -> None:
        """The decoder's last layer at zero weights and its output bias at the logit of the images' mean
        (per pixel for the vanilla VAE): ``SpatialVAE.init_output_bias`` for this reference."""
        mean = images.reshape(images.shape[0], -1).mean(0)
        last = (self.decoder if self.vanilla else self.tail)[-1]
        last.weight.zero_()
        last.bias.copy_(BernoulliLikelihood().params_for_moments(mean if self.vanilla else mean.mean(), None))

    def sample_noise(self, batch: int) -> list[torch.Tensor]:
        """Standard-normal noise per latent, drawn like Pyro's ``Normal.rsample`` (same RNG calls)."""
        from torch.distributions.utils import _standard_normal

        shapes = [(batch, self.z_dim)] + [(batch,)] * self.rotate + [(batch, 2)] * self.translate
        return [_standard_normal(s, dtype=self.grid.dtype, device=self.grid.device) for s in shapes]

    def loss(self, images: torch.Tensor, data_size: int, *, kl: str = "analytic") -> torch.Tensor:
        """Negative ELBO of the batch scaled to the data set (``data_size / B`` times the batch sum)."""
        elbo, _ = self.elbo(images, kl=kl)
        return -elbo.sum() * (data_size / images.shape[0])

    def elbo(self, images: torch.Tensor, *, kl: str = "analytic") -> tuple[torch.Tensor, torch.Tensor]:
        """One-sample ELBO per image ``(B,)`` and the posterior means ``(B, num_latent)`` (``[z, theta,
        dx]``)."""
        batch = images.shape[0]
        y = images.reshape(batch, -1)
        mu, log_std = self.encoder(y).chunk(2, dim=-1)
        std = log_std.exp()
        eps = torch.cat([e.reshape(batch, -1) for e in self.sample_noise(batch)], dim=-1)
        latent = mu + std * eps
        z = latent[:, : self.z_dim]
        if self.vanilla:
            logits = self.decoder(z)
            prior_std = torch.ones(self.z_dim, dtype=y.dtype, device=y.device)
        else:
            coords = self.grid.expand(batch, -1, -1)  # (B, P, 2)
            if self.translate:
                coords = coords - latent[:, -2:].unsqueeze(1)
            if self.rotate:
                theta = latent[:, self.z_dim]
                cos, sin = torch.cos(theta), torch.sin(theta)
                rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
                coords = torch.bmm(coords, rot)
            hidden = self.coord_linear(coords) + self.latent_linear(z).unsqueeze(1)
            logits = self.tail(hidden).squeeze(-1)
            pose_std = [self.theta_prior_std] * self.rotate + [self.dx_prior_std] * (2 * self.translate)
            prior_std = y.new_tensor([1.0] * self.z_dim + pose_std)
        log_px = -F.binary_cross_entropy_with_logits(logits, y, reduction="none").sum(-1)
        if kl == "analytic":
            ratio = std / prior_std
            kl_div = (0.5 * (ratio**2 + (mu / prior_std) ** 2) - 0.5 - ratio.log()).sum(-1)
        else:  # single-sample estimate log q - log p, as Trace_ELBO computes it
            log_q = (-0.5 * eps**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
            log_p = -0.5 * (latent / prior_std) ** 2 - prior_std.log() - 0.5 * math.log(2 * math.pi)
            kl_div = log_q - log_p.sum(-1)
        return log_px - kl_div, mu

    @torch.no_grad()
    def load_from(self, model: SpatialVAE, guide: AmortizedGuide) -> None:
        """Copy the weights of a ``pyro_svae`` model and guide of the same shape into this module."""
        enc = [m for m in guide.encoder.net if isinstance(m, nn.Linear)]
        mine = [m for m in self.encoder if isinstance(m, nn.Linear)]
        for src, dst in zip(enc, mine[:-1], strict=True):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        # the guide's Normal heads work in units of each prior's std: loc = unit raw, scale = unit exp(raw)
        units = [guide.families[site].unit.reshape(-1, 1) for site in model.latent_sites]
        heads = [guide.heads[site] for site in model.latent_sites]
        weights = [h.weight.chunk(2, 0) for h in heads]
        biases = [h.bias.chunk(2, 0) for h in heads]
        loc_w = [u * w[0] for u, w in zip(units, weights, strict=True)]
        loc_b = [u[:, 0] * b[0] for u, b in zip(units, biases, strict=True)]
        scale_b = [u[:, 0].log() + b[1] for u, b in zip(units, biases, strict=True)]
        mine[-1].weight.copy_(torch.cat(loc_w + [w[1] for w in weights]))
        mine[-1].bias.copy_(torch.cat(loc_b + scale_b))
        if self.vanilla:
            src = [model.decoder.latent_linear] + [m for m in model.decoder.tail if isinstance(m, nn.Linear)]
            dst = [m for m in self.decoder if isinstance(m, nn.Linear)]
        else:
            self.latent_linear.weight.copy_(model.decoder.latent_linear.weight)
            src = [model.decoder.coord_linear] + [m for m in model.decoder.tail if isinstance(m, nn.Linear)]
            dst = [self.coord_linear] + [m for m in self.tail if isinstance(m, nn.Linear)]
        for s, d in zip(src, dst, strict=True):
            d.weight.copy_(s.weight)
            d.bias.copy_(s.bias)


# --------------------------------------------------------------------------------------------------
# The two steps
# --------------------------------------------------------------------------------------------------
def build_pyro(hidden: int, layers: int, vanilla: bool, lr: float):
    pyro.clear_param_store()
    kwargs = {} if vanilla else {"rotate": True, "translate": True}
    model = SpatialVAE((28, 28), z_dim=2, vanilla=vanilla, hidden_dim=hidden, num_layers=layers, **kwargs)
    guide = AmortizedGuide(model, hidden_dim=hidden, num_layers=layers)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    return model, guide, svi


def check_same_math(model, guide, raw: RawVAE, images: torch.Tensor) -> float:
    """Relative difference of Pyro's loss and the reference's (sampled KL) on the same noise."""
    with torch.no_grad():
        torch.manual_seed(123)
        pyro_loss = Trace_ELBO().loss(model, guide, images, data_size=DATA_SIZE)
        torch.manual_seed(123)
        raw_loss = float(raw.loss(images, DATA_SIZE, kl="sampled"))
    return abs(pyro_loss - raw_loss) / abs(raw_loss)


def time_steps(step, batches, start: int, count: int) -> float:
    began = time.perf_counter()
    for i in range(count):
        step(batches[(start + i) % len(batches)])
    return time.perf_counter() - began


def benchmark(hidden: int, layers: int, vanilla: bool, args, batches) -> dict:
    torch.manual_seed(0)
    model, guide, svi = build_pyro(hidden, layers, vanilla, args.lr)
    raw = RawVAE(hidden=hidden, layers=layers, vanilla=vanilla)
    raw.load_from(model, guide)
    mismatch = check_same_math(model, guide, raw, batches[0])
    opt = torch.optim.Adam(raw.parameters(), lr=args.lr)

    def pyro_step(images):
        svi.step(images, data_size=DATA_SIZE)

    def raw_step(images):
        opt.zero_grad(set_to_none=True)
        raw.loss(images, DATA_SIZE, kl=args.kl).backward()
        opt.step()

    steps = {"pyro": pyro_step, "raw": raw_step}
    if args.variants:
        # What the library could do differently, on the same model and guide: (a) train with Pyro's
        # validation checks off; (b) one torch.optim.Adam over all weights driven by the ELBO's
        # differentiable_loss instead of pyro.optim's one-optimizer-per-parameter; (c) both.
        elbo = Trace_ELBO()
        params = list(model.parameters()) + list(guide.parameters())
        one_adam = torch.optim.Adam(params, lr=args.lr)

        def novalid_step(images):
            with pyro.validation_enabled(False):
                svi.step(images, data_size=DATA_SIZE)

        def one_adam_step(images):
            one_adam.zero_grad(set_to_none=True)
            elbo.differentiable_loss(model, guide, images, data_size=DATA_SIZE).backward()
            one_adam.step()

        def both_step(images):
            with pyro.validation_enabled(False):
                one_adam_step(images)

        steps["pyro, no validation"] = novalid_step
        steps["pyro, one Adam"] = one_adam_step
        steps["pyro, both"] = both_step
    warm = {}
    for name, step in steps.items():
        time_steps(step, batches, 0, args.warmup)
        warm[name] = time_steps(step, batches, 0, 1)
    # several steps per timing so that each timing lasts >= --min-time seconds
    inner = max(1, math.ceil(args.min_time / min(warm.values())))
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.repeats):
        shift = r % len(names)  # rotate which side goes first
        for name in names[shift:] + names[:shift]:
            times[name].append(time_steps(steps[name], batches, r * inner, inner) / inner)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "size": f"{hidden}x{layers}",
        "model": "vanilla" if vanilla else "spatial (rot+trans)",
        "pyro_ms": 1e3 * med["pyro"],
        "raw_ms": 1e3 * med["raw"],
        "pyro_ips": args.batch_size / med["pyro"],
        "raw_ips": args.batch_size / med["raw"],
        "ratio": med["pyro"] / med["raw"],
        "inner": inner,
        "mismatch": mismatch,
        "variants": {name: med[name] / med["raw"] for name in names if name not in ("pyro", "raw")},
        "pyro_step": pyro_step,
        "raw_step": raw_step,
    }


# --------------------------------------------------------------------------------------------------
# Precision, compilation and pixel subsampling (issue #10)
# --------------------------------------------------------------------------------------------------
def bare_matmul_gflops(
    rows: int, hidden: int, dtype: torch.dtype, device: torch.device, repeats: int
) -> float:
    """GFLOP/s of the three products a layer of ``rows x hidden`` activations by ``hidden x hidden``
    weights takes per step: forward ``A @ W``, input gradient ``G @ Wᵀ`` and weight gradient ``Gᵀ @ A``
    (their FLOPs over their summed median times): the ceiling of the decoder's dominant layer."""
    a = torch.randn(rows, hidden, device=device).to(dtype)
    g = torch.randn(rows, hidden, device=device).to(dtype)
    w = torch.randn(hidden, hidden, device=device).to(dtype)
    out = torch.empty(rows, hidden, device=device, dtype=dtype)  # no allocation (nor page faults) timed
    out_w = torch.empty(hidden, hidden, device=device, dtype=dtype)
    products = (
        lambda: torch.matmul(a, w, out=out),
        lambda: torch.matmul(g, w.t(), out=out),
        lambda: torch.matmul(g.t(), a, out=out_w),
    )
    seconds = 0.0
    for product in products:
        for _ in range(2):
            product()
        times = []
        for _ in range(repeats):
            _sync(device)
            began = time.perf_counter()
            product()
            _sync(device)
            times.append(time.perf_counter() - began)
        seconds += statistics.median(times)
    return 3 * 2 * rows * hidden * hidden / seconds / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_step_memory_mib(step, images, device: torch.device) -> float | None:
    """Peak memory of one step above what was resident before it (MiB)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step(images)
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak resident set size (VmHWM) to the current one
    except OSError:
        return None
    before = _rss_kib("VmRSS")
    step(images)
    peak = _rss_kib("VmHWM")
    return None if before is None or peak is None else (peak - before) / 1024


def matmul_flops_per_image(hidden: int, layers: int, pixels: int, z_dim: int = 2) -> float:
    """Multiply-add FLOPs of one image's forward + backward through encoder and spatial decoder
    (3x the forward: the backward computes input and weight gradients)."""
    decoder = pixels * (2 * hidden + (layers - 1) * hidden * hidden + hidden)  # per pixel, per image
    encoder = pixels * hidden + (layers - 1) * hidden * hidden + hidden * 2 * (z_dim + 3)
    return 3 * 2 * (decoder + encoder + z_dim * hidden)


def _render_on_coordinates(self, z, theta=None, dx=None, scale=None, *, pixels=None):
    """``SpatialVAE.render`` with the pose applied to every coordinate instead of to the first layer's
    weights (for comparison)."""
    grid = self.grid if pixels is None else self.grid[pixels]
    return self.decoder(pose_coordinates(grid, theta, dx, scale), z).to(self.grid.dtype)


def speed_table(args, batches: list[torch.Tensor]) -> None:
    device = torch.device(args.device)
    hidden, layers = 500, 2
    pixels = 28 * 28
    batches = [b.to(device) for b in batches]
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    configs = [(p, False, None) for p in precisions]
    configs += [(p, True, None) for p in precisions]
    configs += [(p, False, k) for p in precisions for k in (pixels // 2, pixels // 4)]

    torch.manual_seed(0)
    raw = RawVAE(hidden=hidden, layers=layers).to(device)
    raw_opt = torch.optim.Adam(raw.parameters(), lr=args.lr)

    def raw_step(images):
        raw_opt.zero_grad(set_to_none=True)
        raw.loss(images, DATA_SIZE, kl=args.kl).backward()
        raw_opt.step()

    steps = {"raw fp32 reference": raw_step}
    meta = {"raw fp32 reference": ("fp32", True)}  # name -> (precision, every pixel scored)
    configs.insert(1, ("fp32", False, "coordinates"))
    for precision, compiled, subsample in configs:
        pyro.clear_param_store()
        torch.manual_seed(0)
        first_layer_on_coordinates = subsample == "coordinates"
        if first_layer_on_coordinates:
            subsample = None
        model = SpatialVAE(
            (28, 28), 2, hidden_dim=hidden, num_layers=layers, pixel_subsample=subsample, compile=compiled
        ).to(device)
        if first_layer_on_coordinates:  # the textbook way: transform B x P coordinates, then project
            model.render = types.MethodType(_render_on_coordinates, model)
        guide = AmortizedGuide(model, hidden_dim=hidden, num_layers=layers).to(device)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": args.lr}), Trace_ELBO())
        autocast = precision_context(precision, device)

        def step(images, svi=svi, autocast=autocast):
            with autocast:
                svi.step(images, data_size=DATA_SIZE)

        share = "100 %" if subsample is None else f"{100 * subsample // pixels} %"
        label = f"pyro {precision}{' compiled' if compiled else ''}, pixels {share}"
        label += ", posed coords" if first_layer_on_coordinates else ""
        steps[label] = step
        meta[label] = (precision, subsample is None)

    for step in steps.values():  # warm-up (and compilation) outside the timings
        time_steps(step, batches, 0, args.warmup)
    memory = {name: peak_step_memory_mib(step, batches[0], device) for name, step in steps.items()}
    names = list(steps)
    # glibc hands blocks above 32 MiB back to the OS when freed, so a CPU step page-faults its large
    # activations anew; both allocator settings are timed, interleaved, each against the reference under it
    allocators = ["system"]
    if device.type == "cpu" and args.allocator == "both" and retain_freed_memory(False):
        allocators.append("retained")
    times: dict[tuple[str, str], list[float]] = {(n, a): [] for n in names for a in allocators}
    for r in range(args.repeats):
        shift = r % len(names)
        for allocator in allocators[r % len(allocators) :] + allocators[: r % len(allocators)]:
            if len(allocators) > 1:
                retain_freed_memory(allocator == "retained")
                time_steps(steps[names[shift]], batches, r, 1)  # the heap settles: untimed
            for name in names[shift:] + names[:shift]:
                _sync(device)
                times[name, allocator].append(time_steps(steps[name], batches, r, 1))
                _sync(device)
    if len(allocators) > 1:
        retain_freed_memory(False)
    med = {key: statistics.median(t) for key, t in times.items()}
    rows = args.batch_size * pixels
    ceiling = {
        p: bare_matmul_gflops(rows, hidden, dt, device, 7)
        for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))
        if p in precisions
    }
    flops = matmul_flops_per_image(hidden, layers, pixels) * args.batch_size
    header = f"| {'configuration':34} |"
    for allocator in allocators:
        header += (
            f" {allocator + ': img/s':>17} | {'ms/step':>8} | {'x raw fp32':>10} | "
            f"{'eff. GFLOP/s':>12} | {'% of ceiling':>12} |"
        )
    header += f" {'peak MiB':>8} |"
    print(
        f"\n{device.type}: paper-size step (500x2, batch {args.batch_size}, 28x28), {args.repeats} timings"
        + (", system allocator and memory retained (`retain_freed_memory`)" if len(allocators) > 1 else "")
    )
    print(header)
    print(re.sub(r"[^|]", "-", header))
    for name in names:
        precision, full = meta[name]
        line = f"| {name:34} |"
        for allocator in allocators:
            seconds = med[name, allocator]
            gflops = flops / seconds / 1e9 if full else float("nan")
            share = 100 * gflops / ceiling[precision] if full else float("nan")
            line += (
                f" {args.batch_size / seconds:17.0f} | {1e3 * seconds:8.1f} | "
                f"{med['raw fp32 reference', allocator] / seconds:10.2f} | {gflops:12.0f} | {share:12.0f} |"
            )
        mem = memory[name]
        print(line + f" {'n/a' if mem is None else f'{mem:8.0f}':>8} |")
    if len(allocators) > 1:
        print(
            "retained memory against the reference as the original code runs (system allocator): "
            + ", ".join(
                f"{name} {med['raw fp32 reference', 'system'] / med[name, 'retained']:.2f}x" for name in names
            )
        )
    print(
        "ceiling (bare matmuls "
        + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in ceiling.items())
        + f": forward, input and weight gradient at {rows} x {hidden} by {hidden} x {hidden}); "
        "eff. GFLOP/s = matmul FLOPs of the step "
        "(encoder + decoder, forward + backward) / step time, for full-pixel steps."
    )


def profile(result: dict, batches, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name in ("pyro", "raw"):
        step = result[f"{name}_step"]
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            time_steps(step, batches, 0, 3)
        print(f"\n--- torch.profiler, {name}, {result['size']} {result['model']}, 3 steps ---")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", nargs="+", default=["500x2", "128x2"], help="HIDDENxLAYERS (default: 500x2 128x2)"
    )
    parser.add_argument("--no-vanilla", action="store_true", help="skip the vanilla-VAE rows")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7, help="timings per side (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per timing, at least")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--kl", choices=["analytic", "sampled"], default="analytic")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables at 500x2")
    parser.add_argument(
        "--no-validation", action="store_true", help="pyro.enable_validation(False) for the Pyro side"
    )
    parser.add_argument("--speed", action="store_true", help="only the precision/compile/subsample table")
    parser.add_argument("--device", default="cpu", help="device of the --speed table (cpu or cuda)")
    parser.add_argument(
        "--allocator",
        choices=["both", "system"],
        default="both",
        help="--speed on the CPU: time every step with the C library's allocator and with freed memory "
        "retained (pyro_svae.retain_freed_memory), interleaved (default: both)",
    )
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also time Pyro without validation / with one torch Adam (overhead diagnosis)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_validation:
        pyro.enable_validation(False)
    print(
        f"torch {torch.__version__}, pyro {pyro.__version__}, torch.get_num_threads() = "
        f"{torch.get_num_threads()}, batch {args.batch_size}, 28x28, z_dim 2, Adam lr {args.lr}, "
        f"reference KL {args.kl}, pyro validation {pyro.infer.util.is_validation_enabled()}"
    )
    train, _ = posed_mnist(rotation="normal", translation_std=1.4, split="head", seed=0)
    g = torch.Generator().manual_seed(0)
    batches = [train.images[torch.randperm(len(train), generator=g)[: args.batch_size]] for _ in range(8)]
    if args.speed:
        speed_table(args, batches)
        return

    results = []
    for size in args.sizes:
        hidden, layers = (int(s) for s in size.lower().split("x"))
        for vanilla in (False,) if args.no_vanilla else (False, True):
            result = benchmark(hidden, layers, vanilla, args, batches)
            results.append(result)
            print(
                f"  done {result['size']} {result['model']}: ratio {result['ratio']:.3f}",
                flush=True,
            )
            if args.profile and hidden == 500 and not vanilla:
                profile(result, batches, 25)

    header = (
        f"| {'size':6} | {'model':19} | {'pyro img/s':>10} | {'raw img/s':>9} | {'pyro ms/step':>12} "
        f"| {'raw ms/step':>11} | {'pyro/raw':>8} | {'steps/timing':>12} | {'loss check':>10} |"
    )
    print()
    print(header)
    print(re.sub(r"[^|]", "-", header))
    for r in results:
        print(
            f"| {r['size']:6} | {r['model']:19} | {r['pyro_ips']:10.0f} | {r['raw_ips']:9.0f} | "
            f"{r['pyro_ms']:12.1f} | {r['raw_ms']:11.1f} | {r['ratio']:8.3f} | {r['inner']:12d} | "
            f"{r['mismatch']:10.1e} |"
        )
    for r in results:
        for name, ratio in r["variants"].items():
            print(f"  variant {r['size']} {r['model']}: {name}: {ratio:.3f} x raw")
    print(
        "\npyro/raw = median Pyro step time / median reference step time (interleaved, "
        f"{args.repeats} timings each); loss check = relative difference of the two losses on the "
        "same weights and noise (reference with sampled KL)."
    )


if __name__ == "__main__":
    main()
