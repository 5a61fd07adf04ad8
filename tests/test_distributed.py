"""Data-parallel training: 2 CPU processes (gloo) take the same steps as one process on the whole batch."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import PoisonObs
from pyro.distributions import Independent
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyro_svae.checkpoint import load_checkpoint
from pyro_svae.distributed import Ranks, setup
from pyro_svae.guides import AmortizedGuide
from pyro_svae.infer import DivergenceError, fit
from pyro_svae.model import SpatialVAE

WORLD = 2
N, BATCH = 11, 5  # batches of 5, 5, 1: uneven slices (3 / 2) and a rank without images (1 / 0)
TRAIN = dict(batch_size=BATCH, learning_rate=1e-2, device="cpu", seed=3, progress=False)


class FixedNoise(Messenger):
    """Guide sites take ``loc + scale * eps`` with ``eps = sin(3 loc + 1)`` held fixed (no gradient).

    The noise is then a function of the image and the current weights alone, the same however the
    batch is split over processes, while gradients still flow through the reparameterized sample
    into ``loc`` and ``scale`` as in training (model sites are replayed, so left alone).
    """

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["value"] is not None or site_is_subsample(msg):
            return
        base = msg["fn"]
        while isinstance(base, Independent):
            base = base.base_dist
        eps = torch.sin(3.0 * base.loc.detach() + 1.0)
        msg["value"] = base.loc + base.scale * eps
        msg["done"] = True


def _data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return (torch.rand(N, 1, 8, 8, generator=generator) > 0.5).float()


def _build(seed: int = 0) -> tuple[SpatialVAE, AmortizedGuide]:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = SpatialVAE((8, 8), z_dim=2, hidden_dim=16, num_layers=1)
    guide = AmortizedGuide(model, hidden_dim=16, num_layers=1)
    return model, guide


def _params(model, guide) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"guide.{k}": v for k, v in guide.state_dict().items()})
    return {k: v.detach().clone() for k, v in state.items()}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    images = _data()
    results = {}

    # 1. fixed noise: the same steps as one process on the whole batch; rank 1 starts from other
    #    weights, which the broadcast from rank 0 must replace
    model, guide = _build()
    if rank == 1:
        with torch.no_grad():
            for p in [*model.parameters(), *guide.parameters()]:
                p.add_(1.0)
    with FixedNoise():
        history = fit(model, guide, images, epochs=2, distributed=True, **TRAIN)
    results["fixed"] = _params(model, guide)
    results["fixed_elbo"] = history.values("elbo", "train")

    # 2. real noise (per-rank streams): 2 epochs straight, against 1 epoch, a checkpoint, and a resume
    model, guide = _build()
    fit(model, guide, images, epochs=2, checkpoint=f"{out}/straight.pt", **TRAIN)
    results["straight"] = _params(model, guide)
    model, guide = _build()
    fit(model, guide, images, epochs=1, checkpoint=f"{out}/resumed.pt", **TRAIN)
    model, guide = _build(seed=99)  # other initial weights: the checkpoint must set them
    fit(model, guide, images, epochs=2, checkpoint=f"{out}/resumed.pt", resume=True, **TRAIN)
    results["resumed"] = _params(model, guide)

    # 3. rank 1 alone diverges at epoch 2, step 2 (a NaN loss; a distribution gone invalid): both stop there
    for kind in ("nan", "invalid"):
        model, guide = _build()
        poison = PoisonObs(after=3 + 1, kind=kind) if rank == 1 else contextlib.nullcontext()
        try:
            with poison:
                fit(model, guide, images, epochs=3, checkpoint=f"{out}/{kind}.pt", **TRAIN)
        except DivergenceError as error:
            results[f"diverged_{kind}"] = (error.epoch, error.step, str(error))
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[str, list[dict]]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return str(out), [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _assert_close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=lambda m, key=key: f"{key}: {m}", **tol)


def test_two_processes_match_one_process_on_the_combined_batch(two_ranks):
    _, results = two_ranks
    model, guide = _build()
    start = _params(model, guide)
    with FixedNoise():
        history = fit(model, guide, _data(), epochs=2, distributed=False, **TRAIN)
    single = _params(model, guide)
    for rank in range(WORLD):
        _assert_close(results[rank]["fixed"], single, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            results[rank]["fixed_elbo"], history.values("elbo", "train"), rtol=1e-5, atol=1e-4
        )
    # and the parameters did move (6 Adam steps of 1e-2)
    moved = [key for key in single if not torch.allclose(single[key], start[key], atol=1e-3)]
    assert len(moved) == len(single), sorted(set(single) - set(moved))


def test_ranks_agree_and_a_two_process_checkpoint_resumes(two_ranks):
    out, results = two_ranks
    _assert_close(results[0]["straight"], results[1]["straight"], rtol=0, atol=0)
    for rank in range(WORLD):
        _assert_close(results[rank]["resumed"], results[0]["straight"], rtol=0, atol=0)
    state = load_checkpoint(f"{out}/straight.pt")
    assert state["epoch"] == 2 and len(state["rng_ranks"]) == WORLD
    # the two ranks drew different guide noise
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])


def test_a_divergence_on_one_rank_stops_every_rank_at_the_same_step(two_ranks):
    out, results = two_ranks
    for kind, reason in (
        ("nan", "loss nan"),
        ("invalid", "the scale of a Normal distribution became invalid"),
    ):
        stops = [results[rank][f"diverged_{kind}"] for rank in range(WORLD)]
        assert [stop[:2] for stop in stops] == [(2, 2)] * WORLD
        assert "loss nan" in stops[0][2] and reason in stops[1][2]  # rank 0 sees the summed loss
        assert load_checkpoint(f"{out}/{kind}.pt")["epoch"] == 1


def test_shard_splits_every_batch_exactly():
    index = torch.tensor([4, 9, 1, 7, 0])
    parts = [Ranks(rank=r, world_size=2).shard(index) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), index)
    assert [p[1] for p in parts] == [3 / 5, 2 / 5]
    local, share = Ranks(rank=1, world_size=2).shard(torch.tensor([5]))
    assert share == 0.0 and local.tolist() == [5]  # takes part, adds nothing
    assert Ranks().shard(index) == (index, 1.0)


def test_distributed_true_needs_torchrun_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        setup(torch.device("cpu"), distributed=True)
    assert not setup(torch.device("cpu"), distributed=None).active


@pytest.mark.slow  # about 10 s: torchrun, two interpreters, final evaluation and figures
def test_cli_trains_under_torchrun_with_two_processes(tmp_path):
    """The README's command: ``torchrun --nproc-per-node 2 pyro-svae train --distributed``."""
    beside = Path(sys.executable).with_name("pyro-svae")
    script = str(beside) if beside.exists() else shutil.which("pyro-svae")
    torchrun = Path(sys.executable).with_name("torchrun")
    if script is None or not torchrun.exists():
        pytest.skip("the pyro-svae console script or torchrun is not installed")
    np.save(tmp_path / "images.npy", _data().repeat(3, 1, 1, 1).squeeze(1).numpy())
    out = tmp_path / "run"
    command = [str(torchrun), "--standalone", "--nproc-per-node", "2", script, "train", "--distributed"]
    command += ["--data", str(tmp_path / "images.npy"), "--test-size", "8", "--epochs", "2"]
    command += ["--hidden-dim", "16", "--eval-particles", "2", "--posterior-draws", "2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("epoch 2/2") == 1, done.stdout  # rank 0 alone reports
    assert (out / "summary.json").is_file() and (out / "metrics.csv").is_file()
    assert len(load_checkpoint(out / "checkpoint.pt")["rng_ranks"]) == 2
