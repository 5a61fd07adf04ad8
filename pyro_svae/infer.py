"""Training with Pyro SVI (:func:`fit`) and evaluation of ELBO and importance-weighted bounds."""

from __future__ import annotations

import contextlib
import functools
import math
import re
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.elbo import ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from tqdm.auto import tqdm

from . import distributed as D
from . import metrics as M
from .checkpoint import (
    get_rng_state,
    load_checkpoint,
    load_module_state,
    optimizer_state,
    save_checkpoint,
    set_optimizer_state,
    set_rng_state,
)
from .data.datasets import DataError, ImageDataset
from .likelihoods import GaussianLikelihood, LearnedGaussianLikelihood, PixelGaussianLikelihood
from .runtime import (  # re-exported: the training entry points' device and precision options
    PRECISIONS,
    EmulatedPrecisionWarning,
    check_precision,
    precision_context,
    resolve_device,
    resolve_precision,
    retain_freed_memory,
)

__all__ = [
    "PRECISIONS",
    "EmulatedPrecisionWarning",
    "check_precision",
    "precision_context",
    "resolve_precision",
    "History",
    "DivergenceError",
    "KLWeight",
    "linear_kl_annealing",
    "decaying_adam",
    "resolve_device",
    "retain_freed_memory",
    "as_dataset",
    "fit",
    "evaluate",
    "posterior_means",
    "recovery_metrics",
]


