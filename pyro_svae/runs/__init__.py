"""Run folders: what a training run leaves behind, and how a saved run is rebuilt.

Layout of a run folder (see the README)::

    RUN/
      config.json      everything needed to rebuild the model, the guide and the data
      metrics.csv      one row per epoch and split: ELBO, reconstruction, KL (nats per image), pose metrics
      checkpoint.pt    model, guide, optimizer, RNG and history (atomic, loaded with weights_only=True)
      summary.json     final test ELBO, importance-weighted bound, pose/content metrics, time, versions
      posterior.nc     ArviZ InferenceData: posterior draws of z, theta, dx per test image
      particles.star   (particle data) every input particle with posterior means and standard deviations
      figures/         training_curves.png, manifold.png, reconstructions.png, theta.png, traversal.gif
      .lock            held (``fcntl.flock``) by the process that trains in the folder; holds its PID

The data of a run are described in ``config.json`` by a *data spec* (:func:`data_spec`,
:func:`particle_spec`): a built-in name, or files and folders by absolute path and SHA-256, with the
preprocessing options and the seeded train/test split, so that a resumed run and ``pyro-svae evaluate``
rebuild exactly the same images.

Every file is written atomically (temporary file, then rename). ``--overwrite`` moves the run it
replaces into ``.replaced-run/`` and deletes it only once the new run has written its first checkpoint.
The package holds no command-line code: it raises :class:`RunError` (a ``ValueError``) with a message
for the user and returns data. Its modules, each one job: :mod:`~pyro_svae.runs.folder` (layout, lock,
atomic JSON/CSV), :mod:`~pyro_svae.runs.dataspec` (data specs and the data they rebuild),
:mod:`~pyro_svae.runs.config` (``config.json`` and the run rebuilt from it),
:mod:`~pyro_svae.runs.posterior` (posterior draws and summaries), :mod:`~pyro_svae.runs.report`
(``summary.json`` contents, figures) and :mod:`~pyro_svae.runs.exports` (STAR files); everything public
is importable from ``pyro_svae.runs``.
"""

from __future__ import annotations

from .config import (
    CONFIG_VERSION,
    GUIDE_KINDS,
    build_model,
    check_checkpoint_config,
    load_trained,
    make_config,
    migrate_config,
    model_config,
    read_config,
)
from .dataspec import (
    CACHE_CHOICES,
    CACHE_LIMIT,
    MIN_TEST_IMAGES,
    PARTICLE_SUFFIXES,
    check_images,
    data_spec,
    is_particle_spec,
    load_data,
    load_dataset,
    particle_spec,
    prepare_particles,
    select_particles,
)
from .exports import write_particles_star
from .folder import (
    EVALUATION_FILES,
    FIGURES,
    METRIC_COLUMNS,
    NOT_IN_METRICS,
    SAMPLE_FILES,
    TEMPORARY_SUFFIXES,
    RunError,
    RunFolder,
    discard_replaced,
    new_run_dir,
    open_run_folder,
    prepare_output_folder,
    prepare_run_folder,
    read_json,
    read_metrics,
    remove_orphans,
    restore_replaced,
    run_lock,
    write_json,
    write_metrics,
)
from .posterior import (
    circular_std,
    load_posterior,
    posterior_inference_data,
    posterior_summaries,
    sample_posterior,
    write_posterior,
)
from .report import environment, final_report, write_figures, write_traversal

__all__ = [
    "CACHE_CHOICES",
    "CACHE_LIMIT",
    "CONFIG_VERSION",
    "GUIDE_KINDS",
    "build_model",
    "check_checkpoint_config",
    "load_trained",
    "make_config",
    "migrate_config",
    "model_config",
    "read_config",
    "MIN_TEST_IMAGES",
    "PARTICLE_SUFFIXES",
    "check_images",
    "data_spec",
    "is_particle_spec",
    "load_data",
    "load_dataset",
    "particle_spec",
    "prepare_particles",
    "select_particles",
    "write_particles_star",
    "EVALUATION_FILES",
    "FIGURES",
    "METRIC_COLUMNS",
    "NOT_IN_METRICS",
    "SAMPLE_FILES",
    "TEMPORARY_SUFFIXES",
    "RunError",
    "RunFolder",
    "discard_replaced",
    "new_run_dir",
    "open_run_folder",
    "prepare_output_folder",
    "prepare_run_folder",
    "read_json",
    "read_metrics",
    "remove_orphans",
    "restore_replaced",
    "run_lock",
    "write_json",
    "write_metrics",
    "circular_std",
    "load_posterior",
    "posterior_inference_data",
    "posterior_summaries",
    "sample_posterior",
    "write_posterior",
    "environment",
    "final_report",
    "write_figures",
    "write_traversal",
]
