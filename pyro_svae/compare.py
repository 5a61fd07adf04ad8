"""Train several (guide, objective) pairs under the same budget and seed and compare them in one table.

    rows = compare_inference(default_contenders(), train, test, make_model=lambda: SpatialVAE((28, 28), 2),
                             epochs=10, num_particles=8)
    print(format_table(rows))

Every contender gets a fresh model from ``make_model`` with the same initial decoder weights (Pyro is
seeded with ``seed`` before each model is built), the same mini-batches (``fit(seed=seed)``), epochs,
batch size, optimizer and learning rate. The table reports on the test images: the ELBO per image and the
importance-weighted bound with the same ``K = num_particles`` for every contender (both from
:func:`~pyro_svae.infer.evaluate`), theta recovery (circular correlation, median error after the best
global offset, with ``symmetry``) and the mean wall-clock seconds of a training epoch.

When the theta prior is circular, a ``"normal"`` theta guide's own bound is not a bound on the circle (see
:mod:`pyro_svae.guides`); the table then adds ``iw_elbo_wrapped``: the same trained guide evaluated with
its wrapped (circular) density, a valid bound, next to the circular guides' bounds.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch
from pyro.infer import RenyiELBO, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO

from . import metrics as M
from .encoders import make_encoder
from .guides import AmortizedGuide, CircularSupportWarning, wrapped_theta
from .infer import evaluate, fit, linear_kl_annealing, posterior_means
from .objectives import IWAE_ELBO
from .priors import is_circular

__all__ = [
    "LOSSES",
    "Contender",
    "default_contenders",
    "circular_contenders",
    "compare_inference",
    "format_table",
]

# SpatialVAE's sample sites all sit in one plate ("images"), so the plate nesting is known: 1.
LOSSES: dict[str, Callable[[int], pyro.infer.ELBO]] = {
    "Trace_ELBO": lambda k: Trace_ELBO(num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1),
    "TraceMeanField_ELBO": lambda k: TraceMeanField_ELBO(
        num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1
    ),
    "TraceGraph_ELBO": lambda k: TraceGraph_ELBO(
        num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1
    ),
    "IWAE_ELBO": lambda k: IWAE_ELBO(num_particles=k, max_plate_nesting=1),
    "RenyiELBO": lambda k: RenyiELBO(
        alpha=0.0, num_particles=k, vectorize_particles=True, max_plate_nesting=1
    ),
}


@dataclass(frozen=True)
class Contender:
    """One (guide, objective) pair: guide ``families`` per site, ``encoder`` (``"mlp"``/``"cnn"``), the
    objective by name (:data:`LOSSES`; ``None`` = the guide's matching ELBO) with ``particles`` samples,
    and optional linear KL annealing over ``kl_warmup`` epochs."""

    name: str
    families: Mapping[str, str] = field(default_factory=dict)
    loss: str | None = None
    particles: int = 1
    encoder: str = "mlp"
    kl_warmup: int | None = None

    def make_loss(self, guide: AmortizedGuide) -> pyro.infer.ELBO:
        if self.loss is None:
            return guide.default_loss()
        try:
            return LOSSES[self.loss](self.particles)
        except KeyError:
            raise ValueError(f"unknown loss '{self.loss}'; expected one of {sorted(LOSSES)}") from None


def default_contenders(particles: int = 8, *, kl_warmup: int = 3) -> list[Contender]:
    """The paper's guide under four objectives, the three circular theta families with their matching
    ELBO, a full-covariance ``z`` and a CNN encoder."""
    return [
        Contender("normal | Trace_ELBO", loss="Trace_ELBO"),
        Contender("normal | TraceMeanField_ELBO", loss="TraceMeanField_ELBO"),
        Contender(f"normal | IWAE K={particles}", loss="IWAE_ELBO", particles=particles),
        Contender(f"normal | Trace_ELBO, KL warm-up {kl_warmup} ep", loss="Trace_ELBO", kl_warmup=kl_warmup),
        Contender("projected_normal | Trace_ELBO", {"theta": "projected_normal"}, "Trace_ELBO"),
        Contender("wrapped_normal | Trace_ELBO", {"theta": "wrapped_normal"}, "Trace_ELBO"),
        Contender("von_mises | TraceGraph_ELBO", {"theta": "von_mises"}, "TraceGraph_ELBO"),
        Contender("normal, full-cov z | Trace_ELBO", {"z": "full_normal"}, "Trace_ELBO"),
        Contender("normal, CNN encoder | Trace_ELBO", loss="Trace_ELBO", encoder="cnn"),
    ]


def circular_contenders() -> list[Contender]:
    """The Normal theta guide against the three circular families, each with its matching ELBO."""
    return [
        Contender("normal | Trace_ELBO", loss="Trace_ELBO"),
        Contender("projected_normal | Trace_ELBO", {"theta": "projected_normal"}, "Trace_ELBO"),
        Contender("wrapped_normal | Trace_ELBO", {"theta": "wrapped_normal"}, "Trace_ELBO"),
        Contender("von_mises | TraceGraph_ELBO", {"theta": "von_mises"}, "TraceGraph_ELBO"),
    ]


def _theta_prior(model):
    module = getattr(model, "theta_prior", None)
    if module is None:
        return None
    return module.forward() if isinstance(module, pyro.nn.PyroModule) else module()


def compare_inference(
    contenders: Sequence[Contender],
    train,
    test,
    *,
    make_model: Callable[[], Any],
    epochs: int = 10,
    batch_size: int = 100,
    learning_rate: float = 1e-3,
    num_particles: int = 8,
    hidden_dim: int = 128,
    num_layers: int = 2,
    seed: int = 0,
    symmetry: int = 1,
    device: str | torch.device = "auto",
    progress: bool = False,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train each contender on ``train`` for ``epochs`` and evaluate it on ``test``; one dict per row.

    ``make_model()`` builds a fresh model (called after seeding, so initial weights agree); guides use
    ``hidden_dim`` x ``num_layers`` encoders. ``num_particles`` is the K of the importance-weighted bound
    for *every* row (whatever the training objective). ``on_result`` is called with each row as soon as
    it is done (e.g. to print progress).
    """
    if not contenders:
        raise ValueError("no contenders to compare")
    rows = []
    for contender in contenders:
        pyro.set_rng_seed(seed)
        model = make_model()
        encoder = None
        if contender.encoder != "mlp":
            encoder = make_encoder(contender.encoder, model.image_shape, hidden_dim=hidden_dim)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CircularSupportWarning)  # the wrapped column addresses it
            guide = AmortizedGuide(
                model,
                encoder,
                families=dict(contender.families),
                hidden_dim=hidden_dim,
                num_layers=num_layers,
            )
        loss = contender.make_loss(guide)
        kl_weight = linear_kl_annealing(contender.kl_warmup) if contender.kl_warmup else 1.0
        history = fit(
            model,
            guide,
            train,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            loss=loss,
            kl_weight=kl_weight,
            seed=seed,
            device=device,
            progress=progress,
        )
        report = evaluate(model, guide, test, num_particles=num_particles, seed=seed)
        row: dict[str, Any] = {
            "contender": contender.name,
            "theta_family": guide.config["families"].get("theta", "-"),
            "objective": type(loss).__name__ + (f" K={loss.num_particles}" if loss.num_particles > 1 else ""),
            "test_elbo": report["elbo"],
            "test_iw_elbo": report["iw_elbo"],
            "K": num_particles,
        }
        prior = _theta_prior(model)
        if prior is not None and is_circular(prior) and guide.config["families"].get("theta") == "normal":
            with wrapped_theta(guide):
                row["iw_elbo_wrapped"] = evaluate(model, guide, test, num_particles=num_particles, seed=seed)[
                    "iw_elbo"
                ]
        means = posterior_means(guide, test)
        if "theta" in means and getattr(test, "theta", None) is not None:
            row["theta_circ_corr"] = M.circular_correlation(means["theta"], test.theta, symmetry=symmetry)
            row["theta_median_error_deg"] = math.degrees(
                M.median_angular_error(means["theta"], test.theta, symmetry=symmetry)
            )
        row["sec_per_epoch"] = statistics.fmean(history.values("seconds", "train")) if epochs else math.nan
        row["epochs"] = epochs
        row["model"] = model
        row["guide"] = guide
        rows.append(row)
        if on_result is not None:
            on_result(row)
    return rows


_COLUMNS = [
    ("contender", "guide (theta) | objective", "{}"),
    ("test_elbo", "test ELBO", "{:.2f}"),
    ("test_iw_elbo", "IW-ELBO", "{:.2f}"),
    ("iw_elbo_wrapped", "IW-ELBO wrapped", "{:.2f}"),
    ("theta_circ_corr", "theta corr", "{:.3f}"),
    ("theta_median_error_deg", "theta med err deg", "{:.1f}"),
    ("sec_per_epoch", "s/epoch", "{:.1f}"),
]


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a plain-text table (nats per image; the IW-ELBO with the rows' common K)."""
    columns = [(key, title, fmt) for key, title, fmt in _COLUMNS if any(key in row for row in rows)]
    ks = {row.get("K") for row in rows}
    cells = [
        [
            title if key != "test_iw_elbo" else f"IW-ELBO K={','.join(map(str, ks))}"
            for key, title, _ in columns
        ]
    ]
    for row in rows:
        cells.append([fmt.format(row[key]) if key in row else "-" for key, _, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = []
    for n, line in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
