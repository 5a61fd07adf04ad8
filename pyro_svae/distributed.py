"""Data-parallel training over processes with ``torch.distributed`` (launched by ``torchrun``).

Every rank holds a full copy of model and guide. :func:`~pyro_svae.infer.fit` draws the same global
batch order on every rank and gives each rank a contiguous slice of each global batch
(:meth:`Ranks.shard`), so the union over ranks is exactly the batch a single process would use. Each
rank runs Pyro's ``loss_and_grads`` on its slice with the images plate scaled to the *global* data set
size, and :meth:`Ranks.step` all-reduces the gradients, weighted by each slice's share of the batch,
before the same Pyro optimizer steps: the update equals a single process's on the combined batch (to
float rounding), whatever the batch size and world size.

Why an explicit all-reduce and not ``DistributedDataParallel``: DDP needs a module whose ``forward``
returns a differentiable loss, i.e. ``ELBO.differentiable_loss``, which ``TraceGraph_ELBO`` (the
default for guides with score-function sites such as von Mises) and the importance-weighted objectives
do not have; with the all-reduce after ``loss_and_grads`` every Pyro objective works unchanged, along
with the messengers ``fit`` wraps around model and guide. DDP's one advantage, overlapping the
all-reduce with the backward pass, is worth little here: model and guide hold well under a million
parameters, one flat all-reduce per step.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch
import torch.distributed as dist
from pyro import poutine
from pyro.infer.util import torch_item, zero_grads

from .checkpoint import get_rng_state, set_rng_state

__all__ = [
    "Ranks",
    "from_main_process",
    "is_main_process",
    "launched_by_torchrun",
    "setup",
    "single_process",
]

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether the environment describes a process group (``torchrun`` sets ``RANK``, ``WORLD_SIZE``…)."""
    return all(key in os.environ for key in _TORCHRUN_ENV)


@dataclass
class Ranks:
    """This process's place among ``world_size`` training processes, and the collectives ``fit`` uses.

    With ``world_size == 1`` every method is the single-process identity (no collective is called).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _synced: set[int] = field(default_factory=set, repr=False)
    _names: tuple[str, ...] | None = field(default=None, repr=False)
    _params: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        """More than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints and shows progress."""
        return self.rank == 0

    # -- data ---------------------------------------------------------------------------------------
    def shard(self, index: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's contiguous slice of a global batch ``index`` ``(B,)`` and its share ``b / B``.

        Slices differ in size by at most one. A rank left without images (``B < world_size``) gets the
        batch's first image with share 0: it still runs model and guide, so that every rank takes part
        in the same collectives, but adds nothing to the gradient.
        """
        if not self.active:
            return index, 1.0
        local = index.tensor_split(self.world_size)[self.rank]
        if local.numel() == 0:
            return index[:1], 0.0
        return local, local.numel() / index.numel()

    def rank_seed(self, seed: int) -> int:
        """The seed of this rank's random streams (guide noise): ``seed`` on rank 0, distinct on others."""
        return seed + 1_000_003 * self.rank

    # -- collectives --------------------------------------------------------------------------------
    def sum(self, *values: float) -> tuple[float, ...]:
        """Element-wise sum over ranks of a few numbers (float64)."""
        if not self.active:
            return tuple(float(v) for v in values)
        buffer = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(buffer)
        return tuple(buffer.tolist())

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._object_device)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, …]`` on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    @property
    def _object_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None

    # -- random streams -----------------------------------------------------------------------------
    def checkpoint_rng(self) -> dict[str, Any]:
        """Checkpoint entries holding every rank's RNG state (``{}`` alone); call it on every rank."""
        if not self.active:
            return {}
        return {"rng_ranks": self.all_gather_object(get_rng_state())}

    def restore_rng(self, state: dict[str, Any]) -> None:
        """This rank's RNG state from a checkpoint (after ``set_rng_state(state["rng"])``, rank 0's).

        A checkpoint written by another number of processes gives each rank fresh, distinct streams
        derived from rank 0's.
        """
        if not self.active:
            return
        per_rank = state.get("rng_ranks")
        if per_rank is not None and len(per_rank) == self.world_size:
            set_rng_state(per_rank[self.rank])
        else:
            pyro.set_rng_seed(self.rank_seed(int(torch.randint(2**31, ()).item())))

    # -- parameters ---------------------------------------------------------------------------------
    def broadcast_modules(self, *modules: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers into every rank's modules (in place)."""
        if not self.active:
            return
        for module in modules:
            tensors = [*module.parameters(), *module.buffers()]
            with torch.no_grad():
                for tensor in tensors:
                    dist.broadcast(tensor.data, src=0)
            self._synced.update(id(p) for p in module.parameters())

    def step(self, svi, *args, share: float = 1.0, **kwargs) -> float:
        """One ``svi.step(*args, **kwargs)`` on this rank's slice, gradients combined over ranks.

        Mirrors ``pyro.infer.SVI.step``: the parameters are those a ``param_only`` trace of
        ``loss_and_grads`` sees. Their gradients, multiplied by ``share`` (this slice's fraction of the
        global batch), are summed over ranks in one flat all-reduce, together with the loss, so every
        rank applies the same update and returns the same global loss. Parameters first seen here
        (created lazily by a ``pyro.param`` statement) are broadcast from rank 0 before the update.
        A non-finite loss on one rank makes the global loss non-finite on all, so every rank sees a
        divergence at the same step; a ``ValueError`` (a distribution whose parameters went invalid)
        after the first step is raised here once the other ranks got a NaN loss, not left to hang them.
        """
        if not self.active:
            return svi.step(*args, **kwargs)
        try:
            with poutine.trace(param_only=True) as capture:
                loss = svi.loss_and_grads(svi.model, svi.guide, *args, **kwargs)
        except ValueError:  # a distribution gone invalid on this rank (divergence): stop every rank
            if self._params is None:
                raise
            self._reduce(self._params, math.nan, share)  # the others see a NaN loss, and stop too
            raise
        named = {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()}
        names = tuple(sorted(named))
        params = [named[name] for name in names]
        if names != self._names:
            self._check_same_names(names)
            self._broadcast_new(params)
            self._names = names
        self._params = params
        loss = self._reduce(params, torch_item(loss), share)
        svi.optim(params)
        zero_grads(params)
        return loss

    def _check_same_names(self, names: tuple[str, ...]) -> None:
        gathered = self.all_gather_object(names)
        if any(other != gathered[0] for other in gathered):
            differ = sorted(set().union(*gathered) - set.intersection(*map(set, gathered)))
            raise RuntimeError(
                f"the ranks' model and guide use different parameters (rank-dependent programs cannot "
                f"be averaged); not on every rank: {differ[:5]}"
            )

    def _broadcast_new(self, params: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for param in params:
                if id(param) not in self._synced:
                    dist.broadcast(param.data, src=0)
                    self._synced.add(id(param))

    def _reduce(self, params: list[torch.Tensor], loss: float, share: float) -> float:
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in params), torch.float32)
        device = params[0].device if params else self.device
        pieces = [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for p in params
        ]
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=device)
        total = torch.tensor([loss], dtype=dtype, device=device)
        flat = torch.cat([*pieces, has_grad, total]) if pieces else total
        numel = sum(piece.numel() for piece in pieces)
        flat[:numel] *= share
        flat[-1] *= share
        dist.all_reduce(flat)
        *flags, total_loss = flat[numel:].tolist()  # one device-to-host copy
        offset = 0
        for p, flag in zip(params, flags, strict=True):
            size = p.numel()
            if flag > 0:  # some rank has a gradient; where none has, leave it None, as SVI does
                p.grad = flat[offset : offset + size].view_as(p).to(p.dtype).clone()
            offset += size
        return total_loss


