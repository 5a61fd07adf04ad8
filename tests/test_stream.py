"""Particles left on disk (pyro_svae.data.stream): the same images as reading them into memory."""

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from pyro_svae import AmortizedGuide, SpatialVAE, fit, runs
from pyro_svae.data import DataError, ParticleImages, load_particles, preprocess_particles, stack_file


def _stack(path, images):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(images, dtype=np.float32))
        mrc.set_image_stack()
        mrc.voxel_size = 2.0
    return path


@pytest.fixture
def two_stacks(tmp_path):
    """A STAR file over two stacks, its rows interleaving them out of order; the images it names."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 12, 12)), rng.normal(size=(5, 12, 12))
    _stack(tmp_path / "a.mrcs", a)
    np.save(tmp_path / "b.npy", b.astype(">f8"))  # another format, byte order and type
    names = [f"{k}@a.mrcs" for k in (3, 1, 7, 2)] + [f"{k}@b.npy" for k in (5, 1, 2)] + ["4@a.mrcs"]
    table = pd.DataFrame({"rlnImageName": names, "rlnImagePixelSize": 2.0})
    starfile.write({"particles": table}, tmp_path / "p.star")
    expected = np.stack([a[2], a[0], a[6], a[1], b[4], b[0], b[1], a[3]])
    return tmp_path / "p.star", expected


def test_streamed_particles_are_the_images_read_into_memory(two_stacks):
    star, expected = two_stacks
    in_memory = load_particles(star)
    streamed = load_particles(star, stream=True)
    assert isinstance(streamed.images, ParticleImages) and streamed.images.shape == (8, 1, 12, 12)
    np.testing.assert_allclose(in_memory.images[:, 0].numpy(), expected, rtol=1e-6)
    torch.testing.assert_close(streamed.images[:], in_memory.images)
    for key in ([5, 0, 7, 5], slice(1, None, 3), torch.tensor([6, 2]), np.array([4])):
        torch.testing.assert_close(streamed.images[key], in_memory.images[key])
    assert streamed.images[3].shape == (1, 12, 12)
    subset = streamed.subset([6, 1, 4])  # a selection reads nothing until indexed
    assert isinstance(subset.images, ParticleImages)
    torch.testing.assert_close(subset.images[:], in_memory.images[[6, 1, 4]])
    assert subset.source_index.tolist() == [6, 1, 4]


def test_streamed_preprocessing_equals_the_in_memory_one(two_stacks):
    star, _ = two_stacks
    options = {"box": 8, "invert": True, "mask_radius": 3.0}
    in_memory = preprocess_particles(load_particles(star), **options)
    streamed = preprocess_particles(load_particles(star, stream=True), **options)
    assert streamed.images.shape == (8, 1, 8, 8) and streamed.info["box_size"] == 8
    torch.testing.assert_close(streamed.images[:], in_memory.images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(streamed.images.cached(batch_size=3), in_memory.images, rtol=1e-5, atol=1e-5)
    batches = list(streamed.images.split(3))
    assert [len(batch) for batch in batches] == [3, 3, 2]


def test_bad_stacks_are_refused_at_the_header_and_bad_pixels_when_read(tmp_path):
    path = _stack(tmp_path / "s.mrcs", np.ones((4, 10, 10)))
    truncated = tmp_path / "t.mrcs"
    truncated.write_bytes(path.read_bytes()[: 1024 + 150])
    with pytest.raises(DataError, match="t.mrcs: truncated"):
        stack_file(truncated)
    with pytest.raises(DataError, match="expected square images, found 4x6"):
        stack_file(_stack(tmp_path / "rect.mrcs", np.zeros((2, 4, 6))))
    images = np.random.default_rng(1).normal(size=(6, 10, 10)).astype(np.float32)
    images[4, 3, 3] = np.nan
    with pytest.warns(RuntimeWarning, match="NaN"):  # mrcfile's, on writing
        path = _stack(tmp_path / "nan.mrcs", images)
    streamed = ParticleImages.from_stack(path)
    assert streamed[:4].shape == (4, 1, 10, 10)  # the other particles read fine
    with pytest.raises(DataError, match=r"particle 4 \(image 5 of .*nan\.mrcs\) holds NaN"):
        streamed[2:6]


def test_particle_specs_stream_and_cache_as_asked(two_stacks):
    star, _ = two_stacks
    never = runs.load_data(runs.particle_spec(star, cache="never", test_size=2, normalize=False))
    auto = runs.load_data(runs.particle_spec(star, test_size=2, normalize=False))
    assert all(isinstance(data.images, ParticleImages) for data in never)
    assert all(isinstance(data.images, torch.Tensor) for data in auto)  # 3 KB: cached
    for lazy, cached in zip(never, auto, strict=True):
        torch.testing.assert_close(lazy.images[:], cached.images)
    with pytest.raises(ValueError, match="--cache-images must be one of auto, always, never"):
        runs.particle_spec(star, cache="sometimes")


def test_fit_trains_on_particles_read_batch_by_batch(two_stacks):
    star, _ = two_stacks
    train, test = runs.load_data(runs.particle_spec(star, cache="never", test_size=2, normalize=False))
    model = SpatialVAE(train.image_shape, 2, hidden_dim=8, likelihood="gaussian")
    guide = AmortizedGuide(model, hidden_dim=8)
    history = fit(model, guide, train, test=test, epochs=2, batch_size=3, progress=False)
    assert len(history) == 2 and all(np.isfinite(history.values("elbo", "test")))
