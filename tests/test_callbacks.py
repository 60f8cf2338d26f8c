"""Callbacks observe a run without changing it; TensorBoard and MLflow logs hold the run's numbers."""

from __future__ import annotations

import hashlib
import math

import pytest

import visiontune
from visiontune.callbacks import parse_log

from .conftest import read_metrics


class Recorder:
    def __init__(self):
        self.steps, self.epochs, self.runs = [], [], []

    def on_step_end(self, step):
        self.steps.append(step)

    def on_epoch_end(self, epoch):
        self.epochs.append(epoch)

    def on_run_end(self, run):
        self.runs.append(run)


class Meddler:
    """Tries to change what it is shown: it cannot, and the run goes on without it."""

    calls = 0

    def on_epoch_end(self, epoch):
        Meddler.calls += 1
        epoch.metrics["val_acc"] = 1.0


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_callbacks_see_every_step_epoch_and_the_end_and_change_nothing(tiny_data, tiny_settings, tmp_path, capsys):
    settings = {**tiny_settings, "epochs": 2, "accumulate": 2}
    plain = visiontune.train(tiny_data, out=str(tmp_path / "plain"), **settings)
    recorder = Recorder()
    watched = visiontune.train(tiny_data, out=str(tmp_path / "watched"), callbacks=[recorder, Meddler()], **settings)
    err = capsys.readouterr().err
    # Observing changed nothing: same weights, same metrics.
    assert digest(watched.path / "best.safetensors") == digest(plain.path / "best.safetensors")
    assert read_metrics(watched.path, timing=False) == read_metrics(plain.path, timing=False)
    # The meddler raised (read-only mapping), was said once and dropped.
    assert Meddler.calls == 1 and err.count("callback Meddler.on_epoch_end failed") == 1
    # Epochs: the probe (0) and 1, 2, with the rows of metrics.csv.
    assert [e.epoch for e in recorder.epochs] == [0, 1, 2]
    assert [e.metrics["val_acc"] for e in recorder.epochs] == [r["val_acc"] for r in watched.metrics]
    # Steps: 17 images in batches of 4, the lone 17th dropped (BatchNorm cannot train on a batch of 1),
    # accumulate 2 -> 2 optimizer steps of 8 images per epoch.
    assert [s.step for s in recorder.steps] == [1, 2, 3, 4]
    assert [s.epoch for s in recorder.steps] == [1, 1, 2, 2]
    # The step losses are the epoch's: their mean is the epoch's train loss.
    first = [s.loss for s in recorder.steps[:2]]
    assert (first[0] + first[1]) / 2 == pytest.approx(watched.metrics[1]["train_loss"], rel=1e-5)
    assert all(s.lr > 0 and math.isfinite(s.loss) for s in recorder.steps)
    (end,) = recorder.runs
    assert end.best_epoch == watched.best_epoch and end.best_val_acc == watched.best_val_acc
    assert end.classes == ("ants", "bees") and len(end.metrics) == 3
    # The best epoch's val probabilities come along (read-only): the end-of-run figures are drawn
    # from them, and they are what a fresh evaluation of the saved best weights gives.
    from visiontune.evaluation import evaluate_run, scores_result

    assert not end.val_probabilities.flags.writeable
    kept = scores_result(watched.path, end.val_probabilities, end.best_val_loss)
    fresh = evaluate_run(watched.path, keep_items=True)
    assert [(i["path"], i["predicted"]) for i in kept["items"]] == [(i["path"], i["predicted"]) for i in fresh["items"]]
    assert [i["probability"] for i in kept["items"]] == pytest.approx([i["probability"] for i in fresh["items"]],
                                                                      abs=1e-5)
    assert kept["confusion_matrix"] == fresh["confusion_matrix"]
    assert kept["loss"] == pytest.approx(watched.best_val_loss, rel=1e-5)


def test_tensorboard_log_holds_the_runs_numbers(tiny_data, tiny_settings, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = visiontune.train(tiny_data, out=str(tmp_path / "run"), **{**tiny_settings, "log": "tensorboard"})
    events = EventAccumulator(str(run.path / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    val_acc = [(e.step, e.value) for e in events.Scalars("epoch/val_acc")]
    assert val_acc == [(int(r["epoch"]), pytest.approx(float(r["val_acc"]), abs=1e-6)) for r in read_metrics(run.path)]
    assert len(events.Scalars("step/train_loss")) == 2 * 4  # 2 epochs of 16 // 4 steps
    assert len(events.Scalars("step/lr")) == 8
    assert {"val/confusion_matrix", "val/mistakes"} <= set(events.Tags()["images"])


def test_mlflow_log_in_a_local_file_store(tiny_data, tiny_settings, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store only on request
    run = visiontune.train(tiny_data, out=str(tmp_path / "run"), **{**tiny_settings, "log": "mlflow"})
    client = mlflow.tracking.MlflowClient()
    (logged,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert logged.info.run_name == "run" and logged.data.params["epochs"] == "2"
    history = client.get_metric_history(logged.info.run_id, "val_acc")
    assert [(m.step, m.value) for m in history] == [(int(r["epoch"]), pytest.approx(float(r["val_acc"])))
                                                     for r in read_metrics(run.path)]
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"metrics.csv", "best.safetensors", "model.json", "config.json"} <= artifacts


def test_log_flag_values():
    assert parse_log("tensorboard") == ("tensorboard",) and parse_log("none") == ()
    assert parse_log("tensorboard, mlflow") == ("tensorboard", "mlflow")
    from visiontune.errors import UsageError

    with pytest.raises(UsageError, match="--log 'wandb' is invalid"):
        parse_log("wandb")
