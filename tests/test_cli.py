"""The ``pyro-svae`` command: train / evaluate / sample, run folders, resume, bad input.

Most tests call ``pyro_svae.cli.main([...])`` in-process on tiny data (14x14 digits, 16 hidden units);
one smoke test and one SIGINT test run the installed console script as a subprocess.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
from conftest import PoisonObs

import pyro_svae.cli.train as train_command
from pyro_svae import runs
from pyro_svae.cli import main
from pyro_svae.data import mnist_digits
from pyro_svae.infer import DivergenceError, History, resolve_precision
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


def test_init_output_bias_starts_the_decoder_at_the_training_mean(capsys, digits, tmp_path):
    from pyro_svae.runs import load_trained

    out = tmp_path / "run"
    argv = ["train", "--data", digits["images"], "--epochs", "1", "--init-output-bias", "--out", out, *TINY]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    _, config, model, _, _ = load_trained(out)
    assert config["training"]["init_output_bias"] is True
    mean = float(np.load(digits["images"]).mean())  # the training split's mean is within 0.02 of it
    bias = model.decoder.tail[-1].bias.item()  # one epoch of two Adam steps moves it by < 0.01
    assert abs(bias - math.log(mean / (1 - mean))) < 0.2


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
    assert "theta corr" in stdout and "(Fisher-Lee " in stdout  # the per-epoch line and the summary
    assert "theta circular corr" in stdout and stdout.count("Fisher-Lee") >= 2
    assert (out / "figures" / "theta.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert {"theta_circ_corr", "theta_median_error_deg"} <= set(summary["test"])
    assert summary["num_train"] == 100 and summary["num_test"] == 40
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "theta_circ_corr" in header
    code, stdout, err = run(capsys, "evaluate", out, "-k", "2")  # its test split, with the truth
    assert code == 0, err
    assert "theta circular corr" in stdout and "(Fisher-Lee " in stdout


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
# divergence: exit status 2, the last good checkpoint kept, resume at a smaller learning rate
# --------------------------------------------------------------------------------------------------
def assert_divergence(code: int, err: str, *fragments: str) -> None:
    """Exit status 2, the error and one line of advice on stderr containing every fragment, no traceback."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 2 and "Traceback" not in err, err
    assert lines[0].startswith("pyro-svae train: error: training diverged at epoch "), lines[0]
    for fragment in fragments:
        assert fragment in err, err


def optimizer_rates(run_dir: Path) -> set[float]:
    optimizer = torch.load(run_dir / "checkpoint.pt", weights_only=True)["optimizer"]
    return {g["lr"] for role in optimizer.values() for s in role.values() for g in s["param_groups"]}


def test_divergence_keeps_the_last_good_checkpoint_and_resumes_at_a_smaller_rate(capsys, trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    checkpoint, metrics = (run_dir / "checkpoint.pt").read_bytes(), (run_dir / "metrics.csv").read_text()
    code, _, err = run(capsys, "train", "--resume", run_dir, "--epochs", "4", "--learning-rate", "1e5")
    assert_divergence(
        code,
        err,
        "epoch 3 (step 2 of 3): the scale of a Normal distribution became invalid",
        "lower --learning-rate (now 100000), check the data's scale (pixel values: mean 0.1",
        f"keeps epoch 2: continue with: pyro-svae train --resume {run_dir} --learning-rate 10000",
    )
    assert (run_dir / "checkpoint.pt").read_bytes() == checkpoint
    assert (run_dir / "metrics.csv").read_text() == metrics

    code, out, err = run(capsys, "train", "--resume", run_dir, "--learning-rate", "1e-3", "--no-progress")
    assert code == 0, err
    assert "resuming after epoch 2, learning rate 0.001" in out and "epoch 4/4" in out
    training = json.loads((run_dir / "config.json").read_text())["training"]
    assert training["learning_rate"] == 1e-3 and training["epochs"] == 4
    assert training["learning_rate_changes"] == [
        {"after_epoch": 2, "from": 2e-3, "to": 1e5},
        {"after_epoch": 2, "from": 1e5, "to": 1e-3},
    ]
    assert optimizer_rates(run_dir) == {1e-3}


def test_a_nan_loss_in_epoch_2_keeps_epoch_1_with_no_pyro_nan_warnings(capsys, digits, tmp_path):
    out = tmp_path / "run"
    with PoisonObs(after=3 + 1 + 1):  # 3 steps and a test evaluation an epoch: epoch 2, step 2
        code, _, err = run(capsys, "train", "--data", digits["images"], "--epochs", "3", "--out", out, *TINY)
    assert_divergence(code, err, "epoch 2 (step 2 of 3): loss nan", "keeps epoch 1", "--learning-rate 0.0002")
    assert "Encountered NaN" not in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 2 * 1


def test_gaussian_data_at_1e6_warns_and_a_first_epoch_divergence_saves_nothing(capsys, digits, tmp_path):
    big = write(tmp_path / "big.npy", np.load(digits["images"]) * 1e6)
    out = tmp_path / "run"
    common = ["--likelihood", "gaussian", "--epochs", "1", "--out", out, *TINY]
    code, _, err = run(capsys, "train", "--data", big, *common)
    warning, *rest = err.strip().splitlines()
    assert warning.startswith("pyro-svae train: warning: big.npy/train: pixel values have mean 1.")
    assert "e+05, far from the Gaussian likelihood's noise sigma 1: normalize the images" in warning
    assert_divergence(
        code,
        "\n".join(rest),
        "training diverged at epoch 1 (step 1 of 3)",
        "per pixel): the pixel values are far from the likelihood's scale",
        "check the data's scale (pixel values: mean 1.",
        f"no epoch finished, so nothing was saved: start again with the same options plus --learning-rate "
        f"0.0002 --out {out} --overwrite",
    )
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.csv").exists()
    large = write(tmp_path / "large.npy", np.load(digits["images"]) * 1e3)
    code, _, err = run(capsys, "train", "--data", large, *common, "--overwrite")  # far, but it trains
    assert code == 0 and "normalize the images" in err
    assert (out / "summary.json").is_file()


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
    "zero-byte .npy": (
        lambda tmp: write_npy_header(tmp / "zero.npy", None, b""),
        ["zero.npy", "empty file"],
    ),
    ".npy header claiming 1 TiB": (
        lambda tmp: write_npy_header(tmp / "huge.npy", (2**28, 32, 32), b"\0" * 400),
        ["huge.npy", "1,099,511,627,776 bytes", "truncated or corrupt"],
    ),
    "one test image": (
        lambda tmp: [write(tmp / "five.npy", np.full((5, 14, 14), 0.5, np.float32)), "--test-size", "1"],
        ["--test-size 1", "at least 2 test images"],
    ),
}


