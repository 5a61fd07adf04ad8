import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import make_ctf, requires_cuda
from pyro import poutine

from pyro_svae import AmortizedGuide, SpatialVAE
from pyro_svae.coords import pixel_grid, pose_coordinates
from pyro_svae.model import images_to_pixels, pixels_to_images


def small_model(**kwargs):
    kwargs.setdefault("hidden_dim", 16)
    return SpatialVAE((6, 6), 3, **kwargs)


def sample_sites(trace):
    return {
        name: site for name, site in trace.nodes.items() if site["type"] == "sample" and not name == "images"
    }


def test_sites_shapes_and_plate_scaling():
    model = small_model()
    images = torch.rand(4, 1, 6, 6)
    trace = poutine.trace(model).get_trace(images, data_size=40)
    sites = sample_sites(trace)
    assert list(sites) == ["z", "theta", "dx", "obs"]
    assert sites["z"]["fn"].event_shape == (3,) and sites["z"]["value"].shape == (4, 3)
    assert sites["theta"]["fn"].event_shape == () and sites["theta"]["value"].shape == (4,)
    assert sites["dx"]["fn"].event_shape == (2,) and sites["dx"]["value"].shape == (4, 2)
    assert sites["obs"]["fn"].event_shape == (36, 1) and sites["obs"]["is_observed"]
    assert all(site["scale"] == 10.0 for site in sites.values())
    assert trace.nodes["images"]["value"].shape == (4,)


def test_switches_remove_pose_sites():
    images = torch.rand(2, 1, 6, 6)
    for kwargs, expected in [
        ({"rotate": False}, ["z", "dx", "obs"]),
        ({"translate": False}, ["z", "theta", "obs"]),
        ({"vanilla": True}, ["z", "obs"]),
    ]:
        trace = poutine.trace(small_model(**kwargs)).get_trace(images)
        assert list(sample_sites(trace)) == expected


def test_vanilla_decoder_ignores_coordinates():
    model = small_model(vanilla=True)
    assert model.render(torch.zeros(5, 3)).shape == (5, 36, 1)


def test_default_priors_are_the_papers():
    model = small_model(theta_prior_std=0.5, dx_prior_std=0.2)
    theta = model.theta_prior()
    assert isinstance(theta, dist.Normal) and float(theta.scale) == 0.5 and float(theta.loc) == 0
    dx = model.dx_prior()
    assert torch.equal(dx.base_dist.scale, torch.full((2,), 0.2))
    z = model.z_prior()
    assert torch.equal(z.base_dist.loc, torch.zeros(3)) and torch.equal(z.base_dist.scale, torch.ones(3))


def test_user_prior_appears_in_the_trace():
    prior = dist.VonMises(torch.tensor(0.0), torch.tensor(2.0))
    model = small_model(theta_prior=prior)
    trace = poutine.trace(model).get_trace(torch.rand(3, 1, 6, 6))
    fn = trace.nodes["theta"]["fn"]
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    assert isinstance(fn, dist.VonMises) and bool((fn.concentration == 2.0).all())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dx_prior": dist.Normal(0.0, 1.0)}, "event shape (2,)"),
        ({"theta_prior": dist.Normal(torch.zeros(2), 1.0)}, "site 'theta'"),
        ({"z_prior": dist.Normal(torch.zeros(2), 1.0).to_event(1)}, "event shape (3,)"),
        ({"vanilla": True, "rotate": True}, "vanilla=True has no pose sites"),
        ({"vanilla": True, "theta_prior": dist.Normal(0.0, 1.0)}, "vanilla=True"),
    ],
)
def test_bad_configuration_is_rejected_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        small_model(**kwargs)


@pytest.mark.parametrize("z_dim", [0, -1, 1.5])
def test_z_dim_must_be_positive_integer(z_dim):
    with pytest.raises(ValueError, match="z_dim"):
        SpatialVAE((6, 6), z_dim)


