import gzip
import math

import numpy as np
import pytest
import torch

from pyro_svae.data import (
    DataError,
    ImageDataset,
    as_image_tensor,
    load_idx,
    load_images,
    load_npy,
    posed_mnist,
    read_npy,
    rotated_mnist,
    rotated_translated_mnist,
)


def write_idx(path, array: np.ndarray, type_code: int = 0x08, gz: bool = False) -> None:
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_rotated_mnist_keeps_ground_truth_and_a_stratified_split():
    train, test = rotated_mnist()
    assert len(train) == 4000 and len(test) == 1000
    assert train.images.shape == (4000, 1, 28, 28) and train.images.dtype == torch.float32
    assert 0.0 <= float(train.images.min()) and float(train.images.max()) <= 1.0
    assert train.theta.shape == (4000,) and train.dx.shape == (4000, 2) and train.labels.shape == (4000,)
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert abs(float(train.theta.std()) - math.pi / 4) < 0.05
    assert float(train.dx.abs().max()) == 0.0


def test_splits_are_disjoint_and_reproducible():
    a_train, a_test = rotated_mnist(seed=3)
    b_train, _ = rotated_mnist(seed=3)
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_train.theta, b_train.theta)
    flat_train = {tuple(row) for row in a_train.theta[:, None].tolist()}
    assert not flat_train & {tuple(row) for row in a_test.theta[:, None].tolist()}


def test_head_split_is_the_reference_construction():
    train, test = posed_mnist(split="head")
    assert set(test.labels.tolist()) == {8, 9} and len(train) == 4000


def test_uniform_rotation_and_translation():
    train, _ = posed_mnist(rotation="uniform", translation_std=1.4, test_size=500)
    assert float(train.theta.min()) >= -math.pi and float(train.theta.max()) < math.pi
    assert float(train.theta.abs().mean()) > 1.2  # ~pi/2 for U[-pi, pi)
    pixel = 2 / 27
    assert abs(float(train.dx.std()) / pixel - 1.4) < 0.1
    _, test = rotated_translated_mnist(test_size=100)
    assert test.dx is not None and len(test) == 100


def test_posed_digits_match_their_pose():
    """An upright digit posed with the stored theta reproduces the stored image."""
    from pyro_svae.coords import transform_images
    from pyro_svae.data import mnist_digits

    upright, _ = mnist_digits()
    train, _ = posed_mnist(split="head", test_size=1000)
    index = torch.arange(5)
    source = torch.from_numpy(upright[train.source_index[index].numpy()]).unsqueeze(1)
    posed = transform_images(source, train.theta[index], train.dx[index])
    assert torch.allclose(posed.clamp(0, 1), train.images[index], atol=1e-5)


def test_splits_come_in_a_random_order_so_that_their_first_images_are_a_fair_sample():
    for split in ("stratified", "head"):
        train, test = posed_mnist(split=split)
        assert set(train.labels[:200].tolist()) == set(train.labels.tolist())  # head: 0-7 only
        assert not torch.equal(train.source_index, train.source_index.sort().values)
        assert set(train.source_index.tolist()).isdisjoint(test.source_index.tolist())


@pytest.mark.parametrize(
    "array, message",
    [
        (
            np.zeros((4, 5)),
            r"expected images of shape \(N, H, W\) or \(N, C, H, W\), found shape \(4, 5\)",
        ),
        (np.zeros((0, 5, 5)), "empty"),
        (np.full((3, 5, 5), np.nan), "NaN or Inf"),
        (np.array([[[np.inf, 0], [0, 0]]]), "NaN or Inf"),
        (np.array(["a", "b"]), "numeric"),
    ],
)
def test_bad_arrays_are_rejected_with_what_was_found(array, message):
    with pytest.raises(DataError, match=message):
        as_image_tensor(array)


def test_image_layouts_and_uint8_scaling():
    assert as_image_tensor(np.zeros((2, 7, 7))).shape == (2, 1, 7, 7)
    assert as_image_tensor(np.zeros((2, 3, 7, 7))).shape == (2, 3, 7, 7)
    assert as_image_tensor(np.zeros((2, 7, 7, 3))).shape == (2, 3, 7, 7)
    assert float(as_image_tensor(np.full((1, 2, 2), 255, np.uint8)).max()) == 1.0


