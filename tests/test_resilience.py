"""Runs that are killed, interrupted or blow up; files that try to run code."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import visiontune
from visiontune import checkpoint
from visiontune.cli import main
from visiontune.errors import UsageError, VisiontuneError

from .conftest import make_folder, read_metrics

EPOCHS = 12


@pytest.fixture(scope="module")
def resilience_data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("resilience") / "data", {"ants": 10, "bees": 9})


def cli_args(data: Path, out: Path, settings: dict, epochs: int = EPOCHS) -> list[str]:
    return ["train", str(data), "--out", str(out), "--epochs", str(epochs), "--model", "test_efficientnet",
            "--weights", settings["weights"], "--image-size", "48", "--train-size", "48", "--batch-size", "4",
            "--cache-dir", settings["cache_dir"], "--no-channels-last", "--lr", "0.02", "--quiet"]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "visiontune", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_rows(run_dir: Path, rows: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    path = run_dir / "metrics.csv"
    while time.time() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= rows + 1:
            return
        if process.poll() is not None:
            pytest.fail(f"training ended before it could be stopped: {process.stderr.read()}")
        time.sleep(0.01)
    pytest.fail("training did not reach the expected epoch")


def assert_same_run(a: Path, b: Path) -> None:
    assert read_metrics(a, timing=False) == read_metrics(b, timing=False)
    wa, wb = checkpoint.load_weights(a / "best.safetensors"), checkpoint.load_weights(b / "best.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    la = checkpoint.load_training_state(a / "last.ckpt")["model"]
    lb = checkpoint.load_training_state(b / "last.ckpt")["model"]
    assert all(torch.equal(la[k], lb[k]) for k in la)


@pytest.fixture(scope="module")
def uninterrupted(resilience_data, tiny_weights, tmp_path_factory):
    """The 12-epoch run the interrupted ones must equal; made once for the module (4 s), read-only:
    a test that damages it works on a copy."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    out = folder / "full"
    settings = {"weights": str(tiny_weights), "cache_dir": str(folder / "cache")}
    assert main(cli_args(resilience_data, out, settings)) == 0
    return out


def test_kill_9_then_resume_equals_uninterrupted_run(resilience_data, tiny_settings, tmp_path, uninterrupted):
    out = tmp_path / "killed"
    process = start(cli_args(resilience_data, out, tiny_settings))
    wait_for_rows(out, 3, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    done_before = len(read_metrics(out, timing=False))
    assert done_before < EPOCHS
    resumed = subprocess.run([sys.executable, "-m", "visiontune", "train", "--resume", str(out), "--quiet"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, uninterrupted)


def test_ctrl_c_saves_state_and_exits_130(resilience_data, tiny_settings, tmp_path, uninterrupted):
    out = tmp_path / "interrupted"
    process = start(cli_args(resilience_data, out, tiny_settings))
    wait_for_rows(out, 2, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and f"visiontune train --resume {out}" in err
    state = checkpoint.load_training_state(out / "last.ckpt")
    # The flag is read only inside an epoch's steps, so the last row written is the epoch saved.
    rows = read_metrics(out, timing=False)
    assert state["epoch"] == int(rows[-1]["epoch"]) >= 1
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert_same_run(out, uninterrupted)


def test_resume_of_a_finished_run_is_refused(uninterrupted, capsys):
    assert main(["train", "--resume", str(uninterrupted)]) == 2
    assert "already finished" in capsys.readouterr().err


def test_non_finite_loss_stops_with_epoch_and_step(resilience_data, tiny_settings, tmp_path):
    out = tmp_path / "boom"
    settings = {**tiny_settings, "lr": 1e12, "schedule": "constant", "epochs": 5, "head_init": "random"}
    with pytest.raises(VisiontuneError, match=r"loss became .* at epoch \d+, step \d+; likely a learning rate") as info:
        visiontune.train(resilience_data, out=str(out), **settings)
    assert info.value.exit_code == 1
    assert (out / "last.ckpt").is_file()  # the last good state is kept


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {Path(os.environ['EXPLOIT_MARKER'])}",))


def test_malicious_pickles_are_refused(resilience_data, tiny_settings, tmp_path, uninterrupted, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    (run / "last.ckpt").write_bytes(pickle.dumps({"epoch": 0, "payload": Exploit()}))
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "not a checkpoint visiontune can load safely" in err and "Traceback" not in err
    evil_weights = tmp_path / "weights.pt"
    evil_weights.write_bytes(pickle.dumps(Exploit()))
    code = main(["train", str(resilience_data), "--weights", str(evil_weights), "--model", "test_efficientnet",
                 "--out", str(tmp_path / "w"), "--cache-dir", tiny_settings["cache_dir"]])
    assert code == 2 and "--weights" in capsys.readouterr().err
    assert not marker.exists()


def test_unwritable_out_is_refused_before_training(resilience_data, tiny_settings, tmp_path):
    # A path below a regular file cannot be created, even by root (for whom permissions do not apply).
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="cannot be written"):
        visiontune.train(resilience_data, out=str(blocker / "run"), **tiny_settings)
    assert blocker.read_text() == "x"
