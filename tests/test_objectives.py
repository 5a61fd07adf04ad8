import math

import pyro
import pytest
import torch

from pyro_svae import AmortizedGuide, SpatialVAE, evaluate, fit
from pyro_svae.coords import bin_centres, pixel_grid
from pyro_svae.objectives import IWAE_ELBO, DistilledSearchELBO
from pyro_svae.pose_search import PoseSearchGuide


def tiny(family="normal"):
    model = SpatialVAE((6, 6), 2, hidden_dim=16)
    guide = AmortizedGuide(model, families={"theta": family}, hidden_dim=16)
    return model, guide


def losses(elbo, model, guide, images, seed=3, **kwargs):
    pyro.set_rng_seed(seed)
    return elbo.loss(model, guide, images, **kwargs)


def test_without_subsampling_it_is_renyi_alpha_zero_and_evaluates_bound():
    model, guide = tiny()
    images = torch.rand(10, 1, 6, 6).round()
    ours = losses(IWAE_ELBO(16), model, guide, images)
    renyi = losses(
        pyro.infer.RenyiELBO(alpha=0, num_particles=16, vectorize_particles=True), model, guide, images
    )
    assert ours == pytest.approx(renyi, rel=1e-5)
    # the same draws as evaluate's importance-weighted bound (particles plate at dim -2; a known
    # plate nesting skips the guessing run, which would consume random numbers)
    known = losses(IWAE_ELBO(16, max_plate_nesting=1), model, guide, images)
    report = evaluate(model, guide, images, num_particles=16, seed=3)
    assert -known / 10 == pytest.approx(report["iw_elbo"], rel=1e-4)


def test_subsampling_scales_outside_the_log_sum_exp():
    """With data_size = N for B images the estimate is (N / B) x the batch's bound; Pyro's RenyiELBO
    raises each weight to the power N / B instead (a different, tempered objective)."""
    model, guide = tiny()
    images = torch.rand(10, 1, 6, 6).round()
    whole = losses(IWAE_ELBO(16), model, guide, images)
    scaled = losses(IWAE_ELBO(16), model, guide, images, data_size=40)
    assert scaled == pytest.approx(4 * whole, rel=1e-5)
    renyi = losses(
        pyro.infer.RenyiELBO(alpha=0, num_particles=16, vectorize_particles=True),
        model,
        guide,
        images,
        data_size=40,
    )
    assert abs(renyi - scaled) > 1.0


def test_one_particle_is_the_elbo_and_more_particles_tighten_it():
    model, guide = tiny()
    images = torch.rand(10, 1, 6, 6).round()
    one = losses(IWAE_ELBO(1, max_plate_nesting=1), model, guide, images)
    trace = losses(pyro.infer.Trace_ELBO(), model, guide, images)
    assert one == pytest.approx(trace, rel=1e-5)
    k1 = sum(losses(IWAE_ELBO(1), model, guide, images, seed=s) for s in range(5))
    k32 = sum(losses(IWAE_ELBO(32), model, guide, images, seed=s) for s in range(5))
    assert k32 < k1  # a smaller loss: a tighter bound


def test_kl_weight_stays_inside_the_weights():
    model, guide = tiny()
    images = torch.rand(10, 1, 6, 6).round()
    pyro.set_rng_seed(0)
    from pyro_svae.infer import KLWeight

    annealed = KLWeight(0.0001)
    low_beta = losses(IWAE_ELBO(4), annealed(model), annealed(guide), images)
    plain = losses(IWAE_ELBO(4), model, guide, images)
    assert low_beta != pytest.approx(plain, rel=1e-3)
    assert math.isfinite(low_beta)


def test_refuses_score_function_guides_and_bad_particle_counts():
    model, guide = tiny("von_mises")
    with pytest.raises(NotImplementedError, match="not reparameterized"):
        IWAE_ELBO(4).loss(model, guide, torch.rand(3, 1, 6, 6))
    with pytest.raises(ValueError, match="positive integer"):
        IWAE_ELBO(0)


