import math

import pyro
import pytest
import torch
from pyro.poutine.messenger import Messenger


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Each test starts with an empty param store and a fixed seed (tests own global state)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_ctf(n: int, **values):
    """CTF rows of ``n`` particles with realistic, varied defoci (300 kV); keywords override."""
    from pyro_svae.ctf import CTFParams

    defaults = dict(
        defocus_u=torch.linspace(12000, 20000, n),
        defocus_v=torch.linspace(11000, 19500, n),
        defocus_angle=30.0,
        voltage=300.0,
        spherical_aberration=2.7,
        amplitude_contrast=0.1,
        pixel_size=2.2,
    )
    return CTFParams.from_values(n, **{**defaults, **values})


class PoisonObs(Messenger):
    """From the ``after + 1``-th run of the model on, ``kind="nan"`` scales the ``obs`` site by NaN (a NaN
    loss); ``kind="invalid"`` builds a Normal with a NaN scale there, which raises torch's validation
    ``ValueError`` as a diverged network's output would."""

    def __init__(self, after: int, kind: str = "nan") -> None:
        super().__init__()
        self.after, self.kind, self.runs = after, kind, 0

    def _pyro_sample(self, msg) -> None:
        if msg["name"] != "obs":
            return
        self.runs += 1
        if self.runs <= self.after:
            return
        if self.kind == "nan":
            msg["scale"] = msg["scale"] * math.nan
        else:
            pyro.distributions.Normal(0.0, math.nan, validate_args=True)
