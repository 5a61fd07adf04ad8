import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import requires_cuda
from pyro import poutine

from pyro_svae import AmortizedGuide, SpatialVAE, evaluate, fit, posterior_means
from pyro_svae.configs import GuideConfig
from pyro_svae.coords import bin_centres, pixel_grid, transform_images, wrap_angle
from pyro_svae.data import ImageDataset, preprocess_particles, simulate_particles
from pyro_svae.pose_search import (
    PoseSearchGuide,
    RotationEquivariantEncoder,
    grid_search_theta,
    local_offset,
    search_theta,
)
from pyro_svae.runs import posterior_summaries

UNIFORM = dist.Uniform(torch.tensor(-math.pi), torch.tensor(math.pi))


def binned_model(bins=4, **kwargs):
    kwargs.setdefault("theta_prior", UNIFORM)
    return SpatialVAE((12, 12), 2, rotation_bins=bins, hidden_dim=16, **kwargs)


def smooth_images(batch: int, size: int = 29) -> torch.Tensor:
    """Off-centre Gaussian blobs: smooth enough that bilinear rotation is nearly exact."""
    grid = pixel_grid(size)
    generator = torch.Generator().manual_seed(0)
    centres = (torch.rand(batch, 2, 2, generator=generator) - 0.5) * 0.8
    d = grid[None, None] - centres[:, :, None, :]
    image = torch.exp(-(d**2).sum(-1) / 0.03).sum(1)
    return image.reshape(batch, 1, size, size)


def test_binned_model_has_a_bin_site_whose_prior_follows_the_theta_prior():
    model = binned_model(8, theta_prior=dist.Normal(torch.tensor(0.0), torch.tensor(0.5)))
    trace = poutine.trace(model).get_trace(torch.rand(3, 1, 12, 12))
    assert list(model.latent_sites) == ["z", "theta_bin", "theta", "dx"]
    probs = trace.nodes["theta_bin"]["fn"].probs[0]
    assert int(probs.argmax()) == 0 and float(probs[4]) < 1e-6  # bin 0 is upright, bin 4 is pi
    assert torch.allclose(bin_centres(4), torch.tensor([0.0, math.pi / 2, -math.pi, -math.pi / 2]))
    for bad in (1, 2.5):
        with pytest.raises(ValueError, match="rotation_bins"):
            binned_model(bad)
    with pytest.raises(ValueError, match="rotation_bins"):
        SpatialVAE((12, 12), 2, rotation_bins=4, rotate=False)


def test_turning_the_image_by_one_bin_rolls_the_logits_by_one_bin_exactly_for_quarter_turns():
    encoder = RotationEquivariantEncoder((1, 29, 29), 4, channels=8)
    images = torch.rand(3, 1, 29, 29)
    turned = transform_images(images, torch.full((3,), math.pi / 2))
    with torch.no_grad():
        logits, turned_logits = encoder(images)["bin_logits"], encoder(turned)["bin_logits"]
        features, turned_features = encoder(images)["features"], encoder(turned)["features"]
    assert torch.allclose(turned_logits, logits.roll(1, -1), atol=1e-5)
    assert torch.allclose(turned_features, features, atol=1e-5)  # content features are invariant


def test_equivariance_holds_within_interpolation_error_for_eighth_turns():
    """Stated tolerance for interpolated (45 degree) rotations of smooth 29x29 images: rolling the logits by
    one bin explains the change of the logits up to a residual of 20 % (measured: ~9 %)."""
    torch.manual_seed(0)
    encoder = RotationEquivariantEncoder((1, 29, 29), 8, channels=8)
    images = smooth_images(4)
    turned = transform_images(images, torch.full((4,), math.pi / 4))
    with torch.no_grad():
        logits, turned_logits = encoder(images)["bin_logits"], encoder(turned)["bin_logits"]
    residual = float((turned_logits - logits.roll(1, -1)).norm())
    change = float((turned_logits - logits).norm())
    assert residual < 0.2 * change


