import math
import sys

import numpy as np
import pytest
import torch

from pyro_svae.coords import pixel_grid, transform_images
from pyro_svae.data import DataError, hubble_deep_field, load_image_folder, simulated_galaxies

# ---------------------------------------------------------------- Hubble eXtreme Deep Field stamps

# Peaks of the two stars with diffraction spikes in skimage.data.hubble_deep_field(), (x, y) pixels.
STARS = [(254.0, 166.0), (754.0, 578.0)]


@pytest.fixture(scope="module")
def hubble():
    return hubble_deep_field()


def test_hubble_stamps_count_shape_range_and_bookkeeping(hubble):
    train, test = hubble
    n = len(train) + len(test)
    assert 80 <= n <= 130  # 102 with the defaults, out of ~195 sources of at least 100 px
    assert len(test) == round(0.2 * n)
    for part in (train, test):
        assert part.image_shape == (3, 64, 64) and part.images.dtype == torch.float32
        assert float(part.images.min()) >= 0.0 and float(part.images.max()) <= 1.0
        assert set(part.factors) == {"axis_ratio", "log_radius"}
        assert bool(((part.factors["axis_ratio"] > 0) & (part.factors["axis_ratio"] <= 1)).all())
    counts = train.info["counts"]
    assert counts["kept"] == n
    rejected = sum(v for k, v in counts.items() if k not in ("components", "area >= 100", "kept"))
    assert rejected + n == counts["area >= 100"] == len(train.info["rejected"]) + n
    assert len(train.info["catalogue"]) == n


def test_hubble_split_is_deterministic_disjoint_and_seeded(hubble):
    train, test = hubble
    ids_train, ids_test = set(train.source_index.tolist()), set(test.source_index.tolist())
    assert not ids_train & ids_test
    assert ids_train | ids_test == set(range(len(train) + len(test)))
    again_train, again_test = hubble_deep_field()  # cached detection, fresh data sets
    assert torch.equal(again_train.source_index, train.source_index)
    assert torch.equal(again_test.images, test.images)
    again_test.images.zero_()  # the cache is not shared with the returned tensors
    assert torch.equal(hubble_deep_field()[1].images, test.images)
    other_train, _ = hubble_deep_field(seed=1)
    assert not torch.equal(other_train.source_index, train.source_index)
    _, ten = hubble_deep_field(test_size=10)
    assert len(ten) == 10


def test_hubble_rejects_edges_and_stars_and_centres_the_light(hubble):
    train, test = hubble
    height, width = 872, 1000
    for entry in train.info["catalogue"]:
        reach = 31.5 * entry["zoom"]
        assert reach <= entry["x"] <= width - 1 - reach and reach <= entry["y"] <= height - 1 - reach
        assert all(math.hypot(entry["x"] - x, entry["y"] - y) > 20 for x, y in STARS)
    stars = [r for r in train.info["rejected"] if r["reason"].startswith("star")]
    assert len(stars) == 2
    for x, y in STARS:
        assert any(math.hypot(r["x"] - x, r["y"] - y) < 3 for r in stars)
    assert train.info["counts"]["touching the edge"] >= 1
    # the light-weighted centre of each stamp sits on the grid centre (neighbours are masked)
    images = torch.cat([train.images, test.images])
    light = (images.mean(1) - train.info["background"]).clamp(min=0).flatten(1)
    light = light * (light > 5 * train.info["sigma"])
    grid = pixel_grid(64)
    centre = (light[..., None] * grid).sum(1) / light.sum(1, keepdim=True)
    pixel = 2 / 63
    assert float(centre.abs().median()) < 0.5 * pixel
    assert float(centre.abs().max()) < 3 * pixel


def test_hubble_unmasked_neighbours_change_only_the_surroundings(hubble):
    train, _ = hubble
    plain, _ = hubble_deep_field(mask_neighbours=False)
    assert torch.equal(plain.source_index, train.source_index)
    assert plain.info["counts"] == train.info["counts"]
    centre = (slice(None), slice(None), slice(28, 36), slice(28, 36))
    assert torch.allclose(plain.images[centre], train.images[centre], atol=0.05)
    assert not torch.allclose(plain.images, train.images, atol=0.05)


def test_hubble_rejects_bad_arguments():
    with pytest.raises(DataError, match="test_size"):
        hubble_deep_field(test_size=1000)
    with pytest.raises(DataError, match="size"):
        hubble_deep_field(size=4)


