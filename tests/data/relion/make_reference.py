"""Write the volumes and STAR files that make_reference.sh projects with relion_project.

Run through make_reference.sh (which also calls relion_project); not imported by the tests.
Volumes are left in a scratch folder; only the STAR inputs, the projections and blobs.json are kept.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mrcfile
import numpy as np

PIXEL_SIZE = 2.5  # Å per pixel, for every box
BOXES = (32, 33)
# Gaussian blobs of the pose volume: (x, y, z) in pixels from the centre voxel N/2 (x = column, y = row,
# z = section), sigma in pixels, amplitude. Asymmetric so every in-plane pose is distinguishable.
BLOBS = [
    {"centre": [5.0, 2.0, 0.0], "sigma": 1.6, "amplitude": 1.0},
    {"centre": [-3.0, 6.0, 1.0], "sigma": 2.0, "amplitude": 0.7},
    {"centre": [-2.5, -5.0, -1.0], "sigma": 1.5, "amplitude": 1.3},
    {"centre": [0.5, -0.5, 0.0], "sigma": 1.8, "amplitude": 0.5},
]
OPTICS = {"voltage": 300.0, "cs": 2.7, "q": 0.1}
# CTF set: defocus U, V (Å), astigmatism angle (deg), phase shift (deg), B-factor (Å^2)
CTF_ROWS = [
    (2000.0, 1500.0, 0.0, 0.0, 0.0),
    (5000.0, 3500.0, 30.0, 0.0, 0.0),
    (12000.0, 11500.0, -65.0, 0.0, 0.0),
    (3000.0, 2000.0, 120.0, 90.0, 0.0),
    (4000.0, 2500.0, 75.0, 0.0, 150.0),
    (20000.0, 19000.0, 10.0, 0.0, 0.0),
]
# Pose set: psi (deg), origin x, y (Å)
POSE_ROWS = [
    (0.0, 0.0, 0.0),
    (30.0, 0.0, 0.0),
    (90.0, 0.0, 0.0),
    (180.0, 0.0, 0.0),
    (-45.0, 5.0, -2.5),
    (0.0, 7.5, 3.75),
    (137.0, -4.0, 6.0),
]


def blob_volume(n: int) -> np.ndarray:
    """Sum of 3-D Gaussians sampled at voxel centres; array axes (z, y, x), centre voxel n // 2."""
    idx = np.arange(n) - n // 2
    z, y, x = np.meshgrid(idx, idx, idx, indexing="ij")
    volume = np.zeros((n, n, n))
    for blob in BLOBS:
        cx, cy, cz = blob["centre"]
        r2 = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2
        volume += blob["amplitude"] * np.exp(-0.5 * r2 / blob["sigma"] ** 2)
    return volume.astype(np.float32)


def delta_volume(n: int) -> np.ndarray:
    volume = np.zeros((n, n, n), np.float32)
    volume[n // 2, n // 2, n // 2] = 1.0
    return volume


def write_mrc(path: Path, volume: np.ndarray) -> None:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(volume)
        mrc.voxel_size = PIXEL_SIZE


def write_star(path: Path, n: int, rows: list[dict]) -> None:
    optics = [
        "# version 30001",
        "",
        "data_optics",
        "",
        "loop_",
        "_rlnOpticsGroup #1",
        "_rlnOpticsGroupName #2",
        "_rlnVoltage #3",
        "_rlnSphericalAberration #4",
        "_rlnAmplitudeContrast #5",
        "_rlnImagePixelSize #6",
        "_rlnImageSize #7",
        "_rlnImageDimensionality #8",
        f"1 opticsGroup1 {OPTICS['voltage']} {OPTICS['cs']} {OPTICS['q']} {PIXEL_SIZE} {n} 2",
        "",
        "",
        "# version 30001",
        "",
        "data_particles",
        "",
        "loop_",
    ]
    columns = list(rows[0])
    lines = optics + [f"_{c} #{i + 1}" for i, c in enumerate(columns)]
    lines += [
        " ".join(f"{row[c]:.6f}" if isinstance(row[c], float) else str(row[c]) for c in columns)
        for row in rows
    ]
    path.write_text("\n".join(lines) + "\n\n")


def main(out: Path, scratch: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    for n in BOXES:
        write_mrc(scratch / f"delta_{n}.mrc", delta_volume(n))
        write_mrc(scratch / f"blobs_{n}.mrc", blob_volume(n))
        ctf_rows = [
            {
                "rlnAngleRot": 0.0,
                "rlnAngleTilt": 0.0,
                "rlnAnglePsi": 0.0,
                "rlnOriginXAngst": 0.0,
                "rlnOriginYAngst": 0.0,
                "rlnDefocusU": u,
                "rlnDefocusV": v,
                "rlnDefocusAngle": angle,
                "rlnPhaseShift": phase,
                "rlnCtfBfactor": bfactor,
                "rlnOpticsGroup": 1,
            }
            for u, v, angle, phase, bfactor in CTF_ROWS
        ]
        write_star(out / f"ctf_{n}.star", n, ctf_rows)
        pose_rows = [
            {
                "rlnAngleRot": 0.0,
                "rlnAngleTilt": 0.0,
                "rlnAnglePsi": psi,
                "rlnOriginXAngst": ox,
                "rlnOriginYAngst": oy,
                "rlnDefocusU": 10000.0,
                "rlnDefocusV": 10000.0,
                "rlnDefocusAngle": 0.0,
                "rlnOpticsGroup": 1,
            }
            for psi, ox, oy in POSE_ROWS
        ]
        write_star(out / f"poses_{n}.star", n, pose_rows)
    meta = {"pixel_size": PIXEL_SIZE, "boxes": list(BOXES), "blobs": BLOBS, "optics": OPTICS}
    (out / "blobs.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
