import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_svae import AmortizedGuide, SpatialVAE, priors
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


# --------------------------------------------------------------------------------------------------
# The pose priors of the issue: one constructor each, swapped without touching the model
# --------------------------------------------------------------------------------------------------

THETA_PRIORS = {
    "normal": lambda: priors.normal_theta(0.5),
    "von_mises": lambda: priors.von_mises_theta(0.3, 2.0),
    "circular_uniform": priors.circular_uniform_theta,
    "symmetric_c2": lambda: priors.symmetric_theta(2, 4.0),
    "learnable_von_mises": lambda: priors.LearnableVonMises(concentration=1.5),
    "any_pyro_distribution": lambda: dist.Cauchy(torch.tensor(0.0), torch.tensor(0.2)),
}
DX_PRIORS = {
    "normal": lambda: priors.normal_dx(0.1),
    "laplace": lambda: priors.laplace_dx(0.1),
    "student_t": lambda: priors.student_t_dx(3.0, 0.1),
    "box": lambda: priors.uniform_box_dx(0.2),
}


@pytest.mark.parametrize("name", THETA_PRIORS)
def test_every_theta_prior_plugs_into_the_model_and_trains(name):
    model = SpatialVAE((6, 6), 2, hidden_dim=8, theta_prior=THETA_PRIORS[name]())
    guide = AmortizedGuide(model, hidden_dim=8, families={"theta": "projected_normal"})
    images = torch.rand(5, 1, 6, 6).round()
    trace = poutine.trace(model).get_trace(images)
    assert trace.nodes["theta"]["value"].shape == (5,)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    assert all(math.isfinite(svi.step(images, data_size=20)) for _ in range(2))


@pytest.mark.parametrize("name", DX_PRIORS)
def test_every_dx_prior_plugs_into_the_model_and_trains(name):
    model = SpatialVAE((6, 6), 2, hidden_dim=8, dx_prior=DX_PRIORS[name]())
    guide = AmortizedGuide(model, hidden_dim=8)
    images = torch.rand(5, 1, 6, 6).round()
    assert poutine.trace(model).get_trace(images).nodes["dx"]["value"].shape == (5, 2)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    assert all(math.isfinite(svi.step(images, data_size=20)) for _ in range(2))


def test_circular_uniform_is_flat_on_the_whole_line_and_samples_one_turn():
    prior = priors.circular_uniform_theta()
    values = torch.tensor([-10.0, -math.pi, 0.0, 2.0, 7 * math.pi])
    assert torch.allclose(prior.log_prob(values), torch.full((5,), -math.log(2 * math.pi)))
    samples = prior.expand([4000]).sample()
    assert samples.shape == (4000,)
    assert float(samples.min()) >= -math.pi and float(samples.max()) < math.pi
    # uniform on the circle: the mean resultant length is ~0 and each quarter holds ~1/4
    assert float(torch.stack([samples.cos(), samples.sin()]).mean(1).norm()) < 0.05
    assert abs(float((samples > math.pi / 2).float().mean()) - 0.25) < 0.03
    assert prior.support is dist.constraints.real
    assert DistributionPrior(prior).double()().loc.dtype == torch.float64


def test_symmetric_prior_is_invariant_under_its_turn_and_has_n_modes():
    theta = torch.arange(720) * (2 * math.pi / 720) - math.pi  # one turn, no repeated end point
    c2 = priors.symmetric_theta(2, 8.0)
    assert torch.allclose(c2.log_prob(theta), c2.log_prob(theta + math.pi), atol=1e-5)
    assert not torch.allclose(c2.log_prob(theta), c2.log_prob(theta + math.pi / 2), atol=1e-2)
    density = c2.log_prob(theta).exp()
    peaks = ((density > density.roll(1)) & (density > density.roll(-1))).sum()
    assert int(peaks) == 2
    assert float((density * (theta[1] - theta[0])).sum()) == pytest.approx(1.0, abs=1e-3)
    c3 = priors.symmetric_theta(3, 8.0, loc=0.4)
    assert torch.allclose(c3.log_prob(theta), c3.log_prob(theta + 2 * math.pi / 3), atol=1e-5)
    # one component is a plain von Mises
    vm = priors.von_mises_theta(0.4, 8.0)
    assert torch.allclose(priors.symmetric_theta(1, 8.0, 0.4).log_prob(theta), vm.log_prob(theta), atol=1e-5)
    with pytest.raises(ValueError, match="symmetry order"):
        priors.symmetric_theta(0)