# ---------------------------------------------------------------- GalSim simulations

SIM = dict(size=48, noise=0.0, background=0.0)


def test_simulated_galaxies_shapes_truth_and_reproducibility():
    data = simulated_galaxies(40, seed=1, shift_std=2.0, scale_range=(1.0, 2.0))
    assert data.image_shape == (3, 64, 64) and len(data) == 40
    assert float(data.images.min()) >= 0.0 and float(data.images.max()) <= 1.0
    assert bool(((data.theta >= -math.pi) & (data.theta < math.pi)).all())
    assert data.dx.shape == (40, 2) and 0.5 < float(data.dx.std() * 63 / 2 / 2.0) < 1.5  # ~2 px
    assert bool(((data.scale >= 1.0) & (data.scale <= 2.0)).all())
    assert set(data.factors) == {"axis_ratio", "bulge_fraction", "log_scale"}
    assert torch.allclose(data.factors["log_scale"], data.scale.log())
    assert bool(((data.factors["axis_ratio"] >= 0.3) & (data.factors["axis_ratio"] <= 1.0)).all())
    assert bool(((data.factors["bulge_fraction"] >= 0.1) & (data.factors["bulge_fraction"] <= 0.6)).all())
    # the bulge is red, the disk blue
    red_minus_blue = data.images[:, 0] - data.images[:, 2]
    assert float(red_minus_blue[:, 32, 32].mean()) > 0.0
    again = simulated_galaxies(40, seed=1, shift_std=2.0, scale_range=(1.0, 2.0))
    assert torch.equal(again.images, data.images) and torch.equal(again.theta, data.theta)
    other = simulated_galaxies(40, seed=2, shift_std=2.0, scale_range=(1.0, 2.0))
    assert not torch.equal(other.images, data.images)


def test_simulated_galaxies_knots_are_seeded_and_several_bulge_indices_are_recorded():
    a = simulated_galaxies(6, seed=3, knots=8, **SIM)
    b = simulated_galaxies(6, seed=3, knots=8, **SIM)
    plain = simulated_galaxies(6, seed=3, **SIM)
    assert torch.equal(a.images, b.images) and not torch.allclose(a.images, plain.images, atol=1e-3)
    mixed = simulated_galaxies(30, seed=0, bulge_indices=(1.5, 4.0), **SIM)
    assert set(mixed.factors["bulge_index"].tolist()) == {1.5, 4.0}


def _relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_simulated_theta_turns_the_content_counter_clockwise():
    kw = dict(seed=5, shift_std=0.0, scale_range=(1.0, 1.0), axis_ratio_range=(0.3, 0.4), **SIM)
    upright = simulated_galaxies(6, rotation="none", **kw)
    turned = simulated_galaxies(6, rotation="uniform", **kw)
    assert torch.equal(upright.factors["axis_ratio"], turned.factors["axis_ratio"])
    assert float(upright.theta.abs().max()) == 0.0
    # same content, so the upright image posed by pyro_svae's transform is the drawn turned one ...
    good = _relative_error(transform_images(upright.images, turned.theta), turned.images)
    bad = _relative_error(transform_images(upright.images, -turned.theta), turned.images)
    assert good < 0.05 and bad > 4 * good
    # ... and, independently of coords, its major axis lies at theta (modulo pi, counter-clockwise, y up)
    grid = pixel_grid(48)
    w = turned.images.sum(1).flatten(1)
    x, y = grid[:, 0], grid[:, 1]
    cxx, cyy, cxy = (w * x * x).sum(1), (w * y * y).sum(1), (w * x * y).sum(1)
    axis = 0.5 * torch.atan2(2 * cxy, cxx - cyy)
    error = torch.remainder(axis - turned.theta + math.pi / 2, math.pi) - math.pi / 2
    assert float(error.abs().max()) < math.radians(3)


