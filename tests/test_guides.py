import math
import warnings

import pyro
import pytest
import torch
from pyro import poutine

from pyro_svae import AmortizedGuide, SpatialVAE, evaluate, fit, priors
from pyro_svae.encoders import CNNEncoder
from pyro_svae.guides import (
    CircularSupportWarning,
    FullNormalFamily,
    LowRankNormalFamily,
    NormalFamily,
    ProjectedNormalAngle,
    WrappedNormal,
    wrapped_theta,
)


def _named_parameters(model, guide) -> dict:
    named = {f"model.{k}": v for k, v in model.named_parameters()}
    named.update({f"guide.{k}": v for k, v in guide.named_parameters()})
    return named


def _frozen_after_svi(model, guide, images, steps: int = 3) -> list[str]:
    """Names of the parameters that a few SVI steps leave unchanged."""
    named = _named_parameters(model, guide)
    before = {k: v.detach().clone() for k, v in named.items()}
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    for _ in range(steps):
        svi.step(images, data_size=len(images))
    return [k for k, v in named.items() if torch.equal(v.detach(), before[k])]


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
    named = _named_parameters(model, guide)
    assert not _frozen_after_svi(model, guide, torch.rand(8, 1, 6, 6))
    assert len(pyro.get_param_store()) == len(named)


# --------------------------------------------------------------------------------------------------
# Families chosen per site, circular families, support
# --------------------------------------------------------------------------------------------------
def _grid(n=20000):
    theta = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n) - math.pi
    return theta, 2 * math.pi / n


@pytest.mark.parametrize("scale", [0.05, 0.7, math.pi - 1e-3, math.pi + 1e-3, 5.0])
def test_wrapped_normal_is_a_density_on_the_circle(scale):
    theta, step = _grid()
    q = WrappedNormal(torch.tensor(2.9, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64))
    density = q.log_prob(theta).exp()
    assert float(density.sum() * step) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(q.log_prob(theta), q.log_prob(theta + 2 * math.pi))  # periodic


def test_wrapped_normal_is_continuous_across_its_two_evaluations_and_reparameterized():
    theta = torch.linspace(-3.0, 3.0, 13, dtype=torch.float64)
    below = WrappedNormal(
        torch.tensor(0.5, dtype=torch.float64), torch.tensor(math.pi - 1e-6, dtype=torch.float64)
    )
    above = WrappedNormal(
        torch.tensor(0.5, dtype=torch.float64), torch.tensor(math.pi + 1e-6, dtype=torch.float64)
    )
    assert torch.allclose(below.log_prob(theta), above.log_prob(theta), atol=1e-5)
    loc = torch.tensor(3.0, requires_grad=True)
    samples = WrappedNormal(loc, torch.tensor(0.5)).rsample((1000,))
    assert float(samples.detach().min()) >= -math.pi and float(samples.detach().max()) < math.pi
    (grad,) = torch.autograd.grad(samples.sum(), loc)
    assert float(grad) == pytest.approx(1000.0)  # the wrap does not change the pathwise gradient