def test_smaller_copies_keep_quarter_turn_equivariance_and_are_recorded_by_the_config():
    encoder = RotationEquivariantEncoder((1, 32, 32), 4, channels=8, copy_size=16)
    assert encoder.copy_shape == (16, 16) and encoder.rotated_copies(torch.rand(2, 1, 32, 32)).shape[-2:] == (
        16,
        16,
    )
    images = smooth_images(3, size=32)
    turned = transform_images(images, torch.full((3,), math.pi / 2))
    with torch.no_grad():
        logits, turned_logits = encoder(images)["bin_logits"], encoder(turned)["bin_logits"]
    assert torch.allclose(turned_logits, logits.roll(1, -1), atol=1e-4)
    assert RotationEquivariantEncoder((1, 12, 12), 4, copy_size=16).copy_shape is None  # already small
    with pytest.raises(ValueError, match="copy_size must be an integer >= 4"):
        RotationEquivariantEncoder((1, 12, 12), 4, copy_size=2)
    model = binned_model(4, enumerate_bins=True)
    guide = PoseSearchGuide(model, "equivariant", hidden_dim=8, channels=4, copy_size=8)
    config = GuideConfig.from_guide(guide)
    assert config.copy_size == 8 and config.encoder == "equivariant"
    rebuilt = config.build(model)
    assert rebuilt.encoder.copy_shape == (8, 8)
    assert GuideConfig.from_dict({"kind": "pose_search", "channels": 4}).copy_size is None  # older runs


@pytest.mark.parametrize("encoder", ["equivariant", "mlp"])
def test_guide_sites_and_posterior_summaries(encoder):
    model = binned_model(6)
    guide = PoseSearchGuide(model, encoder, hidden_dim=16, channels=8)
    images = torch.rand(5, 1, 12, 12)
    trace = poutine.trace(guide).get_trace(images, data_size=50)
    assert trace.nodes["theta_bin"]["infer"] == {"enumerate": "parallel"}
    assert trace.nodes["theta"]["value"].shape == (5,) and trace.nodes["dx"]["value"].shape == (5, 2)
    means = guide.posterior_means(images)
    assert (
        means["theta"].shape == (5,) and means["z"].shape == (5, 2) and means["theta_bin"].dtype == torch.long
    )
    q_theta = guide.distributions(images)["theta"]
    assert q_theta.batch_shape == (5,) and torch.isfinite(q_theta.log_prob(means["theta"])).all()
    with pytest.raises(ValueError, match="rotation_bins"):
        PoseSearchGuide(SpatialVAE((12, 12), 2), "mlp")


def test_enumerated_and_sampled_bins_estimate_the_same_elbo():
    model = binned_model(4, translate=False)
    guide = PoseSearchGuide(model, "mlp", hidden_dim=16)
    with torch.no_grad():  # narrow continuous posteriors: the remaining variance is over bins
        guide.offset_head.bias[4:] = -4.0
        guide.offset_head.weight[4:] = 0.0
        guide.z_head.bias[2:] = -4.0
        guide.z_head.weight[2:] = 0.0
    images = torch.rand(6, 1, 12, 12)
    enumerated = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1, num_particles=20).loss(model, guide, images)
    guide.mode = "sample"
    sampled = pyro.infer.TraceGraph_ELBO(num_particles=500, vectorize_particles=True).loss(
        model, guide, images
    )
    assert enumerated == pytest.approx(sampled, rel=0.01)


@pytest.mark.parametrize("mode", ["enumerate", "sample", "marginal"])
def test_every_parameter_trains_with_the_matching_elbo(mode):
    model = binned_model(4, enumerate_bins=mode == "marginal")
    guide = PoseSearchGuide(model, "equivariant", mode=mode, hidden_dim=8, channels=4)
    images = torch.rand(6, 1, 12, 12)
    params = {**dict(model.named_parameters()), **{f"g.{k}": v for k, v in guide.named_parameters()}}
    before = {k: v.detach().clone() for k, v in params.items()}
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), guide.default_loss())
    for _ in range(2):
        assert math.isfinite(svi.step(images, data_size=12))
    frozen = [k for k, v in params.items() if torch.equal(v.detach(), before[k])]
    assert not frozen