def model_inputs(model, data: ImageDataset, index: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Per-image keyword arguments the model needs besides the images (the CTF rows of ``index`` for a
    model with ``ctf=True``)."""
    if not getattr(model, "ctf", False):
        return {}
    if data.ctf is None:
        raise DataError(
            f"{data.name}: the model applies a CTF (ctf=True) but the data carry no CTF parameters; "
            "load particles with their STAR file or build the model with ctf=False"
        )
    return {"ctf": data.ctf[index].to(device)}


def guide_inputs(guide, data: ImageDataset, index: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """What a guide's summaries need besides the images: the model's inputs for a guide whose rotation
    bins the model sums over (``PoseSearchGuide(mode="marginal")`` asks the model which bin fits), else
    nothing."""
    search_model = getattr(guide, "search_model", None)
    return {} if search_model is None else model_inputs(search_model, data, index, device)


def as_dataset(data, image_shape: Sequence[int] | None = None, *, name: str = "data") -> ImageDataset:
    """Wrap arrays/tensors as an :class:`ImageDataset` and check they fit a model's ``(C, H, W)``."""
    dataset = data if isinstance(data, ImageDataset) else ImageDataset(data, name=name)
    if image_shape is not None and tuple(dataset.image_shape) != tuple(image_shape):
        raise DataError(
            f"{dataset.name}: the model expects images of shape {tuple(image_shape)} (C, H, W), "
            f"found {tuple(dataset.image_shape)}"
        )
    return dataset


@dataclass
class History:
    """Per-epoch records: dicts with ``epoch``, ``split`` (``train``/``test``), ``elbo``,
    ``reconstruction`` and ``kl`` (nats per image), ``seconds`` and pose metrics when known."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def split(self, split: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["split"] == split]

    def values(self, key: str, split: str = "test") -> list[float]:
        """One value per epoch, e.g. ``history.values("elbo", "train")``."""
        return [r[key] for r in self.split(split) if key in r]

    def last(self, split: str = "test") -> dict[str, Any]:
        rows = self.split(split)
        return rows[-1] if rows else {}

    def __len__(self) -> int:
        return len({r["epoch"] for r in self.records})


#: a step's per-image loss this many times ``max(|first step's loss|, pixels)`` above the first step's
#: counts as exploding: healthy runs stay below their first loss; on 14 x 14 digits a run at lr 0.3 peaked
#: at 6x above it and recovered, at lr 0.5 at 580x and never recovered, at lr 1 at 4e7x
EXPLOSION_FACTOR = 100.0

#: a step's loss above this many nats per pixel counts as diverged even at the first step: a Gaussian
#: pixel 1,400 noise sigmas off its mean costs 1e6 nats (pixel values scaled x1e6 cost ~1e10 per pixel);
#: no fit of data on the likelihood's scale comes near it
MAX_NATS_PER_PIXEL = 1e6


class DivergenceError(RuntimeError):
    """Training diverged: a non-finite or exploding loss, a distribution whose parameters left their
    range, or non-finite weights. Raised before the epoch's checkpoint and callbacks, so a checkpoint
    holds the last good epoch; ``history`` has the records up to it, the model and guide are left as
    they diverged."""

    def __init__(
        self,
        *,
        epoch: int,
        step: int,
        steps: int,
        loss: float,
        reason: str,
        learning_rate: float | None,
        history: History,
    ) -> None:
        self.epoch, self.step, self.steps, self.loss = epoch, step, steps, loss
        self.reason, self.learning_rate, self.history = reason, learning_rate, history
        self.summary = f"training diverged at epoch {epoch} (step {step} of {steps}): {reason}"
        now = "" if learning_rate is None else f" (now {learning_rate:g})"
        self.advice = (
            f"lower the learning rate{now}, check the data's scale (a Gaussian likelihood expects pixel "
            "values spread about as much as its noise sigma), or normalize the images"
        )
        super().__init__(f"{self.summary}; {self.advice}")


def _invalid_distribution(error: ValueError) -> str | None:
    """What a torch/Pyro argument-validation error says went invalid (``None`` for other errors)."""
    text = str(error)
    found = re.search(r"Expected parameter (\w+) .*? of distribution (\w+)", text, re.S)
    if found:
        return f"the {found[1]} of a {found[2]} distribution became invalid (NaN, infinite or out of range)"
    found = re.search(
        r"Expected value argument .*? within the support .*? of the distribution (\w+)", text, re.S
    )
    if found:
        return f"a value of a {found[1]} distribution became invalid (NaN or infinite)"
    return None


def _non_finite_parameter(*modules: torch.nn.Module) -> str | None:
    """The name of the first parameter holding NaN or inf, else ``None``."""
    for module in modules:
        for name, param in module.named_parameters():
            if not bool(torch.isfinite(param).all()):
                return f"{getattr(module, '_pyro_name', type(module).__name__)}.{name}"
    return None


def _check_scale(model, data: ImageDataset) -> None:
    """Warn when a Gaussian likelihood meets pixel values far (100x) from its noise scale."""
    likelihood = getattr(model, "likelihood", None)
    if isinstance(likelihood, GaussianLikelihood | LearnedGaussianLikelihood):
        with torch.no_grad():
            sigma = float(likelihood.sigma)
    elif isinstance(likelihood, PixelGaussianLikelihood):
        sigma = 1.0  # the decoder's sigmas start near softplus(0)
    else:
        return
    images = data.images[:: max(1, len(data) // 1000)]  # about 1000 images are enough
    rms, std = float(images.square().mean().sqrt()), float(images.std())
    if rms > 100 * sigma or std < sigma / 100:
        warnings.warn(
            f"{data.name}: pixel values have mean {float(images.mean()):.3g} and std {std:.3g}, far "
            f"from the Gaussian likelihood's noise sigma {sigma:.3g}: normalize the images (subtract the "
            "mean, divide by the std) or training learns little and may diverge",
            stacklevel=3,
        )


class _ObsLogProb(Messenger):
    """Adds up the (plate-scaled) log-density of the ``obs`` site of each model run, detached.

    SVI only returns the loss; this yields the reconstruction term of the same sample for free
    (``KL = reconstruction - ELBO``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0.0
        self.runs = 0

    def _pyro_post_sample(self, msg) -> None:
        if msg["name"] == "obs" and msg["is_observed"]:
            with torch.no_grad():
                log_prob = msg["fn"].log_prob(msg["value"])
                # mean over vectorized particles (leading dims), sum over the images plate (dim -1)
                log_prob = log_prob.reshape(-1, log_prob.shape[-1]).sum(-1).mean()
            self.total += float(log_prob) * float(msg["scale"])
            self.runs += 1

    def pop(self) -> float:
        mean = self.total / max(self.runs, 1)
        self.total, self.runs = 0.0, 0
        return mean


class KLWeight(Messenger):
    """Multiplies the log-densities of latent (unobserved) sites by ``beta`` in model and guide.

    Applied to both, it turns the ELBO into ``E[log p(x | latents)] - beta KL``: KL annealing
    (``beta`` rising from 0 to 1 over the first epochs) or a beta-VAE (constant ``beta``).
    """

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = float(beta)

    def _pyro_sample(self, msg) -> None:
        if self.beta != 1.0 and not msg["is_observed"] and not site_is_subsample(msg):
            msg["scale"] = msg["scale"] * self.beta


def linear_kl_annealing(warmup_epochs: int, start: float = 0.0) -> Callable[[int], float]:
    """``beta(epoch)`` rising linearly from ``start`` at epoch 1 to 1 at ``warmup_epochs`` (then 1)."""
    if warmup_epochs < 1:
        raise ValueError(f"warmup_epochs must be >= 1, got {warmup_epochs}")
    return lambda epoch: min(1.0, start + (1.0 - start) * epoch / warmup_epochs)


def decaying_adam(
    learning_rate: float, final_learning_rate: float, epochs: int
) -> tuple[pyro.optim.PyroLRScheduler, Callable[[int, dict], None]]:
    """Adam whose learning rate decays exponentially, epoch by epoch, from ``learning_rate`` (first epoch)
    to ``final_learning_rate`` (last epoch). Returns the optimizer and the callback that steps it:
    ``fit(..., optimizer=optimizer, callbacks=[step])``."""
    if not (learning_rate > 0 and final_learning_rate > 0) or epochs < 1:
        raise ValueError(
            f"positive learning rates and epochs >= 1 needed, got {learning_rate}, {final_learning_rate}, "
            f"{epochs}"
        )
    gamma = (final_learning_rate / learning_rate) ** (1.0 / max(epochs - 1, 1))
    scheduler = pyro.optim.ExponentialLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": learning_rate}, "gamma": gamma}
    )
    return scheduler, lambda epoch, records: scheduler.step()


def _batches(n: int, batch_size: int, generator: torch.Generator | None) -> Iterable[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return order.split(batch_size)


def _prefixes(model, guide) -> dict[str, str]:
    return {
        "model": getattr(model, "_pyro_name", "model"),
        "guide": getattr(guide, "_pyro_name", "guide"),
    }


@torch.no_grad()
def posterior_means(
    guide, data: ImageDataset, *, batch_size: int = 500, precision: str = "fp32"
) -> dict[str, torch.Tensor]:
    """Posterior point estimates per site for every image, on the CPU: ``z`` ``(N, z_dim)``…
    (the guide in ``eval()`` mode, so without training-time augmentation)."""
    device = next(guide.parameters()).device
    out: dict[str, list[torch.Tensor]] = {}
    was_training = guide.training
    guide.eval()
    try:
        with precision_context(precision, device):
            for index in torch.arange(len(data)).split(batch_size):
                inputs = guide_inputs(guide, data, index, device)
                means = guide.posterior_means(data.images[index].to(device), **inputs)
                for site, value in means.items():
                    out.setdefault(site, []).append(value.float().cpu())
    finally:
        guide.train(was_training)
    return {site: torch.cat(values) for site, values in out.items()}


def recovery_metrics(
    means: dict[str, torch.Tensor],
    data: ImageDataset,
    *,
    train_means: dict[str, torch.Tensor] | None = None,
    train: ImageDataset | None = None,
) -> dict[str, float]:
    """Pose recovery (θ circular correlation, Jammalamadaka's and Fisher-Lee's, the one to read when θ
    is spread over the whole circle; median error in degrees after the best global offset; Δx Pearson
    r) and content quality (k-NN accuracy of labels from ``z``) where the truth is known."""
    result: dict[str, float] = {}
    if "theta" in means and data.theta is not None:
        result["theta_circ_corr"] = M.circular_correlation(means["theta"], data.theta)
        result["theta_circ_corr_fisher_lee"] = M.circular_correlation(
            means["theta"], data.theta, method="fisher-lee"
        )
        result["theta_median_error_deg"] = math.degrees(M.median_angular_error(means["theta"], data.theta))
    if "scale" in means and data.scale is not None and float(data.scale.std()) > 0:
        result["log_scale_corr"] = M.pearson(torch.log(means["scale"]), torch.log(data.scale))
    if "dx" in means and data.dx is not None and float(data.dx.std()) > 0:
        rx, ry = M.translation_correlation(means["dx"], data.dx)
        result["dx_corr_x"], result["dx_corr_y"] = rx, ry
    if train_means is not None and train is not None and train.labels is not None and data.labels is not None:
        result["knn_accuracy"] = M.knn_accuracy(train_means["z"], train.labels, means["z"], data.labels)
    return result


def fit(
    model,
    guide,
    train,
    *,
    test=None,
    epochs: int = 10,
    batch_size: int = 100,
    learning_rate: float = 1e-4,
    optimizer: pyro.optim.PyroOptim | None = None,
    loss: ELBO | None = None,
    device: str | torch.device = "auto",
    seed: int | None = 0,
    progress: bool = True,
    callbacks: Sequence[Callable[[int, dict[str, dict[str, Any]]], None]] = (),
    kl_weight: float | Callable[[int], float] = 1.0,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    extra_state: dict[str, Any] | None = None,
    precision: str = "fp32",
    distributed: bool | None = None,
) -> History:
    """Train ``model`` and ``guide`` with Pyro SVI on mini-batches; returns the :class:`History`.

    ``train``/``test``: :class:`ImageDataset` or arrays ``(N, H, W)`` / ``(N, C, H, W)``. Each epoch
    records the per-image train ELBO (averaged over the epoch's steps), reconstruction term and KL, and
    the test ELBO (one posterior sample per image, weights fixed) with pose metrics when the test data
    carry ground truth. ``loss`` is any Pyro ELBO (default: ``guide.default_loss()`` where the guide
    has one, else ``Trace_ELBO()``), ``optimizer`` any ``pyro.optim`` optimizer (default
    ``Adam(lr=learning_rate)``). ``seed`` seeds Pyro once at the start and fixes the shuffling of every
    epoch; the initial weights were drawn when the networks were built, so seed before building them
    (``pyro.set_rng_seed``) for a run that repeats exactly. With ``checkpoint`` a checkpoint is written
    atomically after every epoch; ``resume=True`` continues from it (reproducing an uninterrupted run on
    the CPU).
    ``callbacks`` are called as ``callback(epoch, {"train": record, "test": record})``.
    ``kl_weight`` (a number, or a function of the epoch such as :func:`linear_kl_annealing`) scales the
    latent sites' log-densities in model and guide (``poutine``-style scaling); the train ``elbo``
    recorded is still the unweighted ELBO, recovered from the weighted objective.
    ``precision`` (:data:`PRECISIONS`) runs the networks under autocast for training steps (see
    :func:`precision_context`); the test ELBO is always evaluated in float32, so runs in different
    precisions report comparable numbers. A model with ``ctf=True`` receives each batch's CTF rows.
    ``distributed=True`` (one process per rank, launched by ``torchrun``; see
    :mod:`pyro_svae.distributed`) trains data-parallel: each rank takes its slice of every batch and the
    gradients are combined over ranks, so each step equals a single process's on the whole batch;
    ``None`` does so when the caller has initialized a process group. The records are the same on every
    rank; rank 0 alone evaluates the test set, writes the checkpoint and shows progress.
    Divergence raises :class:`DivergenceError` before the epoch's checkpoint and callbacks: a step's loss
    not finite or exploding (:func:`_loss_problem`), a distribution whose parameters went invalid after
    the first step, non-finite weights or test ELBO. Ranks stop at the same step: the loss each returns
    is summed over ranks. Resuming, fit's own Adam steps at ``learning_rate``, whatever the checkpoint's
    optimizer state recorded. A Gaussian likelihood warns about pixel values 100x from its noise sigma.
    On Linux, :func:`retain_freed_memory` (process-wide, so left to the caller) makes steps with large
    activations faster (1.2-1.4x at the paper's size on a CPU).
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}")
    train = as_dataset(train, model.image_shape, name="train")
    test = None if test is None else as_dataset(test, model.image_shape, name="test")
    ranks = D.setup(resolve_device(device), distributed)
    run = _Training.start(
        model,
        guide,
        train,
        test,
        ranks,
        precision=precision,
        optimizer=optimizer,
        loss=loss,
        seed=seed,
        learning_rate=learning_rate,
    )
    history, start_epoch = History(), 1
    if resume:
        history, start_epoch = run.restore(checkpoint)
    ranks.broadcast_modules(model, guide)
    if ranks.is_main:
        _check_scale(model, train)

    beta_of = kl_weight if callable(kl_weight) else (lambda epoch: float(kl_weight))
    for epoch in range(start_epoch, epochs + 1):
        beta = float(beta_of(epoch))
        if not beta > 0:
            raise ValueError(f"kl_weight must be positive, got {beta} at epoch {epoch}")
        batches = list(_batches(len(train), batch_size, run.epoch_generator(seed, epoch)))
        diverged = functools.partial(
            DivergenceError, epoch=epoch, steps=len(batches), learning_rate=run.learning_rate, history=history
        )
        records = {
            "train": run.train_epoch(epoch, batches, beta, diverged, progress and ranks.is_main, epochs)
        }
        if test is not None:
            record = _test_record(model, guide, test, epoch, max(batch_size, 100)) if ranks.is_main else None
            records["test"] = ranks.broadcast_object(record)
            if "diverged" in records["test"]:
                raise diverged(step=len(batches), loss=run.last_loss, reason=records["test"]["diverged"])
        history.records.extend(records.values())
        run.save(checkpoint, epoch, history, extra_state)
        for callback in callbacks:
            callback(epoch, records)
    ranks.barrier()
    return history


@dataclass
class _Training:
    """What one :func:`fit` call trains with: SVI on the wrapped model and guide, the ranks, the device
    and the step's precision, and the first step's loss (the yardstick of an exploding one)."""

    model: Any
    guide: Any
    train: ImageDataset
    ranks: Any
    svi: SVI
    optim: pyro.optim.PyroOptim
    recorder: _ObsLogProb
    annealer: KLWeight
    step_precision: contextlib.AbstractContextManager
    learning_rate: float | None  # fit's own Adam's rate; None for a given optimizer
    first: float | None = None
    last_loss: float = math.nan

    @classmethod
    def start(cls, model, guide, train, test, ranks, *, precision, optimizer, loss, seed, learning_rate):
        """Check the inputs against the model, move the modules, seed, and set up SVI."""
        device = ranks.device
        step_precision = precision_context(precision, device)  # validates early
        model_inputs(model, train, torch.arange(0), device)
        if test is not None:
            model_inputs(model, test, torch.arange(0), device)
        model.to(device)
        guide.to(device)
        if seed is not None:
            pyro.set_rng_seed(ranks.rank_seed(seed))  # distinct guide noise per rank; `seed` on rank 0
        optim = optimizer or pyro.optim.Adam({"lr": learning_rate})
        if loss is None:  # guides that need a particular estimator (enumeration, score function) say which
            loss = guide.default_loss() if hasattr(guide, "default_loss") else Trace_ELBO()
        if getattr(model, "pixel_subsample", None) is not None and getattr(loss, "max_plate_nesting", 2) < 2:
            raise ValueError(
                "the model's pixels plate (pixel_subsample) nests inside the images plate: the loss needs "
                f"max_plate_nesting >= 2, got {loss.max_plate_nesting} (enumerating guides are not supported)"
            )
        recorder, annealer = _ObsLogProb(), KLWeight()
        svi = SVI(annealer(recorder(model)), annealer(guide), optim, loss)
        rate = learning_rate if optimizer is None else None
        return cls(model, guide, train, ranks, svi, optim, recorder, annealer, step_precision, rate)

    def restore(self, checkpoint: str | Path | None) -> tuple[History, int]:
        """Load modules, optimizer (at fit's learning rate) and RNG from ``checkpoint``: the history so
        far and the next epoch."""
        if checkpoint is None or not Path(checkpoint).is_file():
            raise FileNotFoundError(f"cannot resume: no checkpoint at {checkpoint}")
        state = load_checkpoint(checkpoint, map_location=self.ranks.device)
        load_module_state(self.model, state["model"], "model")
        load_module_state(self.guide, state["guide"], "guide")
        # fit's own Adam takes `learning_rate` (a resumed run may change it); a given optimizer keeps its own
        prefixes = _prefixes(self.model, self.guide)
        set_optimizer_state(self.optim, state["optimizer"], prefixes, learning_rate=self.learning_rate)
        set_rng_state(state["rng"])
        self.ranks.restore_rng(state)
        return History(list(state["history"])), int(state["epoch"]) + 1

    def epoch_generator(self, seed: int | None, epoch: int) -> torch.Generator:
        """The generator that shuffles ``epoch``: fixed by ``seed``, else drawn and shared by the ranks."""
        if seed is not None:
            return torch.Generator().manual_seed(seed * 100_003 + epoch)
        shared = self.ranks.broadcast_object(int(torch.randint(2**31, ()).item()))
        return torch.Generator().manual_seed(shared)

    def train_epoch(self, epoch, batches, beta: float, diverged, show: bool, epochs: int) -> dict[str, Any]:
        """One pass of SVI steps over ``batches``; the epoch's train record. Raises ``diverged(...)``
        (a :class:`DivergenceError`) on a non-finite or exploding loss, or non-finite weights."""
        model, guide, train, ranks = self.model, self.guide, self.train, self.ranks
        n, pixels = len(train), math.prod(model.image_shape)
        self.annealer.beta = beta
        started = time.perf_counter()
        objective_sum = recon_sum = 0.0
        model.train()
        guide.train()
        bar = tqdm(batches, desc=f"epoch {epoch}/{epochs}", leave=False, disable=not show)
        for step, index in enumerate(bar, 1):
            local, share = ranks.shard(index)  # (index, 1.0) in a single process
            images = train.images[local].to(ranks.device, non_blocking=True)
            inputs = model_inputs(model, train, local, ranks.device)
            try:
                with self.step_precision:
                    step_loss = ranks.step(self.svi, images, data_size=n, share=share, **inputs)
            except ValueError as error:
                reason = _invalid_distribution(error)
                if reason is None or self.first is None:  # another error, or one of the untrained networks
                    raise
                raise diverged(step=step, loss=math.nan, reason=reason) from error
            self.last_loss = per_image = step_loss / n
            self.first = per_image if self.first is None else self.first
            reason = _loss_problem(per_image, self.first, pixels)
            if reason is not None:
                raise diverged(step=step, loss=per_image, reason=reason)
            weight = index.numel() / n
            objective_sum -= step_loss * weight
            recon_sum += self.recorder.pop() * weight * share
            bar.set_postfix(elbo=f"{-per_image:.1f}")
        name = _non_finite_parameter(model, guide)
        if name is not None:
            reason = f"parameter {name} became NaN or infinite"
            raise diverged(step=len(batches), loss=self.last_loss, reason=reason)
        (recon_sum,) = ranks.sum(recon_sum)
        kl = (recon_sum - objective_sum) / beta / n
        record = {
            "epoch": epoch,
            "split": "train",
            "elbo": recon_sum / n - kl,
            "reconstruction": recon_sum / n,
            "kl": kl,
            "seconds": time.perf_counter() - started,
        }
        if beta != 1.0:
            record["kl_weight"] = beta
        return record

    def save(self, checkpoint, epoch: int, history: History, extra_state: dict[str, Any] | None) -> None:
        """Write the checkpoint of ``epoch`` (rank 0; every rank contributes its random state)."""
        if checkpoint is None:
            return
        rng_ranks = self.ranks.checkpoint_rng()  # on every rank
        if not self.ranks.is_main:
            return
        save_checkpoint(
            checkpoint,
            {
                "epoch": epoch,
                "model": self.model.state_dict(),
                "guide": self.guide.state_dict(),
                "optimizer": optimizer_state(self.optim, _prefixes(self.model, self.guide)),
                "history": history.records,
                "rng": get_rng_state(),
                **rng_ranks,
                **(extra_state or {}),
            },
        )


def _loss_problem(loss: float, first: float, pixels: int) -> str | None:
    """Why a step's per-image ``loss`` means divergence: not finite, more than :data:`EXPLOSION_FACTOR` x
    ``max(|first|, pixels)`` above the ``first`` step's, or (from the first step on) above
    :data:`MAX_NATS_PER_PIXEL` per pixel; else ``None``."""
    if not math.isfinite(loss):
        return f"loss {loss}"
    if loss > first + EXPLOSION_FACTOR * max(abs(first), pixels):
        return f"loss {loss:.3g} nats per image, exploded from {first:.3g} at the first step"
    if loss > MAX_NATS_PER_PIXEL * pixels:
        return (
            f"loss {loss:.3g} nats per image ({loss / pixels:.3g} per pixel): the pixel values are far "
            "from the likelihood's scale"
        )
    return None


def _test_record(model, guide, test: ImageDataset, epoch: int, batch_size: int) -> dict[str, Any]:
    """The epoch's test record (one posterior sample per image, pose metrics); ``{"diverged": reason}``
    where the test ELBO is not finite."""
    try:
        report = evaluate(model, guide, test, num_particles=1, batch_size=batch_size)
    except ValueError as error:
        reason = _invalid_distribution(error)
        if reason is None:
            raise
        return {"diverged": f"on the test images, {reason}"}
    if not math.isfinite(report["elbo"]):
        return {"diverged": f"test ELBO {report['elbo']}"}
    record = {"epoch": epoch, "split": "test", **report.pop("per_image_summary")}
    record.update(recovery_metrics(posterior_means(guide, test), test))
    return record


@torch.no_grad()
def _log_weights(model, guide, images: torch.Tensor, particles: int, **inputs) -> dict[str, torch.Tensor]:
    """Per-particle, per-image terms ``(particles, B)``: log p(x, latents) - log q(latents | x), and the
    reconstruction term log p(x | latents).

    Discrete sites that the model marks for parallel enumeration and the guide does not sample (the
    rotation bins of ``SpatialVAE(enumerate_bins=True)``) are summed out exactly, as ``TraceEnum_ELBO``
    does: the weights are then those of the model with the bins marginalized, and the reconstruction term
    is ``log sum_bins p(bin) p(x | bin, latents)``."""
    shape = (particles, images.shape[0])
    enumerated_model = poutine.enum(model, first_available_dim=-1 - len(shape))
    with pyro.plate("particles", particles, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(images, **inputs)
        model_trace = poutine.trace(poutine.replay(enumerated_model, trace=guide_trace)).get_trace(
            images, **inputs
        )
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    joint = torch.zeros(shape, device=images.device)
    recon = torch.zeros(shape, device=images.device)
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        log_prob = site["log_prob"].float()
        joint = joint + log_prob
        if name == "obs" or site["infer"].get("_enumerate_dim") is not None:
            recon = recon + log_prob
    log_w = _sum_out_enumerated(joint, shape)
    for site in guide_trace.nodes.values():
        if site["type"] == "sample" and not site_is_subsample(site):
            log_w = log_w - site["log_prob"].float().expand(shape)
    return {"log_w": log_w, "recon": _sum_out_enumerated(recon, shape)}


def _sum_out_enumerated(log_prob: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Log-sum-exp over the enumeration dims left of ``shape`` (none when nothing was enumerated)."""
    while log_prob.dim() > len(shape):
        log_prob = log_prob.logsumexp(0)
    return log_prob.expand(shape)


@torch.no_grad()
def evaluate(
    model,
    guide,
    data,
    *,
    num_particles: int = 64,
    batch_size: int = 100,
    device: str | torch.device | None = None,
    seed: int | None = None,
    max_elements: int = 2**26,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Per-image ELBO and importance-weighted bound on ``data`` with ``num_particles`` samples each.

    Returns ``{"elbo", "iw_elbo", "reconstruction", "kl", "num_particles", "num_images",
    "per_image_elbo" (N,), "per_image_iw_elbo" (N,), "per_image_summary"}``, in nats per image. The ELBO
    is the mean over particles of ``log p(x, latents) - log q(latents | x)``; the bound is
    ``log mean exp`` of the same weights (the IWAE bound with K = ``num_particles``). Weights are not
    changed. ``max_elements`` caps ``particles x batch x pixels x hidden`` activations held at once.
    ``precision`` runs the networks under autocast (:func:`precision_context`); the default float32 is
    what :func:`fit` reports.
    """
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    data = as_dataset(data, model.image_shape, name="evaluation data")
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    autocast = precision_context(precision, device)
    model_inputs(model, data, torch.arange(0), device)
    model.to(device)
    guide.to(device)
    if seed is not None:
        pyro.set_rng_seed(seed)
    was_training = model.training, guide.training
    model.eval()
    guide.eval()
    hidden = max((p.shape[0] for p in model.parameters() if p.dim() == 2), default=1)
    pixels = data.image_shape[1] * data.image_shape[2]
    if getattr(model, "enumerate_bins", False):  # every image is rendered at all K bins at once
        batch_size = max(1, min(batch_size, max_elements // (pixels * hidden * model.rotation_bins)))
        max_elements = max_elements // model.rotation_bins
    elbos, bounds, recons = [], [], []
    try:
        for index in torch.arange(len(data)).split(batch_size):
            images = data.images[index].to(device)
            inputs = model_inputs(model, data, index, device)
            chunk = max(1, min(num_particles, max_elements // (index.numel() * pixels * hidden)))
            terms: dict[str, list[torch.Tensor]] = {"log_w": [], "recon": []}
            for start in range(0, num_particles, chunk):
                with autocast:
                    part = _log_weights(model, guide, images, min(chunk, num_particles - start), **inputs)
                for key, value in part.items():
                    terms[key].append(value)
            log_w = torch.cat(terms["log_w"])
            elbos.append(log_w.mean(0))
            bounds.append(torch.logsumexp(log_w, 0) - math.log(num_particles))
            recons.append(torch.cat(terms["recon"]).mean(0))
    finally:
        model.train(was_training[0])
        guide.train(was_training[1])
    per_image_elbo = torch.cat(elbos).cpu()
    per_image_bound = torch.cat(bounds).cpu()
    elbo = float(per_image_elbo.mean())
    reconstruction = float(torch.cat(recons).mean())
    summary = {"elbo": elbo, "reconstruction": reconstruction, "kl": reconstruction - elbo}
    return {
        **summary,
        "iw_elbo": float(per_image_bound.mean()),
        "num_particles": num_particles,
        "num_images": len(data),
        "per_image_elbo": per_image_elbo,
        "per_image_iw_elbo": per_image_bound,
        "per_image_summary": summary,
    }