def test_is_circular_tells_circle_from_line():
    assert priors.is_circular(priors.von_mises_theta())
    assert priors.is_circular(priors.circular_uniform_theta())
    assert priors.is_circular(priors.symmetric_theta(2))
    assert priors.is_circular(priors.LearnableVonMises().forward())
    assert priors.is_circular(dist.Uniform(-math.pi, math.pi))
    assert not priors.is_circular(priors.normal_theta())
    assert not priors.is_circular(dist.Uniform(-1.0, 1.0))


def test_learnable_von_mises_is_trained_by_svi_and_named_under_the_model():
    prior = priors.LearnableVonMises(concentration=0.3)
    model = SpatialVAE((6, 6), 2, hidden_dim=8, theta_prior=prior)
    assert len(pyro.get_param_store()) == 0  # checking the prior's shape registered nothing
    guide = AmortizedGuide(model, hidden_dim=8, families={"theta": "wrapped_normal"})
    with torch.no_grad():  # q(theta) = WrappedNormal(0, e^-1) for every image, and kept so
        guide.heads["theta"].weight.zero_()
        guide.heads["theta"].bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
    fixed_guide = poutine.block(guide, hide_types=["param"])
    images = torch.rand(16, 1, 6, 6).round()
    svi = pyro.infer.SVI(model, fixed_guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
    for _ in range(40):
        svi.step(images)
    name = f"{model._pyro_name}.theta_prior.concentration"
    assert name in pyro.get_param_store()
    # E_q[cos theta] = e^-0.07 ~ 0.93 is matched by kappa ~ 7: from 0.3 the concentration must rise
    assert float(model.theta_prior.concentration.detach()) > 1.0
    assert float(pyro.param(name).detach()) == pytest.approx(float(model.theta_prior.concentration.detach()))


def test_learnable_log_normal_scale_moves_its_location_to_the_inferred_sizes():
    prior = priors.LearnableLogNormalScale(std=0.25)
    model = SpatialVAE((6, 6), 2, hidden_dim=8, scale_prior=prior)
    guide = AmortizedGuide(model, hidden_dim=8)
    assert guide.config["families"]["scale"] == "constrained_normal"
    with torch.no_grad():  # q(log s) = N(log 0.1, small) for every image, and kept so
        guide.heads["scale"].weight.zero_()
        guide.heads["scale"].bias.copy_(torch.tensor([math.log(0.1) / 0.25, -3.0]))
    fixed_guide = poutine.block(guide, hide_types=["param"])
    images = torch.rand(16, 1, 6, 6).round()
    svi = pyro.infer.SVI(model, fixed_guide, pyro.optim.Adam({"lr": 0.1}), pyro.infer.Trace_ELBO())
    for _ in range(60):
        svi.step(images)
    assert f"{model._pyro_name}.scale_prior.loc" in pyro.get_param_store()
    assert float(model.scale_prior.loc.detach()) < 0.5 * math.log(0.1)  # from 0 towards log 0.1
    assert isinstance(model.scale_prior.std, torch.Tensor) and float(model.scale_prior.std) == 0.25
    learned = priors.LearnableLogNormalScale(learn_std=True)
    assert float(learned.forward().log_prob(torch.tensor(1.0)).detach()) == pytest.approx(
        -math.log(0.25 * math.sqrt(2 * math.pi))
    )
    with pytest.raises(ValueError, match="positive"):
        priors.LearnableLogNormalScale(std=0.0)


def test_a_learnable_scale_prior_is_rebuilt_from_the_config_with_its_spread_and_state():
    from pyro_svae.runs import build_model

    for prior, name in (
        (priors.LearnableLogNormalScale(std=0.5, learn_std=True), "learned_std"),
        (priors.LearnableLogNormalScale(std=0.4), "learned"),
    ):
        model = SpatialVAE((6, 6), 2, hidden_dim=8, scale_prior=prior)
        guide = AmortizedGuide(model, hidden_dim=8)
        assert model.config["scale_prior"] == name
        assert model.config["scale_prior_std"] == pytest.approx(prior.initial_std)
        state = model.state_dict()
        (loc_key,) = [key for key in state if key.startswith("scale_prior.loc")]
        state[loc_key] = torch.tensor(0.7)  # as if trained
        rebuilt, _ = build_model({"model": model.config, "guide": guide.config})
        assert isinstance(rebuilt.scale_prior, priors.LearnableLogNormalScale)
        assert rebuilt.scale_prior.learn_std == prior.learn_std
        assert set(rebuilt.state_dict()) == set(state)  # the checkpoint loads: std a parameter or a buffer
        rebuilt.load_state_dict(state)
        loaded = rebuilt.scale_prior()
        assert float(loaded.loc.detach()) == pytest.approx(0.7)
        assert float(loaded.scale.detach()) == pytest.approx(prior.initial_std)
    by_name = SpatialVAE((6, 6), 2, hidden_dim=8, scale_prior="learned_std", scale_prior_std=0.3)
    assert by_name.scale_prior.learn_std and by_name.scale_prior.initial_std == 0.3
    with pytest.raises(ValueError, match="learned_std"):
        SpatialVAE((6, 6), 2, hidden_dim=8, scale_prior="fitted")


def test_translation_priors_have_the_right_tails_and_support():
    far = torch.tensor([1.0, 0.0])
    normal, laplace, student = priors.normal_dx(0.1), priors.laplace_dx(0.1), priors.student_t_dx(3.0, 0.1)
    assert float(student.log_prob(far)) > float(laplace.log_prob(far)) > float(normal.log_prob(far))
    box = priors.uniform_box_dx(0.2)
    assert float(box.log_prob(torch.tensor([0.19, -0.19]))) == pytest.approx(2 * -math.log(0.4), rel=1e-5)
    assert not bool(box.support.check(torch.tensor([0.3, 0.0])))
    for bad in (
        lambda: priors.laplace_dx(0.0),
        lambda: priors.student_t_dx(-1.0),
        lambda: priors.uniform_box_dx(0),
    ):
        with pytest.raises(ValueError, match="positive"):
            bad()


def test_a_binned_rotation_prior_samples_a_bin_then_the_angle_within_it():
    binned = priors.BinnedRotationPrior(4)
    assert binned.latent_sites == {"theta_bin": (), "theta": ()} and binned.bin_scale == math.pi / 4
    with pyro.plate("images", 3):
        trace = poutine.trace(binned.sample).get_trace(normal_theta(0.5))
    probs = trace.nodes["theta_bin"]["fn"].probs[0]
    assert int(probs.argmax()) == 0 and float(probs[2]) < 1e-6  # bin 2 is pi away from the prior's mode
    centre = binned.centres[trace.nodes["theta_bin"]["value"]]
    assert torch.equal(trace.nodes["theta"]["fn"].loc, centre)
    enumerated = priors.BinnedRotationPrior(4, enumerate=True)
    assert list(enumerated.latent_sites) == ["theta_bin", "theta_offset"]
    for bad in (1, 2.5, True):
        with pytest.raises(ValueError, match="integer >= 2"):
            priors.BinnedRotationPrior(bad)


def test_a_binned_model_holds_its_bins_and_rebuilds_them_from_its_config():
    old_config = {"image_shape": [1, 8, 8], "z_dim": 2, "rotation_bins": 4, "enumerate_bins": True}
    model = SpatialVAE(**old_config, hidden_dim=8)
    assert isinstance(model.theta_bins, priors.BinnedRotationPrior) and model.theta_bins.enumerate
    assert (model.rotation_bins, model.enumerate_bins) == (4, True)
    assert model.config["rotation_bins"] == 4 and model.config["enumerate_bins"] is True
    rebuilt = SpatialVAE(**model.config)
    assert rebuilt.config == model.config and rebuilt.theta_bins.bins == 4 and rebuilt.enumerate_bins
    plain = SpatialVAE((8, 8), 2, hidden_dim=8)
    assert plain.theta_bins is None and plain.rotation_bins is None and not plain.enumerate_bins