def test_fit_uses_the_guides_matching_elbo_and_evaluate_samples_bins():
    model = binned_model(4)
    guide = PoseSearchGuide(model, "equivariant", hidden_dim=8, channels=4)
    data = torch.rand(20, 1, 12, 12)
    history = fit(model, guide, data, test=data[:8], epochs=1, batch_size=10, progress=False)
    assert math.isfinite(history.last("test")["elbo"])
    report = evaluate(model, guide, data[:8], num_particles=4)
    assert report["iw_elbo"] >= report["elbo"] - 1e-3


def test_a_model_that_sums_over_bins_keeps_the_offset_as_its_continuous_site():
    model = binned_model(4, enumerate_bins=True)
    assert list(model.latent_sites) == ["z", "theta_bin", "theta_offset", "dx"]
    trace = poutine.trace(model).get_trace(torch.rand(3, 1, 12, 12))
    assert trace.nodes["theta_bin"]["infer"]["enumerate"] == "parallel"
    theta = trace.nodes["theta"]
    assert theta["infer"].get("_deterministic")
    expected = bin_centres(4)[trace.nodes["theta_bin"]["value"]] + trace.nodes["theta_offset"]["value"]
    assert torch.allclose(theta["value"], expected)
    assert float(trace.nodes["theta_offset"]["fn"].scale[0]) == pytest.approx(math.pi / 4)
    with pytest.raises(ValueError, match="rotation_bins=K"):
        SpatialVAE((12, 12), 2, enumerate_bins=True)
    with pytest.raises(ValueError, match="enumerate_bins"):
        PoseSearchGuide(model, "mlp", mode="enumerate")
    with pytest.raises(ValueError, match="enumerate_bins"):
        PoseSearchGuide(binned_model(4), "mlp", mode="marginal")
    guide = PoseSearchGuide(model, "mlp", hidden_dim=8)
    guide_trace = poutine.trace(guide).get_trace(torch.rand(2, 1, 12, 12))
    sampled = [
        name
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    ]
    assert guide.mode == "marginal" and sampled == ["images", "z", "theta_offset", "dx"]
    # the encoder's own bin logits ride along as an observed auxiliary site (log-density 0)
    logits = guide_trace.nodes["theta_bin_logits"]
    assert logits["is_observed"] and logits["infer"]["is_auxiliary"] and logits["value"].shape == (2, 4)


def loss_and_guide_draw(model, guide, images, seed=3):
    """``TraceEnum_ELBO``'s loss and the guide's trace (log-densities computed) for the same draw."""
    pyro.set_rng_seed(seed)
    loss = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).loss(model, guide, images)
    pyro.set_rng_seed(seed)
    draw = poutine.trace(guide).get_trace(images)
    draw.compute_log_prob()
    return loss, draw


def test_summing_over_bins_in_the_model_matches_a_hand_computation():
    """TraceEnum_ELBO and evaluate() both give log sum_k p(k) p(x | z, centre_k + offset, dx) + log p(z,
    offset, dx) - log q(z, offset, dx) for the same guide draw (the exact path: every bin rendered)."""
    model = binned_model(4, enumerate_bins=True, bin_render="exact")
    guide = PoseSearchGuide(model, "mlp", hidden_dim=8)
    images = torch.rand(5, 1, 12, 12)
    loss, draw = loss_and_guide_draw(model, guide, images)
    z, offset, dx = (draw.nodes[site]["value"] for site in ("z", "theta_offset", "dx"))
    with torch.no_grad():
        obs = images.reshape(5, -1, 1)
        per_bin = torch.stack(
            [model.likelihood(model.render(z, c + offset, dx)).log_prob(obs) for c in bin_centres(4)]
        )  # (K, B)
        log_px = torch.logsumexp(per_bin - math.log(4), 0)
        log_prior = (
            dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
            + dist.Normal(0.0, math.pi / 4).log_prob(offset)
            + dist.Normal(0.0, 0.1).log_prob(dx).sum(-1)
        )
        log_q = sum(draw.nodes[site]["log_prob"] for site in ("z", "theta_offset", "dx"))
        expected = log_px + log_prior - log_q  # (B,)
    assert -loss == pytest.approx(float(expected.sum()), rel=1e-5)
    report = evaluate(model, guide, images, num_particles=1, seed=3)
    assert torch.allclose(report["per_image_elbo"], expected, rtol=1e-5)
    # the bins are summed out of the reconstruction term too
    assert report["reconstruction"] == pytest.approx(float(log_px.mean()), rel=1e-5)


