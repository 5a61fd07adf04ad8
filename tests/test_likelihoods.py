import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine

from pyro_svae import AmortizedGuide, SpatialVAE
from pyro_svae.likelihoods import (
    LIKELIHOODS,
    GreyBernoulli,
    LearnedGaussianLikelihood,
    make_likelihood,
)


def test_grey_bernoulli_scores_grey_values_as_binary_cross_entropy():
    logits = torch.tensor([-2.0, 0.0, 3.0])
    values = torch.tensor([0.25, 0.5, 1.0])
    expected = values * F.logsigmoid(logits) + (1 - values) * F.logsigmoid(-logits)
    assert torch.allclose(GreyBernoulli(logits=logits).log_prob(values), expected)


def test_grey_bernoulli_rejects_values_outside_the_unit_interval():
    with pytest.raises(ValueError):
        GreyBernoulli(logits=torch.zeros(2), validate_args=True).log_prob(torch.tensor([0.5, 1.5]))


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_every_likelihood_scores_images_with_event_shape_pixels_by_channels(name):
    likelihood = make_likelihood(name)
    params = torch.randn(4, 10, 3 * likelihood.params_per_channel)
    distribution = likelihood(params)
    assert distribution.event_shape == (10, 3) and distribution.batch_shape == (4,)
    log_prob = distribution.log_prob(torch.rand(4, 10, 3))
    assert log_prob.shape == (4,) and torch.isfinite(log_prob).all()


def test_fixed_gaussian_is_the_full_normal_density():
    likelihood = make_likelihood("gaussian", sigma=0.5)
    params, values = torch.zeros(1, 2, 1), torch.tensor([[[0.5], [-1.0]]])
    expected = torch.distributions.Normal(0.0, 0.5).log_prob(values).sum()
    assert torch.allclose(likelihood(params).log_prob(values), expected)


def test_learned_sigma_is_a_trained_parameter():
    model = SpatialVAE((4, 4), 1, likelihood=LearnedGaussianLikelihood(0.5), hidden_dim=8)
    guide = AmortizedGuide(model, hidden_dim=8)
    images = torch.rand(5, 1, 4, 4)
    before = float(model.likelihood.sigma.detach())
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
    for _ in range(5):
        svi.step(images)
    assert f"{model._pyro_name}.likelihood.sigma" in pyro.get_param_store()
    assert float(model.likelihood.sigma.detach()) != pytest.approx(before)


def test_pixel_gaussian_needs_two_outputs_per_channel():
    model = SpatialVAE((2, 4, 4), 1, likelihood="gaussian_pixel", hidden_dim=8)
    assert model.decoder.out_dim == 4
    trace = poutine.trace(model).get_trace(torch.rand(3, 2, 4, 4))
    assert trace.nodes["obs"]["fn"].base_dist.scale.shape == (3, 16, 2)


def test_unknown_likelihood_names_the_choices():
    with pytest.raises(ValueError, match="bernoulli"):
        make_likelihood("poisson")


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_params_for_moments_inverts_the_likelihood_mean(name):
    likelihood = make_likelihood(name)
    mean = torch.tensor([[0.13, 0.5, 0.7], [0.3, 0.08, 0.9]])  # (pixels, channels)
    std = torch.tensor([[0.2, 0.1, 0.3], [0.05, 0.4, 0.2]])
    params = likelihood.params_for_moments(mean, std)
    assert params.shape == (2, 3 * likelihood.params_per_channel)
    distribution = likelihood(params.unsqueeze(0))
    assert torch.allclose(distribution.mean[0], mean, atol=1e-5)
    if name == "gaussian_pixel":  # the decoder's spread too
        assert torch.allclose(distribution.stddev[0], std, atol=1e-5)


def test_params_for_moments_stays_finite_at_black_and_white_pixels():
    mean, std = torch.tensor([0.0, 1.0]), torch.zeros(2)
    for name in ("bernoulli", "continuous_bernoulli"):
        params = make_likelihood(name).params_for_moments(mean, std)
        assert torch.isfinite(params).all() and params[0] < -6 and params[1] > 6
