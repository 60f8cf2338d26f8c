"""Multi-label: a path,labels CSV trains sigmoid heads; eval, report, predict, export and serve speak label sets."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

import visiontune
from visiontune.cli import main
from visiontune.metrics import choose_thresholds, multilabel_report

COLOURS = {"red": 0, "green": 1, "blue": 2}


def stripes_image(path, labels: tuple[str, ...], rng: np.random.Generator) -> None:
    """Three vertical stripes; a class's colour fills one random stripe when the class is present."""
    pixels = np.full((32, 48, 3), 90.0)
    stripes = rng.permutation(3)
    for stripe, name in zip(stripes, labels):
        pixels[:, stripe * 16 : (stripe + 1) * 16] = 30
        pixels[:, stripe * 16 : (stripe + 1) * 16, COLOURS[name]] = 230
    pixels += rng.normal(0, 12, pixels.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


@pytest.fixture
def multilabel_csv(tmp_path):
    rng = np.random.default_rng(0)
    sets = [("red",), ("green",), ("blue",), ("red", "green"), ("red", "blue"), ("green", "blue"),
            ("red", "green", "blue"), ()]
    rows = []
    for i in range(64):
        labels = sets[i % len(sets)]
        split = "val" if i % 3 == 0 else "train"  # every label set in both splits
        stripes_image(tmp_path / "images" / f"img{i:02d}.png", labels, rng)
        rows.append((f"images/img{i:02d}.png", "|".join(labels), split))
    path = tmp_path / "labels.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "labels", "split"), *rows])
    return path


def test_thresholds_and_report_on_known_values():
    probs = np.array([[0.9, 0.2], [0.6, 0.7], [0.4, 0.1], [0.3, 0.8]])
    targets = np.array([[1, 0], [1, 1], [0, 0], [0, 1]], dtype=float)
    # F1 = 1 from the cut below 0.6 (class a) and below 0.7 (b): midway to the next lower probability.
    assert choose_thresholds(probs, targets) == pytest.approx([0.5, 0.45])
    report = multilabel_report(probs, targets, [0.5, 0.5], ["a", "b"])
    assert report["exact_match"] == 1.0 and report["mAP"] == 1.0
    report = multilabel_report(probs, targets, [0.35, 0.5], ["a", "b"])  # row 2 gets a false "a"
    assert report["exact_match"] == 0.75 and report["per_class"]["a"]["precision"] == pytest.approx(2 / 3)
    assert choose_thresholds(probs, np.zeros_like(targets)) == [0.5, 0.5]  # no positives: nothing to tune on


def test_multilabel_end_to_end(multilabel_csv, tiny_settings, tmp_path, capsys):
    run = visiontune.train(multilabel_csv, out=str(tmp_path / "run"),
                           **{**tiny_settings, "epochs": 10, "batch_size": 8, "lr": 0.01, "bn": "train",
                           "optimizer": "adamw"})
    meta = json.loads((run.path / "model.json").read_text())
    assert meta["task"] == "multi-label" and meta["classes"] == ["blue", "green", "red"]
    assert len(meta["thresholds"]) == 3 and all(0 < t < 1 for t in meta["thresholds"])
    header = (run.path / "splits" / "val.csv").read_text().splitlines()[0]
    assert header == "path,labels"

    assert main(["eval", str(run.path), "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "multi-label" and result["n"] == 22
    assert result["mAP"] > 0.9 and result["accuracy"] >= 0.75, result
    assert result["thresholds"] == meta["thresholds"]
    assert set(result["per_class"]["red"]) >= {"precision", "recall", "f1", "ap", "support", "threshold"}

    # predict: label sets at the stored thresholds, the same from the run and from its ONNX export.
    val = [row.split(",") for row in (run.path / "splits" / "val.csv").read_text().splitlines()[1:]]
    paths = [p for p, _ in val]
    predicted = visiontune.load(run.path).predict(paths)
    for r in predicted:
        assert r["labels"] == [c for c, t in zip(meta["classes"], meta["thresholds"]) if r["probs"][c] >= t]
        assert r["label"] == "|".join(r["labels"])
        assert sum(r["probs"].values()) != pytest.approx(1.0)  # one sigmoid per class, not a softmax
    right = sum(set(r["labels"]) == set(filter(None, truth.split("|"))) for r, (_, truth) in zip(predicted, val))
    assert right / len(val) == result["accuracy"]
    for output in ("probs", "logits"):
        artifact = tmp_path / f"m-{output}.onnx"
        assert main(["export", str(run.path), "--out", str(artifact), "--output", output]) == 0
        exported = visiontune.load(artifact).predict(paths)
        assert [r["labels"] for r in exported] == [r["labels"] for r in predicted]
        assert max(abs(a["probs"][c] - b["probs"][c]) for a, b in zip(exported, predicted) for c in a["probs"]) < 1e-4
    capsys.readouterr()

    assert main(["report", str(run.path)]) == 0
    page = (run.path / "report.html").read_text()
    assert "val mAP" in page and "threshold" in page

    from fastapi.testclient import TestClient

    from visiontune.serve import create_app

    with TestClient(create_app(run.path, device="cpu")) as client:
        answer = client.post("/predict", files={"file": ("a.png", open(paths[0], "rb").read(), "image/png")}).json()
    assert answer["predictions"][0]["labels"] == predicted[0]["labels"]


def test_multilabel_fixed_mode_and_refusals(multilabel_csv, tiny_settings, tmp_path, capsys):
    run = visiontune.train(multilabel_csv, out=str(tmp_path / "fixed"), **{**tiny_settings, "mode": "fixed"})
    assert [r["stage"] for r in run.metrics] == ["head", "head"]
    assert all(0 <= r["val_acc"] <= 1 for r in run.metrics)
    assert len(json.loads((run.path / "model.json").read_text())["thresholds"]) == 3
    code = main(["train", str(multilabel_csv), "--class-weights", "auto", "--out", str(tmp_path / "x")])
    assert code == 2 and "multi-label" in capsys.readouterr().err
    code = main(["train", str(multilabel_csv), "--augment", "strong", "--out", str(tmp_path / "y")])
    assert code == 2 and "--mixup 0 --cutmix 0" in capsys.readouterr().err