def test_marginal_guide_poses_images_with_the_decoders_best_bin():
    """Images the model renders at bin 1 (z, offset and shift 0): with the guide's means at those values,
    the bin the posterior summary picks is the one they were rendered at."""
    torch.manual_seed(0)
    model = binned_model(4, enumerate_bins=True, translate=False, bin_render="exact")
    guide = PoseSearchGuide(model, "mlp", hidden_dim=8)
    with torch.no_grad():
        for head in (guide.z_head, guide.offset_head):
            head.weight.zero_()
            head.bias.zero_()
        z = torch.zeros(3, 2)
        theta = torch.full((3,), float(bin_centres(4)[1]))
        images = model.likelihood.mean(model.render(z, theta)).reshape(3, 1, 12, 12)
        means = guide.posterior_means(images)
        probs = guide.bin_posterior(images)
        per_bin = torch.stack(
            [
                model.likelihood(model.render(z, c.expand(3))).log_prob(images.reshape(3, -1, 1))
                for c in bin_centres(4)
            ]
        )
    assert means["theta_bin"].tolist() == [1, 1, 1] and means["theta_bin"].dtype == torch.long
    assert torch.allclose(means["theta"], theta)
    assert torch.allclose(probs, torch.softmax(per_bin.T, -1), atol=1e-5)  # uniform prior over bins
    q_theta = guide.distributions(images)["theta"]
    assert torch.allclose(q_theta.mixture_distribution.probs, probs, atol=1e-5)


def particles_and_search_model(bins: int, **kwargs) -> tuple[ImageDataset, SpatialVAE]:
    """12 particles of 16 px with a CTF and a model that sums ``bins`` rotation bins out."""
    particles = preprocess_particles(simulate_particles(12, box=16, snr=1.0, ctf=True, seed=0))
    model = SpatialVAE(
        (16, 16),
        1,
        rotation_bins=bins,
        enumerate_bins=True,
        theta_prior=UNIFORM,
        likelihood="gaussian",
        ctf=True,
        **kwargs,
    )
    return particles, model


def test_marginal_guide_trains_and_summarizes_particles_with_their_ctf():
    particles, model = particles_and_search_model(4, hidden_dim=8)
    guide = PoseSearchGuide(model, "equivariant", hidden_dim=8, channels=4)
    history = fit(model, guide, particles, test=particles, epochs=1, batch_size=6, progress=False)
    assert math.isfinite(history.last("test")["elbo"]) and "theta_circ_corr" in history.last("test")
    means = posterior_means(guide, particles)
    assert means["theta"].shape == (12,) and means["z"].shape == (12, 1)
    summary = posterior_summaries(guide, particles, draws=20)  # what the STAR export writes
    assert summary["theta_mean"].shape == (12,) and bool((summary["theta_std"] > 0).all())
    assert torch.allclose(summary["theta_mean"], means["theta"])


