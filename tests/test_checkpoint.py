import os
import random
import stat

import numpy as np
import pytest
import torch

from pyro_svae.checkpoint import (
    CheckpointError,
    atomic_write,
    current_umask,
    get_rng_state,
    load_checkpoint,
    load_module_state,
    save_checkpoint,
    set_rng_state,
)


def test_checkpoint_round_trip_uses_weights_only(tmp_path):
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 3, "weights": {"w": torch.ones(2)}, "history": [{"elbo": -1.0}]})
    payload = load_checkpoint(path)
    assert payload["epoch"] == 3 and torch.equal(payload["weights"]["w"], torch.ones(2))
    assert not list(path.parent.glob(".*.tmp"))


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1})

    def crash(tmp):
        open(tmp, "wb").write(b"half a file")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, crash)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_pickled_code_and_garbage_are_refused(tmp_path):
    torch.save({"format_version": 1, "evil": print}, tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(tmp_path / "code.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_round_trip(tmp_path):
    state = get_rng_state()
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


def test_mismatched_module_state_names_the_difference():
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_module_state(torch.nn.Linear(3, 4), torch.nn.Linear(3, 5).state_dict(), "model")


def test_empty_and_pickled_checkpoints_say_why_without_torchs_unsafe_advice(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        load_checkpoint(tmp_path / "empty.pt")
    torch.save({"format_version": 1, "evil": print}, tmp_path / "code.pt")
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(tmp_path / "code.pt")
    assert "pickled Python objects" in str(refused.value)
    assert "weights_only" not in str(refused.value) and len(str(refused.value).splitlines()) == 1


@pytest.mark.skipif(os.name != "posix", reason="file modes and umasks are POSIX")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    before = os.umask(umask)
    try:
        assert current_umask() == umask
        save_checkpoint(tmp_path / "checkpoint.pt", {"epoch": 1})
        atomic_write(tmp_path / "notes.txt", lambda tmp: open(tmp, "w").write("x"))
    finally:
        os.umask(before)
    for name in ("checkpoint.pt", "notes.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