def test_projected_normal_angle_is_a_density_on_the_circle_with_mean_direction():
    theta, step = _grid()
    concentration = torch.tensor([-1.5, 2.0], dtype=torch.float64)
    q = ProjectedNormalAngle(concentration)
    assert float((q.log_prob(theta).exp() * step).sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(q.mean) == pytest.approx(math.atan2(2.0, -1.5))
    concentration = torch.tensor([0.0, 4.0], requires_grad=True)
    samples = ProjectedNormalAngle(concentration).rsample((2000,))
    assert abs(float(torch.atan2(samples.sin().mean(), samples.cos().mean()).detach()) - math.pi / 2) < 0.05
    (grad,) = torch.autograd.grad(samples.cos().mean(), concentration)
    assert float(grad[0]) > 0  # turning the concentration towards x raises E[cos theta]


SITE_FAMILIES = [
    ("theta", "normal", True, False),
    ("theta", "von_mises", False, True),
    ("theta", "projected_normal", True, True),
    ("theta", "wrapped_normal", True, True),
    ("z", "normal", True, False),
    ("z", "lowrank_normal", True, False),
    ("z", "full_normal", True, False),
]


@pytest.mark.parametrize(("site", "family", "rsample", "circular"), SITE_FAMILIES)
def test_each_family_samples_the_site_with_its_shape_and_flags(site, family, rsample, circular):
    model = SpatialVAE((5, 5), 3, hidden_dim=8)
    guide = AmortizedGuide(model, families={site: family}, hidden_dim=8)
    fam = guide.families[site]
    assert (fam.has_rsample, fam.circular, fam.name) == (rsample, circular, family)
    assert guide.has_rsample == rsample
    images = torch.rand(4, 1, 5, 5)
    trace = poutine.trace(guide).get_trace(images)
    value = trace.nodes[site]["value"]
    assert value.shape == ((4,) if site == "theta" else (4, 3))
    assert trace.nodes[site]["fn"].has_rsample == rsample
    assert torch.isfinite(trace.log_prob_sum())
    mean = guide.posterior_means(images)[site]
    assert mean.shape == value.shape
    if circular:
        assert float(value.detach().abs().max()) <= math.pi and float(mean.detach().abs().max()) <= math.pi
    # particles broadcast (evaluate / IWAE put a plate at dim -2)
    report = evaluate(model, guide, images, num_particles=3)
    assert math.isfinite(report["iw_elbo"])


def test_matching_elbo_is_tracegraph_for_a_family_without_rsample():
    model = SpatialVAE((5, 5), 2, hidden_dim=8)
    assert type(AmortizedGuide(model, hidden_dim=8).default_loss()) is pyro.infer.Trace_ELBO
    guide = AmortizedGuide(model, families={"theta": "von_mises"}, hidden_dim=8)
    assert type(guide.default_loss()) is pyro.infer.TraceGraph_ELBO
    with pytest.raises(NotImplementedError, match="reparameterized"):
        pyro.infer.TraceMeanField_ELBO().loss(model, guide, torch.rand(3, 1, 5, 5))


def test_full_normal_covariance_comes_from_a_cholesky_factor():
    family = FullNormalFamily((3,))
    raw = torch.tensor([[0.1, 0.2, 0.3, 0.0, math.log(2.0), math.log(0.5), 1.0, -2.0, 0.5]])
    q = family(raw)
    tril = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 0.0], [-2.0, 0.5, 0.5]])
    assert torch.allclose(q.scale_tril[0], tril)
    assert torch.allclose(q.covariance_matrix[0], tril @ tril.T)
    low_rank = LowRankNormalFamily((3,), rank=2)
    assert low_rank.num_params == 3 * 4
    assert low_rank(torch.randn(5, 12)).covariance_matrix.shape == (5, 3, 3)
    with pytest.raises(ValueError, match="vector site"):
        FullNormalFamily(())


def test_box_prior_gets_a_guide_inside_the_box_and_refuses_the_real_line():
    model = SpatialVAE((5, 5), 2, hidden_dim=8, dx_prior=priors.uniform_box_dx(0.2))
    guide = AmortizedGuide(model, hidden_dim=8)
    assert guide.config["families"]["dx"] == "constrained_normal"
    with torch.no_grad():
        guide.heads["dx"].bias.copy_(torch.tensor([5.0, -5.0, 1.0, 1.0]))  # far outside, wide
    samples = torch.stack([guide(torch.rand(6, 1, 5, 5))["dx"].detach() for _ in range(20)])
    assert float(samples.abs().max()) <= 0.2
    assert math.isfinite(evaluate(model, guide, torch.rand(6, 1, 5, 5), num_particles=4)["elbo"])
    with pytest.raises(ValueError, match="support"):
        AmortizedGuide(model, families={"dx": "normal"}, hidden_dim=8)