def test_simulated_dx_moves_the_content_and_scale_magnifies_it():
    kw = dict(seed=7, rotation="none", axis_ratio_range=(0.5, 0.6), **SIM)
    still = simulated_galaxies(6, shift_std=0.0, scale_range=(1.0, 1.0), **kw)
    shifted = simulated_galaxies(6, shift_std=3.0, scale_range=(1.0, 1.0), **kw)
    good = _relative_error(transform_images(still.images, dx=shifted.dx), shifted.images)
    bad = _relative_error(transform_images(still.images, dx=-shifted.dx), shifted.images)
    assert good < 0.05 and bad > 4 * good
    # the content centre (light-weighted, y up) is at dx
    grid = pixel_grid(48)
    w = shifted.images.sum(1).flatten(1)
    centre = (w[..., None] * grid).sum(1) / w.sum(1, keepdim=True)
    assert torch.allclose(centre, shifted.dx, atol=0.2 * 2 / 47)
    # scale magnifies the galaxy before the PSF and the pixels, so resampling matches only roughly (the
    # bulge's cusp is barely resolved); 1 / scale would be far worse
    grown = simulated_galaxies(6, shift_std=0.0, scale_range=(1.5, 2.0), **kw)
    good = _relative_error(transform_images(still.images, magnification=grown.scale), grown.images)
    bad = _relative_error(transform_images(still.images, magnification=1 / grown.scale), grown.images)
    assert good < 0.2 and bad > 4 * good
    # in linear intensities with a narrow PSF, the second-moment radius grows by scale (a few % less: the
    # exponential disk's tail is cut by the stamp)
    kw.update(stretch=0.0, psf_fwhm=0.5, size=64, half_light_radius=0.03)
    still = simulated_galaxies(6, shift_std=0.0, scale_range=(1.0, 1.0), **kw)
    grown = simulated_galaxies(6, shift_std=0.0, scale_range=(1.5, 2.0), **kw)

    def radius(images):
        w = images.sum(1).flatten(1)
        return ((w * (pixel_grid(64) ** 2).sum(1)).sum(1) / w.sum(1)).sqrt()

    assert torch.allclose(radius(grown.images) / radius(still.images), grown.scale, rtol=0.06)


def test_half_light_ratio_matches_galsim():
    galsim = pytest.importorskip("galsim")
    from pyro_svae.data.galaxies import half_light_ratio

    fractions = np.array([0.0, 0.1, 0.35, 0.6, 1.0])
    for index in (1.5, 4.0):
        ratios = half_light_ratio(fractions, index)
        for fraction, ratio in zip(fractions, ratios, strict=True):
            bulge = galsim.Sersic(n=index, half_light_radius=4.0, flux=max(fraction, 1e-12))
            disk = galsim.Exponential(half_light_radius=10.0, flux=max(1.0 - fraction, 1e-12))
            expected = galsim.Add(bulge, disk).calculateHLR(scale=0.1, size=2048) / 10.0
            assert ratio == pytest.approx(expected, abs=2e-3)
    assert half_light_ratio(0.0, 4.0) == pytest.approx(1.0) and half_light_ratio(1.0, 4.0) == pytest.approx(
        0.4
    )


def test_simulated_scale_is_the_whole_galaxys_half_light_radius():
    # linear intensities, a narrow PSF, round galaxies: the measured half-light radius of the whole light is
    # scale * half_light_radius * size pixels, for bulge-dominated and disk-dominated galaxies alike
    kw = dict(seed=3, rotation="none", shift_std=0.0, axis_ratio_range=(1.0, 1.0), stretch=0.0, psf_fwhm=0.3)
    data = simulated_galaxies(
        12,
        size=96,
        noise=0.0,
        background=0.0,
        scale_range=(1.0, 1.5),
        half_light_radius=0.04,
        bulge_fraction_range=(0.0, 0.8),
        **kw,
    )
    light = data.images.sum(1).flatten(1)
    radius = pixel_grid(96).norm(dim=-1) * 95 / 2  # pixels from the centre
    order = radius.argsort()
    cumulative = light[:, order].cumsum(1)
    half = radius[order][(cumulative < cumulative[:, -1:] / 2).sum(1)]
    expected = data.scale * 0.04 * 96
    assert torch.allclose(half, expected, rtol=0.06)
    fraction = data.factors["bulge_fraction"]
    assert float(fraction.max() - fraction.min()) > 0.4  # the test spans disks and bulges
    # the disk's half-light radius (the size before) would be off by up to 1 / half_light_ratio(0.8) = 2.0x