def test_dataset_checks_ground_truth_shapes():
    with pytest.raises(DataError, match=r"theta: expected shape \(3,\)"):
        ImageDataset(np.zeros((3, 4, 4)), theta=np.zeros(4))


def test_idx_files_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8), dtype=np.uint8)
    labels = np.arange(6, dtype=np.uint8)
    write_idx(tmp_path / "imgs-idx3-ubyte", images)
    write_idx(tmp_path / "labels-idx1-ubyte.gz", labels, gz=True)
    data = load_images(tmp_path / "imgs-idx3-ubyte", labels=tmp_path / "labels-idx1-ubyte.gz")
    assert torch.allclose(data.images[:, 0], torch.from_numpy(images / 255.0).float())
    assert data.labels.tolist() == list(range(6))
    floats = np.random.default_rng(1).random((2, 3, 3)).astype(np.float32)
    write_idx(tmp_path / "f.idx", floats, type_code=0x0D)
    assert torch.allclose(load_idx(tmp_path / "f.idx").images[:, 0], torch.from_numpy(floats))


def test_corrupt_idx_files_are_rejected(tmp_path):
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="not an IDX file"):
        load_idx(tmp_path / "bad.idx")
    images = np.zeros((4, 5, 5), np.uint8)
    write_idx(tmp_path / "short.idx", images)
    (tmp_path / "short.idx").write_bytes((tmp_path / "short.idx").read_bytes()[:-7])
    with pytest.raises(DataError, match="announces shape"):
        load_idx(tmp_path / "short.idx")
    write_idx(tmp_path / "labels.idx", np.zeros(3, np.uint8))
    write_idx(tmp_path / "four.idx", images)
    with pytest.raises(DataError, match="expected 4 labels"):
        load_idx(tmp_path / "four.idx", labels=tmp_path / "labels.idx")


def test_npy_loader_reads_the_original_format(tmp_path):
    images = np.random.default_rng(0).random((5, 28, 28)).astype(np.float32)
    np.save(tmp_path / "images_train.npy", images)
    data = load_npy(tmp_path / "images_train.npy")
    assert data.images.shape == (5, 1, 28, 28) and data.name == "images_train.npy"
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="not a readable .npy"):
        load_images(tmp_path / "broken.npy")


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_images(tmp_path / "nothing.npy")
    (tmp_path / "x.tiff").write_bytes(b"")
    with pytest.raises(DataError, match="unknown image file format"):
        load_images(tmp_path / "x.tiff")


def test_subset_keeps_ground_truth():
    data = ImageDataset(np.zeros((4, 3, 3)), theta=np.arange(4.0), labels=np.arange(4))
    part = data.subset([3, 1])
    assert part.theta.tolist() == [3.0, 1.0] and part.labels.tolist() == [3, 1] and part.dx is None


def test_builtin_names_build_train_and_test_splits():
    from pyro_svae.data import BUILTIN

    train, test = BUILTIN["uniform_rotated_translated_mnist"](test_size=100)
    assert float(train.theta.abs().max()) > 3.0 and float(train.dx.abs().max()) > 0
    assert set(BUILTIN) >= {"rotated_mnist", "rotated_translated_mnist", "uniform_rotated_mnist"}


def test_npy_files_are_checked_against_their_header_before_reading(tmp_path):
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        load_npy(tmp_path / "empty.npy")
    with open(tmp_path / "huge.npy", "wb") as handle:  # a header claiming 1 TiB, then 400 bytes
        np.lib.format.write_array_header_1_0(
            handle, {"descr": "<f4", "fortran_order": False, "shape": (2**28, 32, 32)}
        )
        handle.write(bytes(400))
    with pytest.raises(DataError, match=r"1,099,511,627,776 bytes .* holds 400: truncated"):
        load_npy(tmp_path / "huge.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError, match="Python objects"):
        load_npy(tmp_path / "objects.npy")
    np.save(tmp_path / "ok.npy", np.zeros((3, 4, 4), np.float32))
    assert read_npy(tmp_path / "ok.npy", mmap=True).shape == (3, 4, 4)
