"""Train spatial-VAE (or the vanilla-VAE baseline) and write a run folder.

With no options: the built-in rotated MNIST, a CPU-sized network (2 x 128 tanh), z_dim 2, rotation and
translation inference, a few minutes on a 2-core CPU. ``--resume RUN`` continues an interrupted run.

Cryo-EM particles (``--particles FILE.star``, or a stack with ``--ctf FILE.star``; also the built-in
``simulated_particles``) get particle defaults: a Gaussian likelihood (sigma 1, on particles normalized
to a unit-variance background), the CTF in the model when the data carry one (``--no-ctf`` to ignore it),
and a rotation prior of std pi (in-plane rotations are uniform). The run folder then also holds
``particles.star``: every input particle with its posterior pose, content and their standard deviations.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyro
import torch

from .. import distributed, runs
from ..checkpoint import load_checkpoint
from ..configs import GuideConfig, ModelConfig, TrainConfig, check_compatible
from ..data import posterior_pose_note
from ..decoders import ACTIVATIONS
from ..guides import AmortizedGuide
from ..infer import DivergenceError, History, fit
from ..lattice import BIN_RENDERS
from ..likelihoods import LIKELIHOODS
from ..model import SpatialVAE
from ..objectives import DEFAULT_DISTILL_BINS
from ..pose_search import PoseSearchGuide
from ..runtime import PRECISIONS, check_precision, resolve_device, resolve_precision, retain_freed_memory
from ._common import (
    DEVICE_HELP,
    EXIT_USAGE,
    InterruptGuard,
    UsageError,
    device_type,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)

__all__ = ["add_args", "main", "DEFAULTS"]

DEFAULTS: dict[str, Any] = {
    "data": "rotated_mnist",
    "z_dim": 2,
    "hidden_dim": 128,
    "num_layers": 2,
    "activation": "tanh",
    "theta_prior": math.pi / 4,
    "dx_prior": 0.1,
    "likelihood": "bernoulli",
    "scale_prior": 0.25,
    # bf16 autocast where the hardware multiplies bf16 natively: measured 2.3x the fp32 step at the paper's
    # size on this project's CPU, with test ELBO and theta recovery equal to fp32's within 0.02 nat / 0.002
    # (benchmarks/throughput.py --speed, benchmarks/quality.py --precision); fp32 elsewhere
    "precision": "auto",
    # small batches and a larger step: the spatial decoder gains far more from more steps than from
    # bigger batches (measured on rotated MNIST, 20 epochs: test ELBO -175.7 at 25 / 2e-3 against about
    # -205 at 100 / 1e-3), and an epoch costs no more
    "learning_rate": 2e-3,
    "batch_size": 25,
    "epochs": 20,
    "device": "auto",
    "seed": 0,
    "eval_particles": 16,
    "posterior_draws": 100,
    "runs_dir": "runs",
    "pose_search_mode": "enumerate",
}
# Defaults that differ for cryo-EM particles (--particles, or a particle built-in). The pose search sums
# the rotation bins out in the model: on the hinge at SNR 0.1 with CTF (benchmarks/cryoem.py, 16 bins)
# |rho| 0.83 and theta cc 0.78 at 5,000 particles and 10 epochs, against 0.76 / 0.25 with the encoder's bins
# after 8 (and 0.81 / 0.79 against 0.72 / 0.60 at 2,000 particles, 10 epochs).
PARTICLE_DEFAULTS: dict[str, Any] = {
    "likelihood": "gaussian",
    "theta_prior": math.pi,
    "pose_search": 16,
    "pose_search_mode": "marginal",
    "pose_search_channels": 16,
    "pose_search_copy_size": 16,
}

# Options a resumed run may change; every other setting comes from the run's config.json.
RESUMABLE = ("epochs", "device", "no_progress", "resume", "distributed", "precision", "learning_rate")


@dataclasses.dataclass(frozen=True)
class Option:
    """One ``pyro-svae train`` option: its argparse entry and what it sets.

    ``target``: the fields the option's value goes to, ``"section.field"``: the run's configs (``model``,
    ``guide``, ``training``) or its data spec (``data``: a keyword of :func:`~pyro_svae.runs.data_spec`,
    ``particles``: of :func:`~pyro_svae.runs.particle_spec`); ``None`` for options the CLI reads itself
    (run folder, device). ``convert`` maps a given value to the field's (``--no-rotate`` ->
    ``rotate=False``). ``default=None`` is the placeholder of an option not given (its default comes
    from :data:`DEFAULTS`, or the config's or the data spec's own)."""

    flags: tuple[str, ...]
    group: str
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None
    action: str | None = None
    default: Any = None
    target: str | tuple[str, ...] | None = None
    convert: Callable[[Any], Any] | None = None

    @property
    def dest(self) -> str:
        return next(f for f in self.flags if f.startswith("--"))[2:].replace("-", "_")

    @property
    def targets(self) -> tuple[str, ...]:
        return (self.target,) if isinstance(self.target, str) else self.target or ()

    def add_to(self, group: argparse._ArgumentGroup) -> None:
        extra = {k: getattr(self, k) for k in ("type", "choices", "metavar", "action") if getattr(self, k)}
        group.add_argument(*self.flags, default=self.default, help=self.help, **extra)


_d = DEFAULTS
_off = lambda given: not given  # noqa: E731 - a --no-X flag given sets X=False
_DATA, _CRYO, _MODEL, _TRAINING, _RUN = "data", "cryo-EM particles", "model", "training", "run folder"
#: the target sections that are the run's configs (the others, ``data`` and ``particles``, its data spec)
_CONFIG_SECTIONS = ("model", "guide", "training")
OPTIONS: tuple[Option, ...] = (
    # data
    Option(
        ("--data",),
        _DATA,
        "a built-in data set (rotated_mnist, rotated_translated_mnist, uniform_rotated_mnist, "
        "hubble_galaxies, simulated_galaxies, simulated_particles), an image file: .npy (N, H, W) / "
        "(N, C, H, W) or MNIST IDX, or a folder of PNG/JPEG/.npy/FITS cut-outs of one size "
        f"(default: {_d['data']})",
        metavar="NAME|FILE|DIR",
        target="data.data",
    ),
    Option(
        ("--labels",),
        _DATA,
        "class labels of --data (.npy or IDX), optional",
        metavar="FILE",
        target="data.labels",
    ),
    Option(
        ("--test-data",),
        _DATA,
        "test images (default: hold out --test-size of --data)",
        metavar="FILE",
        target="data.test_data",
    ),
    Option(
        ("--test-labels",), _DATA, "class labels of --test-data", metavar="FILE", target="data.test_labels"
    ),
    Option(
        ("--test-size",),
        _DATA,
        "images held out for testing: a count, or a fraction when below 1 (default: 10%% of a "
        "file; 1000 for a built-in data set)",
        type=positive_float,
        metavar="N",
        target=("data.test_size", "particles.test_size"),
    ),
    Option(
        ("--train-size",),
        _DATA,
        "use only the first N training images (quick trials)",
        type=positive_int,
        metavar="N",
        target=("data.train_size", "particles.train_size"),
    ),
    # cryo-EM particles
    Option(
        ("--particles",),
        _CRYO,
        "particle images: a RELION .star or cryoSPARC .cs file (CTF from its columns) or an "
        ".mrcs/.mrc/.npy stack (then --ctf gives its CTF rows)",
        metavar="FILE",
        target="particles.particles",
    ),
    Option(
        ("--ctf",),
        _CRYO,
        "CTF parameters of a --particles stack, one row per image",
        metavar="FILE.star",
        target="particles.ctf",
    ),
    Option(
        ("--ind",),
        _CRYO,
        "train on these particles only: 0-based indices, .npy or .txt (as cryoDRGN's --ind)",
        metavar="FILE",
        target="particles.ind",
    ),
    Option(
        ("--cache-images",),
        _CRYO,
        "read the particles into memory once: 'auto' when they take at most 1 GiB, else they are read "
        "from their stacks batch by batch (default: auto)",
        choices=runs.CACHE_CHOICES,
        target="particles.cache",
    ),
    Option(
        ("--pixel-size",),
        _CRYO,
        "pixel size in Å where the files do not give it (STAR optics, MRC header)",
        type=positive_float,
        metavar="A",
        target="particles.pixel_size",
    ),
    Option(
        ("--no-ctf",),
        _CRYO,
        "ignore the CTF even when the particles carry one (default: model it when present)",
        action="store_true",
        target="particles.use_ctf",
        convert=_off,
    ),
    Option(
        ("--box",),
        _CRYO,
        "Fourier-crop the particles to N x N pixels",
        type=positive_int,
        metavar="N",
        target="particles.box",
    ),
    Option(
        ("--no-normalize",),
        _CRYO,
        "keep pixel values (default: zero mean, unit std of each particle's background)",
        action="store_true",
        target="particles.normalize",
        convert=_off,
    ),
    Option(
        ("--invert",),
        _CRYO,
        "multiply the particles by -1 (dark -> light)",
        action="store_true",
        target="particles.invert",
    ),
    Option(
        ("--mask-radius",),
        _CRYO,
        "normalization: the background lies outside this radius, pixels of the (cropped) box "
        "(default: 0.75 x box / 2, RELION's)",
        type=positive_float,
        metavar="PX",
        target="particles.mask_radius",
    ),
    # model
    Option(
        ("-z", "--z-dim"),
        _MODEL,
        f"dimension of the content z (default: {_d['z_dim']})",
        type=positive_int,
        metavar="N",
        target="model.z_dim",
    ),
    Option(
        ("--hidden-dim",),
        _MODEL,
        f"hidden units of encoder and decoder layers (default: {_d['hidden_dim']})",
        type=positive_int,
        metavar="N",
        target=("model.hidden_dim", "guide.hidden_dim"),
    ),
    Option(
        ("--num-layers",),
        _MODEL,
        f"hidden layers of encoder and decoder (default: {_d['num_layers']})",
        type=positive_int,
        metavar="N",
        target=("model.num_layers", "guide.num_layers"),
    ),
    Option(
        ("--encoder-hidden-dim", "--q-hidden-dim"),
        _MODEL,
        "hidden units of the encoder (default: --hidden-dim)",
        type=positive_int,
        metavar="N",
        target="guide.hidden_dim",
    ),
    Option(
        ("--encoder-layers", "--q-num-layers"),
        _MODEL,
        "hidden layers of the encoder (default: --num-layers)",
        type=positive_int,
        metavar="N",
        target="guide.num_layers",
    ),
    Option(
        ("--decoder-hidden-dim", "--p-hidden-dim"),
        _MODEL,
        "hidden units of the decoder (default: --hidden-dim)",
        type=positive_int,
        metavar="N",
        target="model.hidden_dim",
    ),
    Option(
        ("--decoder-layers", "--p-num-layers"),
        _MODEL,
        "hidden layers of the decoder (default: --num-layers)",
        type=positive_int,
        metavar="N",
        target="model.num_layers",
    ),
    Option(
        ("-a", "--activation"),
        _MODEL,
        f"activation function (default: {_d['activation']})",
        choices=tuple(sorted(ACTIVATIONS)),
        target=("model.activation", "guide.activation"),
    ),
    Option(
        ("--vanilla",),
        _MODEL,
        "the baseline VAE: a decoder that sees z only, no pose inference",
        action="store_true",
        target="model.vanilla",
    ),
    Option(
        ("--no-rotate",),
        _MODEL,
        "do not infer rotation",
        action="store_true",
        target="model.rotate",
        convert=_off,
    ),
    Option(
        ("--no-translate",),
        _MODEL,
        "do not infer translation",
        action="store_true",
        target="model.translate",
        convert=_off,
    ),
    Option(
        ("--theta-prior",),
        _MODEL,
        f"standard deviation of the rotation prior, radians (default: pi/4 = {_d['theta_prior']:.4f})",
        type=positive_float,
        metavar="STD",
        target="model.theta_prior_std",
    ),
    Option(
        ("--dx-prior", "--dx-scale"),
        _MODEL,
        "standard deviation of the translation prior, grid units (the image spans [-1, 1]) "
        f"(default: {_d['dx_prior']})",
        type=positive_float,
        metavar="STD",
        target="model.dx_prior_std",
    ),
    Option(
        ("--likelihood",),
        _MODEL,
        f"pixel observation model (default: {_d['likelihood']}; gaussian for particles)",
        choices=tuple(sorted(LIKELIHOODS)),
        target="model.likelihood",
    ),
    Option(
        ("--scale",),
        _MODEL,
        "also infer a magnification per image (a 'scale' pose site, e.g. for galaxies)",
        action="store_true",
        target="model.scale",
    ),
    Option(
        ("--scale-prior",),
        _MODEL,
        f"std of the log-normal scale prior (with --scale; default: {_d['scale_prior']})",
        type=positive_float,
        metavar="STD",
        target="model.scale_prior_std",
    ),
    Option(
        ("--learn-scale-prior",),
        _MODEL,
        "fit the location of the log-normal scale prior (with --scale): the decoder picks its own "
        "unit of size",
        action="store_true",
        target="model.scale_prior",
        convert=lambda given: "learned",
    ),
    Option(
        ("--psf-fwhm",),
        _MODEL,
        "blur the rendered image by a round Gaussian point-spread function of this FWHM before the "
        "likelihood (telescope images: the decoder learns the galaxy before the optics; Gaussian "
        "likelihoods only)",
        type=positive_float,
        metavar="PIXELS",
        target="model.psf_fwhm",
    ),
    Option(
        ("--coord-frequency",),
        _MODEL,
        "multiply the spatial decoder's initial coordinate weights by F (about 1 / object size in "
        "grid units; e.g. 10 for galaxies that fill a tenth of the cut-out; default 1)",
        type=positive_float,
        metavar="F",
        target="model.coord_frequency",
    ),
    Option(
        ("--augment-rotation",),
        _MODEL,
        "turn each training image by a random angle before the encoder and turn q(theta, dx) "
        "back (the original code's augmentation)",
        action="store_true",
        target="guide.augment_rotation",
    ),
    Option(
        ("--canonicalize",),
        _MODEL,
        "moments: the encoder reads each image turned and centred by its light's second moments "
        "(major axis along x) and q(theta, dx) is mapped back; for objects with a long axis (galaxies)",
        choices=("moments",),
        target="guide.canonicalize",
    ),
    Option(
        ("--pose-search",),
        _MODEL,
        "search rotations over K bins: a discrete rotation site, enumerated exactly (for uniformly "
        "rotated data; particles search 16 bins unless given 0, which turns the search off)",
        type=non_negative_int,
        metavar="K",
        target="model.rotation_bins",
        convert=lambda bins: bins or None,
    ),
    Option(
        ("--pose-search-render",),
        _MODEL,
        "with --pose-search in marginal mode, how the model renders its bins: 'lattice' (default: each "
        "image rendered once and every bin read from it, about one decoder pass at any K; a round field "
        "of view), 'lattice_full' (the lattice over every turn of the square, about 2.4 passes) or "
        "'exact' (the decoder at every bin, K passes)",
        choices=BIN_RENDERS,
        target="model.bin_render",
    ),
    Option(
        ("--pose-search-encoder",),
        _MODEL,
        "with --pose-search, the guide's encoder: 'equivariant' (a CNN over K turned copies of each "
        "image; default) or 'mlp' (the paper's network, K times cheaper; in marginal mode its bin "
        "logits are fitted to the search's)",
        choices=("equivariant", "mlp"),
        target="guide.encoder",
    ),
    Option(
        ("--pose-search-channels",),
        _MODEL,
        "with --pose-search, the equivariant encoder's CNN channels (default: 32; 16 for particles)",
        type=positive_int,
        metavar="C",
        target="guide.channels",
    ),
    Option(
        ("--pose-search-copy-size",),
        _MODEL,
        "with --pose-search, the equivariant encoder turns copies of each image resampled to at most N "
        "pixels on a side: its K copies are most of a search's cost (default: the image's size; 16 for "
        "particles)",
        type=positive_int,
        metavar="N",
        target="guide.copy_size",
    ),
    Option(
        ("--pose-search-distill",),
        _MODEL,
        "with --pose-search in marginal mode, the weight of the encoder's fit to the search's bins in "
        f"every step, so that it poses images alone (default: {DEFAULT_DISTILL_BINS:g}; 0: the plain ELBO)",
        type=non_negative_float,
        metavar="W",
        target="guide.distill_bins",
    ),
    Option(
        ("--pose-search-mode",),
        _MODEL,
        "with --pose-search: 'enumerate' (the encoder scores the bins, TraceEnum_ELBO sums over them; "
        "default for images) or 'marginal' (the model sums the bins out and its likelihood at every bin "
        "picks the pose, the guide gives z, the offset within a bin and the shift; default for particles)",
        choices=("enumerate", "marginal"),
        target="guide.mode",
    ),
    Option(
        ("--pixel-subsample",),
        _MODEL,
        "score K random pixels per image in training steps (an unbiased, cheaper ELBO; the "
        "spatial decoder without CTF only)",
        type=positive_int,
        metavar="K",
        target="model.pixel_subsample",
    ),
    Option(
        ("--compile",),
        _MODEL,
        "run the spatial decoder through torch.compile (pays on GPUs and long runs)",
        action="store_true",
        target="model.compile",
    ),
    # training
    Option(
        ("-l", "--learning-rate"),
        _TRAINING,
        f"Adam learning rate (default: {_d['learning_rate']:g})",
        type=positive_float,
        metavar="LR",
        target="training.learning_rate",
    ),
    Option(
        ("--batch-size", "--minibatch-size"),
        _TRAINING,
        f"images per step (default: {_d['batch_size']})",
        type=positive_int,
        metavar="B",
        target="training.batch_size",
    ),
    Option(
        ("--epochs", "--num-epochs"),
        _TRAINING,
        f"passes over the training images; with --resume, the new total (default: {_d['epochs']})",
        type=non_negative_int,
        metavar="N",
        target="training.epochs",
    ),
    Option(("-d", "--device"), _TRAINING, DEVICE_HELP, type=device_type, metavar="DEVICE"),
    Option(
        ("--precision",),
        _TRAINING,
        "arithmetic of the networks' training steps: fp32, or autocast to bf16 (CPU or GPU) or "
        "fp16 (GPU); auto: bf16 where the hardware multiplies bf16 natively, else fp32 (config.json "
        f"records which); the test ELBO is always computed in fp32 (default: {_d['precision']})",
        choices=(*PRECISIONS, "auto"),
    ),
    Option(
        ("--distributed",),
        _TRAINING,
        "data-parallel over the processes torchrun starts (one per GPU on CUDA); launch with "
        "`torchrun --nproc-per-node N $(which pyro-svae) train --distributed ...`",
        action="store_true",
        default=False,
    ),
    Option(
        ("--seed",),
        _TRAINING,
        f"random seed (default: {_d['seed']})",
        type=non_negative_int,
        metavar="N",
        target="training.seed",
    ),
    Option(
        ("--init-output-bias",),
        _TRAINING,
        "start the decoder at the training images' mean (its output bias; not with a CTF): "
        "saves the first epochs at small learning rates",
        action="store_true",
        target="training.init_output_bias",
    ),
    Option(
        ("--eval-particles",),
        _TRAINING,
        "posterior samples per test image for the final ELBO and importance-weighted bound "
        f"(default: {_d['eval_particles']})",
        type=positive_int,
        metavar="K",
        target="training.eval_particles",
    ),
    Option(
        ("--posterior-draws",),
        _TRAINING,
        f"posterior draws per test image saved in posterior.nc (default: {_d['posterior_draws']})",
        type=positive_int,
        metavar="S",
        target="training.posterior_draws",
    ),
    # run folder
    Option(
        ("-o", "--out"), _RUN, f"run folder (default: a new folder under {_d['runs_dir']}/)", metavar="DIR"
    ),
    Option(("--overwrite",), _RUN, "replace the run files already in --out", action="store_true"),
    Option(
        ("--resume",),
        _RUN,
        "continue the run in folder RUN from its last checkpoint (its config.json fixes every "
        "setting but --epochs, --device, --precision and --learning-rate)",
        metavar="RUN",
    ),
    Option(
        ("--no-progress",),
        _RUN,
        "no progress bar (it only shows on a terminal)",
        action="store_true",
        default=False,
    ),
    Option(
        ("--return-freed-memory",),
        _RUN,
        "hand memory freed by each step back to the OS (the C library's default); without it the "
        "process keeps it for the next step, which saves re-faulting large activations (Linux)",
        action="store_true",
        default=False,
    ),
)
#: option name -> its entry in :data:`OPTIONS`
_BY_DEST = {option.dest: option for option in OPTIONS}
#: the options a user sets (``None`` when not given); the on/off switches of the process are not settings
_OPTION_KEYS = tuple(o.dest for o in OPTIONS if o.default is None and o.dest != "resume")
_PARTICLE_OPTIONS = tuple(o.dest for o in OPTIONS if o.group == _CRYO and o.dest != "particles")


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options mirror the original spatial-VAE scripts (aliases in brackets); one entry of
    :data:`OPTIONS` each."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in OPTIONS:
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(option.group)
        option.add_to(groups[option.group])


def _given(args: argparse.Namespace) -> list[str]:
    """Options given on the command line (those whose value is not the ``None`` placeholder)."""
    return [key for key, value in vars(args).items() if key in _OPTION_KEYS and value is not None]


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _value(args: argparse.Namespace, key: str) -> Any:
    value = getattr(args, key)
    return DEFAULTS[key] if value is None else value


def _check_contradictions(args: argparse.Namespace) -> None:
    if args.vanilla:
        pose = [k for k in ("theta_prior", "dx_prior") if getattr(args, k) is not None]
        if pose:
            raise UsageError(
                f"--vanilla has no pose latents, so {' and '.join(map(_flag, pose))} cannot apply"
            )
    if args.no_rotate and args.theta_prior is not None:
        raise UsageError("--no-rotate turns rotation off, so --theta-prior cannot apply")
    if args.no_translate and args.dx_prior is not None:
        raise UsageError("--no-translate turns translation off, so --dx-prior cannot apply")
    if args.particles is not None:
        files = [k for k in ("data", "labels", "test_data", "test_labels") if getattr(args, k) is not None]
        if files:
            raise UsageError(
                f"--particles gives the data, so {' and '.join(map(_flag, files))} cannot apply "
                "(hold particles out for testing with --test-size)"
            )
    else:
        particle_only = [k for k in _PARTICLE_OPTIONS if getattr(args, k) is not None]
        if particle_only:
            raise UsageError(f"{', '.join(map(_flag, particle_only))} apply to --particles only")
    if args.ctf is not None and args.no_ctf:
        raise UsageError("--ctf gives the CTF, --no-ctf ignores it: give one of them")
    if args.no_normalize and args.mask_radius is not None:
        raise UsageError(
            "--mask-radius sets the normalization background, so it cannot go with --no-normalize"
        )
    for key in ("scale_prior", "learn_scale_prior"):
        if getattr(args, key) is not None and not args.scale:
            raise UsageError(f"{_flag(key)} is about the prior of the scale site: add --scale")
    pose_off = "--vanilla" if args.vanilla else "--no-rotate" if args.no_rotate else None
    for key in ("augment_rotation", "canonicalize"):  # the guide's config does not know the model's pose
        if getattr(args, key) is not None and pose_off:
            raise UsageError(f"{pose_off} turns rotation off, so {_flag(key)} cannot apply")
    if args.pose_search == 1:
        raise UsageError("--pose-search needs at least 2 rotation bins (or 0: no search), got 1")


def _check_search_options(args: argparse.Namespace, searching: bool, *, ctf: bool) -> None:
    """Options of the rotation search need one (``searching``: the run has rotation bins, given or by
    the particles' default); the amortized guide's options need none (pixel subsampling with a CTF is
    left to the model's rule, which refuses it with or without a search)."""
    for key in (
        "pose_search_mode",
        "pose_search_render",
        "pose_search_encoder",
        "pose_search_channels",
        "pose_search_copy_size",
        "pose_search_distill",
    ):
        if getattr(args, key) is not None and not searching:
            raise UsageError(f"{_flag(key)} is about the rotation search: add --pose-search K")
    amortized_only = ("augment_rotation", "canonicalize") + (() if ctf else ("pixel_subsample",))
    for key in amortized_only:
        if getattr(args, key) is not None and searching and args.pose_search is None:
            raise UsageError(
                f"particles search rotations by default (--pose-search {PARTICLE_DEFAULTS['pose_search']}), "
                f"which {_flag(key)} does not go with: add --pose-search 0 to train the amortized guide"
            )


def _target_fields(
    args: argparse.Namespace, defaults: dict[str, Any], sections: tuple[str, ...] = _CONFIG_SECTIONS
) -> dict[str, dict[str, Any]]:
    """The fields of ``sections`` the options set, through :data:`OPTIONS`' targets. An option not given
    takes its value from ``defaults``, else leaves the config's (the data spec's) own default; a later
    option of the table overrides an earlier one of the same field (``--decoder-hidden-dim`` over
    ``--hidden-dim``)."""
    fields: dict[str, dict[str, Any]] = {section: {} for section in sections}
    for option in OPTIONS:
        value = getattr(args, option.dest)
        if value is None and option.dest not in defaults:
            continue
        if value is None:
            value = defaults[option.dest]
        elif option.convert is not None:
            value = option.convert(value)
        for target in option.targets:
            section, field = target.split(".")
            if section in fields:
                fields[section][field] = value
    return fields


def _configs(
    args: argparse.Namespace,
    image_shape: tuple[int, ...],
    *,
    defaults: dict[str, Any],
    ctf: bool,
    device: torch.device,
) -> tuple[ModelConfig, GuideConfig, TrainConfig]:
    """The run's configurations from the options; the rules between options are the config classes'
    (their ``ValueError`` reported as a usage error naming the flags)."""
    fields = _target_fields(args, defaults)
    model, guide, training = fields["model"], fields["guide"], fields["training"]
    mode = guide.pop("mode")
    _check_search_options(args, model.get("rotation_bins") is not None, ctf=ctf)
    if model.get("rotation_bins") is not None:
        model["enumerate_bins"] = mode == "marginal"
        guide.update(kind="pose_search", mode=mode)
        guide.setdefault("encoder", "equivariant")
    training["precision"] = resolve_precision(_value(args, "precision"), device)
    try:
        model_config = ModelConfig(image_shape=image_shape, ctf=ctf, **model)
        guide_config = GuideConfig(**guide)
        training_config = TrainConfig(**training)
        check_compatible(model_config, training_config)
    except ValueError as error:
        raise UsageError(_in_flags(str(error), ctf=ctf)) from None
    return model_config, guide_config, training_config


def _in_flags(message: str, *, ctf: bool) -> str:
    """A config's message with its field names as the flags that set them (``ctf``: the data's CTF)."""
    names: dict[str, str] = {
        "vanilla=True": "--vanilla",
        "ctf=True": "the CTF",
        "ctf": "the CTF",
        "enumerate_bins=True": "--pose-search-mode marginal",
    }
    for option in OPTIONS:
        for target in option.targets:
            section, field = target.split(".")
            if section in _CONFIG_SECTIONS:
                names.setdefault(field, _flag(option.dest))
    del names["likelihood"]  # also a plain word of the messages
    alternatives = "|".join(map(re.escape, sorted(names, key=len, reverse=True)))
    text = re.sub(rf"(?<![\w.-])({alternatives})(?![\w=])", lambda m: names[m.group(1)], message)
    if ctf and "the CTF" in text and "--no-ctf" not in text:
        text += "; --no-ctf ignores the CTF"
    return text


def _describe(model: SpatialVAE) -> str:
    if model.vanilla:
        return f"vanilla VAE (z_dim {model.z_dim})"
    pose = [
        name
        for name, on in (("rotation", model.rotate), ("translation", model.translate), ("scale", model.scale))
        if on
    ]
    pose_text = ", ".join(pose[:-1]) + (" and " if len(pose) > 1 else "") + pose[-1] if pose else "no pose"
    extras = []
    if model.rotation_bins is not None:
        where = "summed out by the model" if model.enumerate_bins else "scored by the encoder"
        extras.append(f"pose search over {model.rotation_bins} rotation bins, {where}")
    if model.ctf:
        extras.append("CTF")
    if model.psf_fwhm is not None:
        extras.append(f"PSF of {model.psf_fwhm:g} px FWHM")
    if model.pixel_subsample is not None:
        extras.append(f"{model.pixel_subsample} pixels per image per step")
    return f"spatial-VAE (z_dim {model.z_dim}; infers {pose_text}{''.join('; ' + e for e in extras)})"


def _data_path(spec: dict[str, Any]) -> Path | None:
    entry = (spec.get("particles") or {}).get("file") or spec.get("file")
    return None if entry is None else Path(entry["path"])


def _data_label(spec: dict[str, Any]) -> str:
    if spec.get("builtin"):
        return str(spec["builtin"])
    return _data_path(spec).name


def _ctf_note(spec: dict[str, Any], model: SpatialVAE) -> str:
    """A remark for the first output line when particles asked for the CTF but carry none."""
    particles = spec.get("particles")
    if particles and particles.get("use_ctf", True) and not model.ctf:
        return f" (no CTF columns in {Path(particles['file']['path']).name}: training WITHOUT CTF)"
    return ""


def _epoch_line(epoch: int, epochs: int, records: dict[str, dict[str, Any]]) -> str:
    width = len(str(epochs))
    train = records["train"]
    parts = [f"epoch {epoch:>{width}}/{epochs}", f"train ELBO {train['elbo']:9.2f}"]
    test = records.get("test")
    if test:
        parts.append(
            f"test ELBO {test['elbo']:9.2f} (rec {test['reconstruction']:8.2f}, KL {test['kl']:6.2f})"
        )
        if "theta_circ_corr" in test:
            fisher_lee = test["theta_circ_corr_fisher_lee"]
            parts.append(f"theta corr {test['theta_circ_corr']:.3f} (Fisher-Lee {fisher_lee:.3f})")
        if "dx_corr_x" in test:
            parts.append(f"dx corr {test['dx_corr_x']:.2f}/{test['dx_corr_y']:.2f}")
        if "log_scale_corr" in test:
            parts.append(f"log scale corr {test['log_scale_corr']:.2f}")
    parts.append(f"{train['seconds']:.1f} s")
    return " | ".join(parts)


def _say(*lines: str) -> None:
    if not distributed.is_main_process():
        return
    for line in lines:
        print(line, flush=True)


def _check_precision(precision: str, device: torch.device) -> None:
    try:
        check_precision(precision, device)
    except ValueError as error:
        raise UsageError(f"--precision {precision}: {error}") from None


def _data_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The run's data spec: :func:`~pyro_svae.runs.particle_spec` of the options whose target is
    ``particles.*`` when ``--particles`` is given, else :func:`~pyro_svae.runs.data_spec` of the
    ``data.*`` ones."""
    section = "particles" if args.particles is not None else "data"
    fields = _target_fields(args, DEFAULTS, (section,))[section]
    return runs.particle_spec(**fields) if section == "particles" else runs.data_spec(**fields)


def _check_data_options(args: argparse.Namespace, spec: dict[str, Any], train, *, ctf: bool) -> None:
    """Contradictions between options and what the data turned out to be (the model's options are
    checked by its config)."""
    translate = not (args.vanilla or args.no_translate)
    if spec.get("particles") and translate and train.info.get("pixel_size") is None and not ctf:
        raise UsageError(
            f"{Path(args.particles).name}: the pixel size is unknown (no MRC header value, no CTF "
            "table) and particles.star gives origins in Å: pass --pixel-size A"
        )


def main(args: argparse.Namespace) -> int:
    """Train a new run, or continue one with ``--resume``; returns the exit status."""
    if args.return_freed_memory or not retain_freed_memory():
        return _main(args)
    try:
        return _main(args)
    finally:  # the process may go on (tests, notebooks calling the CLI): back to the C library's rule
        retain_freed_memory(False)


def _main(args: argparse.Namespace) -> int:
    if args.distributed:  # join torchrun's process group first: rank 0 alone writes the run folder
        distributed.setup(resolve_device(_value(args, "device")), True)
    if args.resume is not None:
        return _resume(args)
    _check_contradictions(args)
    device = resolve_device(_value(args, "device"))
    _check_precision(_value(args, "precision"), device)
    spec = _data_spec(args)
    train, test = runs.load_data(spec)
    defaults = {**DEFAULTS, **PARTICLE_DEFAULTS} if runs.is_particle_spec(spec) else DEFAULTS
    ctf = train.ctf is not None
    model_config, guide_config, training = _configs(
        args, train.image_shape, defaults=defaults, ctf=ctf, device=device
    )
    _check_data_options(args, spec, train, ctf=ctf)
    runs.check_images(train, test, model_config.likelihood)
    pyro.clear_param_store()
    pyro.set_rng_seed(training.seed)  # the initial weights depend on the seed alone
    model = model_config.build()
    guide = guide_config.build(model)
    if training.init_output_bias:
        model.init_output_bias(train)
    config = runs.make_config(model, guide, data=spec, training=training)
    label = spec.get("builtin") or _data_path(spec).name.split(".")[0]
    out = args.out or runs.new_run_dir(DEFAULTS["runs_dir"], label)
    with _writer_lock(out, create=True):
        if distributed.is_main_process():
            folder = runs.prepare_run_folder(out, overwrite=bool(args.overwrite))
            runs.write_json(folder.config, config)
        folder = runs.RunFolder(Path(distributed.from_main_process(str(out))))
        return _train(args, folder, config, model, guide, train, test, device, previous=[])


def _resume(args: argparse.Namespace) -> int:
    fixed = [key for key in _given(args) if key not in RESUMABLE]
    if fixed:
        raise UsageError(
            f"{', '.join(map(_flag, fixed))} cannot be given with --resume: the run's config.json "
            "fixes its settings (only --epochs, --device, --precision and --learning-rate may change)"
        )
    with _writer_lock(args.resume):
        distributed.from_main_process(None)  # the other ranks read the folder once rank 0 has tidied it
        return _resume_locked(args)


def _resume_locked(args: argparse.Namespace) -> int:
    folder = runs.open_run_folder(args.resume)
    config = runs.read_config(folder)
    if not folder.checkpoint.is_file():
        raise runs.RunError(
            f"{folder.root} has no checkpoint.pt to resume from (no epoch finished); start it again "
            f"with: pyro-svae train --out {folder.root} --overwrite"
        )
    device = resolve_device(_value(args, "device"))
    state = load_checkpoint(folder.checkpoint)
    runs.check_checkpoint_config(state, config, folder.checkpoint)
    done = int(state["epoch"])
    training = config.setdefault("training", {})
    epochs = args.epochs if args.epochs is not None else int(training.get("epochs", done))
    if epochs < done:
        raise UsageError(f"--epochs {epochs} is fewer than the {done} epochs the run has finished")
    precision = resolve_precision(args.precision or training.get("precision", "fp32"), device)
    _check_precision(precision, device)
    train, test = runs.load_data(config.get("data", {}))
    runs.check_images(train, test, config["model"].get("likelihood", "bernoulli"))
    if config["model"].get("ctf") and train.ctf is None:
        raise runs.RunError(
            f"{folder.config}: the run's model applies a CTF but its data now carry no CTF parameters"
        )
    pyro.clear_param_store()
    model, guide = runs.build_model(config)
    rate = float(training["learning_rate"])
    new_rate = rate if args.learning_rate is None else args.learning_rate
    if new_rate != rate:  # config.json keeps the rate now used and when it changed
        change = {"after_epoch": done, "from": rate, "to": new_rate}
        training["learning_rate_changes"] = [*training.get("learning_rate_changes", []), change]
    before = (training.get("epochs"), training.get("precision", "fp32"), rate)
    training.update(epochs=epochs, precision=precision, learning_rate=new_rate)  # on every rank
    if before != (epochs, precision, new_rate) and distributed.is_main_process():
        runs.write_json(folder.config, config)
    return _train(args, folder, config, model, guide, train, test, device, previous=list(state["history"]))


@contextlib.contextmanager
def _writer_lock(root: str | Path, *, create: bool = False) -> Iterator[None]:
    """Rank 0 (the process that writes) holds the run folder's lock, and first settles what a killed run
    left there: a run ``--overwrite`` set aside, temporary files. Other ranks hold nothing."""
    if not distributed.is_main_process():
        yield
        return
    with runs.run_lock(root, create=create) as folder:
        _put_back(folder)
        removed = runs.remove_orphans(folder)
        if removed:
            _say(f"{folder.root}: removed {removed} temporary file(s) that a stopped run left behind")
        yield


def _put_back(folder: runs.RunFolder) -> bool:
    """Settle a run ``--overwrite`` set aside after the new run stopped: deleted where the new run wrote
    its first checkpoint, else put back in place (the new run's files removed). True if put back."""
    if not distributed.is_main_process():
        return False
    if folder.checkpoint.is_file() and runs.discard_replaced(folder):
        return False
    if not runs.restore_replaced(folder):
        return False
    print(
        "pyro-svae train: the new run stopped before its first checkpoint; the run it was replacing is "
        f"back in {folder.root}",
        file=sys.stderr,
        flush=True,
    )
    return True


def _train(
    args: argparse.Namespace,
    folder: runs.RunFolder,
    config: dict[str, Any],
    model: SpatialVAE,
    guide: AmortizedGuide | PoseSearchGuide,
    train,
    test,
    device: torch.device,
    *,
    previous: list[dict[str, Any]],
) -> int:
    training = config["training"]
    epochs = int(training["epochs"])
    started = time.perf_counter()
    resume = bool(previous)
    done = max((int(r["epoch"]) for r in previous), default=0)
    _say(
        f"pyro-svae train: {_describe(model)} on {_data_label(config['data'])}: {len(train)} training / "
        f"{len(test)} test images of {'x'.join(map(str, train.image_shape))} on {device}"
        + _ctf_note(config["data"], model),
        f"run folder: {folder.root}"
        + (f" (resuming after epoch {done}, learning rate {training['learning_rate']:g})" if resume else ""),
    )
    records = list(previous)

    def on_epoch(epoch: int, epoch_records: dict[str, dict[str, Any]]) -> None:
        records.extend(epoch_records.values())
        if distributed.is_main_process():
            runs.discard_replaced(folder)  # the new run has its first checkpoint
            runs.write_metrics(folder.metrics, records)
        _say(_epoch_line(epoch, epochs, epoch_records))

    guard = InterruptGuard()
    try:
        with guard, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Encountered NaN")  # a NaN loss is a DivergenceError
            history = fit(
                model,
                guide,
                train,
                test=test,
                epochs=epochs,
                batch_size=int(training["batch_size"]),
                learning_rate=float(training["learning_rate"]),
                device=device,
                seed=int(training["seed"]),
                progress=not args.no_progress and sys.stderr.isatty(),
                callbacks=[on_epoch],
                checkpoint=folder.checkpoint,
                resume=resume,
                extra_state={"run_config": runs.model_config(model, guide)},
                precision=str(training.get("precision", "fp32")),
                distributed=bool(args.distributed),
            )
            if not distributed.is_main_process():
                return 0
            runs.write_metrics(folder.metrics, history.records)
            _finish(folder, config, model, guide, train, test, device, history, started)
            runs.discard_replaced(folder)  # a run of 0 epochs has no checkpoint
    except KeyboardInterrupt:
        if not distributed.is_main_process():
            return guard.exit_code
        return _interrupted(folder, guard.exit_code)
    except DivergenceError as error:
        if not distributed.is_main_process():
            return EXIT_USAGE
        restored = _put_back(folder)
        return _diverged(folder, error, float(training["learning_rate"]), train, restored=restored)
    except BaseException:
        _put_back(folder)
        raise
    return 0


def _finish(
    folder: runs.RunFolder,
    config: dict[str, Any],
    model: SpatialVAE,
    guide: AmortizedGuide | PoseSearchGuide,
    train,
    test,
    device: torch.device,
    history: History,
    started: float,
) -> None:
    """Final evaluation (in fp32), posterior draws, figures, ``particles.star`` (particle files) and
    ``summary.json``."""
    training = config["training"]
    _say(f"final evaluation: {training['eval_particles']} posterior samples per test image ...")
    pyro.set_rng_seed(int(training["seed"]))
    report, means = runs.final_report(
        model,
        guide,
        test,
        train=train,
        num_particles=int(training["eval_particles"]),
        seed=int(training["seed"]),
    )
    samples = runs.sample_posterior(guide, test, draws=int(training["posterior_draws"]))
    posterior = runs.posterior_inference_data(samples, test, attrs={"run": str(folder.root)})
    runs.write_posterior(folder.posterior, posterior)
    figures = runs.write_figures(
        folder.figures, model=model, test=test, means=means, records=history.records, report=report
    )
    figures.append(runs.write_traversal(folder.figures, model, means=means))
    outputs = "summary.json, metrics.csv, figures/, posterior.nc, checkpoint.pt"
    if config["data"].get("particles"):
        every = runs.load_dataset(config["data"])  # train and test, in the input order
        pyro.set_rng_seed(int(training["seed"]))
        star = runs.write_particles_star(
            folder.particles_star, guide, every, draws=max(2, int(training["posterior_draws"]))
        )
        _say(f"{star.name}: {len(every)} particles with posterior poses, z and standard deviations")
        _say(f"{star.name}: rlnImageName as in the input; read it from the input's project directory")
        note = posterior_pose_note(every)
        if note:
            _say(f"{star.name}: {note}")
        outputs = "particles.star, " + outputs
    drop_seconds = lambda record: {k: v for k, v in record.items() if k != "seconds"}  # noqa: E731
    summary = {
        "test": report,
        "last_epoch": {split: drop_seconds(history.last(split)) for split in ("train", "test")},
        "epochs": len(history),
        "num_train": len(train),
        "num_test": len(test),
        "image_shape": list(train.image_shape),
        "training_seconds": sum(float(r.get("seconds", 0.0)) for r in history.split("train")),
        "wall_seconds": time.perf_counter() - started,
        **runs.environment(device),
        "figures": [str(path.relative_to(folder.root)) for path in figures],
    }
    runs.write_json(folder.summary, summary)
    line = f"test ELBO {report['elbo']:.2f}, importance-weighted bound (K={report['num_particles']}) "
    line += f"{report['iw_elbo']:.2f} nats per image"
    extras = [
        f"{label} {report[key]:.3f}"
        for key, label in (
            ("theta_circ_corr", "theta circular corr"),
            ("theta_circ_corr_fisher_lee", "theta circular corr (Fisher-Lee)"),
            ("theta_median_error_deg", "theta median error (deg)"),
            ("dx_corr_x", "dx corr x"),
            ("dx_corr_y", "dx corr y"),
            ("log_scale_corr", "log scale corr"),
            ("knn_accuracy", "kNN accuracy"),
            ("clustering_accuracy", "clustering accuracy"),
            *(
                (key, f"z Spearman {key[len('z_spearman_') :]}")
                for key in report
                if key.startswith("z_spearman_")
            ),
        )
        if key in report
    ]
    _say(
        line,
        *([", ".join(extras)] if extras else []),
        f"done in {summary['wall_seconds']:.0f} s; results in {folder.root}/ ({outputs})",
    )


def _last_checkpoint(folder: runs.RunFolder) -> int | None:
    """The epoch the run's checkpoint holds (``None`` without one), with metrics.csv made to agree."""
    if not folder.checkpoint.is_file():
        return None
    state = load_checkpoint(folder.checkpoint)
    runs.write_metrics(folder.metrics, state["history"])
    return int(state["epoch"])


def _diverged(
    folder: runs.RunFolder, error: DivergenceError, learning_rate: float, train, *, restored: bool
) -> int:
    """After a diverged epoch: the error and advice on two lines, how to go on from the last good
    checkpoint with a smaller learning rate (``restored``: the folder holds the run ``--overwrite`` was
    replacing again, not this one); exit status 2."""
    smaller = f"--learning-rate {learning_rate / 10:g}"
    images = train.checkable_images()
    scale = f"pixel values: mean {float(images.mean()):.3g}, std {float(images.std()):.3g}"
    epoch = None if restored else _last_checkpoint(folder)
    if epoch is None:
        then = (
            "no epoch finished, so nothing was saved: start again with the same options plus "
            f"{smaller} --out {folder.root} --overwrite"
        )
    else:
        resume = f"pyro-svae train --resume {folder.root} {smaller}"
        then = f"{folder.checkpoint} keeps epoch {epoch}: continue with: {resume}"
    print(
        f"pyro-svae train: error: {error.summary}",
        f"pyro-svae train: lower --learning-rate (now {learning_rate:g}), check the data's scale ({scale}) "
        f"or normalize the images; {then}",
        sep="\n",
        file=sys.stderr,
        flush=True,
    )
    return EXIT_USAGE


def _interrupted(folder: runs.RunFolder, exit_code: int) -> int:
    """After Ctrl-C / SIGTERM: put back a replaced run, or make metrics.csv agree with the last checkpoint
    and say how to resume."""
    if _put_back(folder):
        print("pyro-svae train: interrupted before the first epoch finished", file=sys.stderr, flush=True)
    elif (epoch := _last_checkpoint(folder)) is not None:
        print(
            f"pyro-svae train: interrupted; {folder.checkpoint} holds epoch {epoch}. "
            f"Continue with: pyro-svae train --resume {folder.root}",
            file=sys.stderr,
            flush=True,
        )
    else:
        print(
            "pyro-svae train: interrupted before the first epoch finished; nothing to resume. "
            f"Start again with: pyro-svae train --out {folder.root} --overwrite",
            file=sys.stderr,
            flush=True,
        )
    return exit_code
