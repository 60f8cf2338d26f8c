"""A table of bad inputs: each gets one sentence naming the file or flag, exit 2 (usage) or 1 (data),
never a traceback, and nothing the user had is changed."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest

import visiontune
from visiontune.cli import main

from .conftest import make_folder, make_image


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_weights):
    """Good data, a finished run, and the bad files the table refers to."""
    import numpy as np

    root = tmp_path_factory.mktemp("bad")
    good = make_folder(root / "good", {"a": 4, "b": 4})
    run = visiontune.train(good, out=str(root / "run"), model="test_efficientnet", weights=str(tiny_weights),
                           image_size=48, train_size=48, batch_size=4, epochs=1, cache_dir=str(root / "cache"),
                           quiet=True, channels_last=False).path
    make_folder(root / "one", {"a": 3}, layout="flat")
    (root / "empty").mkdir()
    mism = make_folder(root / "mism", {"a": 2, "b": 2})
    make_image(mism / "val" / "c" / "x.png", 2, np.random.default_rng(0))
    (root / "notes.txt").write_text("hello")
    (root / "noheader.csv").write_text("a.png,a\n")
    (root / "missing.csv").write_text("path,label\nnope.png,a\n")
    (root / "split.csv").write_text(f"path,label,split\n{good}/train/a/a_0.png,a,holdout\n")
    (root / "text_weights.pt").write_text("not a state dict")
    (root / "list_weights.pt").write_bytes(pickle.dumps([1, 2, 3]))
    nonempty = root / "nonempty"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_text("mine")
    (root / "a-file").write_text("x")
    (root / "not-a-run").mkdir()
    return root, good, run


def table(root: Path, good: Path, run: Path) -> list[tuple[list[str], int, str]]:
    # Exit 2: the command line (a flag, a path that is not there); exit 3: the data itself.
    g = str(good)
    return [
        (["train", str(root / "nowhere")], 2, "DATA"),
        (["train", str(root / "empty")], 3, "no images"),
        (["train", str(root / "one")], 3, "single class"),
        (["train", str(root / "mism")], 3, "class folders differ"),
        (["train", str(root / "notes.txt")], 2, "not a .csv"),
        (["train", str(root / "noheader.csv")], 3, "path,label"),
        (["train", str(root / "missing.csv")], 3, "does not exist"),
        (["train", str(root / "split.csv")], 3, "holdout"),
        (["train", g, "--model", "no_such_net"], 2, "--model"),
        (["train", g, "--weights", str(root / "absent.pt")], 2, "--weights"),
        (["train", g, "--weights", str(root / "text_weights.pt")], 2, "--weights"),
        (["train", g, "--weights", str(root / "list_weights.pt")], 2, "--weights"),
        (["train", g, "--epochs", "0"], 2, "--epochs"),
        (["train", g, "--lr", "-1"], 2, "--lr"),
        (["train", g, "--batch-size", "0"], 2, "--batch-size"),
        (["train", g, "--momentum", "1.5"], 2, "--momentum"),
        (["train", g, "--weight-decay", "-1"], 2, "--weight-decay"),
        (["train", g, "--warmup-epochs", "-1"], 2, "--warmup-epochs"),
        (["train", g, "--label-smoothing", "1"], 2, "--label-smoothing"),
        (["train", g, "--val-fraction", "0"], 2, "--val-fraction"),
        (["train", g, "--views", "0"], 2, "--views"),
        (["train", g, "--image-size", "8"], 2, "--image-size"),
        (["train", g, "--train-size", "8"], 2, "--train-size"),
        (["train", g, "--threads", "0"], 2, "--threads"),
        (["train", g, "--decode-cache-gb", "-1"], 2, "--decode-cache-gb"),
        (["train", g, "--device", "tpu"], 2, "--device tpu"),
        (["train", g, "--device", "cuda:x"], 2, "--device"),
        (["train", g, "--mode", "auto", "--budget", "soon"], 2, "--budget"),
        (["train", g, "--budget", "5m"], 2, "--budget"),
        (["train", g, "--mode", "staged", "--head-epochs", "0"], 2, "--head-epochs"),
        (["train", g, "--mixup", "-1"], 2, "--mixup"),
        (["train", g, "--workers", "-1"], 2, "--workers"),
        (["train", g, "--out", str(root / "nonempty")], 2, "--out"),
        (["train", g, "--out", str(root / "a-file" / "run")], 2, "--out"),
        (["train"], 2, "DATA is missing"),
        (["train", g, "--resume", str(run)], 2, "--resume"),
        (["train", "--resume", str(root / "not-a-run")], 2, "--resume"),
        (["train", "--resume", str(run)], 2, "already finished"),
        (["eval", str(root / "not-a-run")], 2, "model.json"),
        (["eval", str(run), "--split", "test"], 2, "--split"),
        (["eval", str(run), str(root / "mism")], 3, "c"),
        (["predict", str(root / "absent.onnx"), g], 2, "no such run folder or model file"),
        (["predict", str(root / "notes.txt"), g], 2, "unknown model file type"),
        (["doctor", str(root / "nowhere")], 2, "DATA"),
    ]


def test_bad_inputs_table(world, capsys):
    root, good, run = world
    cases = table(root, good, run)
    assert len(cases) >= 25
    before = {p: snapshot(p) for p in (good, run, root / "nonempty")}
    for args, code, words in cases:
        extra = ["--cache-dir", str(root / "cache")] if args[0] == "train" else []
        if args[0] == "train" and "--out" not in args and "--resume" not in args:
            extra += ["--out", str(root / "fresh")]
        got = main(args + extra)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert got == code, (args, err)
        assert "Traceback" not in err, (args, err)
        assert len(lines) == 1 and lines[0].startswith("visiontune: error: ") and words in lines[0], (args, err)
        assert not (root / "fresh").exists(), (args, "a failed start left a run folder")
    after = {p: snapshot(p) for p in (good, run, root / "nonempty")}
    assert after == before
