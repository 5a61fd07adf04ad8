"""The ``pyro-svae`` command: train / evaluate / sample, run folders, resume, bad input.

Most tests call ``pyro_svae.cli.main([...])`` in-process on tiny data (14x14 digits, 16 hidden units);
one smoke test and one SIGINT test run the installed console script as a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pyro_svae.cli.train as train_command
from pyro_svae.cli import main
from pyro_svae.data import mnist_digits
from pyro_svae.runs import load_posterior

TINY = ["--hidden-dim", "16", "--eval-particles", "2", "--posterior-draws", "3", "--no-progress"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``pyro-svae argv`` in-process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_error(code: int, err: str, *fragments: str) -> None:
    """Exit status 2, one line on stderr that contains every fragment, no traceback."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    """60 MNIST digits at 14x14 (``.npy``) with labels, written once for the module."""
    folder = tmp_path_factory.mktemp("digits")
    images, labels = mnist_digits()
    pick = np.arange(0, 5000, 83)[:60]
    small = images[pick][:, ::2, ::2].astype(np.float32)
    np.save(folder / "digits.npy", small)
    np.save(folder / "labels.npy", labels[pick])
    return {"images": folder / "digits.npy", "labels": folder / "labels.npy"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits) -> Path:
    """A finished 2-epoch run on the tiny digits (shared; tests copy it before changing it)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    code = main(
        ["train", "--data", str(digits["images"]), "--labels", str(digits["labels"]), "--epochs", "2"]
        + ["--out", str(out), *TINY]
    )
    assert code == 0
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / run.name
    shutil.copytree(run, target)
    return target


# --------------------------------------------------------------------------------------------------
# the console script
# --------------------------------------------------------------------------------------------------
def console_script() -> str:
    beside = Path(sys.executable).with_name("pyro-svae")
    found = str(beside) if beside.exists() else shutil.which("pyro-svae")
    if found is None:
        pytest.skip("the pyro-svae console script is not installed")
    return found


