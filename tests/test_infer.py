import math
import warnings

import numpy as np
import pyro
import pytest
import torch
from conftest import PoisonObs, make_ctf, requires_cuda

from pyro_svae import AmortizedGuide, DivergenceError, SpatialVAE, evaluate, fit, infer
from pyro_svae.checkpoint import load_checkpoint
from pyro_svae.data import DataError, ImageDataset, rotated_mnist
from pyro_svae.infer import decaying_adam, resolve_device


@pytest.fixture(scope="module")
def digits():
    train, test = rotated_mnist(test_size=200)
    return train.subset(range(400)), test


def tiny(image_shape=(28, 28), **kwargs):
    model = SpatialVAE(image_shape, 2, hidden_dim=32, **kwargs)
    return model, AmortizedGuide(model, hidden_dim=32)


def narrow(guide):
    """Shrink every posterior scale to e^-6 so Monte-Carlo estimates have little variance."""
    with torch.no_grad():
        for head in guide.heads.values():
            half = head.out_features // 2
            head.weight[half:] = 0.0
            head.bias[half:] = -6.0
    return guide


def test_training_on_a_few_hundred_images_improves_the_elbo(digits):
    train, test = digits
    model, guide = tiny()
    history = fit(model, guide, train, test=test, epochs=3, learning_rate=3e-3, progress=False)
    elbos = history.values("elbo", "test")
    assert len(history) == 3 and len(elbos) == 3
    assert elbos[-1] > elbos[0] + 5
    train_rows = history.split("train")
    assert train_rows[-1]["elbo"] > train_rows[0]["elbo"]
    for row in history.records:
        assert row["kl"] >= 0
        assert row["elbo"] == pytest.approx(row["reconstruction"] - row["kl"])
    assert "theta_circ_corr" in history.last("test")


