"""Training objectives beyond Pyro's stock ELBOs: the importance-weighted bound under mini-batching, and
the ELBO of a model that searches its rotation bins with the encoder taught that search.

``pyro.infer.RenyiELBO(alpha=0, num_particles=K, vectorize_particles=True)`` is the IWAE bound of
Burda et al. when the whole data set is in the batch. With a subsampled plate (``fit`` passes
``data_size=N`` for a batch of ``B`` images) Pyro scales every log-density by ``N / B`` *before* the
log-sum-exp over particles, so it optimizes ``sum_i log mean_k w_ik^(N/B)``, a tempered bound that tends
to the best particle's weight instead of ``(N / B) sum_i log mean_k w_ik``. :class:`IWAE_ELBO` is the
same estimator with the scale applied outside the log-sum-exp: an unbiased mini-batch estimate of the
data set's importance-weighted bound (and of its gradient), which reduces to ``RenyiELBO(alpha=0)``
when ``data_size`` is not given.
"""

from __future__ import annotations

import math

import torch
from pyro.infer import RenyiELBO, TraceEnum_ELBO
from pyro.infer.util import is_identically_zero
from pyro.poutine.util import site_is_subsample
from pyro.util import warn_if_nan

__all__ = ["IWAE_ELBO", "DistilledSearchELBO", "BIN_LOGITS_SITE", "DEFAULT_DISTILL_BINS"]

#: the default weight of the encoder's fit to the search's bins: at 1 the ELBO's gradients in the shared
#: CNN outweigh the fit, and on uniformly rotated MNIST the encoder's bins stay flat (docs/pose_search.md)
DEFAULT_DISTILL_BINS = 10.0

#: the guide's deterministic site holding its own logits over the model's rotation bins ``(B, K)``
BIN_LOGITS_SITE = "theta_bin_logits"


class IWAE_ELBO(RenyiELBO):  # noqa: N801 - Pyro's naming (Trace_ELBO, TraceMeanField_ELBO)
    """The importance-weighted bound with ``num_particles = K``, per image, correct under subsampling.

    ``loss = -(N / B) sum_i [logsumexp_k log w_ik - log K]`` with ``log w_ik = log p(x_i, h_ik) -
    log q(h_ik | x_i)`` for a batch of ``B`` out of ``N`` images. Every sample site must be inside the
    same (possibly subsampled) plates, as in :class:`~pyro_svae.model.SpatialVAE`; further per-site
    scales (KL annealing's ``beta``) are kept inside the weight. Guide sites must be reparameterized
    (``TraceGraph``-style score-function terms are not supported by importance weighting here).
    Particles are always vectorized (a plate at ``-max_plate_nesting - 1``).
    """

    def __init__(self, num_particles: int = 8, max_plate_nesting: float = float("inf")) -> None:
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
        super().__init__(
            alpha=0.0,
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=True,
        )

    def _log_weights(self, model, guide, args, kwargs, *, differentiable: bool):
        """``(log_w (K, B), scale)``: unscaled per-image log weights and the plates' subsample scale."""
        model_trace, guide_trace = next(self._get_traces(model, guide, args, kwargs))
        log_w = 0.0
        plate_scale = None
        for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or site_is_subsample(site):
                    continue
                frames = [f for f in site["cond_indep_stack"] if f.name != "num_particles_vectorized"]
                if not frames:
                    raise ValueError(
                        f"IWAE_ELBO weighs each image separately: site '{name}' lies outside every plate"
                    )
                scale = 1.0
                for frame in frames:
                    if frame.full_size is not None and frame.size:
                        scale *= frame.full_size / frame.size
                if plate_scale is None:
                    plate_scale = scale
                elif not math.isclose(scale, plate_scale):
                    raise ValueError("IWAE_ELBO needs every sample site in the same subsampled plates")
                if sign < 0:
                    score_function = site["score_parts"].score_function
                    if not is_identically_zero(score_function):
                        raise NotImplementedError(
                            f"guide site '{name}' is not reparameterized ({type(site['fn']).__name__}); "
                            "IWAE_ELBO needs a guide with rsample (e.g. 'projected_normal' for theta)"
                        )
                log_prob = site["log_prob"] / scale  # keep per-site factors such as KL annealing's beta
                if not differentiable:
                    log_prob = log_prob.detach()
                log_w = log_w + sign * log_prob
        if self.num_particles == 1:
            log_w = log_w.unsqueeze(0)
        return log_w.reshape(self.num_particles, -1), plate_scale or 1.0

    def _bound(self, log_w: torch.Tensor, scale: float) -> torch.Tensor:
        return scale * (torch.logsumexp(log_w, dim=0) - math.log(self.num_particles)).sum()

    @torch.no_grad()
    def loss(self, model, guide, *args, **kwargs) -> float:
        log_w, scale = self._log_weights(model, guide, args, kwargs, differentiable=False)
        loss = -float(self._bound(log_w, scale))
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        log_w, scale = self._log_weights(model, guide, args, kwargs, differentiable=True)
        return -self._bound(log_w, scale)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:  # SVI collects the parameters from its own param-only trace
            loss.backward()
        value = float(loss.detach())
        warn_if_nan(value, "loss")
        return value