def test_a_real_line_theta_guide_against_a_circular_prior_warns():
    model = SpatialVAE((5, 5), 2, hidden_dim=8, theta_prior=priors.von_mises_theta())
    with pytest.warns(CircularSupportWarning, match="projected_normal"):
        AmortizedGuide(model, hidden_dim=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AmortizedGuide(model, families={"theta": "projected_normal"}, hidden_dim=8)
        AmortizedGuide(SpatialVAE((5, 5), 2, hidden_dim=8), hidden_dim=8)  # paper prior: no warning


def _flat_model(theta_prior):
    """A model whose likelihood ignores every latent: log p(x) is exactly the likelihood of x."""
    model = SpatialVAE((5, 5), 2, translate=False, hidden_dim=8, theta_prior=theta_prior)
    with torch.no_grad():
        model.decoder.coord_linear.weight.zero_()
        model.decoder.latent_linear.weight.zero_()
    return model


def _guide_with(model, family, theta_raw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CircularSupportWarning)
        guide = AmortizedGuide(model, families={"theta": family}, hidden_dim=8)
    with torch.no_grad():
        for head in guide.heads.values():
            head.weight.zero_()
            head.bias.zero_()  # q(z) = N(0, I) = p(z): no KL from z
        guide.heads["theta"].bias.copy_(torch.tensor(theta_raw))
    return guide


def test_circular_path_gives_a_bound_where_the_normal_guide_overshoots():
    """A flat circular prior and a likelihood that ignores theta: log p(x) is known exactly. A wide
    Normal guide on the real line then reports an 'ELBO' above log p(x); read as the wrapped angle
    it is a bound again, and so is every circular family."""
    model = _flat_model(priors.circular_uniform_theta())
    images = torch.rand(4, 1, 5, 5).round()
    with torch.no_grad():
        params = model.render(torch.zeros(4, 2), torch.zeros(4))
        log_px = float(model.likelihood(params).log_prob(images.flatten(-2).transpose(-1, -2)).mean())
    unit = float(priors.circular_uniform_theta().stddev)  # the normal head works in prior units
    wide_normal = _guide_with(model, "normal", [0.0, math.log(10.0 / unit)])
    assert float(wide_normal.distributions(images)["theta"].scale[0].detach()) == pytest.approx(10.0)
    overshoot = evaluate(model, wide_normal, images, num_particles=1000, seed=0)["elbo"] - log_px
    # entropy of N(0, 10) minus log(2 pi): the amount by which the real-line objective cheats
    assert overshoot == pytest.approx(
        0.5 * math.log(2 * math.pi * math.e * 100) - math.log(2 * math.pi), abs=0.05
    )
    assert overshoot > 1.5
    with wrapped_theta(wide_normal):
        assert evaluate(model, wide_normal, images, num_particles=64, seed=0)["elbo"] <= log_px + 1e-3
    assert isinstance(wide_normal.families["theta"], NormalFamily)  # restored after the block
    for family, raw in [
        ("projected_normal", [0.0, 0.0]),
        ("projected_normal", [3.0, 1.0]),
        ("wrapped_normal", [1.0, 0.0, math.log(10.0)]),
        ("von_mises", [1.0, 0.0, -5.0]),
    ]:
        guide = _guide_with(model, family, raw)
        assert evaluate(model, guide, images, num_particles=64, seed=0)["elbo"] <= log_px + 1e-3, family


def test_mean_field_uses_the_analytic_kl_where_registered_and_samples_otherwise():
    images = torch.rand(4, 1, 5, 5).round()

    def spread(model, guide, loss):
        values = []
        for seed in range(4):
            pyro.set_rng_seed(seed)
            values.append(loss.loss(model, guide, images))
        return max(values) - min(values)

    # Normal guide, Normal priors: every KL is analytic and the likelihood ignores the latents, so
    # TraceMeanField_ELBO is exact (no Monte-Carlo noise) while Trace_ELBO is not.
    model = _flat_model(priors.normal_theta())
    guide = _guide_with(model, "normal", [0.3, -1.0])
    assert spread(model, guide, pyro.infer.TraceMeanField_ELBO()) < 1e-4
    assert spread(model, guide, pyro.infer.Trace_ELBO()) > 1e-2
    # no KL(Normal || VonMises) is registered: TraceMeanField_ELBO falls back to sampling that term
    vm_model = _flat_model(priors.von_mises_theta())
    vm_guide = _guide_with(vm_model, "normal", [0.3, -1.0])
    assert spread(vm_model, vm_guide, pyro.infer.TraceMeanField_ELBO()) > 1e-3


def test_every_parameter_moves_with_circular_full_covariance_and_cnn_guides():
    model = SpatialVAE((8, 8), 2, hidden_dim=8, theta_prior=priors.circular_uniform_theta())
    encoder = CNNEncoder(model.image_shape, channels=(4, 8), hidden_dim=16)
    guide = AmortizedGuide(model, encoder, families={"theta": "projected_normal", "z": "full_normal"})
    assert not _frozen_after_svi(model, guide, torch.rand(8, 1, 8, 8))


def test_von_mises_guide_trains_with_tracegraph_through_fit():
    model = SpatialVAE((6, 6), 2, hidden_dim=8, theta_prior=priors.circular_uniform_theta())
    guide = AmortizedGuide(model, families={"theta": "von_mises"}, hidden_dim=8)
    head = guide.heads["theta"].weight.detach().clone()
    history = fit(model, guide, torch.rand(20, 1, 6, 6).round(), epochs=2, batch_size=7, progress=False)
    assert len(history) == 2 and not torch.equal(head, guide.heads["theta"].weight.detach())


def test_rotation_augmentation_reads_a_turned_copy_and_turns_the_posterior_back(monkeypatch):
    from pyro_svae.coords import transform_images
    from pyro_svae.guides import RotateVector

    model = SpatialVAE((8, 8), 2, hidden_dim=16)
    guide = AmortizedGuide(model, hidden_dim=16, augment_rotation=True)
    images = torch.rand(3, 1, 8, 8)
    alpha = torch.tensor([0.5, -2.0, 3.0])
    monkeypatch.setattr(guide, "_augmentation_angle", lambda x: alpha)
    q = guide.distributions(images)
    raw = guide.raw_params(transform_images(images, alpha))
    base_theta = guide.families["theta"](raw["theta"])
    base_dx = guide.families["dx"](raw["dx"])
    theta, dx = torch.tensor([0.1, 0.2, -0.3]), torch.randn(3, 2) * 0.1
    assert torch.allclose(q["theta"].log_prob(theta), base_theta.log_prob(theta + alpha), atol=1e-5)
    turned = RotateVector(alpha)(dx)
    assert torch.allclose(q["dx"].log_prob(dx), base_dx.log_prob(turned), atol=1e-5)
    guide.eval()  # evaluation reads the image as it is
    monkeypatch.undo()
    plain = guide.distributions(images)
    assert torch.allclose(plain["theta"].mean, guide.posterior_means(images)["theta"])
    guide.train()
    assert not _frozen_after_svi(model, guide, images)
    with pytest.raises(ValueError, match="rotation site"):
        AmortizedGuide(SpatialVAE((8, 8), 2, rotate=False, hidden_dim=16), augment_rotation=True)


def test_canonicalizing_guide_reads_each_image_in_its_moment_frame_and_maps_q_back():
    from pyro_svae.coords import principal_pose, transform_images
    from pyro_svae.guides import RotateVector

    model = SpatialVAE((16, 16), 2, hidden_dim=16)
    guide = AmortizedGuide(model, hidden_dim=16, canonicalize="moments")
    x, y = model.grid.unbind(-1)
    blob = torch.exp(-0.5 * ((x / 0.35) ** 2 + (y / 0.12) ** 2)).reshape(1, 1, 16, 16)
    images = transform_images(
        blob.expand(3, -1, -1, -1), torch.tensor([0.6, -1.9, 2.5]), torch.randn(3, 2) * 0.1
    )
    phi, centre = principal_pose(images)
    canonical = transform_images(images, -phi, -RotateVector(-phi)(centre))
    _, moved = principal_pose(canonical)  # the encoder reads the light centred, its long axis along x
    assert principal_pose(canonical)[0].abs().max() < 0.05 and moved.abs().max() < 0.02
    raw = guide.raw_params(canonical)
    base_theta, base_dx = guide.families["theta"](raw["theta"]), guide.families["dx"](raw["dx"])
    q = guide.distributions(images)
    theta, dx = torch.tensor([0.1, 0.2, -0.3]), torch.randn(3, 2) * 0.1
    # theta = phi + theta', dx = R(phi) dx' + centre, both with unit Jacobian
    assert torch.allclose(q["theta"].log_prob(theta), base_theta.log_prob(theta - phi), atol=1e-5)
    back = RotateVector(-phi)(dx - centre)
    assert torch.allclose(q["dx"].log_prob(dx), base_dx.log_prob(back), atol=1e-5)
    means = guide.posterior_means(images)
    expected = torch.remainder(base_theta.mean + phi + math.pi, 2 * math.pi) - math.pi
    assert torch.allclose(means["theta"], expected, atol=1e-5)
    assert torch.allclose(means["dx"], RotateVector(phi)(base_dx.mean) + centre, atol=1e-5)
    guide.eval()  # canonicalization is part of the guide, in training and in evaluation
    assert torch.allclose(guide.distributions(images)["theta"].log_prob(theta), q["theta"].log_prob(theta))
    guide.train()
    assert not _frozen_after_svi(model, guide, images)
    assert guide.config["canonicalize"] == "moments"


def test_canonicalizing_guide_is_rotation_equivariant_on_an_elongated_object():
    from pyro_svae.coords import transform_images

    model = SpatialVAE((24, 24), 2, hidden_dim=16)
    guide = AmortizedGuide(model, hidden_dim=16, canonicalize="moments")
    torch.nn.init.normal_(guide.heads["theta"].weight, std=0.1)  # a residual that reads the image
    x, y = model.grid.unbind(-1)
    image = torch.exp(-0.5 * ((x / 0.4) ** 2 + (y / 0.15) ** 2)).reshape(1, 1, 24, 24)
    image = image * (1 + 0.5 * (x > 0).float().reshape(1, 1, 24, 24))  # brighter on one side: no half turn
    alpha = torch.tensor([0.0, 0.7, -2.0, 2.9])
    with torch.no_grad():
        theta = guide.posterior_means(transform_images(image.expand(4, -1, -1, -1), alpha))["theta"]
    moved = torch.remainder(theta - theta[0] - alpha + math.pi / 2, math.pi) - math.pi / 2
    assert moved.abs().max() < math.radians(3)


def test_canonicalizing_guide_starts_at_the_measured_pose():
    from pyro_svae.coords import principal_pose

    model = SpatialVAE((16, 16), 2, hidden_dim=16, theta_prior_std=math.pi)
    guide = AmortizedGuide(model, hidden_dim=16, canonicalize="moments")
    images = torch.rand(5, 1, 16, 16) ** 3
    angle, centre = principal_pose(images)
    q = guide.distributions(images)
    assert torch.allclose(guide.posterior_means(images)["theta"], angle, atol=1e-5)
    assert torch.allclose(guide.posterior_means(images)["dx"], centre, atol=1e-5)
    assert torch.allclose(q["theta"].base_dist.stddev, torch.full((5,), 0.1 * math.pi))
    plain = AmortizedGuide(model, hidden_dim=16)  # the paper's guide starts about as wide as the prior
    assert plain.distributions(images)["theta"].stddev.median() > 5 * 0.1 * math.pi


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"canonicalize": "pca"}, "canonicalize must be one of"),
        ({"canonicalize": "moments", "augment_rotation": True}, "cannot apply"),
    ],
)
def test_canonicalization_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AmortizedGuide(SpatialVAE((8, 8), 2, hidden_dim=16), hidden_dim=16, **kwargs)
    with pytest.raises(ValueError, match="rotation site"):
        AmortizedGuide(SpatialVAE((8, 8), 2, rotate=False, hidden_dim=16), canonicalize="moments")