def test_training_with_fit_raises_the_importance_weighted_bound():
    model, guide = tiny("projected_normal")
    images = torch.rand(2, 1, 6, 6).round().repeat(20, 1, 1, 1)  # two patterns: learnable
    before = evaluate(model, guide, images, num_particles=8, seed=0)["iw_elbo"]
    fit(model, guide, images, epochs=10, batch_size=20, learning_rate=2e-2, loss=IWAE_ELBO(4), progress=False)
    after = evaluate(model, guide, images, num_particles=8, seed=0)["iw_elbo"]
    assert after > before + 1.0


def searching(bins=4):
    uniform = pyro.distributions.Uniform(torch.tensor(-math.pi), torch.tensor(math.pi))
    model = SpatialVAE(
        (10, 10), 2, rotation_bins=bins, enumerate_bins=True, theta_prior=uniform, hidden_dim=16
    )
    return model, PoseSearchGuide(model, "mlp", hidden_dim=16)


def test_distillation_leaves_the_elbo_and_fits_the_encoders_bins_to_the_models_bin_posterior():
    model, guide = searching()
    images = torch.rand(6, 1, 10, 10).round()
    plain = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)
    distilled = DistilledSearchELBO(weight=2.0)
    assert losses(distilled, model, guide, images) == pytest.approx(losses(plain, model, guide, images))
    pyro.set_rng_seed(5)
    total = distilled.differentiable_loss(model, guide, images, data_size=60)
    # the target: the model's posterior over bins given the guide's draw (the same draw, same seed)
    pyro.set_rng_seed(5)
    draw = pyro.poutine.trace(guide).get_trace(images)
    latents = {site: draw.nodes[site]["value"] for site in ("z", "theta_offset", "dx")}
    with torch.no_grad():
        obs = images.reshape(6, -1, 1)
        centres = bin_centres(4).view(4, 1)
        params = model.render_binned(latents["z"], centres, latents["theta_offset"], latents["dx"])
        posterior = torch.softmax(model.likelihood(params).log_prob(obs), 0).T  # uniform bins
        logits = draw.nodes["theta_bin_logits"]["value"]
        cross_entropy = -(posterior * torch.log_softmax(logits, -1)).sum(-1)
    pyro.set_rng_seed(5)
    elbo_loss = plain.differentiable_loss(model, guide, images, data_size=60)
    assert distilled.last_cross_entropy == pytest.approx(float(cross_entropy.mean()), rel=1e-4)
    expected = elbo_loss + 2.0 * 10 * cross_entropy.sum()  # scaled like the data: 60 / 6
    assert float(total) == pytest.approx(float(expected), rel=1e-5)


def test_distillation_gradients_reach_the_encoder_only_and_training_lowers_the_cross_entropy():
    model, guide = searching()
    # a bar at one of four angles: the model's bin posterior has something to say
    grid = pixel_grid(10)
    angles = bin_centres(4).repeat(5)
    along = grid @ torch.stack([angles.cos(), angles.sin()])  # (P, 20)
    across = grid @ torch.stack([-angles.sin(), angles.cos()])
    images = ((across.abs() < 0.25) & (along > -0.2)).float().T.reshape(20, 1, 10, 10)
    objective = guide.default_loss()
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), objective)
    svi.step(images)
    first = objective.last_cross_entropy
    model.zero_grad()
    guide.zero_grad()
    pyro.set_rng_seed(0)
    guide.default_loss().differentiable_loss(model, guide, images).backward()
    with_distillation = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    pyro.set_rng_seed(0)
    pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, images).backward()
    assert all(torch.allclose(a, p.grad) for a, p in zip(with_distillation, model.parameters(), strict=True))
    for _ in range(40):
        svi.step(images)
    assert objective.last_cross_entropy < first
    with pytest.raises(ValueError, match="weight must be >= 0"):
        DistilledSearchELBO(weight=-1.0)
    plain_model, plain_guide = tiny()
    with pytest.raises(ValueError, match="records its bin logits"):
        DistilledSearchELBO().loss(plain_model, plain_guide, images[:, :, :6, :6])
