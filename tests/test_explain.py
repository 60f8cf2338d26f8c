"""explain: heatmaps where the evidence is, on a model whose answer is known; the CLI and report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from visiontune.cli import main
from visiontune.explain import Explainer, find_target_layer

from .conftest import make_image

IDENTITY = {"size": 32, "resize": 32, "interpolation": "bicubic", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
            "crop_pct": 1.0}


def red_vs_blue_model() -> nn.Module:
    """Class "red" scores the mean red level, class "blue" the mean blue level: the evidence for a
    class is exactly where its colour is, so the right heatmap is known."""
    conv = nn.Conv2d(3, 2, 1, bias=False)
    head = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = 1.0  # feature 0: red
        conv.weight[1, 2] = 1.0  # feature 1: blue
        head.weight.copy_(torch.eye(2))
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def quadrant_image(corner: tuple[slice, slice]) -> np.ndarray:
    """Dim blue everywhere; bright red only in one quadrant."""
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[..., 2] = 60
    image[corner[0], corner[1], 0] = 250
    return image


@pytest.mark.parametrize("corner", [(slice(0, 16), slice(0, 16)), (slice(16, 32), slice(16, 32))])
def test_heatmap_is_large_where_the_evidence_is(corner):
    model = red_vs_blue_model()
    explainer = Explainer(model, ["red", "blue"], IDENTITY)
    assert explainer.layer is explainer.model[1]  # the last spatial map: the ReLU before pooling
    result = explainer.explain(quadrant_image(corner))
    assert result.label == "red" and result.explained == "red"
    inside = np.zeros((32, 32), dtype=bool)
    inside[corner] = True
    assert result.heatmap.shape == (32, 32)
    assert result.heatmap[inside].mean() > 0.9
    assert result.heatmap[~inside].mean() < 0.1
    # The other class's evidence (blue) is everywhere, so its map is flat, not the red quadrant.
    blue = explainer.explain(quadrant_image(corner), class_name="blue")
    assert blue.label == "red" and blue.explained == "blue"
    assert blue.heatmap[inside].mean() < 0.5


def test_transformer_without_spatial_map_is_refused_in_one_sentence():
    from visiontune.errors import UsageError

    tokens = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    with pytest.raises(UsageError, match="no spatial feature map"):
        find_target_layer(tokens, 8)


def test_explain_cli_writes_overlays_and_predictions(tiny_run, tiny_data, tmp_path, capsys):
    folder = tmp_path / "photos"
    make_image(folder / "a.png", 0, np.random.default_rng(3))
    make_image(folder / "sub" / "a.png", 1, np.random.default_rng(4))  # same name, another folder
    (folder / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "heat"
    code = main(["explain", str(tiny_run.path), str(folder), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1, captured.err  # one image could not be read
    rows = [json.loads(line) for line in (out / "explanations.jsonl").read_text().splitlines()]
    good = [r for r in rows if "error" not in r]
    assert len(rows) == 3 and len(good) == 2
    code = main(["predict", str(tiny_run.path), *[r["path"] for r in good], "--format", "jsonl"])
    predicted = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in good] == [p["label"] for p in predicted]
    for row in good:
        assert row["explained_class"] == row["label"]
        heat = np.asarray(Image.open(row["heatmap"]))
        assert heat.shape == (48, 48, 3)  # the 48 px crop the tiny model sees
    assert len({r["heatmap"] for r in good}) == 2
    # --class explains another class; a class the model lacks is one sentence, exit 2.
    code = main(["explain", str(tiny_run.path), good[0]["path"], "--out", str(out), "--class", "bees"])
    assert code == 0
    last = json.loads((out / "explanations.jsonl").read_text().splitlines()[-1])
    assert last["explained_class"] == "bees" and Path(last["heatmap"]).is_file()
    assert len(list(out.glob("*.png"))) == 3  # nothing written before was overwritten
    code = main(["explain", str(tiny_run.path), good[0]["path"], "--out", str(out), "--class", "wasps"])
    err = capsys.readouterr().err
    assert code == 2 and "--class 'wasps'" in err and "ants, bees" in err