def test_guides_gain_the_scale_site_with_a_positive_family():
    from pyro_svae.pose_search import PoseSearchGuide

    model = SpatialVAE((8, 8), 2, hidden_dim=16, scale=True)
    guide = AmortizedGuide(model, hidden_dim=16)
    trace = poutine.trace(guide).get_trace(torch.rand(4, 1, 8, 8))
    assert trace.nodes["scale"]["value"].shape == (4,) and bool((trace.nodes["scale"]["value"] > 0).all())
    assert guide.config["families"]["scale"] == "constrained_normal"
    binned = SpatialVAE((8, 8), 2, hidden_dim=16, scale=True, rotation_bins=4)
    search = PoseSearchGuide(binned, encoder="mlp", mode="sample", hidden_dim=16)
    trace = poutine.trace(search).get_trace(torch.rand(4, 1, 8, 8))
    assert bool((trace.nodes["scale"]["value"] > 0).all())
    assert search.posterior_means(torch.rand(4, 1, 8, 8))["scale"].shape == (4,)


def test_both_guides_share_one_base_for_calling_and_choosing_the_loss():
    from pyro_svae.guides import EncoderGuide
    from pyro_svae.objectives import DistilledSearchELBO
    from pyro_svae.pose_search import PoseSearchGuide

    binned = SpatialVAE((8, 8), 2, hidden_dim=8, rotation_bins=4)
    marginal = SpatialVAE((8, 8), 2, hidden_dim=8, rotation_bins=4, enumerate_bins=True)
    losses = {
        AmortizedGuide(SpatialVAE((8, 8), 2, hidden_dim=8), hidden_dim=8): pyro.infer.Trace_ELBO,
        PoseSearchGuide(binned, "mlp", mode="enumerate", hidden_dim=8): pyro.infer.TraceEnum_ELBO,
        PoseSearchGuide(binned, "mlp", mode="sample", hidden_dim=8): pyro.infer.TraceGraph_ELBO,
        # the marginal mode's ELBO also teaches the encoder the search's bins
        PoseSearchGuide(marginal, "mlp", hidden_dim=8): DistilledSearchELBO,
    }
    for guide, loss in losses.items():
        assert isinstance(guide, EncoderGuide) and type(guide.default_loss(num_particles=2)) is loss
        assert guide.default_loss(num_particles=2).num_particles == 2
        values = guide.guide(torch.rand(3, 1, 8, 8), data_size=30)
        summed_out = {"theta_bin"} if getattr(guide, "mode", None) == "marginal" else set()  # by the model
        assert set(values) == set(guide.site_shapes) - summed_out
        with pytest.raises(ValueError, match="needs the images"):
            guide(None)
