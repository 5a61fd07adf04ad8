import pyro.distributions as dist
import pytest
import torch

from pyro_svae.priors import DistributionPrior, as_prior, normal_dx, normal_theta


def test_distribution_prior_moves_nested_tensors_with_the_module():
    mixture = dist.MixtureSameFamily(
        dist.Categorical(torch.tensor([0.5, 0.5])),
        dist.VonMises(torch.tensor([0.0, 3.14]), torch.tensor([4.0, 4.0])),
    )
    prior = DistributionPrior(mixture).double()
    moved = prior()
    assert moved.component_distribution.loc.dtype == torch.float64
    assert moved.mixture_distribution.probs.dtype == torch.float64
    assert mixture.component_distribution.loc.dtype == torch.float32  # the original is untouched
    assert torch.isfinite(moved.log_prob(torch.tensor(0.3, dtype=torch.float64)))


def test_transformed_distribution_prior_moves_its_transforms():
    log_normal = dist.TransformedDistribution(
        dist.Normal(torch.tensor(0.0), torch.tensor(1.0)),
        [dist.transforms.AffineTransform(torch.tensor(1.0), torch.tensor(2.0))],
    )
    moved = DistributionPrior(log_normal).double()()
    assert moved.transforms[0].loc.dtype == torch.float64


def test_as_prior_checks_the_event_shape():
    assert as_prior(normal_dx(0.1), site="dx", event_shape=(2,))().event_shape == (2,)
    with pytest.raises(ValueError, match=r"expand\(\[2\]\)\.to_event\(1\)"):
        as_prior(dist.Normal(0.0, 1.0), site="dx", event_shape=(2,))
    with pytest.raises(TypeError, match="must be a torch/Pyro distribution"):
        as_prior(0.5, site="theta", event_shape=())


def test_prior_std_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        normal_theta(0.0)
    with pytest.raises(ValueError, match="positive"):
        normal_dx(-1.0)