def test_condition_on_theta_renders_aligned_images():
    model = small_model()
    conditioned = poutine.condition(model, data={"theta": torch.zeros(2), "dx": torch.zeros(2, 2)})
    trace = poutine.trace(conditioned).get_trace(num_images=2)
    assert torch.equal(trace.nodes["theta"]["value"], torch.zeros(2))
    assert trace.nodes["obs"]["value"].shape == (2, 36, 1)


def test_render_uses_the_pose_transform():
    model = small_model()
    z = torch.randn(2, 3)
    theta, dx = torch.tensor([0.3, -1.0]), torch.tensor([[0.1, 0.0], [0.0, -0.2]])
    coords = pose_coordinates(pixel_grid(6), theta, dx)
    assert torch.allclose(model.render(z, theta, dx), model.decoder(coords, z))


def test_decode_returns_images():
    model = SpatialVAE((2, 5, 4), 2, hidden_dim=8)
    assert model.decode(torch.zeros(7, 2)).shape == (7, 2, 5, 4)


def test_pixel_layout_round_trip():
    images = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    pixels = images_to_pixels(images)
    assert pixels.shape == (2, 20, 3)
    assert torch.equal(pixels[1, 6], images[1, :, 1, 1])
    assert torch.equal(pixels_to_images(pixels, 4, 5), images)


def test_two_models_do_not_share_parameters():
    first, second = small_model(), small_model()
    assert first._pyro_name != second._pyro_name
    images = torch.rand(2, 1, 6, 6)
    poutine.trace(first).get_trace(images)
    poutine.trace(second).get_trace(images)
    store = pyro.get_param_store()
    w1 = store[f"{first._pyro_name}.decoder.coord_linear.weight"]
    w2 = store[f"{second._pyro_name}.decoder.coord_linear.weight"]
    assert w1 is first.decoder.coord_linear.weight and w2 is second.decoder.coord_linear.weight


def test_priors_and_grid_follow_the_module_dtype():
    model = small_model(theta_prior=dist.VonMises(torch.tensor(0.0), torch.tensor(1.0))).double()
    assert model.grid.dtype == torch.float64
    assert model.theta_prior().concentration.dtype == torch.float64
    trace = poutine.trace(model).get_trace(torch.rand(2, 1, 6, 6, dtype=torch.float64))
    assert trace.nodes["obs"]["fn"].base_dist.logits.dtype == torch.float64


