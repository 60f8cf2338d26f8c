"""WebDataset shards: written from a folder, read back in the same order; a run from shards equals the folder run."""

from __future__ import annotations

import json
import tarfile

import pytest

import visiontune
from visiontune.cli import main

from .conftest import read_metrics


def test_shards_round_trip_and_a_streamed_run_equals_the_folder_run(tiny_data, tiny_settings, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["shard", str(tiny_data), str(out), "--shard-size", "5"]) == 0
    manifest = json.loads((out / "visiontune-shards.json").read_text())
    assert manifest["classes"] == ["ants", "bees"]
    assert manifest["splits"]["train"]["count"] == 17 and len(manifest["splits"]["train"]["shards"]) == 4
    # Plain WebDataset: every sample is <key>.<ext> with the file's bytes, <key>.cls and <key>.path.txt.
    with tarfile.open(out / manifest["splits"]["train"]["shards"][0]) as tar:
        names = tar.getnames()
        first = tar.extractfile("00000000.png").read()
    assert sorted(names[:3]) == ["00000000.cls", "00000000.path.txt", "00000000.png"]
    source = sorted((tiny_data / "train" / "ants").glob("*.png"))[0]
    assert first == source.read_bytes()
    # Same splits, in the same order, with the same labels.
    from visiontune.data import discover

    folder, shards = discover(tiny_data), discover(out)
    assert shards.layout == "shards" and shards.classes == folder.classes
    for split in ("train", "val"):
        assert [y for _, y in shards.samples[split]] == [y for _, y in folder.samples[split]]
        assert [m.read_bytes() for m, _ in shards.samples[split]] == [p.read_bytes() for p, _ in folder.samples[split]]
    # Same seed, same metrics (bitwise on this CPU; the acceptance is 1e-5).
    from_folder = visiontune.train(tiny_data, out=str(tmp_path / "a"), **tiny_settings)
    from_shards = visiontune.train(out, out=str(tmp_path / "b"), **tiny_settings)
    for a, b in zip(read_metrics(from_folder.path, timing=False), read_metrics(from_shards.path, timing=False)):
        assert a["stage"] == b["stage"]
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-5, abs=1e-7)
    # With loader worker processes too (each opens the shards itself).
    settings = {**tiny_settings, "epochs": 1, "workers": 2}
    workers_folder = visiontune.train(tiny_data, out=str(tmp_path / "c"), **settings)
    workers_shards = visiontune.train(out, out=str(tmp_path / "d"), **settings)
    assert read_metrics(workers_shards.path, timing=False) == read_metrics(workers_folder.path, timing=False)
    # The run reads its own splits back: eval and report work on a shard run.
    capsys.readouterr()
    assert main(["eval", str(from_shards.path), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == from_shards.best_val_acc
    assert main(["report", str(from_shards.path)]) == 0
    capsys.readouterr()
    # OUT must be new: nothing the user had is overwritten.
    assert main(["shard", str(tiny_data), str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_a_missing_shard_is_one_sentence(tiny_data, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["shard", str(tiny_data), str(out), "--shard-size", "5"]) == 0
    (out / "train-000001.tar").unlink()
    assert main(["datasets", str(out)]) == 3
    assert "shard train-000001.tar is missing" in capsys.readouterr().err
