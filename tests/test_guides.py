import pyro
import pytest
import torch
from pyro import poutine

from pyro_svae import AmortizedGuide, SpatialVAE
from pyro_svae.guides import NormalFamily


def test_guide_samples_every_latent_site_with_the_models_shapes():
    model = SpatialVAE((5, 5), 4, hidden_dim=8)
    guide = AmortizedGuide(model, hidden_dim=8)
    trace = poutine.trace(guide).get_trace(torch.rand(3, 1, 5, 5), data_size=30)
    assert trace.nodes["z"]["value"].shape == (3, 4)
    assert trace.nodes["theta"]["value"].shape == (3,)
    assert trace.nodes["dx"]["value"].shape == (3, 2)
    assert trace.nodes["z"]["scale"] == 10.0


def test_guide_follows_the_models_switches():
    model = SpatialVAE((5, 5), 2, rotate=False, hidden_dim=8)
    guide = AmortizedGuide(model, hidden_dim=8)
    assert set(guide.heads) == {"z", "dx"}


def test_guide_holds_none_of_the_models_parameters():
    model = SpatialVAE((5, 5), 2, hidden_dim=8)
    guide = AmortizedGuide(model, hidden_dim=8)
    model_params = {id(p) for p in model.parameters()}
    assert not model_params & {id(p) for p in guide.parameters()}


def test_family_per_site_is_a_constructor_choice():
    model = SpatialVAE((5, 5), 2, hidden_dim=8)
    family = NormalFamily((2,))
    guide = AmortizedGuide(model, families={"dx": family}, hidden_dim=8)
    assert guide.families["dx"] is family
    with pytest.raises(ValueError, match="unknown family"):
        AmortizedGuide(model, families={"theta": "banana"})
    with pytest.raises(ValueError, match="does not have"):
        AmortizedGuide(SpatialVAE((5, 5), 2, rotate=False), families={"theta": "normal"})
    with pytest.raises(ValueError, match="event shape"):
        AmortizedGuide(model, families={"z": NormalFamily((3,))})


def test_posterior_means_are_the_normal_locations():
    model = SpatialVAE((5, 5), 2, hidden_dim=8)
    guide = AmortizedGuide(model, hidden_dim=8)
    images = torch.rand(4, 1, 5, 5)
    means = guide.posterior_means(images)
    q = guide.distributions(images)
    assert torch.equal(means["theta"], q["theta"].mean) and means["dx"].shape == (4, 2)


def test_every_parameter_of_model_and_guide_moves_under_svi():
    """Catches shared param-store names between model and guide (they would silently stop training)."""
    model = SpatialVAE((6, 6), 2, hidden_dim=8)
    guide = AmortizedGuide(model, hidden_dim=8)
    images = torch.rand(8, 1, 6, 6)
    named = {**{f"model.{k}": v for k, v in model.named_parameters()}}
    named.update({f"guide.{k}": v for k, v in guide.named_parameters()})
    before = {k: v.detach().clone() for k, v in named.items()}
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    for _ in range(3):
        svi.step(images, data_size=8)
    frozen = [k for k, v in named.items() if torch.equal(v.detach(), before[k])]
    assert not frozen, f"parameters that did not move: {frozen}"
    assert len(pyro.get_param_store()) == len(named)
