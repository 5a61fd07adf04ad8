"""Data sets with optional ground truth, and loaders for users' own files."""

from .datasets import DataError, ImageDataset, as_image_tensor
from .loaders import load_idx, load_images, load_npy, read_idx
from .mnist import mnist_digits, posed_mnist, rotated_mnist, rotated_translated_mnist

BUILTIN = {
    "rotated_mnist": lambda **kw: rotated_mnist(**kw),
    "rotated_translated_mnist": lambda **kw: rotated_translated_mnist(**kw),
    "uniform_rotated_mnist": lambda **kw: rotated_mnist(rotation="uniform", **kw),
    "uniform_rotated_translated_mnist": lambda **kw: rotated_translated_mnist(rotation="uniform", **kw),
}

__all__ = [
    "BUILTIN",
    "DataError",
    "ImageDataset",
    "as_image_tensor",
    "load_idx",
    "load_images",
    "load_npy",
    "read_idx",
    "mnist_digits",
    "posed_mnist",
    "rotated_mnist",
    "rotated_translated_mnist",
]