def test_simulated_galaxies_validates_and_names_the_extra(monkeypatch):
    with pytest.raises(DataError, match="rotation"):
        simulated_galaxies(2, rotation="spin")
    with pytest.raises(DataError, match="axis_ratio_range"):
        simulated_galaxies(2, axis_ratio_range=(0.0, 0.5))
    with pytest.raises(DataError, match="bulge_indices"):
        simulated_galaxies(2, bulge_indices=(9.0,))
    monkeypatch.setitem(sys.modules, "galsim", None)
    with pytest.raises(ImportError, match="galaxies"):
        simulated_galaxies(2)


# ---------------------------------------------------------------- image folders


def _save_png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


def test_folder_of_png_jpeg_npy_and_fits(tmp_path):
    from astropy.io import fits

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(12, 10), dtype=np.uint8)
    _save_png(tmp_path / "a.png", grey)
    stack = rng.random((3, 12, 10)).astype(np.float32)
    np.save(tmp_path / "b.npy", stack)
    plane = rng.random((12, 10)).astype(np.float32)
    fits.PrimaryHDU(plane).writeto(tmp_path / "c.fits")
    (tmp_path / "notes.txt").write_text("not an image")
    data = load_image_folder(tmp_path)
    assert data.info["files"] == ["a.png", "b.npy", "c.fits"]
    assert data.image_shape == (1, 12, 10) and len(data) == 5
    assert data.source_index.tolist() == [0, 1, 1, 1, 2]
    assert torch.allclose(data.images[0, 0], torch.from_numpy(grey / 255.0).float())
    assert torch.allclose(data.images[1:4, 0], torch.from_numpy(stack))
    assert torch.allclose(data.images[4, 0], torch.from_numpy(plane[::-1].copy()))  # FITS row 0: bottom
    assert data.name == tmp_path.name


def test_folder_of_colour_images_drops_alpha_and_reads_jpeg(tmp_path):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, size=(8, 8, 4), dtype=np.uint8)
    _save_png(tmp_path / "1.png", rgba)
    smooth = np.zeros((8, 8, 3), dtype=np.uint8) + np.array([200, 100, 50], dtype=np.uint8)
    _save_png(tmp_path / "2.jpg", smooth)
    np.save(tmp_path / "3.npy", smooth)  # one (H, W, C) image, uint8
    data = load_image_folder(tmp_path, name="colour")
    assert data.image_shape == (3, 8, 8) and len(data) == 3 and data.name == "colour"
    assert torch.allclose(data.images[0], torch.from_numpy(rgba[..., :3] / 255.0).float().permute(2, 0, 1))
    expected = torch.tensor([200, 100, 50]) / 255.0
    assert torch.allclose(data.images[1].mean((1, 2)), expected, atol=0.03)  # JPEG is lossy
    assert torch.allclose(data.images[2].mean((1, 2)), expected)


def test_folder_mixed_sizes_and_channels_empty_and_unreadable(tmp_path):
    _save_png(tmp_path / "big.png", np.zeros((16, 16), dtype=np.uint8))
    _save_png(tmp_path / "small.png", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(DataError, match=r"mixed image sizes.*big.png is 16x16.*small.png is 8x8"):
        load_image_folder(tmp_path)
    resized = load_image_folder(tmp_path, size=12)
    assert resized.image_shape == (1, 12, 12)
    _save_png(tmp_path / "colour.png", np.zeros((16, 16, 3), dtype=np.uint8))
    with pytest.raises(DataError, match=r"mixed channel counts.*big.png has 1.*colour.png has 3"):
        load_image_folder(tmp_path, size=12)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no image files"):
        load_image_folder(empty)
    (empty / "readme.md").write_text("hello")
    with pytest.raises(DataError, match="no image files"):
        load_image_folder(empty)
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "missing")

    broken = tmp_path / "broken"
    broken.mkdir()
    _save_png(broken / "fine.png", np.zeros((8, 8), dtype=np.uint8))
    (broken / "zz.png").write_bytes(b"this is not a PNG")
    with pytest.raises(DataError, match="zz.png"):
        load_image_folder(broken)
    (broken / "zz.png").unlink()
    np.save(broken / "nan.npy", np.full((8, 8), np.nan))
    with pytest.raises(DataError, match="nan.npy.*NaN"):
        load_image_folder(broken)


def test_fits_without_astropy_names_astropy(tmp_path, monkeypatch):
    (tmp_path / "x.fits").write_bytes(b"")
    for module in ("astropy", "astropy.io", "astropy.io.fits"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match="astropy"):
        load_image_folder(tmp_path)