def test_tiny_model_elbo_matches_a_hand_computation():
    model = SpatialVAE((2, 3), 1, hidden_dim=4, num_layers=1, theta_prior_std=0.7, dx_prior_std=0.2)
    guide = AmortizedGuide(model, hidden_dim=5, num_layers=1)
    images = torch.rand(2, 1, 2, 3)
    pyro.set_rng_seed(3)
    elbo = -pyro.infer.Trace_ELBO().loss(model, guide, images)
    pyro.set_rng_seed(3)
    sampled = guide(images)  # the ELBO runs the guide first, so the same draws come out

    with torch.no_grad():
        features = torch.tanh(guide.encoder.net[0](images.flatten(1)))
        log_q = 0.0
        prior_std = {"z": 1.0, "theta": 0.7, "dx": 0.2}  # the guide's heads work in these units
        for site, value in sampled.items():
            raw_loc, raw_log_scale = guide.heads[site](features).chunk(2, -1)
            loc, scale = prior_std[site] * raw_loc, prior_std[site] * raw_log_scale.exp()
            value = value.reshape(loc.shape)
            log_q += (-0.5 * ((value - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum()
        z, theta, dx = sampled["z"], sampled["theta"], sampled["dx"]

        def log_normal(x, std):
            return (-0.5 * (x / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)).sum()

        log_prior = log_normal(z, 1.0) + log_normal(theta, 0.7) + log_normal(dx, 0.2)
        grid = pixel_grid(2, 3)
        shifted = grid[None] - dx[:, None, :]
        c, s = theta.cos()[:, None], theta.sin()[:, None]
        u = torch.stack(
            [shifted[..., 0] * c + shifted[..., 1] * s, shifted[..., 1] * c - shifted[..., 0] * s],
            -1,
        )
        dec = model.decoder
        hidden = torch.tanh(dec.coord_linear(u) + dec.latent_linear(z)[:, None, :])
        logits = dec.tail[1](hidden).squeeze(-1)
        y = images.flatten(1)
        log_lik = (
            y * torch.nn.functional.logsigmoid(logits) + (1 - y) * torch.nn.functional.logsigmoid(-logits)
        ).sum()
    assert elbo == pytest.approx(float(log_lik + log_prior - log_q), rel=1e-5)


@requires_cuda
def test_model_and_guide_run_on_cuda():
    model = small_model().cuda()
    guide = AmortizedGuide(model, hidden_dim=8).cuda()
    images = torch.rand(3, 1, 6, 6, device="cuda")
    loss = pyro.infer.Trace_ELBO().loss(model, guide, images, data_size=30)
    assert math.isfinite(loss)
    trace = poutine.trace(model).get_trace(images)
    assert trace.nodes["theta"]["value"].device.type == "cuda"


@requires_cuda
def test_psf_model_runs_on_cuda():
    model = small_model(psf_fwhm=2.0, likelihood="gaussian").cuda()
    guide = AmortizedGuide(model, hidden_dim=8).cuda()
    images = torch.rand(3, 1, 6, 6, device="cuda")
    assert math.isfinite(pyro.infer.Trace_ELBO().loss(model, guide, images))
    trace = poutine.trace(model).get_trace(images)
    assert trace.nodes["obs"]["fn"].base_dist.loc.device.type == "cuda"


# --- scale, CTF and pixel subsampling -------------------------------------------------------------


def test_scale_site_magnifies_the_content():
    model = small_model(scale=True)
    assert list(model.latent_sites) == ["z", "theta", "dx", "scale"]
    trace = poutine.trace(model).get_trace(torch.rand(3, 1, 6, 6))
    site = trace.nodes["scale"]
    assert isinstance(site["fn"], dist.LogNormal) and site["value"].shape == (3,)
    z = torch.randn(2, 3)
    magnified = model.render(z, torch.zeros(2), torch.zeros(2, 2), torch.full((2,), 2.0))
    expected = model.decoder(model.grid / 2.0, z)
    assert torch.allclose(magnified, expected, atol=1e-6)
    with pytest.raises(ValueError, match="vanilla"):
        small_model(vanilla=True, scale=True)


def test_ctf_filters_the_rendered_mean_before_the_gaussian_likelihood():
    from pyro_svae.ctf import apply_ctf, ctf_2d

    model = small_model(ctf=True, likelihood="gaussian_pixel")
    images, ctf = torch.randn(4, 1, 6, 6), make_ctf(4, pixel_size=3.0)
    trace = poutine.trace(model).get_trace(images, ctf=ctf)
    z, theta, dx = (trace.nodes[name]["value"] for name in ("z", "theta", "dx"))
    clean = model.decode(z, theta, dx)
    recorded = apply_ctf(clean, ctf_2d(ctf, 6))
    obs_mean = pixels_to_images(trace.nodes["obs"]["fn"].base_dist.loc, 6, 6)
    assert torch.allclose(obs_mean, recorded, atol=1e-5)
    assert not torch.allclose(recorded, clean, atol=1e-3)
    assert torch.allclose(model.decode(z, theta, dx, ctf=ctf), recorded, atol=1e-5)
    with pytest.raises(ValueError, match="pass ctf="):
        model(images)
    with pytest.raises(ValueError, match="Gaussian likelihood"):
        small_model(ctf=True)


def test_psf_blurs_the_rendered_mean_before_the_gaussian_likelihood():
    from pyro_svae.optics import gaussian_psf_2d

    model = SpatialVAE((2, 16, 16), 3, hidden_dim=16, psf_fwhm=2.5, likelihood="gaussian")
    images = torch.rand(4, 2, 16, 16)
    trace = poutine.trace(model).get_trace(images)
    z, theta, dx = (trace.nodes[name]["value"] for name in ("z", "theta", "dx"))
    sharp = model.decode(z, theta, dx)
    # the same blur as a direct (circular) convolution with the sampled Gaussian kernel
    offsets = torch.arange(16.0)
    offsets = torch.minimum(offsets, 16 - offsets)
    sigma = 2.5 / (2 * math.sqrt(2 * math.log(2)))
    kernel_1d = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = torch.outer(kernel_1d, kernel_1d)
    kernel = kernel / kernel.sum()
    spectrum = torch.fft.fft2(sharp) * torch.fft.fft2(kernel)
    blurred = torch.fft.ifft2(spectrum).real
    obs_mean = pixels_to_images(trace.nodes["obs"]["fn"].base_dist.loc, 16, 16)
    # the sampled kernel aliases the continuous Gaussian's spectrum very slightly
    assert torch.allclose(obs_mean, blurred, atol=2e-3)
    assert torch.allclose(model.decode(z, theta, dx, blur=True), obs_mean, atol=1e-6)
    assert not torch.allclose(obs_mean, sharp, atol=1e-2)
    assert torch.allclose(obs_mean.sum((-2, -1)), sharp.sum((-2, -1)), atol=1e-4)  # the flux is kept
    assert gaussian_psf_2d(2.5, 16)[0, 0] == 1.0 and model.config["psf_fwhm"] == 2.5
    vanilla = small_model(vanilla=True, psf_fwhm=1.5, likelihood="gaussian")  # its images are blurred too
    trace = poutine.trace(vanilla).get_trace(torch.rand(2, 1, 6, 6))
    obs_mean = pixels_to_images(trace.nodes["obs"]["fn"].base_dist.loc, 6, 6)
    assert torch.allclose(obs_mean, vanilla.decode(trace.nodes["z"]["value"], blur=True), atol=1e-6)
    with pytest.raises(ValueError, match="has none"):
        small_model().decode(torch.randn(1, 3), blur=True)
    with pytest.raises(ValueError, match="Gaussian likelihood"):
        small_model(psf_fwhm=2.0)
    with pytest.raises(ValueError, match="psf_fwhm must be"):
        small_model(psf_fwhm=0.0, likelihood="gaussian")
    with pytest.raises(ValueError, match="pixel_subsample"):
        small_model(psf_fwhm=2.0, likelihood="gaussian", pixel_subsample=9)


def test_psf_works_with_a_ctf_and_follows_the_module_device_and_dtype():
    from pyro_svae.ctf import apply_ctf, ctf_2d
    from pyro_svae.optics import gaussian_psf_2d

    model = small_model(ctf=True, psf_fwhm=1.5, likelihood="gaussian").double()
    assert model.optics.psf.transfer_function.dtype == torch.float64
    images, ctf = torch.randn(2, 1, 6, 6, dtype=torch.float64), make_ctf(2, pixel_size=3.0)
    trace = poutine.trace(model).get_trace(images, ctf=ctf)
    z, theta, dx = (trace.nodes[name]["value"] for name in ("z", "theta", "dx"))
    expected = apply_ctf(apply_ctf(model.decode(z, theta, dx), gaussian_psf_2d(1.5, 6)), ctf_2d(ctf, 6))
    obs_mean = pixels_to_images(trace.nodes["obs"]["fn"].base_dist.loc, 6, 6)
    assert torch.allclose(obs_mean.float(), expected.float(), atol=1e-5)


def test_coord_frequency_scales_the_initial_coordinate_weights():
    torch.manual_seed(0)
    plain = SpatialVAE((6, 6), 2, hidden_dim=64)
    torch.manual_seed(0)
    sharp = SpatialVAE((6, 6), 2, hidden_dim=64, coord_frequency=10.0)
    weight, sharp_weight = plain.decoder.coord_linear.weight, sharp.decoder.coord_linear.weight
    assert torch.allclose(sharp_weight, 10 * weight)
    assert torch.equal(sharp.decoder.latent_linear.weight, plain.decoder.latent_linear.weight)
    assert sharp.config["coord_frequency"] == 10.0
    with pytest.raises(ValueError, match="coord_frequency must be positive"):
        SpatialVAE((6, 6), 2, hidden_dim=8, coord_frequency=0.0)
    with pytest.raises(ValueError, match="not to the vanilla one"):
        SpatialVAE((6, 6), 2, hidden_dim=8, vanilla=True, coord_frequency=2.0)


def test_pixel_subsampling_is_an_unbiased_estimate_of_the_full_log_likelihood():
    model = small_model(pixel_subsample=9, likelihood="gaussian")
    images = torch.randn(2, 1, 6, 6)
    latents = {"z": torch.randn(2, 3), "theta": torch.tensor([0.3, -1.0]), "dx": torch.zeros(2, 2)}
    conditioned = poutine.condition(model, latents)
    model.eval()
    full = poutine.trace(conditioned).get_trace(images).nodes["obs"]
    full_log_lik = float(full["fn"].log_prob(full["value"]).sum().detach())
    model.train()
    estimates = []
    for _ in range(400):
        trace = poutine.trace(conditioned).get_trace(images)
        site = trace.nodes["obs"]
        assert site["value"].shape == (9, 2, 1, 1)
        estimates.append(float(site["fn"].log_prob(site["value"]).sum().detach()) * site["scale"])
    estimates = torch.tensor(estimates)
    assert abs(float(estimates.mean()) - full_log_lik) < 4 * float(estimates.std()) / 20
    assert float(estimates.std()) > 0
    with pytest.raises(ValueError, match="pixel_subsample"):
        small_model(pixel_subsample=9, vanilla=True)
    with pytest.raises(ValueError, match="pixel_subsample"):
        small_model(pixel_subsample=9, ctf=True, likelihood="gaussian")
    with pytest.raises(ValueError, match="pixel_subsample"):
        small_model(pixel_subsample=37)


@pytest.mark.slow
def test_compiled_decoder_computes_the_same_images():
    torch.manual_seed(0)
    plain = small_model()
    compiled = small_model(compile=True)
    compiled.load_state_dict(plain.state_dict())
    z, theta, dx = torch.randn(4, 3), torch.randn(4), torch.randn(4, 2) * 0.1
    assert torch.allclose(compiled.render(z, theta, dx), plain.render(z, theta, dx), atol=1e-5)
    with pytest.raises(ValueError, match="compile"):
        small_model(vanilla=True, compile=True)


def _initial_output(model: SpatialVAE) -> torch.Tensor:
    """The decoder's output for z = 0 (the same for any z and pose once started at the mean)."""
    with torch.no_grad():
        return model.decoder(torch.zeros(model.z_dim)) if model.vanilla else model.render(torch.zeros(1, 2))


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli", "gaussian_pixel"])
def test_init_output_bias_starts_the_spatial_decoder_at_each_channels_mean(likelihood):
    torch.manual_seed(0)
    images = torch.rand(40, 3, 6, 6) * torch.tensor([0.3, 0.6, 0.9]).reshape(3, 1, 1)
    model = SpatialVAE((3, 6, 6), z_dim=2, hidden_dim=8, likelihood=likelihood)
    assert model.init_output_bias(images) is model
    mean = model.likelihood.mean(_initial_output(model))  # (1, P, C)
    expected = images.mean(dim=(0, 2, 3))
    assert torch.allclose(mean, expected.expand_as(mean), atol=1e-5)
    with torch.no_grad():  # the same image whatever the content and pose: exactly the mean, no ramp
        posed = model.likelihood.mean(model.render(torch.randn(3, 2), torch.randn(3), torch.randn(3, 2)))
    assert torch.allclose(posed, expected.expand_as(posed), atol=1e-5)
    if likelihood == "gaussian_pixel":
        spread = model.likelihood(_initial_output(model)).stddev
        assert torch.allclose(spread, images.std(dim=(0, 2, 3), unbiased=False).expand_as(spread), atol=1e-4)


@pytest.mark.parametrize("vanilla", [False, True])
def test_init_output_bias_starts_a_learned_sigma_at_the_datas_spread(vanilla):
    torch.manual_seed(0)
    images = torch.rand(40, 2, 5, 5) * torch.tensor([0.3, 0.9]).reshape(2, 1, 1)
    model = SpatialVAE((2, 5, 5), z_dim=2, hidden_dim=8, likelihood="gaussian_learned", vanilla=vanilla)
    assert model.likelihood.sigma.item() == pytest.approx(1.0)
    model.init_output_bias(images)
    around = images - (images.mean(0) if vanilla else images.mean(dim=(0, 2, 3)).reshape(2, 1, 1))
    expected = around.square().mean().sqrt()  # the maximum-likelihood sigma of the starting image
    assert model.likelihood.sigma.item() == pytest.approx(float(expected), rel=1e-4)
    parameters = dict(model.named_parameters())  # still the module's learned parameter, now moved
    assert parameters["likelihood.sigma_unconstrained"].exp().item() == pytest.approx(
        float(expected), rel=1e-4
    )


def test_init_output_bias_starts_the_vanilla_decoder_at_the_mean_image():
    torch.manual_seed(0)
    images = torch.rand(30, 1, 5, 5) * torch.linspace(0.1, 0.9, 25).reshape(1, 1, 5, 5)
    model = SpatialVAE((5, 5), z_dim=2, hidden_dim=8, vanilla=True).init_output_bias(images)
    mean = model.likelihood.mean(_initial_output(model))  # (P, C)
    assert torch.allclose(mean, images.mean(0).reshape(25, 1), atol=1e-5)


def test_init_output_bias_raises_the_initial_elbo():
    from pyro_svae.data import rotated_mnist

    train, _ = rotated_mnist(test_size=100)
    images = train.images[:200]

    def initial_elbo(init: bool) -> float:
        pyro.set_rng_seed(0)
        model = SpatialVAE((28, 28), z_dim=2, hidden_dim=32)
        if init:
            model.init_output_bias(images)
        guide = AmortizedGuide(model, hidden_dim=32)
        loss = pyro.infer.Trace_ELBO(num_particles=4).loss(model.model, guide.guide, images)
        return -loss / len(images)

    plain, started = initial_elbo(False), initial_elbo(True)
    assert started > plain + 100  # a dark background from the first step (MNIST's mean pixel is ~0.13)


def test_init_output_bias_rejects_models_and_data_it_cannot_serve():
    with pytest.raises(ValueError, match="CTF"):
        SpatialVAE((6, 6), z_dim=2, hidden_dim=8, ctf=True, likelihood="gaussian").init_output_bias(
            torch.rand(4, 6, 6)
        )
    model = SpatialVAE((6, 6), z_dim=2, hidden_dim=8)
    with pytest.raises(ValueError, match="expects images of shape"):
        model.init_output_bias(torch.rand(4, 5, 5))
    with pytest.raises(ValueError):
        model.init_output_bias(torch.full((4, 6, 6), float("nan")))
    with pytest.raises(ValueError, match="empty"):
        model.init_output_bias(torch.rand(0, 6, 6))


@requires_cuda
def test_init_output_bias_follows_the_module_device():
    model = SpatialVAE((6, 6), z_dim=2, hidden_dim=8).cuda()
    model.init_output_bias(torch.rand(4, 6, 6, device="cuda"))
    model.init_output_bias(torch.rand(4, 6, 6))  # CPU data into a CUDA model
    assert model.decoder.tail[-1].bias.device.type == "cuda"