def test_console_script_trains_and_samples_in_a_subprocess(digits, tmp_path):
    script = console_script()
    out = tmp_path / "run"
    args = [script, "train", "--data", digits["images"], "--epochs", "1", "--out", out, *TINY]
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "epoch 1/1" in done.stdout and "test ELBO" in done.stdout
    assert (out / "summary.json").is_file()
    done = subprocess.run(
        [script, "sample", str(out), "-n", "4"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert np.load(out / "samples" / "samples.npz")["images"].shape == (4, 1, 14, 14)


def test_help_lists_the_commands_and_the_original_options(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and all(name in out for name in ("train", "evaluate", "sample"))
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0
    for option in (
        "--z-dim",
        "--encoder-hidden-dim",
        "--decoder-layers",
        "--theta-prior",
        "--dx-prior",
        "--no-rotate",
        "--no-translate",
        "--vanilla",
        "--likelihood",
        "--learning-rate",
        "--batch-size",
        "--epochs",
        "--device",
        "--seed",
        "--resume",
        "--overwrite",
    ):
        assert option in out


def test_no_command_is_a_usage_error(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "give a command" in err


# --------------------------------------------------------------------------------------------------
# train: the run folder
# --------------------------------------------------------------------------------------------------
def test_train_writes_a_complete_run_folder(trained):
    for name in ("config.json", "metrics.csv", "summary.json", "checkpoint.pt", "posterior.nc"):
        assert (trained / name).is_file(), name
    for name in ("training_curves.png", "manifold.png", "reconstructions.png"):
        assert (trained / "figures" / name).read_bytes()[:4] == b"\x89PNG"
    config = json.loads((trained / "config.json").read_text())
    assert config["model"]["z_dim"] == 2 and config["model"]["hidden_dim"] == 16
    assert config["training"]["epochs"] == 2
    lines = (trained / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,split,elbo,reconstruction,kl")
    assert [line.split(",")[:2] for line in lines[1:]] == [
        ["1", "train"],
        ["1", "test"],
        ["2", "train"],
        ["2", "test"],
    ]
    summary = json.loads((trained / "summary.json").read_text())
    for key in ("elbo", "iw_elbo", "reconstruction", "kl", "knn_accuracy", "clustering_accuracy"):
        assert key in summary["test"], key
    assert summary["test"]["iw_elbo"] >= summary["test"]["elbo"] - 1e-3
    assert summary["device"] == "cpu" and "torch" in summary["versions"]
    assert summary["wall_seconds"] > 0
    state = torch.load(trained / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2


def test_train_on_builtin_data_with_ground_truth_reports_pose(capsys, tmp_path):
    out = tmp_path / "rot"
    code, stdout, err = run(
        capsys,
        "train",
        "--data",
        "rotated_mnist",
        "--train-size",
        "100",
        "--test-size",
        "40",
        "--epochs",
        "1",
        "--out",
        out,
        *TINY,
    )
    assert code == 0, err
    assert "theta corr" in stdout
    assert (out / "figures" / "theta.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert {"theta_circ_corr", "theta_median_error_deg"} <= set(summary["test"])
    assert summary["num_train"] == 100 and summary["num_test"] == 40
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "theta_circ_corr" in header


def test_vanilla_and_pose_switches_shape_the_model(capsys, digits, tmp_path):
    for flags, sites in ((["--vanilla"], ["z"]), (["--no-translate"], ["z", "theta"])):
        out = tmp_path / flags[0].strip("-")
        code, _, err = run(
            capsys, "train", "--data", digits["images"], "--epochs", "1", "--out", out, *flags, *TINY
        )
        assert code == 0, err
        config = json.loads((out / "config.json").read_text())
        assert config["model"]["vanilla"] == (flags == ["--vanilla"])
        posterior = load_posterior(out / "posterior.nc").posterior
        assert sorted(posterior.data_vars) == sorted(sites)


def test_default_out_is_a_new_folder_under_runs(capsys, digits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "train", "--data", digits["images"], "--epochs", "0", *TINY)
    assert code == 0, err
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.endswith("-digits") and (folder / "config.json").is_file()


# --------------------------------------------------------------------------------------------------
# evaluate and sample
# --------------------------------------------------------------------------------------------------
def test_evaluate_reproduces_the_final_test_numbers(capsys, trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    code, out, err = run(capsys, "evaluate", run_dir)
    assert code == 0, err
    assert "importance-weighted bound" in out
    again = json.loads((run_dir / "evaluation-test" / "summary.json").read_text())["test"]
    original = json.loads((run_dir / "summary.json").read_text())["test"]
    assert again["elbo"] == pytest.approx(original["elbo"])
    assert again["iw_elbo"] == pytest.approx(original["iw_elbo"])
    # a second evaluation does not replace the first without --overwrite
    code, _, err = run(capsys, "evaluate", run_dir)
    assert_clean_error(code, err, "already holds", "--overwrite")
    code, _, err = run(capsys, "evaluate", run_dir, "--overwrite", "-k", "3")
    assert code == 0, err


def test_evaluate_on_a_given_file(capsys, trained, digits, tmp_path):
    out = tmp_path / "eval"
    code, stdout, err = run(capsys, "evaluate", trained, "--data", digits["images"], "--out", out, "-k", "2")
    assert code == 0, err
    assert "60 images" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test"]["num_images"] == 60 and summary["epoch"] == 2
    assert (out / "posterior.nc").is_file() and (out / "figures" / "reconstructions.png").is_file()


def test_evaluate_rejects_images_of_another_size(capsys, trained, tmp_path):
    path = tmp_path / "big.npy"
    np.save(path, np.random.default_rng(0).random((5, 20, 20), dtype=np.float32))
    code, _, err = run(capsys, "evaluate", trained, "--data", path, "--out", tmp_path / "e")
    assert_clean_error(code, err, "(1, 14, 14)", "(1, 20, 20)")


def test_sample_decodes_images_at_a_fixed_or_sampled_pose(capsys, trained, tmp_path):
    out = tmp_path / "fixed"
    code, _, err = run(capsys, "sample", trained, "-n", "5", "--theta", "0.5", "--out", out)
    assert code == 0, err
    saved = np.load(out / "samples.npz")
    assert saved["images"].shape == (5, 1, 14, 14) and saved["z"].shape == (5, 2)
    assert np.allclose(saved["theta"], 0.5) and np.allclose(saved["dx"], 0.0)
    assert (out / "samples.png").is_file()
    out = tmp_path / "prior"
    code, _, err = run(capsys, "sample", trained, "-n", "6", "--pose-from-prior", "--out", out)
    assert code == 0, err
    assert np.load(out / "samples.npz")["theta"].std() > 0
    code, _, err = run(capsys, "sample", trained, "--pose-from-prior", "--theta", "1", "--out", out)
    assert_clean_error(code, err, "--pose-from-prior")


# --------------------------------------------------------------------------------------------------
# resume and interruption
# --------------------------------------------------------------------------------------------------
def interrupt_after(monkeypatch, epoch: int, how: str = "raise") -> None:
    """Make the next ``pyro-svae train`` stop right after ``epoch`` (as Ctrl-C would)."""
    real_fit = train_command.fit

    def stop(finished: int, records) -> None:
        if finished == epoch:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1.0)  # the handler raises KeyboardInterrupt here
            raise KeyboardInterrupt

    def fit_then_stop(*args, callbacks=(), **kwargs):
        return real_fit(*args, callbacks=[*callbacks, stop], **kwargs)

    monkeypatch.setattr(train_command, "fit", fit_then_stop)


def test_resume_after_an_interruption_reproduces_the_uninterrupted_run(capsys, digits, tmp_path, monkeypatch):
    common = ["train", "--data", digits["images"], "--epochs", "4", *TINY]
    code, _, err = run(capsys, *common, "--out", tmp_path / "straight")
    assert code == 0, err

    broken = tmp_path / "broken"
    interrupt_after(monkeypatch, 2)
    code, _, err = run(capsys, *common, "--out", broken)
    assert code == 130
    assert f"Continue with: pyro-svae train --resume {broken}" in err and "epoch 2" in err
    assert torch.load(broken / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert not (broken / "summary.json").exists()
    monkeypatch.undo()

    code, out, err = run(capsys, "train", "--resume", broken, "--no-progress")
    assert code == 0, err
    assert "resuming after epoch 2" in out and "epoch 3/4" in out
    straight = (tmp_path / "straight" / "metrics.csv").read_text()
    assert (broken / "metrics.csv").read_text() == straight
    assert len(straight.splitlines()) == 1 + 4 * 2
    summaries = [json.loads((p / "summary.json").read_text()) for p in (tmp_path / "straight", broken)]
    assert summaries[0]["test"] == summaries[1]["test"]


def test_sigterm_stops_training_with_a_checkpoint(capsys, digits, tmp_path, monkeypatch):
    out = tmp_path / "term"
    handler_before = signal.getsignal(signal.SIGTERM)
    interrupt_after(monkeypatch, 1, how="sigterm")
    code, _, err = run(capsys, "train", "--data", digits["images"], "--epochs", "3", "--out", out, *TINY)
    assert code == 143
    assert "pyro-svae train --resume" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the CLI restores the handler


def test_resume_can_extend_a_finished_run_but_not_change_its_settings(capsys, trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    code, _, err = run(capsys, "train", "--resume", run_dir, "--z-dim", "3")
    assert_clean_error(code, err, "--z-dim", "cannot be given with --resume")
    code, _, err = run(capsys, "train", "--resume", run_dir, "--epochs", "1")
    assert_clean_error(code, err, "fewer than the 2 epochs")
    code, out, err = run(capsys, "train", "--resume", run_dir, "--epochs", "3", "--no-progress")
    assert code == 0, err
    assert "epoch 3/3" in out
    assert json.loads((run_dir / "config.json").read_text())["training"]["epochs"] == 3


@pytest.mark.slow
def test_sigint_to_the_console_script_then_resume_matches_an_uninterrupted_run(capsys, digits, tmp_path):
    """Ctrl-C to a real process: exit 130, a checkpoint of the last finished epoch, and resuming it
    gives the same metrics.csv rows as a run that was never stopped."""
    script = console_script()
    broken = tmp_path / "broken"
    common = ["--data", str(digits["images"]), *TINY]
    process = subprocess.Popen(
        [script, "train", *common, "--epochs", "1000", "--out", str(broken)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if (broken / "checkpoint.pt").exists():
                break
            time.sleep(0.2)
        assert process.poll() is None, "training ended before it could be interrupted"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "pyro-svae train --resume" in err
    done = torch.load(broken / "checkpoint.pt", weights_only=True)["epoch"]
    rows = (broken / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * done  # metrics.csv agrees with the checkpoint

    target = str(done + 1)
    code, _, err = run(capsys, "train", "--resume", broken, "--epochs", target, "--no-progress")
    assert code == 0, err
    code, _, err = run(capsys, "train", *common, "--epochs", target, "--out", tmp_path / "straight")
    assert code == 0, err
    assert (broken / "metrics.csv").read_text() == (tmp_path / "straight" / "metrics.csv").read_text()


# --------------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit status 2, nothing overwritten
# --------------------------------------------------------------------------------------------------
def write(path: Path, array) -> Path:
    np.save(path, array)
    return path


BAD_DATA = {
    "missing file": (lambda tmp: tmp / "nope.npy", ["no such file", "nope.npy"]),
    "unreadable file": (
        lambda tmp: (tmp / "garbage.npy").write_bytes(b"not an array") and tmp / "garbage.npy",
        ["not a readable .npy array"],
    ),
    "unknown format": (
        lambda tmp: (tmp / "images.txt").write_text("1 2 3") and tmp / "images.txt",
        ["unknown image file format"],
    ),
    "wrong rank": (
        lambda tmp: write(tmp / "flat.npy", np.zeros((10, 196), np.float32)),
        ["expected images of shape", "(10, 196)"],
    ),
    "non-square images": (
        lambda tmp: write(tmp / "wide.npy", np.zeros((10, 14, 20), np.float32)),
        ["must be square", "14x20"],
    ),
    "NaN pixels": (
        lambda tmp: write(tmp / "nan.npy", np.where(np.eye(14) > 0, np.nan, 0.5)[None].repeat(4, 0)),
        ["NaN or Inf"],
    ),
    "Inf pixels": (
        lambda tmp: write(tmp / "inf.npy", np.full((4, 14, 14), np.inf, np.float32)),
        ["NaN or Inf"],
    ),
    "empty data set": (
        lambda tmp: write(tmp / "empty.npy", np.zeros((0, 14, 14), np.float32)),
        ["empty"],
    ),
    "pixels outside [0, 1] for Bernoulli": (
        lambda tmp: write(tmp / "big.npy", np.full((4, 14, 14), 3.0, np.float32)),
        ["[0, 1]", "--likelihood gaussian"],
    ),
    "unknown built-in name": (lambda tmp: "rotated_mnsit", ["neither a built-in data set"]),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_gives_one_line_and_exit_2(capsys, tmp_path, case):
    make, fragments = BAD_DATA[case]
    data = make(tmp_path)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--data", data, "--epochs", "1", "--out", out, *TINY)
    assert_clean_error(code, err, *fragments)
    assert not out.exists(), "a failed start must not leave a run folder behind"


CONTRADICTIONS = {
    "vanilla with a rotation prior": (["--vanilla", "--theta-prior", "0.5"], "--vanilla"),
    "vanilla with a translation prior": (["--vanilla", "--dx-prior", "0.2"], "--dx-prior"),
    "no-rotate with a rotation prior": (["--no-rotate", "--theta-prior", "0.5"], "--no-rotate"),
    "test data and test size": (["--test-data", "x.npy", "--test-size", "5"], "not both"),
    "non-positive size": (["--z-dim", "0"], "positive integer"),
    "resume and out": (["--resume", "somewhere", "--out", "x"], "cannot be given with --resume"),
}


@pytest.mark.parametrize("case", list(CONTRADICTIONS))
def test_contradictory_options_give_one_line_and_exit_2(capsys, digits, tmp_path, case):
    flags, fragment = CONTRADICTIONS[case]
    out = tmp_path / "run"
    if "--resume" not in flags:
        flags = [*flags, "--out", out]
    code, _, err = run(capsys, "train", "--data", digits["images"], *flags, *TINY)
    assert_clean_error(code, err, fragment)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_cuda_without_a_gpu_is_a_clean_error(capsys, digits, tmp_path):
    code, _, err = run(
        capsys, "train", "--data", digits["images"], "--device", "cuda", "--out", tmp_path / "r"
    )
    assert_clean_error(code, err, "CUDA")


def test_existing_run_folder_is_not_overwritten_without_overwrite(capsys, trained, digits, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    code, _, err = run(capsys, "train", "--data", digits["images"], "--epochs", "1", "--out", run_dir, *TINY)
    assert_clean_error(code, err, "already holds a run", "--overwrite", "--resume")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    (run_dir / "notes.txt").write_text("mine")
    code, _, err = run(
        capsys, "train", "--data", digits["images"], "--epochs", "1", "--out", run_dir, "--overwrite", *TINY
    )
    assert code == 0, err
    assert json.loads((run_dir / "config.json").read_text())["training"]["epochs"] == 1
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_checkpoint_that_does_not_match_the_config_is_a_clean_error(capsys, trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    config["model"]["z_dim"] = 3
    (run_dir / "config.json").write_text(json.dumps(config))
    for command in (["evaluate", run_dir], ["sample", run_dir], ["train", "--resume", run_dir]):
        code, _, err = run(capsys, *command)
        assert_clean_error(code, err, "does not match", "z_dim")


def test_checkpoint_without_its_config_record_is_still_checked(capsys, trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    del state["run_config"]
    torch.save(state, run_dir / "checkpoint.pt")
    config = json.loads((run_dir / "config.json").read_text())
    config["model"]["hidden_dim"] = 8
    (run_dir / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "evaluate", run_dir)
    assert_clean_error(code, err, "checkpoint does not match the model")


def test_unreadable_checkpoint_or_missing_run_is_a_clean_error(capsys, trained, tmp_path):
    code, _, err = run(capsys, "evaluate", tmp_path / "nowhere")
    assert_clean_error(code, err, "no run folder")
    run_dir = copy_run(trained, tmp_path)
    (run_dir / "checkpoint.pt").write_bytes(b"garbage")
    code, _, err = run(capsys, "sample", run_dir)
    assert_clean_error(code, err, "not a readable pyro_svae checkpoint")
