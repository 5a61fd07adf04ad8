"""Data sets with optional ground truth, and loaders for users' own files."""

from .datasets import DataError, ImageDataset, as_image_tensor
from .galaxies import hubble_deep_field, simulated_galaxies
from .loaders import load_idx, load_image_folder, load_images, load_npy, read_idx
from .mnist import mnist_digits, posed_mnist, rotated_mnist, rotated_translated_mnist
from .particles import (
    circular_mask,
    fourier_crop,
    load_particles,
    normalize_particles,
    pose_to_relion,
    preprocess_particles,
    read_stack,
    read_star,
    relion_to_pose,
    write_particles,
    write_posterior_star,
)
from .simulate import hinge_model, hinge_weights, read_atomic_model, read_density_map, simulate_particles

BUILTIN = {
    "rotated_mnist": lambda **kw: rotated_mnist(**kw),
    "rotated_translated_mnist": lambda **kw: rotated_translated_mnist(**kw),
    "uniform_rotated_mnist": lambda **kw: rotated_mnist(rotation="uniform", **kw),
    "uniform_rotated_translated_mnist": lambda **kw: rotated_translated_mnist(rotation="uniform", **kw),
    "hubble_deep_field": lambda **kw: hubble_deep_field(**kw),
}

__all__ = [
    "BUILTIN",
    "DataError",
    "ImageDataset",
    "as_image_tensor",
    "hubble_deep_field",
    "simulated_galaxies",
    "load_image_folder",
    "load_idx",
    "load_images",
    "load_npy",
    "read_idx",
    "mnist_digits",
    "posed_mnist",
    "rotated_mnist",
    "rotated_translated_mnist",
    "read_stack",
    "read_star",
    "load_particles",
    "write_particles",
    "write_posterior_star",
    "circular_mask",
    "normalize_particles",
    "fourier_crop",
    "preprocess_particles",
    "relion_to_pose",
    "pose_to_relion",
    "hinge_model",
    "hinge_weights",
    "read_atomic_model",
    "read_density_map",
    "simulate_particles",
]