def single_process(device: torch.device) -> Ranks:
    """The trivial group of one process."""
    return Ranks(device=torch.device(device))


def setup(device: torch.device, distributed: bool | None = None) -> Ranks:
    """The processes taking part in training, joining ``torchrun``'s process group where asked.

    ``distributed``: ``None`` uses a process group the caller has already initialized (if any, with
    more than one process); ``True`` also initializes one from ``torchrun``'s environment variables
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), backend ``nccl`` on
    CUDA devices and ``gloo`` on the CPU; ``False`` trains in this process alone. On CUDA, a device
    without an index becomes ``cuda:LOCAL_RANK`` (one GPU per process).
    """
    device = torch.device(device)
    if distributed is False or not dist.is_available():
        if distributed:
            raise RuntimeError("distributed=True, but this torch build has no torch.distributed")
        return single_process(device)
    if not dist.is_initialized():
        if not distributed:
            return single_process(device)
        if not launched_by_torchrun():
            missing = [key for key in _TORCHRUN_ENV if key not in os.environ]
            raise RuntimeError(
                "distributed=True needs the process-group environment torchrun sets up (missing: "
                f"{', '.join(missing)}); launch with e.g. `torchrun --nproc-per-node 2 …`"
            )
        local_rank = int(os.environ["LOCAL_RANK"])
        if device.type == "cuda":
            device = torch.device("cuda", local_rank if device.index is None else device.index)
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    world_size = dist.get_world_size()
    if world_size == 1:
        return single_process(device)
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = dist.get_backend()
    if backend == "nccl" and device.type != "cuda":
        raise RuntimeError(f"the process group uses nccl, which needs CUDA tensors, but device is {device}")
    return Ranks(rank=dist.get_rank(), world_size=world_size, local_rank=local_rank, device=device)


def is_main_process() -> bool:
    """Rank 0 of an initialized process group, or a process on its own (the one that writes files)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def from_main_process(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank of an initialized process group; else ``obj``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    device = None
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]