class DistilledSearchELBO(TraceEnum_ELBO):
    """``TraceEnum_ELBO`` for a model that sums its rotation bins out (``enumerate_bins=True``), plus the
    guide's own bin logits fitted to the model's bin posterior.

    In each step the model scores every image at all K bins; normalized over the bins (with the prior and
    the other latents at the guide's sample) that is ``p(bin | image, z, theta_offset, dx)``, which the
    ELBO uses and then forgets. This objective keeps it as a target: ``weight * (N / B) sum_i
    CE(p_i, q_i)``, the cross-entropy of the guide's logits at :data:`BIN_LOGITS_SITE` (a deterministic
    guide site ``(B, K)``) to that posterior held fixed, so the encoder learns to read the pose the search
    finds, and amortized inference (``PoseSearchGuide.bins_from = "encoder"``) needs no decoder. The
    posterior is the forward KL's target, so the encoder covers every bin the search keeps (a digit's turn
    by pi). The gradients of the ELBO are unchanged; ``loss`` and the values returned are the ELBO's alone,
    and the last step's cross-entropy per image is in :attr:`last_cross_entropy`.
    """

    def __init__(self, weight: float = DEFAULT_DISTILL_BINS, **kwargs) -> None:
        if not weight >= 0:
            raise ValueError(f"weight must be >= 0, got {weight!r}")
        kwargs.setdefault("max_plate_nesting", 1)
        super().__init__(**kwargs)
        self.weight = float(weight)
        self._last_cross_entropy: torch.Tensor | None = None
        self._terms: list[torch.Tensor] = []

    @property
    def last_cross_entropy(self) -> float:
        """The last step's cross-entropy per image of the encoder's bins to the model's (nan before one)."""
        return math.nan if self._last_cross_entropy is None else float(self._last_cross_entropy)

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        if BIN_LOGITS_SITE not in guide_trace.nodes:
            raise ValueError(
                f"DistilledSearchELBO needs a guide that records its bin logits at {BIN_LOGITS_SITE!r} "
                "(PoseSearchGuide in marginal mode)"
            )
        logits_site = guide_trace.nodes[BIN_LOGITS_SITE]
        logits = logits_site["value"]
        joint = 0.0
        for site in model_trace.nodes.values():
            if site["type"] != "sample" or "unscaled_log_prob" not in site:
                continue
            log_prob = site["unscaled_log_prob"]  # the posterior's, not tempered by the data's N / B
            if log_prob.dim() >= 2:  # beyond the images plate: the enumerated bin's dim
                joint = joint + log_prob
        if not torch.is_tensor(joint) or joint.dim() != 2 or joint.shape[0] != logits.shape[-1]:
            raise ValueError("DistilledSearchELBO needs a model that enumerates its rotation bins")
        target = torch.softmax(joint.detach().float(), 0).T  # (B, K)
        cross_entropy = -(target * torch.log_softmax(logits.float(), -1)).sum(-1)
        # the site sits in the images plate: its scale is the data's N / B (observed, so no KL weight)
        self._terms.append(logits_site["scale"] * cross_entropy.sum())
        self._last_cross_entropy = cross_entropy.detach().mean()  # read lazily: no device sync per step
        return model_trace, guide_trace

    def _distillation(self) -> torch.Tensor | float:
        terms, self._terms = self._terms, []
        return self.weight * sum(terms) / self.num_particles

    def loss(self, model, guide, *args, **kwargs) -> float:
        try:
            return super().loss(model, guide, *args, **kwargs)
        finally:
            self._terms = []

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        self._terms = []
        loss = super().differentiable_loss(model, guide, *args, **kwargs)
        return loss + self._distillation()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        self._terms = []
        loss = super().loss_and_grads(model, guide, *args, **kwargs)
        extra = self._distillation()
        if torch.is_tensor(extra) and extra.requires_grad:
            extra.backward()
        return loss