@requires_cuda
def test_the_particles_default_search_trains_and_poses_on_cuda():
    """The lattice, the distillation and both readings of the bins follow the module's device."""
    particles, model = particles_and_search_model(8)
    guide = PoseSearchGuide(model, "equivariant", hidden_dim=8, channels=4, copy_size=8)
    history = fit(
        model, guide, particles, test=particles, epochs=1, batch_size=6, device="cuda", progress=False
    )
    assert model.config["bin_render"] == "lattice" and model.lattice.points.is_cuda
    assert math.isfinite(history.last("test")["elbo"])
    for source in ("search", "encoder"):
        guide.bins_from = source
        means = posterior_means(guide, particles)
        assert means["theta"].shape == (12,) and bool(means["theta"].isfinite().all())
    found = search_theta(model, guide, particles, angles=8)
    assert found.shape == (12,) and found.device.type == "cpu"


@pytest.mark.parametrize("kind", ["plain", "translate+scale", "ctf"])
def test_grid_search_finds_the_angle_each_image_was_rendered_at(kind):
    pyro.set_rng_seed(0)
    batch, angles = 10, 36
    options = {"translate": kind != "plain", "scale": kind == "translate+scale"}
    ctf = None
    if kind == "ctf":
        from conftest import make_ctf

        options.update(likelihood="gaussian", ctf=True)
        ctf = make_ctf(batch)
    model = SpatialVAE((16, 16), 2, theta_prior=UNIFORM, hidden_dim=16, **options)
    truth = bin_centres(angles)[torch.randperm(angles)[:batch]]  # on the grid: found exactly
    latents = {"z": torch.randn(batch, 2)}
    if model.translate:
        latents["dx"] = 0.1 * torch.randn(batch, 2)
    if model.scale:
        latents["scale"] = torch.exp(0.1 * torch.randn(batch))
    images = model.decode(theta=truth, ctf=ctf, **latents)
    found = grid_search_theta(model, images, latents, angles=angles, ctf=ctf)
    assert torch.allclose(found, truth)
    # a coarser grid lands on the nearest angle it has (ties aside, within half its step)
    coarse = grid_search_theta(model, images, latents, angles=12, ctf=ctf)
    assert (wrap_angle(coarse - truth).abs() <= math.pi / 12 + 1e-6).float().mean() >= 0.8


@pytest.mark.parametrize("kind", ["plain", "ctf"])
def test_search_theta_runs_the_grid_search_over_a_data_set_at_the_guide_means(kind):
    pyro.set_rng_seed(0)
    ctf = None
    options = {}
    if kind == "ctf":
        from conftest import make_ctf

        options.update(likelihood="gaussian", ctf=True)
        ctf = make_ctf(10)
    model = SpatialVAE((16, 16), 2, hidden_dim=16, **options)
    guide = AmortizedGuide(model, hidden_dim=16)
    data = ImageDataset(torch.rand(10, 1, 16, 16), ctf=ctf)
    latents = posterior_means(guide, data)
    expected = grid_search_theta(model, data.images, latents, angles=24, ctf=ctf)
    found = search_theta(model, guide, data, angles=24, batch_size=4)  # three chunks, CTF rows sliced
    assert torch.equal(found, expected)
    if kind == "plain":  # bare images are accepted too; the model's image shape is checked
        assert torch.equal(search_theta(model, guide, data.images, angles=24), expected)
        with pytest.raises(ValueError, match=r"expects images of shape \(1, 16, 16\)"):
            search_theta(model, guide, torch.rand(3, 1, 8, 8))
    else:
        with pytest.raises(ValueError, match="CTF"):
            search_theta(model, guide, data.images)


