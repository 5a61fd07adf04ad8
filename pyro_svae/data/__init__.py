"""Data sets with optional ground truth, and loaders for users' own files."""

import numpy as np

from .cryosparc import read_cs, write_class_cs, write_posterior_cs
from .datasets import DataError, ImageDataset, LazyImages, as_image_tensor
from .galaxies import hubble_deep_field, simulated_galaxies
from .loaders import load_idx, load_image_folder, load_images, load_npy, read_idx, read_npy
from .mnist import mnist_digits, posed_mnist, rotated_mnist, rotated_translated_mnist
from .particles import (
    circular_mask,
    fourier_crop,
    load_particles,
    normalize_particles,
    pose_to_relion,
    posterior_pose_note,
    preprocess_particles,
    read_indices,
    read_stack,
    read_star,
    relion_to_pose,
    write_class_star,
    write_particles,
    write_posterior_star,
)
from .simulate import hinge_model, hinge_weights, read_atomic_model, read_density_map, simulate_particles
from .stream import ParticleImages, stack_file


def _split(full: ImageDataset, *, test_size: int, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """A seeded random train/test split of a simulated set (``test_size`` images held out)."""
    if not 0 < test_size < len(full):
        raise DataError(f"test_size must be between 1 and {len(full) - 1}, got {test_size}")
    order = np.random.default_rng(seed).permutation(len(full))
    train, test = full.subset(np.sort(order[test_size:])), full.subset(np.sort(order[:test_size]))
    train.name, test.name = f"{full.name}/train", f"{full.name}/test"
    return train, test


def _simulated_galaxies(*, seed: int = 0, test_size: int = 200) -> tuple[ImageDataset, ImageDataset]:
    # 2,000 GalSim bulge+disk galaxies (64 x 64 RGB, uniform rotation, scale 1-2): about 10 s to draw
    return _split(simulated_galaxies(2000, seed=seed), test_size=test_size, seed=seed)


def _simulated_particles(*, seed: int = 0, test_size: int = 200) -> tuple[ImageDataset, ImageDataset]:
    # 2,000 hinge particles, 32 x 32 at 2.2 Å, uniform in-plane rotation, SNR 1, no CTF: under a second
    full = simulate_particles(2000, box=32, snr=1.0, ctf=False, seed=seed, keep_clean=False)
    return _split(full, test_size=test_size, seed=seed)


# Built-in data sets by name: each ``(**kw) -> (train, test)`` with keywords ``seed`` and ``test_size``.
BUILTIN = {
    "rotated_mnist": lambda **kw: rotated_mnist(**kw),
    "rotated_translated_mnist": lambda **kw: rotated_translated_mnist(**kw),
    "uniform_rotated_mnist": lambda **kw: rotated_mnist(rotation="uniform", **kw),
    "uniform_rotated_translated_mnist": lambda **kw: rotated_translated_mnist(rotation="uniform", **kw),
    "hubble_deep_field": lambda **kw: hubble_deep_field(**kw),
    "hubble_galaxies": lambda **kw: hubble_deep_field(**kw),
    "simulated_galaxies": _simulated_galaxies,
    "simulated_particles": _simulated_particles,
}
# Built-ins that are cryo-EM particles (the command line gives them particle defaults)
PARTICLE_BUILTINS = ("simulated_particles",)

__all__ = [
    "LazyImages",
    "ParticleImages",
    "stack_file",
    "BUILTIN",
    "PARTICLE_BUILTINS",
    "DataError",
    "ImageDataset",
    "as_image_tensor",
    "hubble_deep_field",
    "simulated_galaxies",
    "load_image_folder",
    "load_idx",
    "load_images",
    "load_npy",
    "read_npy",
    "read_idx",
    "mnist_digits",
    "posed_mnist",
    "rotated_mnist",
    "rotated_translated_mnist",
    "read_indices",
    "read_cs",
    "write_posterior_cs",
    "write_class_cs",
    "write_class_star",
    "read_stack",
    "read_star",
    "load_particles",
    "write_particles",
    "write_posterior_star",
    "posterior_pose_note",
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
