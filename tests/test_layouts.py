"""Folder layouts from the wild: every one understood as meant, or refused in one sentence.

The failure these guard against is silent: a `training_set/` + `test_set/` download trained as a
two-class model whose classes are the split names.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import visiontune
from visiontune.cli import main
from visiontune.data import cross_split_duplicates, discover
from visiontune.errors import DataError
from visiontune.evaluation import evaluate_run

from .conftest import make_image


def make_tree(root: Path, groups: list[str], classes=("cats", "dogs"), per_class: int = 5, ext: str = ".png",
              seed: int = 0) -> Path:
    """root/<group>/<class>/<class><i><ext> for each group ("" for root/<class>/ directly)."""
    rng = np.random.default_rng(seed)
    for g, group in enumerate(groups):
        for label, cls in enumerate(classes):
            for i in range(per_class):
                make_image(root / group / cls / f"{cls}{g}_{i}{ext}", label, rng)
    return root


@pytest.mark.parametrize("train_name, val_name, test_name", [
    ("train", "val", None),
    ("training_set", None, "test_set"),           # the cats-vs-dogs download
    ("Training", "Valid", None),                  # letter case
    ("TRAIN_SET", "validation", "testing"),
    ("trainset", "dev", "testset"),
])
def test_split_folders_are_found_by_name(tmp_path, train_name, val_name, test_name):
    groups = [name for name in (train_name, val_name, test_name) if name]
    splits = discover(make_tree(tmp_path / "data", groups))
    assert splits.classes == ["cats", "dogs"]
    assert splits.layout == "folders"
    assert set(splits.samples) == {"train", "val"} | ({"test"} if test_name else set())
    if test_name:
        assert len(splits.samples["test"]) == 10 and all(test_name in str(p) for p, _ in splits.samples["test"])
    if val_name is None:  # val held out of train, stratified and seeded; test untouched
        assert splits.auto_split == {"val_from": "train", "val_fraction": 0.2, "seed": 0}
        assert [y for _, y in splits.samples["val"]] == [0, 1]
        assert len(splits.samples["train"]) == 8
    else:
        assert all(val_name in str(p) for p, _ in splits.samples["val"])


@pytest.mark.parametrize("wrappers", [["dataset"], ["archive", "data"]])
def test_wrapper_folders_of_an_unzipped_archive_are_looked_through(tmp_path, wrappers):
    inner = tmp_path.joinpath("download", *wrappers)
    make_tree(inner, ["training_set", "test_set"])
    (tmp_path / "download" / "__MACOSX").mkdir()  # what macOS zips add beside the data
    splits = discover(tmp_path / "download")
    assert splits.root == inner and splits.classes == ["cats", "dogs"]
    assert splits.split_folders == {"train": "training_set", "test": "test_set"}


def test_class_folders_inside_a_wrapper(tmp_path):
    make_tree(tmp_path / "zip" / "flowers", [""], classes=("daisy", "rose", "tulip"))
    splits = discover(tmp_path / "zip")
    assert splits.layout == "class-folders" and splits.classes == ["daisy", "rose", "tulip"]


@pytest.mark.parametrize("groups, classes, words", [
    (["batch1", "batch2"], ("cats", "dogs"), ["batch1 and batch2", "cats, dogs", "one level down"]),
    (["train", "val", "extra"], ("cats", "dogs"), ["mixes split folders", "extra"]),
    (["train", "training"], ("cats", "dogs"), ["train/ and training/", "train split"]),
    (["val", "test"], ("cats", "dogs"), ["no training split"]),
    ([""], ("cats", "dogs", "test"), ["test/ is named like a split", "cats, dogs"]),
    (["train", "val"], ("cats", "validation"), ["class folder named like a split", "validation"]),
])
def test_ambiguous_layouts_are_refused_in_one_sentence(tmp_path, groups, classes, words):
    root = make_tree(tmp_path / "photos", groups, classes=classes)
    with pytest.raises(DataError) as info:
        discover(root)
    message = str(info.value)
    assert "\n" not in message and message.endswith(".")
    for word in words:
        assert word in message


def test_the_refusal_reaches_the_cli_without_a_traceback(tmp_path, capsys, monkeypatch):
    root = make_tree(tmp_path / "photos", ["batch1", "batch2"])
    monkeypatch.chdir(tmp_path)  # where a run folder would be created
    assert main(["train", str(root), "--quiet"]) == 3  # bad data: exit 3, apart from a bad flag (2)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "batch1 and batch2" in err
    assert not (tmp_path / "runs").exists()


def test_a_png_named_jpg_and_non_ascii_names_with_spaces(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "données"
    make_image(root / "train" / "chats" / "mon chat été.jpg", 0, rng, fmt="PNG")  # PNG bytes, .jpg name
    make_image(root / "train" / "chats" / "猫 2.png", 0, rng)
    make_image(root / "train" / "chiens" / "chien 1.jpeg", 1, rng, fmt="PNG")
    make_image(root / "train" / "chiens" / "собака.png", 1, rng)
    for cls, label in (("chats", 0), ("chiens", 1)):
        make_image(root / "val" / cls / f"{cls} ü.jpg", label, rng, fmt="PNG")
    splits = discover(root)
    assert sorted(p.name for p, _ in splits.samples["train"]) == sorted(
        ["mon chat été.jpg", "猫 2.png", "chien 1.jpeg", "собака.png"])
    from visiontune.images import decode_array

    pixels = decode_array(root / "train" / "chats" / "mon chat été.jpg", 32)
    assert pixels.shape[2] == 3 and pixels[..., 0].mean() > pixels[..., 2].mean()  # class 0 is reddish


def test_cross_split_duplicates_are_found_with_their_labels(tmp_path):
    root = make_tree(tmp_path / "d", ["train", "val"])
    copy = root / "val" / "dogs" / "dogs_copy.png"
    copy.write_bytes((root / "train" / "cats" / "cats0_0.png").read_bytes())  # same photo, other label
    (root / "train" / "cats" / "cats_twice.png").write_bytes((root / "train" / "cats" / "cats0_1.png").read_bytes())
    groups = cross_split_duplicates(discover(root))
    assert len(groups) == 1  # the within-train copy is no leak
    assert sorted((split, path.name, label) for split, path, label in groups[0]) == [
        ("train", "cats0_0.png", 0), ("val", "dogs_copy.png", 1)]


def test_training_warns_about_duplicates_and_lists_them(tmp_path, tiny_settings, capsys):
    root = make_tree(tmp_path / "d", ["train", "val"], per_class=4)
    (root / "val" / "dogs" / "leak.png").write_bytes((root / "train" / "cats" / "cats0_0.png").read_bytes())
    run = visiontune.train(root, out=str(tmp_path / "run"), **{**tiny_settings, "epochs": 1})
    err = capsys.readouterr().err
    assert "1 image(s) appear byte-identical in more than one split, 1 of them under different labels" in err
    with (run.path / "duplicates.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["group"], r["split"], r["label"], Path(r["path"]).name) for r in rows] == [
        ("1", "train", "cats", "cats0_0.png"), ("1", "val", "dogs", "leak.png")]


def test_the_duplicate_check_does_not_hold_up_training(tmp_path, tiny_settings, capsys, monkeypatch):
    import threading

    from visiontune import training

    root = make_tree(tmp_path / "d", ["train", "val"], per_class=4)
    (root / "val" / "dogs" / "leak.png").write_bytes((root / "train" / "cats" / "cats0_0.png").read_bytes())
    release, finished = threading.Event(), []

    def slow_check(splits):  # a large set's check: it ends only after training has begun
        release.wait(timeout=10)
        finished.append(True)
        return cross_split_duplicates(splits)

    class Watch:
        seen = []

        def on_epoch_end(self, epoch):
            Watch.seen.append((epoch.epoch, bool(finished)))
            release.set()

    monkeypatch.setattr(training, "cross_split_duplicates", slow_check)
    run = visiontune.train(root, out=str(tmp_path / "run"), callbacks=[Watch()], **{**tiny_settings, "epochs": 1})
    assert Watch.seen[0] == (0, False)  # the probe's epoch ended while the check was still running
    assert "1 image(s) appear byte-identical in more than one split" in capsys.readouterr().err
    assert (run.path / "duplicates.csv").is_file()


def test_train_and_test_folders_then_eval_on_the_test_split(tmp_path, tiny_settings, capsys):
    root = make_tree(tmp_path / "dataset", ["training_set", "test_set"], per_class=5)
    run = visiontune.train(root, out=str(tmp_path / "run"), **{**tiny_settings, "epochs": 1})
    config = json.loads((run.path / "config.json").read_text())
    assert config["data"]["classes"] == ["cats", "dogs"]
    assert config["data"]["counts"]["test"] == {"cats": 5, "dogs": 5}
    assert config["data"]["split_folders"] == {"train": "training_set", "test": "test_set"}
    result = evaluate_run(run.path, split="test")
    assert result["split"] == "test" and result["n"] == 10
    on_folder = evaluate_run(run.path, root, split="test")  # DATA given again: the same test folder
    assert on_folder["n"] == 10 and on_folder["accuracy"] == result["accuracy"]


def test_datasets_command_prints_the_layout_it_understood(tmp_path, capsys):
    root = make_tree(tmp_path / "dataset" / "dataset", ["training_set", "test_set"], per_class=5)
    assert main(["datasets", str(tmp_path / "dataset")]) == 0
    out = capsys.readouterr().out
    assert str(root) in out and "split folders, 2 classes" in out
    assert "train (training_set/)" in out and "test (test_set/)" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:5]}
    assert rows == {"cats": ["4", "1", "5"], "dogs": ["4", "1", "5"], "total": ["8", "2", "10"]}
    assert "held out of train, seed 0" in out


def test_doctor_reads_the_same_layout(tmp_path, capsys):
    root = make_tree(tmp_path / "dataset", ["Training", "Valid"], per_class=3)
    (root / "Valid" / "dogs" / "leak.png").write_bytes((root / "Training" / "cats" / "cats0_0.png").read_bytes())
    main(["doctor", str(root), "--format", "json"])
    report = json.loads(capsys.readouterr().out)
    assert report["split_folders"] == {"train": "Training", "val": "Valid"}
    assert set(report["counts"]) == {"train", "val"}
    assert [sorted(Path(p).name for p in g) for g in report["duplicates_across_splits"]] == [["cats0_0.png", "leak.png"]]