def test_grid_search_refuses_what_it_cannot_search():
    images = torch.rand(2, 1, 16, 16)
    latents = {"z": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="infers rotation"):
        grid_search_theta(SpatialVAE((16, 16), 2, vanilla=True), images, latents)
    with pytest.raises(ValueError, match="angles"):
        grid_search_theta(SpatialVAE((16, 16), 2), images, latents, angles=1)
    with pytest.raises(ValueError, match=r"\['dx'\] missing"):
        grid_search_theta(SpatialVAE((16, 16), 2), images, latents)
    with pytest.raises(ValueError, match=r"shape \(B, 1, 16, 16\)"):
        grid_search_theta(SpatialVAE((16, 16), 2, translate=False), images[0], latents)
    with pytest.raises(ValueError, match="one row per image"):
        grid_search_theta(SpatialVAE((16, 16), 2, translate=False), images, {"z": torch.zeros(3, 2)})
    ctf_model = SpatialVAE((16, 16), 2, likelihood="gaussian", ctf=True)
    with pytest.raises(ValueError, match="ctf rows"):
        grid_search_theta(ctf_model, images, latents)


def test_grid_search_follows_the_prior_where_the_images_say_nothing():
    prior = dist.VonMises(torch.tensor(1.0), torch.tensor(4.0))
    model = SpatialVAE((16, 16), 2, theta_prior=prior, translate=False, hidden_dim=16)
    with torch.no_grad():
        model.decoder.tail[-1].weight.zero_()  # every rendering the same: a flat likelihood in theta
    found = grid_search_theta(model, torch.rand(3, 1, 16, 16), {"z": torch.randn(3, 2)}, angles=36)
    assert torch.allclose(found, torch.full((3,), 6 * 2 * math.pi / 36))  # the grid angle nearest 1.0


def shared_weights(**kwargs):
    """An exact and a lattice model (``kwargs["bin_render"]``) with the same decoder."""
    torch.manual_seed(0)
    render = kwargs.pop("bin_render")
    exact = binned_model(kwargs.pop("bins"), enumerate_bins=True, bin_render="exact", **kwargs)
    lattice = binned_model(exact.rotation_bins, enumerate_bins=True, bin_render=render, **kwargs)
    lattice.load_state_dict(exact.state_dict())
    return exact, lattice


def every_bin(model, z, offset, dx=None):
    """``(K, B, P, C)``: the exact path, one render per bin."""
    centres = bin_centres(model.rotation_bins)
    return torch.stack([model.render(z, c + offset, dx) for c in centres])


def test_a_full_lattice_renders_quarter_turns_exactly_and_the_default_one_inside_its_field_of_view():
    exact, full = shared_weights(bins=4, bin_render="lattice_full", translate=False)
    z, offset = torch.randn(3, 2), torch.randn(3) * 0.3
    centres = bin_centres(4).view(4, 1)
    with torch.no_grad():
        assert torch.allclose(full.render_binned(z, centres, offset), every_bin(exact, z, offset), atol=1e-5)
    exact, lattice = shared_weights(bins=16, bin_render="lattice")
    assert lattice.lattice.num_points < 1.3 * 144 < full.lattice.num_points
    dx = torch.randn(3, 2) * 0.1
    with torch.no_grad():
        read = lattice.render_binned(z, bin_centres(16).view(16, 1), offset, dx)
        truth = every_bin(exact, z, offset, dx)
    inside = (pixel_grid(12).norm(dim=-1) < 1.0 - 0.1 * 3).view(1, 1, -1)  # the disk, shifts included
    error = (read - truth).abs()[inside.expand(16, 3, -1)]
    assert error.max() < 0.05 * float(truth.std())  # bilinear interpolation of a smooth decoder
    assert (read - truth).abs().max() > error.max()  # the corners beyond the field of view differ