def write_npy_header(path: Path, shape: tuple[int, ...] | None, payload: bytes) -> Path:
    """A file with an ``.npy`` header announcing ``shape`` (float32; none when ``None``), then ``payload``."""
    with open(path, "wb") as handle:
        if shape is not None:
            header = {"descr": "<f4", "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(handle, header)
        handle.write(payload)
    return path


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_gives_one_line_and_exit_2(capsys, tmp_path, case):
    make, fragments = BAD_DATA[case]
    made = make(tmp_path)
    data, *options = made if isinstance(made, list) else [made]
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--data", data, *options, "--epochs", "1", "--out", out, *TINY)
    assert_clean_error(code, err, *fragments)
    assert not out.exists(), "a failed start must not leave a run folder behind"


CONTRADICTIONS = {
    "vanilla with a rotation prior": (["--vanilla", "--theta-prior", "0.5"], "--vanilla"),
    "vanilla with a translation prior": (["--vanilla", "--dx-prior", "0.2"], "--dx-prior"),
    "no-rotate with a rotation prior": (["--no-rotate", "--theta-prior", "0.5"], "--no-rotate"),
    "test data and test size": (["--test-data", "x.npy", "--test-size", "5"], "not both"),
    "non-positive size": (["--z-dim", "0"], "positive integer"),
    "resume and out": (["--resume", "somewhere", "--out", "x"], "cannot be given with --resume"),
    "particle option without particles": (["--box", "8"], "--particles only"),
    "selection without particles": (["--ind", "keep.npy"], "--particles only"),
    "particles and data": (["--particles", "p.star"], "--particles gives the data"),
    "scale prior without scale": (["--scale-prior", "0.3"], "add --scale"),
    "learned scale prior without scale": (["--learn-scale-prior"], "add --scale"),
    "vanilla with scale": (["--vanilla", "--scale"], "--scale"),
    "augmentation without rotation": (["--no-rotate", "--augment-rotation"], "--augment-rotation"),
    "pose search without rotation": (["--vanilla", "--pose-search", "8"], "--pose-search"),
    "pose search with augmentation": (["--pose-search", "8", "--augment-rotation"], "--augment-rotation"),
    "pose search with canonicalization": (
        ["--pose-search", "8", "--canonicalize", "moments"],
        "--canonicalize",
    ),
    "canonicalization without rotation": (["--no-rotate", "--canonicalize", "moments"], "--canonicalize"),
    "canonicalization with augmentation": (["--canonicalize", "moments", "--augment-rotation"], "upright"),
    "pose search with one bin": (["--pose-search", "1"], "at least 2 rotation bins"),
    "pose search with pixel subsampling": (["--pose-search", "8", "--pixel-subsample", "20"], "give one"),
    "pose search mode without pose search": (["--pose-search-mode", "marginal"], "add --pose-search"),
    "render without pose search": (["--pose-search-render", "exact"], "add --pose-search"),
    "distillation without pose search": (["--pose-search-distill", "3"], "add --pose-search"),
    "negative distillation": (["--pose-search", "8", "--pose-search-distill", "-1"], "a finite number >= 0"),
    "encoder with the search off": (
        ["--pose-search", "0", "--pose-search-encoder", "mlp"],
        "add --pose-search",
    ),
    "lattice without summing the bins": (
        ["--pose-search", "8", "--pose-search-render", "lattice"],
        "--pose-search-mode",
    ),
    "pixel subsampling with vanilla": (["--vanilla", "--pixel-subsample", "20"], "--pixel-subsample"),
    "too many pixels": (["--pixel-subsample", "500"], "196 pixels"),
    "compile with vanilla": (["--vanilla", "--compile"], "--compile"),
    "psf with pixel subsampling": (["--psf-fwhm", "2", "--pixel-subsample", "20"], "give one of them"),
    "psf with a bernoulli likelihood": (["--psf-fwhm", "2"], "cannot score PSF-blurred"),
    "coordinate frequency with vanilla": (["--vanilla", "--coord-frequency", "5"], "--coord-frequency"),
    "unknown precision": (["--precision", "fp8"], "invalid choice"),
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


def files_in(root: Path) -> dict[str, bytes]:
    """``{relative path: bytes}`` of the files under ``root`` but its lock file."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != ".lock"
    }


def test_existing_run_folder_is_not_overwritten_without_overwrite(capsys, trained, digits, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    before = files_in(run_dir)
    code, _, err = run(capsys, "train", "--data", digits["images"], "--epochs", "1", "--out", run_dir, *TINY)
    assert_clean_error(code, err, "already holds a run", "--overwrite", "--resume")
    assert files_in(run_dir) == before
    mine = {"notes.txt": b"mine", "figures/mine.png": b"mine", "samples/mine.txt": b"mine"}
    for name, data in {**mine, "samples/samples.npz": b"old samples"}.items():
        (run_dir / name).parent.mkdir(exist_ok=True)
        (run_dir / name).write_bytes(data)
    code, _, err = run(
        capsys, "train", "--data", digits["images"], "--epochs", "1", "--out", run_dir, "--overwrite", *TINY
    )
    assert code == 0, err
    assert json.loads((run_dir / "config.json").read_text())["training"]["epochs"] == 1
    after = files_in(run_dir)
    assert all(after[name] == data for name, data in mine.items())  # the user's files stay
    assert "samples/samples.npz" not in after and not (run_dir / ".replaced-run").exists()


def failing_fit(error: BaseException):
    def fit(*args, **kwargs):
        raise error

    return fit


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(
    capsys, trained, digits, tmp_path, monkeypatch
):
    run_dir = copy_run(trained, tmp_path)
    (run_dir / "figures" / "mine.png").write_bytes(b"mine")
    before = files_in(run_dir)
    argv = ["train", "--data", digits["images"], "--epochs", "3", "--out", run_dir, "--overwrite", *TINY]
    diverged = DivergenceError(
        epoch=1, step=1, steps=3, loss=math.nan, reason="loss nan", learning_rate=2e-3, history=History()
    )
    for error, status in ((KeyboardInterrupt(), 130), (diverged, 2), (OSError(28, "No space left"), 2)):
        monkeypatch.setattr(train_command, "fit", failing_fit(error))  # stops before the first checkpoint
        code, _, err = run(capsys, *argv)
        assert code == status, err
        assert f"the run it was replacing is back in {run_dir}" in err
        assert "keeps epoch" not in err  # the checkpoint there is the old run's, not one to resume
        assert files_in(run_dir) == before
    monkeypatch.undo()

    interrupt_after(monkeypatch, 1)  # the new run's first checkpoint replaces the old run
    code, _, err = run(capsys, *argv)
    assert code == 130 and "Continue with" in err
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert json.loads((run_dir / "config.json").read_text())["training"]["epochs"] == 3
    assert not (run_dir / "summary.json").exists() and not (run_dir / ".replaced-run").exists()
    assert (run_dir / "figures" / "mine.png").read_bytes() == b"mine"


@pytest.mark.skipif(runs.folder.fcntl is None, reason="no fcntl: run folders are not locked")
def test_a_run_folder_in_use_is_refused_with_the_holders_pid(capsys, trained, digits, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    before = files_in(run_dir)
    overwrite = ["--data", digits["images"], "--epochs", "1", "--out", run_dir, "--overwrite", *TINY]
    with runs.run_lock(run_dir):  # as another pyro-svae train would
        for argv in (["--resume", run_dir, "--epochs", "3"], overwrite):
            code, _, err = run(capsys, "train", *argv)
            assert_clean_error(code, err, f"{run_dir} is in use by process {os.getpid()}")
    assert files_in(run_dir) == before


def test_resume_settles_what_a_killed_run_left(capsys, trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    before = files_in(run_dir)
    aside = run_dir / ".replaced-run"  # an --overwrite killed before its first checkpoint ...
    for name in before:
        (aside / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).rename(aside / name)
    (run_dir / "config.json").write_text("{}")
    orphans = [".checkpoint.pt.x1y2z3w4.tmp", "figures/.manifold.png.a1b2c3d4.tmp"]  # ... or a write
    for name in [*orphans, ".notes.txt.a1b2c3d4.tmp"]:
        (run_dir / name).parent.mkdir(exist_ok=True)
        (run_dir / name).write_bytes(b"")
    code, out, err = run(capsys, "train", "--resume", run_dir, "--epochs", "2", "--no-progress")
    assert code == 0, err
    assert f"the run it was replacing is back in {run_dir}" in err
    assert "removed 2 temporary file(s)" in out and "resuming after epoch 2" in out
    assert not aside.exists() and not any((run_dir / name).exists() for name in orphans)
    assert (run_dir / ".notes.txt.a1b2c3d4.tmp").exists()  # not a temporary file of this project
    assert set(files_in(run_dir)) == {*before, ".notes.txt.a1b2c3d4.tmp"}


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


# --------------------------------------------------------------------------------------------------
# cryo-EM particles, folders of cut-outs, built-ins and model options
# --------------------------------------------------------------------------------------------------
PARTICLE_TINY = ["--hidden-dim", "8", "--eval-particles", "2", "--posterior-draws", "3", "--no-progress"]
PARTICLE_TINY += ["--epochs", "1", "--batch-size", "10"]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    """40 simulated 16x16 particles with CTF, written by ``pyro-svae simulate-particles``."""
    folder = tmp_path_factory.mktemp("particles") / "sim"
    assert main(["simulate-particles", "--out", str(folder), "--n", "40", "--box", "16", "--seed", "3"]) == 0
    return folder / "particles.star"


@pytest.fixture(scope="module")
def particle_run(tmp_path_factory, simulated) -> Path:
    out = tmp_path_factory.mktemp("particle-runs") / "run"
    assert main(["train", "--particles", str(simulated), "--out", str(out), *PARTICLE_TINY]) == 0
    return out


def star_table(path: Path):
    import starfile

    return starfile.read(path, always_dict=True)["particles"]


def test_simulate_particles_writes_relion_files_with_ground_truth(capsys, tmp_path):
    from pyro_svae.data import load_particles

    code, out, err = run(capsys, "simulate-particles", "--out", tmp_path, "-n", "12", "--box", "16")
    assert code == 0, err
    assert "12 particles of 16x16" in out and "with CTF" in out and "particles.star" in out
    data = load_particles(tmp_path / "particles.star")
    assert data.images.shape == (12, 1, 16, 16) and data.ctf is not None
    assert data.theta is not None and data.dx is not None and "conformation" in data.factors
    assert data.info["pixel_size"] == pytest.approx(2.2)
    code, _, err = run(capsys, "simulate-particles", "--out", tmp_path, "-n", "12")
    assert_clean_error(code, err, "already holds particles.star", "--overwrite")
    code, out, err = run(
        capsys, "simulate-particles", "--out", tmp_path, "-n", "5", "--box", "12", "--no-ctf",
        "--no-noise", "--shift-std", "0", "--pixel-size", "3", "--overwrite",
    )  # fmt: skip
    assert code == 0, err
    data = load_particles(tmp_path / "particles.star")
    assert len(data) == 5 and data.ctf is None and float(data.dx.abs().max()) < 1e-6
    assert data.info["pixel_size"] == pytest.approx(3.0)
    code, _, err = run(capsys, "simulate-particles", "--out", tmp_path, "--no-noise", "--snr", "2")
    assert_clean_error(code, err, "--snr")
    code, _, err = run(capsys, "simulate-particles", "--out", tmp_path / "m", "--atomic-model", "no.pdb")
    assert_clean_error(code, err, "no such file", "no.pdb")


def test_train_on_simulated_particles_end_to_end(particle_run, simulated, capsys):
    config = json.loads((particle_run / "config.json").read_text())
    spec = config["data"]["particles"]
    assert spec["file"]["path"] == str(simulated.resolve()) and len(spec["file"]["sha256"]) == 64
    assert spec["use_ctf"] and spec["preprocess"] == {
        "box": None,
        "normalize": True,
        "invert": False,
        "mask_radius": None,
    }
    model = config["model"]
    assert model["ctf"] and model["likelihood"] == "gaussian"
    assert model["theta_prior_std"] == pytest.approx(np.pi)  # in-plane rotations are uniform
    # particles search 16 rotation bins, summed out by the model through its render lattice
    assert config["guide"]["kind"] == "pose_search" and config["guide"]["mode"] == "marginal"
    assert model["rotation_bins"] == 16 and model["enumerate_bins"] and model["bin_render"] == "lattice"
    # the default precision is auto; config.json records what it resolved to on this machine
    assert config["training"]["precision"] == resolve_precision("auto", torch.device("cpu"))

    table = star_table(particle_run / "particles.star")
    original = star_table(simulated)
    assert len(table) == 40  # train and test, in the input order
    assert [name.split("@")[0] for name in table["rlnImageName"]] == list(original["rlnImageName"].str[:6])
    for column in ("rlnAnglePsi", "rlnOriginXAngst", "pyroSvaePsiStdDeg", "pyroSvaeOriginXStdAngst"):
        assert column in table.columns and np.isfinite(table[column]).all()
    assert {"pyroSvaeZ1", "pyroSvaeZ2", "pyroSvaeZStd1", "pyroSvaeZStd2"} <= set(table.columns)
    assert (table["pyroSvaeZStd1"] > 0).all() and (table["pyroSvaePsiStdDeg"] > 0).all()
    assert np.allclose(table["pyroSvaeInputAnglePsi"], original["rlnAnglePsi"])  # the truth is kept

    from pyro_svae.data import load_particles

    # rlnImageName as given: the written file finds its images from the input's project directory
    assert table["rlnImageName"].tolist() == original["rlnImageName"].tolist()
    again = load_particles(particle_run / "particles.star", project_dir=simulated.parent)
    assert torch.equal(again.images, load_particles(simulated).images)

    from PIL import Image

    with Image.open(particle_run / "figures" / "traversal.gif") as gif:
        assert gif.n_frames == 24
    summary = json.loads((particle_run / "summary.json").read_text())
    assert "figures/traversal.gif" in summary["figures"] and "z_spearman_conformation" in summary["test"]

    code, out, err = run(capsys, "evaluate", particle_run, "--out", particle_run.parent / "eval")
    assert code == 0, err
    evaluated = json.loads((particle_run.parent / "eval" / "summary.json").read_text())
    assert evaluated["test"]["elbo"] == pytest.approx(summary["test"]["elbo"], abs=1e-3)


def test_particle_run_output_names_the_ctf_and_resumes(capsys, simulated, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--particles", simulated, "--out", out, *PARTICLE_TINY)
    assert code == 0, err
    first = stdout.splitlines()[0]
    assert "CTF" in first and "36 training / 4 test images of 1x16x16" in first
    assert "particles.star: 40 particles" in stdout and "z Spearman conformation" in stdout
    code, stdout, err = run(capsys, "train", "--resume", out, "--epochs", "2", "--no-progress")
    assert code == 0, err
    assert "epoch 2/2" in stdout and (out / "particles.star").is_file()


def test_particles_refined_in_3d_keep_their_poses_and_the_run_says_so(capsys, simulated, tmp_path):
    import starfile

    blocks = starfile.read(simulated, always_dict=True)
    particles = blocks["particles"]
    stack = (simulated.parent / particles["rlnImageName"].iloc[0].split("@")[1]).resolve()
    rng = np.random.default_rng(0)
    blocks["particles"] = particles.assign(
        rlnImageName=[f"{name.split('@')[0]}@{stack}" for name in particles["rlnImageName"]],
        rlnAngleRot=rng.uniform(-180, 180, len(particles)).round(6),
        rlnAngleTilt=rng.uniform(0, 180, len(particles)).round(6),
    )
    refined = tmp_path / "refined.star"
    starfile.write(blocks, refined)
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--particles", refined, "--out", out, *PARTICLE_TINY)
    assert code == 0, err
    assert (
        "particles.star: the input STAR has 3D poses (rlnAngleRot/rlnAngleTilt): the in-plane posterior went "
        "to pyroSvaePsiDeg/pyroSvaeOriginX/YAngst, RELION's pose columns are unchanged"
    ) in stdout
    table, original = star_table(out / "particles.star"), star_table(refined)
    for column in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        np.testing.assert_array_equal(table[column].to_numpy(), original[column].to_numpy())
    assert {"pyroSvaePsiDeg", "pyroSvaeOriginXAngst", "pyroSvaePsiResultant"} <= set(table.columns)


def test_star_exported_from_a_relion_project_opens_every_image_from_the_project(
    capsys, simulated, tmp_path, monkeypatch
):
    import starfile

    from pyro_svae.data import load_particles

    data = load_particles(simulated, mmap=False)
    project = tmp_path / "project"
    movies = project / "Extract" / "job012" / "Movies"
    movies.mkdir(parents=True)
    images = data.images[:, 0].numpy()
    for k, rows in enumerate((slice(0, 25), slice(25, 40))):
        with mrcfile.new(movies / f"mic{k + 1}.mrcs") as mrc:
            mrc.set_data(images[rows])
    blocks = starfile.read(simulated, always_dict=True)
    names = [f"{i + 1:06d}@Extract/job012/Movies/mic1.mrcs" for i in range(25)]
    names += [f"{i + 1:06d}@Extract/job012/Movies/mic2.mrcs" for i in range(15)]
    blocks["particles"] = blocks["particles"].assign(
        rlnImageName=names, rlnMicrographName="MotionCorr/job002/Movies/mic.mrc", rlnClassNumber=3
    )
    (project / "Select" / "job020").mkdir(parents=True)
    starfile.write(blocks, project / "Select" / "job020" / "particles.star")
    monkeypatch.chdir(project)  # RELION runs in its project directory
    out = tmp_path / "run"
    argv = ["train", "--particles", "Select/job020/particles.star", "--out", out, *PARTICLE_TINY]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    assert "project directory" in stdout
    table = star_table(out / "particles.star")
    original = blocks["particles"]
    assert table["rlnImageName"].tolist() == names  # unchanged
    assert set(original.columns) <= set(table.columns)  # every input column kept
    for column in ("rlnMicrographName", "rlnClassNumber", "rlnDefocusU", "rlnOpticsGroup"):
        assert table[column].tolist() == original[column].tolist()
    assert "rlnAnglePsi" in table and "pyroSvaeInputAnglePsi" in table  # 2-D input: RELION's pose columns
    again = load_particles(out / "particles.star")  # the project's own path resolution: from its folder
    assert torch.equal(again.images, data.images)
    monkeypatch.chdir(tmp_path)
    again = load_particles(out / "particles.star", project_dir=project)
    assert torch.equal(again.images, data.images)


def test_train_on_a_selection_of_particles(capsys, simulated, tmp_path):
    keep = np.array([39, 0, 5, 7, 12, 13, 20, 21, 22, 30, 31, 33])
    np.save(tmp_path / "keep.npy", keep)
    out = tmp_path / "run"
    argv = ["train", "--particles", simulated, "--ind", tmp_path / "keep.npy", "--test-size", "3"]
    code, stdout, err = run(capsys, *argv, "--out", out, *PARTICLE_TINY)
    assert code == 0, err
    assert "9 training / 3 test images" in stdout and "particles.star: 12 particles" in stdout
    spec = json.loads((out / "config.json").read_text())["data"]["particles"]
    assert spec["ind"]["path"] == str((tmp_path / "keep.npy").resolve()) and len(spec["ind"]["sha256"]) == 64
    table, original = star_table(out / "particles.star"), star_table(simulated)
    assert table["rlnImageName"].tolist() == original["rlnImageName"].iloc[np.sort(keep)].tolist()
    train, test = runs.load_data(json.loads((out / "config.json").read_text())["data"])
    assert sorted(train.source_index.tolist() + test.source_index.tolist()) == sorted(keep.tolist())

    (tmp_path / "bad.txt").write_text("1 2 40\n")
    argv = ["train", "--particles", simulated, "--ind", tmp_path / "bad.txt", "--out", tmp_path / "r2"]
    code, _, err = run(capsys, *argv, *PARTICLE_TINY)
    assert_clean_error(code, err, "bad.txt", "index 40 is outside the 40 particles")


def test_init_output_bias_is_refused_for_particles_with_a_ctf(capsys, simulated, tmp_path):
    argv = ["train", "--particles", simulated, "--init-output-bias", "--out", tmp_path / "run"]
    code, _, err = run(capsys, *argv, *PARTICLE_TINY)
    assert_clean_error(code, err, "--init-output-bias", "CTF")


def test_stack_with_ctf_star_preprocessing_and_no_ctf(capsys, simulated, tmp_path):
    from pyro_svae.data import load_particles, read_stack, write_particles

    data = load_particles(simulated)
    stack = tmp_path / "stack.mrcs"
    write_particles(tmp_path / "stack.star", data)  # stack.mrcs + its CTF rows in stack.star
    ctf_star = tmp_path / "ctf.star"
    (tmp_path / "stack.star").rename(ctf_star)
    out = tmp_path / "run"
    flags = ["--ctf", ctf_star, "--box", "12", "--invert", "--mask-radius", "4", "--test-size", "8"]
    code, stdout, err = run(capsys, "train", "--particles", stack, *flags, "--out", out, *PARTICLE_TINY)
    assert code == 0, err
    assert "32 training / 8 test images of 1x12x12" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["ctf"] and config["model"]["image_shape"] == [1, 12, 12]
    spec = config["data"]["particles"]
    assert spec["ctf_file"]["path"] == str(ctf_star.resolve())
    assert spec["preprocess"] == {"box": 12, "normalize": True, "invert": True, "mask_radius": 4.0}
    table = star_table(out / "particles.star")
    assert len(table) == 40 and table["rlnImageName"].iloc[0] == f"000001@{stack.resolve()}"
    assert read_stack(stack).shape == (40, 16, 16)

    out = tmp_path / "no-ctf"
    code, stdout, err = run(
        capsys, "train", "--particles", simulated, "--no-ctf", "--likelihood", "gaussian_learned",
        "--theta-prior", "1.0", "--out", out, *PARTICLE_TINY,
    )  # fmt: skip
    assert code == 0, err
    model = json.loads((out / "config.json").read_text())["model"]
    assert not model["ctf"] and model["likelihood"] == "gaussian_learned"
    assert model["theta_prior_std"] == 1.0 and "WITHOUT CTF" not in stdout


def test_star_without_ctf_columns_trains_without_ctf_and_says_so_first(capsys, simulated, tmp_path):
    from dataclasses import replace

    from pyro_svae.data import load_particles, write_particles

    plain = replace(load_particles(simulated), ctf=None)
    write_particles(tmp_path / "plain.star", plain, pixel_size=2.2)
    out = tmp_path / "run"
    flags = ["--particles", tmp_path / "plain.star", "--out", out]
    code, stdout, err = run(capsys, "train", *flags, *PARTICLE_TINY)
    assert code == 0, err
    assert "no CTF columns in plain.star: training WITHOUT CTF" in stdout.splitlines()[0]
    assert not json.loads((out / "config.json").read_text())["model"]["ctf"]


def _particles(tmp_path: Path, simulated: Path) -> dict[str, Path]:
    """Bad particle files next to a good stack."""
    import mrcfile

    from pyro_svae.data import load_particles, write_particles

    data = load_particles(simulated)
    write_particles(tmp_path / "good.star", data)
    table = (tmp_path / "good.star").read_text()
    (tmp_path / "past_end.star").write_text(table.replace("000040@good.mrcs", "000099@good.mrcs"))
    plain = tmp_path / "plain.star"
    (plain).write_text(
        "data_particles\n\nloop_\n_rlnImageName #1\n" + "".join(f"{i + 1:06d}@good.mrcs\n" for i in range(40))
    )
    np.save(tmp_path / "wide.npy", np.random.default_rng(0).normal(size=(6, 16, 20)).astype(np.float32))
    np.save(tmp_path / "stack.npy", data.images[:, 0].numpy())
    with mrcfile.new(tmp_path / "corrupt.mrcs") as mrc:
        mrc.set_data(np.zeros((4, 16, 16), np.float32))
    with open(tmp_path / "corrupt.mrcs", "r+b") as handle:  # mode 99: no MRC data type
        handle.seek(12)
        handle.write(np.int32(99).tobytes())
    with mrcfile.new(tmp_path / "truncated.mrcs") as mrc:
        mrc.set_data(np.zeros((4, 16, 16), np.float32))
    with open(tmp_path / "truncated.mrcs", "r+b") as handle:
        handle.truncate(1024 + 100)
    return {"tmp": tmp_path, "good_star": tmp_path / "good.star", "plain": plain}


BAD_PARTICLES = {
    "--ctf STAR without CTF columns": (
        lambda f: ["--particles", f["tmp"] / "stack.npy", "--ctf", f["plain"], "--pixel-size", "2"],
        ["CTF column(s) missing", "rlnDefocusU"],
    ),
    "reference past the end of the stack": (
        lambda f: ["--particles", f["tmp"] / "past_end.star"],
        ["asks for image 99", "holds 40 images"],
    ),
    "non-square particles": (lambda f: ["--particles", f["tmp"] / "wide.npy"], ["square", "16x20"]),
    "stack and CTF rows of different counts": (
        lambda f: ["--particles", f["tmp"] / "wide.npy", "--ctf", f["good_star"]],
        ["square"],
    ),
    "missing pixel size of a STAR file": (lambda f: ["--particles", f["plain"]], ["missing pixel size"]),
    "missing pixel size of a stack": (
        lambda f: ["--particles", f["tmp"] / "stack.npy"],
        ["pixel size is unknown", "--pixel-size"],
    ),
    "corrupt MRC header": (
        lambda f: ["--particles", f["tmp"] / "corrupt.mrcs"],
        ["corrupt.mrcs", "MRC data cannot be read", "mode '99'"],
    ),
    "truncated MRC data": (lambda f: ["--particles", f["tmp"] / "truncated.mrcs"], ["truncated.mrcs"]),
    "Bernoulli likelihood with CTF": (
        lambda f: ["--particles", f["good_star"], "--likelihood", "bernoulli"],
        ["cannot score CTF-filtered particles", "--no-ctf"],
    ),
    "pixel subsampling with CTF": (
        lambda f: ["--particles", f["good_star"], "--pixel-subsample", "10"],
        ["--pixel-subsample", "CTF"],
    ),
    "--ctf with --no-ctf": (
        lambda f: ["--particles", f["tmp"] / "stack.npy", "--ctf", f["good_star"], "--no-ctf"],
        ["--no-ctf"],
    ),
    "--ctf with a STAR file": (
        lambda f: ["--particles", f["good_star"], "--ctf", f["good_star"]],
        ["carries its own CTF columns"],
    ),
    "mask radius without normalization": (
        lambda f: ["--particles", f["good_star"], "--no-normalize", "--mask-radius", "3"],
        ["--mask-radius"],
    ),
    "box larger than the particles": (lambda f: ["--particles", f["good_star"], "--box", "20"], ["box"]),
    "unknown particle format": (lambda f: ["--particles", f["plain"].with_suffix(".txt")], [".txt"]),
}


@pytest.mark.parametrize("case", list(BAD_PARTICLES))
def test_bad_particles_give_one_line_and_exit_2(capsys, simulated, tmp_path, case):
    files = _particles(tmp_path, simulated)
    make, fragments = BAD_PARTICLES[case]
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", *make(files), "--out", out, *PARTICLE_TINY)
    assert_clean_error(code, err, *fragments)
    assert not out.exists()


def test_mismatched_stack_and_ctf_counts_are_a_clean_error(capsys, simulated, tmp_path):
    files = _particles(tmp_path, simulated)
    np.save(tmp_path / "short.npy", np.load(tmp_path / "stack.npy")[:30])
    flags = ["--particles", tmp_path / "short.npy", "--ctf", files["good_star"]]
    code, _, err = run(capsys, "train", *flags, "--out", tmp_path / "run", *PARTICLE_TINY)
    assert_clean_error(code, err, "40 CTF rows for 30 images")


def write_cutouts(folder: Path, count: int, size: int = 12, *, odd: int | None = None) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        side = odd if (odd is not None and i == count - 1) else size
        pixels = (rng.random((side, side, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"galaxy_{i:03d}.png")
    return folder


def test_train_on_a_folder_of_cutouts_and_evaluate_it(capsys, tmp_path):
    folder = write_cutouts(tmp_path / "cutouts", 20)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "run"
    flags = ["--data", folder, "--test-size", "4", "--out", out]
    code, stdout, err = run(capsys, "train", *flags, *PARTICLE_TINY)
    assert code == 0, err
    assert "16 training / 4 test images of 3x12x12" in stdout
    entry = json.loads((out / "config.json").read_text())["data"]["file"]
    assert entry["folder"] and entry["path"] == str(folder.resolve()) and len(entry["sha256"]) == 64
    assert not (out / "particles.star").exists() and (out / "figures" / "traversal.gif").is_file()
    code, _, err = run(capsys, "evaluate", out)
    assert code == 0, err


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda tmp: write_cutouts(tmp / "mixed", 4, odd=10), "12x12"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no image files"),
    ],
    ids=["mixed sizes", "empty folder"],
)
def test_bad_folders_give_one_line_and_exit_2(capsys, tmp_path, make, fragment):
    code, _, err = run(capsys, "train", "--data", make(tmp_path), "--out", tmp_path / "run", *PARTICLE_TINY)
    assert_clean_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_builtin_simulated_particles_get_particle_defaults(capsys, tmp_path):
    out = tmp_path / "run"
    flags = ["--data", "simulated_particles", "--train-size", "30", "--test-size", "10"]
    code, stdout, err = run(capsys, "train", *flags, "--out", out, *PARTICLE_TINY)
    assert code == 0, err
    assert "30 training / 10 test images of 1x32x32" in stdout and "theta corr" in stdout
    model = json.loads((out / "config.json").read_text())["model"]
    assert model["likelihood"] == "gaussian" and not model["ctf"]
    assert model["theta_prior_std"] == pytest.approx(np.pi)
    assert not (out / "particles.star").exists()


def test_scale_augmentation_subsampling_and_precision_are_recorded_and_rebuilt(capsys, tmp_path, monkeypatch):
    from pyro_svae.data import BUILTIN, simulated_galaxies

    def small_galaxies(*, seed=0, test_size=10):
        full = simulated_galaxies(30, size=16, seed=seed)
        return full.subset(range(30 - test_size)), full.subset(range(30 - test_size, 30))

    monkeypatch.setitem(BUILTIN, "simulated_galaxies", small_galaxies)
    out = tmp_path / "run"
    flags = ["--data", "simulated_galaxies", "--scale", "--scale-prior", "0.4", "--augment-rotation"]
    flags += ["--pixel-subsample", "64", "--precision", "bf16"]
    code, stdout, err = run(capsys, "train", *flags, "--out", out, *PARTICLE_TINY)
    assert code == 0, err
    assert "infers rotation, translation and scale" in stdout and "64 pixels per image" in stdout
    assert "log scale corr" in stdout.splitlines()[2]  # the epoch line
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["scale"] and config["model"]["scale_prior_std"] == 0.4
    assert config["model"]["pixel_subsample"] == 64 and config["guide"]["augment_rotation"]
    assert config["training"]["precision"] == "bf16"
    assert "log_scale_corr" in json.loads((out / "summary.json").read_text())["test"]
    code, stdout, err = run(capsys, "train", "--resume", out, "--epochs", "2", "--precision", "auto")
    assert code == 0, err
    resolved = resolve_precision("auto", torch.device("cpu"))  # config.json records what auto chose
    assert json.loads((out / "config.json").read_text())["training"]["precision"] == resolved
    moments = tmp_path / "moments"
    flags = ["--data", "simulated_galaxies", "--scale", "--learn-scale-prior", "--canonicalize", "moments"]
    flags += ["--psf-fwhm", "2.5", "--coord-frequency", "10", "--likelihood", "gaussian"]
    code, stdout, err = run(capsys, "train", *flags, "--out", moments, *PARTICLE_TINY)
    assert code == 0, err
    assert "PSF of 2.5 px FWHM" in stdout
    config = json.loads((moments / "config.json").read_text())
    assert config["guide"]["canonicalize"] == "moments" and config["model"]["scale_prior"] == "learned"
    assert config["model"]["psf_fwhm"] == 2.5 and config["model"]["coord_frequency"] == 10
    code, stdout, err = run(capsys, "train", "--resume", moments, "--epochs", "2")
    assert code == 0, err
    code, _, err = run(capsys, "evaluate", out, "--out", tmp_path / "eval")
    assert code == 0, err


def test_pose_search_run_is_rebuilt_by_evaluate_and_sample(capsys, digits, tmp_path):
    out = tmp_path / "run"
    flags = ["--data", digits["images"], "--pose-search", "8", "--epochs", "1", "--out", out]
    code, stdout, err = run(capsys, "train", *flags, *TINY)
    assert code == 0, err
    assert "pose search over 8 rotation bins" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["guide"]["kind"] == "pose_search" and config["model"]["rotation_bins"] == 8
    code, _, err = run(capsys, "evaluate", out)
    assert code == 0, err
    code, _, err = run(capsys, "sample", out, "-n", "3")
    assert code == 0, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_fp16_without_a_gpu_is_a_usage_error(capsys, digits, tmp_path):
    out = tmp_path / "run"
    flags = ["--data", digits["images"], "--precision", "fp16", "--out", out]
    code, _, err = run(capsys, "train", *flags, *TINY)
    assert_clean_error(code, err, "--precision fp16", "CUDA")
    assert not out.exists()


def test_help_lists_the_particle_and_model_options(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "simulate-particles" in out
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0
    for option in (
        "--particles",
        "--ctf",
        "--pixel-size",
        "--no-ctf",
        "--box",
        "--no-normalize",
        "--invert",
        "--mask-radius",
        "--scale",
        "--scale-prior",
        "--augment-rotation",
        "--pose-search",
        "--pose-search-mode",
        "--pixel-subsample",
        "--compile",
        "--precision",
        "simulated_particles",
        "hubble_galaxies",
    ):
        assert option in out, option


def test_compile_is_recorded_and_rebuilt(capsys, digits, tmp_path, monkeypatch):
    from pyro_svae import runs

    def stop(*args, **kwargs):
        raise KeyboardInterrupt  # the config is written before training starts

    monkeypatch.setattr(train_command, "fit", stop)
    out = tmp_path / "run"
    code, _, _ = run(capsys, "train", "--data", digits["images"], "--compile", "--out", out, *TINY)
    assert code == 130
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["compile"] is True
    assert runs.build_model(config)[0].config["compile"] is True


@pytest.mark.slow
def test_compiled_particle_run_trains_and_evaluates(capsys, simulated, tmp_path):
    out = tmp_path / "run"
    flags = ["--particles", simulated, "--no-ctf", "--compile", "--pixel-subsample", "64", "--out", out]
    code, _, err = run(capsys, "train", *flags, *PARTICLE_TINY)
    # particles search rotations by default, and the search's bins cannot nest the pixels plate
    assert code == 2 and "add --pose-search 0" in err
    code, _, err = run(capsys, "train", *flags, "--pose-search", "0", *PARTICLE_TINY)
    assert code == 0, err
    code, _, err = run(capsys, "evaluate", out)
    assert code == 0, err


def test_particle_pose_search_sums_bins_in_the_model_and_exports_the_posterior(capsys, simulated, tmp_path):
    out = tmp_path / "run"
    flags = ["--particles", simulated, "--pose-search", "4", "--out", out]
    code, stdout, err = run(capsys, "train", *flags, *PARTICLE_TINY)
    assert code == 0, err
    assert "pose search over 4 rotation bins, summed out by the model" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["enumerate_bins"] is True and config["guide"]["mode"] == "marginal"
    assert config["guide"]["distill_bins"] == 10.0
    table = star_table(out / "particles.star")
    assert table["rlnAnglePsi"].notna().all() and (table["pyroSvaePsiStdDeg"] > 0).all()
    code, _, err = run(capsys, "evaluate", out)
    assert code == 0, err
    # the weight of the encoder's fit to the search is the run's
    weighted = [*flags[:4], "--pose-search-distill", "0", "--out", tmp_path / "plain"]
    code, _, err = run(capsys, "train", *weighted, *PARTICLE_TINY)
    assert code == 0, err
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["guide"]["distill_bins"] == 0.0
    # the encoder-scored bins stay one flag away
    other = [*flags[:4], "--pose-search-mode", "enumerate", "--out", tmp_path / "b"]
    code, stdout, err = run(capsys, "train", *other, *PARTICLE_TINY)
    assert code == 0, err
    assert "scored by the encoder" in stdout


def test_train_keeps_freed_memory_while_it_trains_unless_told_not_to(capsys, digits, tmp_path, monkeypatch):
    states: list[bool] = []  # the allocator's setting as fit sees it
    switches: list[bool] = []
    real_fit = train_command.fit

    def switch(enabled: bool = True) -> bool:
        switches.append(enabled)
        return True

    def recording_fit(*args, **kwargs):
        states.append(bool(switches) and switches[-1])
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(train_command, "retain_freed_memory", switch)
    monkeypatch.setattr(train_command, "fit", recording_fit)
    common = ["train", "--data", digits["images"], "--epochs", "1", *TINY]
    code, _, err = run(capsys, *common, "--out", tmp_path / "kept")
    assert code == 0, err
    assert states == [True] and switches == [True, False]  # on while training, restored after
    code, _, err = run(capsys, *common, "--out", tmp_path / "returned", "--return-freed-memory")
    assert code == 0, err
    assert states == [True, False] and switches == [True, False]


@pytest.mark.parametrize("device", ["tpu", "mps", "cuda:x"])
def test_devices_torch_cannot_use_here_are_refused_at_the_option(capsys, tmp_path, device):
    code, _, err = run(capsys, "train", "-d", device, "--epochs", "1", "--out", tmp_path / "run")
    assert code == 2 and "Traceback" not in err
    assert "argument -d/--device" in err and repr(device) in err
    assert not (tmp_path / "run").exists()


def test_bf16_on_a_cpu_without_native_bf16_warns_on_one_line(capsys, digits, tmp_path, monkeypatch):
    from pyro_svae import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    flags = ["--data", digits["images"], "--precision", "bf16", "--epochs", "1", "--out", tmp_path / "run"]
    code, _, err = run(capsys, "train", *flags, *TINY)
    assert code == 0, err
    warning = [line for line in err.splitlines() if "emulated" in line]
    assert warning == [warning[0]] and warning[0].startswith("pyro-svae train: warning: precision 'bf16'")