def test_evaluate_reports_per_image_bounds_and_leaves_weights_alone(digits):
    _, test = digits
    model, guide = tiny()
    before = [p.detach().clone() for p in list(model.parameters()) + list(guide.parameters())]
    report = evaluate(model, guide, test.subset(range(50)), num_particles=8, batch_size=20, seed=0)
    after = list(model.parameters()) + list(guide.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert report["per_image_elbo"].shape == (50,) and report["num_particles"] == 8
    # log-mean-exp of the weights is never below their mean (Jensen), image by image
    assert bool((report["per_image_iw_elbo"] >= report["per_image_elbo"] - 1e-4).all())
    assert report["elbo"] == pytest.approx(report["reconstruction"] - report["kl"])


def test_evaluate_matches_pyros_elbo_estimate(digits):
    _, test = digits
    model, guide = tiny()
    narrow(guide)
    images = test.images[:40]
    ours = evaluate(model, guide, images, num_particles=50, seed=1)["elbo"]
    pyro.set_rng_seed(1)
    theirs = (
        -pyro.infer.Trace_ELBO(num_particles=50, vectorize_particles=True).loss(model, guide, images) / 40
    )
    assert ours == pytest.approx(theirs, abs=0.5)


def test_particle_chunks_do_not_change_the_result(digits):
    _, test = digits
    model, guide = tiny()
    narrow(guide)
    data = test.subset(range(10))
    whole = evaluate(model, guide, data, num_particles=6, seed=2)
    chunked = evaluate(model, guide, data, num_particles=6, seed=2, max_elements=10 * 784 * 32 * 2)
    assert whole["elbo"] == pytest.approx(chunked["elbo"], abs=1.0)


def test_bad_input_at_fit_boundary(digits):
    model, guide = tiny()
    with pytest.raises(DataError, match=r"expects images of shape \(1, 28, 28\).*found \(1, 20, 20\)"):
        fit(model, guide, np.zeros((5, 20, 20)), epochs=1, progress=False)
    with pytest.raises(DataError, match="NaN or Inf"):
        fit(model, guide, np.full((5, 28, 28), np.nan), epochs=1, progress=False)
    with pytest.raises(DataError, match="empty"):
        fit(model, guide, np.zeros((0, 28, 28)), epochs=1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        fit(model, guide, digits[0], epochs=1, batch_size=0, progress=False)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, digits):
    train = digits[0].subset(range(200))
    test = digits[1].subset(range(50))

    def run(epochs, resume=False, path=tmp_path / "ckpt.pt"):
        pyro.set_rng_seed(0)  # the same initial weights for every run
        model, guide = tiny()
        return fit(
            model,
            guide,
            train,
            test=test,
            epochs=epochs,
            seed=5,
            progress=False,
            checkpoint=path,
            resume=resume,
            learning_rate=1e-3,
        )

    full = run(3, path=tmp_path / "full.pt")
    run(1)
    resumed = run(3, resume=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(resumed.records) == strip(full.records)


def binary_images(n: int = 20, size: int = 8) -> torch.Tensor:
    return (torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(1)) > 0.5).float()


@pytest.mark.filterwarnings("ignore:Encountered NaN")  # Pyro's own note of the NaN loss
def test_a_nan_loss_stops_training_before_its_epoch_is_saved(tmp_path):
    model, guide = tiny((8, 8))
    path = tmp_path / "ckpt.pt"
    saved, epochs_seen = [], []

    def after_epoch(epoch, records):
        epochs_seen.append(epoch)
        saved.append(path.read_bytes())

    with PoisonObs(after=4 + 2), pytest.raises(DivergenceError) as caught:  # 4 steps an epoch
        fit(
            model,
            guide,
            binary_images(),
            epochs=3,
            batch_size=5,
            progress=False,
            checkpoint=path,
            callbacks=[after_epoch],
        )
    error = caught.value
    assert (error.epoch, error.step, error.steps) == (2, 3, 4) and math.isnan(error.loss)
    assert "training diverged at epoch 2 (step 3 of 4): loss nan" in str(error)
    assert "lower the learning rate (now 0.0001)" in str(error) and "normalize" in str(error)
    # the checkpoint and the history stay at the last good epoch; no callback saw the diverged one
    assert epochs_seen == [1] and path.read_bytes() == saved[0]
    assert load_checkpoint(path)["epoch"] == 1
    assert [r["epoch"] for r in error.history.records] == [1]


def test_an_invalid_distribution_after_a_step_is_divergence_but_not_at_the_first(tmp_path):
    images = binary_images()
    model, guide = tiny((8, 8))
    with PoisonObs(after=2, kind="invalid"), pytest.raises(DivergenceError) as caught:
        fit(model, guide, images, epochs=1, batch_size=5, progress=False)
    assert caught.value.step == 3 and isinstance(caught.value.__cause__, ValueError)
    assert "the scale of a Normal distribution became invalid" in str(caught.value)
    # the untrained networks' own first step: a plain error (a bug or bad input, not divergence)
    with PoisonObs(after=0, kind="invalid"), pytest.raises(ValueError, match="Expected parameter scale"):
        fit(model, guide, images, epochs=1, batch_size=5, progress=False)


def test_a_huge_learning_rate_is_caught_with_advice_and_nothing_saved(tmp_path):
    model, guide = tiny((8, 8))
    path = tmp_path / "ckpt.pt"
    with pytest.raises(DivergenceError, match=r"epoch 1 \(step 2 of 4\).*learning rate \(now 100000\)"):
        fit(
            model,
            guide,
            binary_images(),
            epochs=2,
            batch_size=5,
            learning_rate=1e5,
            progress=False,
            checkpoint=path,
        )
    assert not path.exists()


def test_an_exploding_loss_is_caught_while_healthy_runs_are_not(digits):
    train = digits[0]
    model, guide = tiny()
    with pytest.raises(DivergenceError, match=r"exploded from 5\d\d at the first step") as caught:
        fit(model, guide, train, epochs=2, learning_rate=1.0, progress=False)
    assert caught.value.loss > 100 * 582
    problem = infer._loss_problem
    assert problem(-20.0, 100.0, 784) is None and problem(2.0, -5.0, 784) is None  # improving
    assert problem(100.0 + 99 * 784, 100.0, 784) is None  # far worse, within 100 x 1 nat per pixel
    assert "exploded" in problem(100.0 + 101 * 784, 100.0, 784)
    assert "exploded" in problem(1e9, 1000.0, 784) and problem(math.inf, 1.0, 1) == "loss inf"


def test_resume_with_a_new_learning_rate_steps_at_that_rate(tmp_path):
    images, path = binary_images(), tmp_path / "ckpt.pt"

    def rates() -> set[float]:
        optimizer = load_checkpoint(path)["optimizer"]
        return {g["lr"] for role in optimizer.values() for s in role.values() for g in s["param_groups"]}

    common = dict(batch_size=5, progress=False, checkpoint=path)
    fit(*tiny((8, 8)), images, epochs=1, learning_rate=1e-3, **common)
    assert rates() == {1e-3}
    fit(*tiny((8, 8)), images, epochs=2, learning_rate=1e-4, resume=True, **common)
    assert rates() == {1e-4} and load_checkpoint(path)["epoch"] == 2


def test_gaussian_data_far_from_the_noise_scale_warns_but_trains():
    model, guide = tiny((8, 8), likelihood="gaussian")
    images = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(model, guide, images, epochs=0, progress=False)
    with pytest.warns(UserWarning, match=r"std 29\d, far from .* sigma 1: normalize the images"):
        history = fit(model, guide, images * 1e3, epochs=1, batch_size=5, progress=False)
    assert len(history) == 1
    with pytest.warns(UserWarning, match="normalize"), pytest.raises(DivergenceError) as diverged:
        fit(model, guide, images * 1e6, epochs=1, batch_size=5, progress=False)
    assert diverged.value.step == 1 and "far from the likelihood's scale" in diverged.value.reason


def test_arrays_are_accepted_and_the_device_is_resolved():
    model, guide = tiny((8, 8))
    data = ImageDataset(np.random.default_rng(0).random((20, 8, 8)))
    history = fit(model, guide, data.images.numpy()[:, 0], epochs=1, batch_size=7, progress=False)
    assert math.isfinite(history.last("train")["elbo"])
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")


@requires_cuda
def test_fit_and_evaluate_on_cuda(digits):
    train, test = digits
    model, guide = tiny()
    fit(
        model,
        guide,
        train.subset(range(100)),
        test=test.subset(range(20)),
        epochs=1,
        device="cuda",
        progress=False,
    )
    assert next(model.parameters()).device.type == "cuda"
    assert math.isfinite(evaluate(model, guide, test.subset(range(20)), num_particles=4)["iw_elbo"])


@requires_cuda
def test_canonicalizing_guide_trains_and_summarizes_on_cuda(digits):
    from pyro_svae import AmortizedGuide, SpatialVAE, posterior_means

    train, test = digits
    model = SpatialVAE((28, 28), 2, hidden_dim=16, translate=True)
    guide = AmortizedGuide(model, hidden_dim=16, canonicalize="moments")
    fit(model, guide, train.subset(range(50)), epochs=1, device="cuda", progress=False)
    assert next(guide.parameters()).device.type == "cuda"
    means = posterior_means(guide, test.subset(range(10)))
    assert torch.isfinite(means["theta"]).all() and means["dx"].shape == (10, 2)


def test_kl_weight_scales_latent_sites_only():
    from pyro import poutine

    from pyro_svae.infer import KLWeight

    model, guide = tiny((8, 8))
    images = torch.rand(3, 1, 8, 8)
    trace = poutine.trace(KLWeight(0.25)(model)).get_trace(images, data_size=6)
    assert trace.nodes["z"]["scale"] == 0.5 and trace.nodes["theta"]["scale"] == 0.5
    assert trace.nodes["obs"]["scale"] == 2.0
    guide_trace = poutine.trace(KLWeight(0.25)(guide)).get_trace(images, data_size=6)
    assert guide_trace.nodes["dx"]["scale"] == 0.5


def test_kl_annealing_schedule_is_recorded_and_the_elbo_stays_unweighted(digits):
    from pyro_svae.infer import linear_kl_annealing

    train, _ = digits
    model, guide = tiny()
    history = fit(
        model,
        guide,
        train.subset(range(100)),
        epochs=3,
        progress=False,
        kl_weight=linear_kl_annealing(3, start=0.0),
    )
    rows = history.split("train")
    assert [r.get("kl_weight") for r in rows] == [pytest.approx(1 / 3), pytest.approx(2 / 3), None]
    for row in rows:
        assert row["elbo"] == pytest.approx(row["reconstruction"] - row["kl"]) and row["kl"] > 0


def test_bf16_training_keeps_parameters_float32_and_its_elbo_tracks_fp32(digits):
    train, test = digits
    model, guide = tiny()
    history = fit(
        model, guide, train, test=test, epochs=2, learning_rate=3e-3, progress=False, precision="bf16"
    )
    elbos = history.values("elbo", "test")
    assert elbos[-1] > elbos[0]
    assert all(p.dtype == torch.float32 for p in [*model.parameters(), *guide.parameters()])
    # the same weights and posterior samples scored in both precisions
    reports = {
        precision: evaluate(model, guide, test, num_particles=2, seed=5, precision=precision)
        for precision in ("fp32", "bf16")
    }
    assert abs(reports["bf16"]["elbo"] - reports["fp32"]["elbo"]) < 0.5
    assert reports["bf16"]["elbo"] != reports["fp32"]["elbo"]  # autocast really ran
    with pytest.raises(ValueError, match="precision"):
        fit(model, guide, train, epochs=1, precision="fp8", progress=False)
    with pytest.raises(ValueError, match="fp16"):
        fit(model, guide, train, epochs=1, precision="fp16", device="cpu", progress=False)


def test_a_ctf_model_trains_on_particles_with_their_ctf():
    n = 24
    ctf = make_ctf(n, defocus_u=torch.linspace(10000, 25000, n), defocus_v=torch.linspace(9500, 24000, n))
    data = ImageDataset(torch.randn(n, 1, 12, 12), ctf=ctf, name="particles")
    model = SpatialVAE((12, 12), 1, hidden_dim=16, ctf=True, likelihood="gaussian")
    guide = AmortizedGuide(model, hidden_dim=16)
    history = fit(model, guide, data, test=data, epochs=2, batch_size=8, progress=False)
    assert math.isfinite(history.last("test")["elbo"])
    report = evaluate(model, guide, data, num_particles=3)
    assert report["per_image_elbo"].shape == (n,)
    with pytest.raises(DataError, match="CTF"):
        fit(model, guide, ImageDataset(data.images), epochs=1, progress=False)


def test_pixel_subsampled_training_reports_the_full_elbo(digits):
    train, test = digits
    model = SpatialVAE((28, 28), 2, hidden_dim=32, pixel_subsample=196)
    guide = AmortizedGuide(model, hidden_dim=32)
    history = fit(model, guide, train, test=test, epochs=2, learning_rate=3e-3, progress=False)
    elbos = history.values("elbo", "test")
    assert elbos[-1] > elbos[0]
    assert model.training  # evaluation switched to all pixels and back


def test_decaying_adam_reaches_the_final_rate_at_the_last_epoch():
    data = torch.rand(8, 1, 6, 6)
    model = SpatialVAE((6, 6), 1, hidden_dim=4)
    guide = AmortizedGuide(model, hidden_dim=4)
    optimizer, step = decaying_adam(1e-2, 1e-4, epochs=3)
    rates = []
    fit(
        model,
        guide,
        data,
        epochs=3,
        batch_size=4,
        optimizer=optimizer,
        progress=False,
        callbacks=[
            lambda e, r: rates.append(next(iter(optimizer.optim_objs.values())).get_last_lr()[0]),
            step,
        ],
    )
    assert rates == pytest.approx([1e-2, 1e-3, 1e-4])
    with pytest.raises(ValueError, match="learning rates"):
        decaying_adam(1e-2, 0.0, epochs=3)