def test_the_lattice_path_gives_the_hand_computed_elbo_and_refuses_models_that_do_not_sum_bins():
    model = binned_model(8, enumerate_bins=True, translate=False)
    assert model.config["bin_render"] == "lattice" and model.lattice is not None
    guide = PoseSearchGuide(model, "mlp", hidden_dim=8, distill_bins=0.0)
    images = torch.rand(5, 1, 12, 12)
    loss, draw = loss_and_guide_draw(model, guide, images)
    z, offset = draw.nodes["z"]["value"], draw.nodes["theta_offset"]["value"]
    with torch.no_grad():
        params = model.render_binned(z, bin_centres(8).view(8, 1), offset)
        per_bin = model.likelihood(params).log_prob(images.reshape(5, -1, 1))  # (K, B)
        log_px = torch.logsumexp(per_bin - math.log(8), 0)
        log_prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1) + dist.Normal(0.0, math.pi / 8).log_prob(offset)
        log_q = draw.nodes["z"]["log_prob"] + draw.nodes["theta_offset"]["log_prob"]
    assert -loss == pytest.approx(float((log_px + log_prior - log_q).sum()), rel=1e-5)
    assert binned_model(4).config["bin_render"] == "exact"
    with pytest.raises(ValueError, match="enumerate_bins=True"):
        binned_model(4, bin_render="lattice")
    with pytest.raises(ValueError, match="bin_render must be one of"):
        binned_model(4, enumerate_bins=True, bin_render="polar")


def test_the_encoders_own_bins_answer_without_the_decoder_when_asked():
    model = binned_model(4, enumerate_bins=True)
    guide = PoseSearchGuide(model, "mlp", hidden_dim=8)
    images = torch.rand(6, 1, 12, 12)
    with torch.no_grad():
        guide.bin_head.bias.copy_(torch.tensor([0.0, 9.0, 0.0, 0.0]))  # the encoder says: bin 1
        guide.bins_from = "encoder"
        means = guide.posterior_means(images)
        raw = guide.raw_params(images)
    assert means["theta_bin"].tolist() == [1] * 6
    assert torch.allclose(means["theta"], wrap_angle(bin_centres(4)[1] + raw["offset"]))
    assert torch.allclose(
        guide.distributions(images)["theta_bin"].probs, torch.softmax(raw["bin_logits"], -1)
    )
    guide.bins_from = "oracle"
    with pytest.raises(ValueError, match="bins_from must be 'search' or 'encoder'"):
        guide.posterior_means(images)
    assert type(guide.default_loss()).__name__ == "DistilledSearchELBO"
    plain = PoseSearchGuide(model, "mlp", hidden_dim=8, distill_bins=0.0).default_loss()
    assert type(plain) is pyro.infer.TraceEnum_ELBO
    with pytest.raises(ValueError, match="distill_bins must be >= 0"):
        PoseSearchGuide(model, "mlp", distill_bins=-1.0)


def test_the_shared_offset_is_the_circular_mean_of_the_best_bins_and_its_neighbours_estimates():
    width = 2 * math.pi / 8
    # image 0: split between bins 2 and 3, whose copies both point half a bin past centre 2; bin 6 (across
    # the circle, a half turn) is nearly as probable, with an offset of its own
    logits = torch.zeros(2, 8)
    logits[0, 2], logits[0, 3], logits[0, 6], logits[1, 1] = 3.0, 2.9, 2.8, 5.0
    logits.requires_grad_(True)
    per_bin = torch.zeros(2, 8, 2)
    per_bin[0, 2, 0], per_bin[0, 3, 0], per_bin[0, 6, 0] = 0.45 * width, -0.45 * width, -0.3 * width
    per_bin[1, 1, 0], per_bin[1, 1, 1] = 0.1, -2.0
    per_bin.requires_grad_(True)
    offset, log_scale = local_offset(logits, per_bin)
    (offset.sum() + log_scale.sum()).backward()
    offset, log_scale = offset.detach(), log_scale.detach()
    # measured from bin 2's centre: both copies say 0.45 and 0.55 of a bin; a mean of offsets would say 0
    assert 0.45 * width < float(offset[0]) < 0.55 * width
    assert float(offset[1]) == pytest.approx(0.1, abs=1e-3)  # one bin holds nearly all the probability
    assert float(log_scale[1]) == pytest.approx(-2.0, abs=0.05)
    assert logits.grad is None or not logits.grad.any()  # fitted to the search, not pulled by the ELBO
    assert per_bin.grad[0, 2, 0] > 0 and per_bin.grad[0, 6].abs().sum() == 0
