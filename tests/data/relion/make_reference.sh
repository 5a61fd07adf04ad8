#!/usr/bin/env bash
# Regenerate the RELION reference projections used by tests/test_ctf.py.
#
# Needs relion_project (Debian package relion 3.1.3: apt-get install relion) and Python with numpy and
# mrcfile. Writes, next to this script:
#   ctf_N.star / ctf_N.mrcs      delta volume at voxel N/2 projected with --ctf (one image per CTF row)
#   delta_N.mrcs                 the same delta projected once without CTF (psi 0, no origin)
#   poses_N.star / poses_N.mrcs  asymmetric Gaussian-blob volume projected at the STAR's psi and origins
#                                (--pad 3: the gridding correction leaves ~1.5 % error, ~3.5 % at --pad 2)
#   blobs.json                   pixel size, blob centres/sigmas/amplitudes, optics
# for box sizes N = 32 and 33 (relion_project pads odd boxes to an even size: its odd-box output is
# centred at pixel N//2 + 1, see tests/test_ctf.py). Usage: tests/data/relion/make_reference.sh [python]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${1:-python}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
cd "$here"
"$python" make_reference.py "$here" "$scratch"
angpix="$("$python" -c 'import json; print(json.load(open("blobs.json"))["pixel_size"])')"
for n in 32 33; do
    relion_project --i "$scratch/delta_$n.mrc" --ang "ctf_$n.star" --o "$scratch/ctf_$n" --ctf --pad 1 \
        --angpix "$angpix" > "$scratch/log_ctf_$n.txt"
    relion_project --i "$scratch/delta_$n.mrc" --o "$scratch/delta_$n.mrc" --pad 1 --angpix "$angpix" \
        > "$scratch/log_delta_$n.txt"
    relion_project --i "$scratch/blobs_$n.mrc" --ang "poses_$n.star" --o "$scratch/poses_$n" --pad 3 \
        --angpix "$angpix" > "$scratch/log_poses_$n.txt"
    cp "$scratch/ctf_$n.mrcs" "ctf_$n.mrcs"
    cp "$scratch/poses_$n.mrcs" "poses_$n.mrcs"
    cp "$scratch/delta_$n.mrc" "delta_$n.mrcs"
done
relion_project --version | head -n 1 > relion_version.txt
