"""Config files, extending a finished run, warm starts from a run (--init) and a run's weights as --weights."""

from __future__ import annotations

import hashlib
import json

import pytest
from safetensors.torch import load_file

import visiontune
from visiontune.cli import main

from .conftest import make_folder, read_metrics


def cli_settings(settings: dict) -> list[str]:
    flags = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def backbone_tensors(path, head="classifier."):
    return {k: v for k, v in load_file(str(path)).items() if not k.startswith(head)}


def test_config_file_repeats_a_run_bitwise_and_flags_override_it(tiny_run, tmp_path, capsys):
    again = tmp_path / "again"
    assert main(["train", "--config", str(tiny_run.path / "config.json"), "--out", str(again)]) == 0
    assert read_metrics(again, timing=False) == read_metrics(tiny_run.path, timing=False)
    assert digest(again / "best.safetensors") == digest(tiny_run.path / "best.safetensors")
    settings = json.loads((tiny_run.path / "config.json").read_text())["config"]
    # YAML of a few settings; a flag overrides the file.
    yaml_file = tmp_path / "settings.yaml"
    yaml_file.write_text(f"data: {settings['data']}\nmodel: {settings['model']}\nweights: {settings['weights']}\n"
                         f"image_size: 48\ntrain_size: 48\nbatch_size: 4\nepochs: 3\nmode: fixed\n"
                         f"cache_dir: {settings['cache_dir']}\nquiet: true\nchannels_last: false\n")
    assert main(["train", "--config", str(yaml_file), "--epochs", "2", "--out", str(tmp_path / "y")]) == 0
    written = json.loads((tmp_path / "y" / "config.json").read_text())["config"]
    assert written["mode"] == "fixed" and written["epochs"] == 2 and written["batch_size"] == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nlearning_rate: 0.1\n")
    assert main(["train", "x", "--config", str(bad)]) == 2
    assert "unknown setting(s) learning_rate" in capsys.readouterr().err


def test_every_train_flag_comes_from_train_config():
    from dataclasses import fields

    from visiontune.cli import build_parser
    from visiontune.config import TrainConfig, field_docs

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {option for action in train._actions for option in action.option_strings}
    docs = field_docs()
    for f in fields(TrainConfig):
        if f.name != "data":
            assert "--" + f.name.replace("_", "-") in flags, f.name
            assert docs.get(f.name), f"{f.name} has no docstring, so its flag would have no help"
    assert flags - {"--" + f.name.replace("_", "-") for f in fields(TrainConfig)} == {
        "-h", "--help", "--config", "--resume", "--no-channels-last", "--no-compile", "--no-deterministic",
        "--no-feature-cache", "--no-strict", "--no-quiet", "--no-refit-head"}


def test_resume_extends_a_finished_run_with_a_replanned_schedule(tiny_data, tiny_settings, tmp_path, capsys):
    run = tmp_path / "run"
    visiontune.train(tiny_data, out=str(run), **{**tiny_settings, "epochs": 2})
    before = read_metrics(run, timing=False)
    assert main(["train", "--resume", str(run)]) == 2
    assert "add --epochs N" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--epochs", "4"]) == 0
    err = capsys.readouterr().err
    assert "extending" in err and "re-planned over 4 epochs" in err
    after = read_metrics(run, timing=False)
    assert after[: len(before)] == before and [r["epoch"] for r in after] == ["0", "1", "2", "3", "4"]
    assert json.loads((run / "config.json").read_text())["config"]["epochs"] == 4
    # Epochs 3-4 follow a 4-epoch schedule: the same learning rates as a run planned for 4 from the start.
    fresh = tmp_path / "fresh"
    visiontune.train(tiny_data, out=str(fresh), **{**tiny_settings, "epochs": 4})
    assert [r["lr"] for r in after[3:]] == [r["lr"] for r in read_metrics(fresh)[3:]]
    assert [r["lr"] for r in after[1:3]] != [r["lr"] for r in read_metrics(fresh)[1:3]]
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 2
    assert "not shorten it" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--lr", "0.1"]) == 2


def test_init_from_a_run_same_classes_keeps_head_other_classes_backbone(tiny_run, tiny_data, tiny_settings,
                                                                          tmp_path, capsys):
    # Same classes, fixed mode at a negligible lr: epoch 1 scores what the run's best epoch scored.
    same = visiontune.train(tiny_data, out=str(tmp_path / "same"), init=str(tiny_run.path),
                            **{**tiny_settings, "mode": "fixed", "epochs": 1, "lr": 1e-12, "quiet": False})
    assert "backbone and head (same classes)" in capsys.readouterr().out
    assert same.metrics[0]["val_acc"] == tiny_run.best_val_acc
    assert same.metrics[0]["val_loss"] == pytest.approx(tiny_run.best_val_loss, rel=1e-4)
    # Fine-tuning from it skips the linear probe: the head is already trained.
    tuned = visiontune.train(tiny_data, out=str(tmp_path / "tuned"), init=str(tiny_run.path),
                             **{**tiny_settings, "epochs": 1})
    assert [r["stage"] for r in tuned.metrics] == ["full"]
    # Other classes: the backbone only, said so; fixed mode leaves it as the run had it.
    other = make_folder(tmp_path / "other", {"cats": 6, "dogs": 6, "owls": 6})
    new = visiontune.train(other, out=str(tmp_path / "new"), init=str(tiny_run.path),
                           **{**tiny_settings, "mode": "fixed", "epochs": 1, "quiet": False})
    assert "with a new head: its classes (ants, bees) differ" in capsys.readouterr().out
    assert new.classes == ["cats", "dogs", "owls"]
    expected = backbone_tensors(tiny_run.path / "best.safetensors")
    got = backbone_tensors(new.path / "best.safetensors")
    assert expected.keys() == got.keys() and all((expected[k] == got[k]).all() for k in expected)
    # A run's best.safetensors as --weights: its backbone, a new head.
    weights = visiontune.train(other, out=str(tmp_path / "weights"), weights=str(tiny_run.path / "best.safetensors"),
                               **{k: v for k, v in {**tiny_settings, "mode": "fixed", "epochs": 1}.items()
                                  if k != "weights"})
    got = backbone_tensors(weights.path / "best.safetensors")
    assert all((expected[k] == got[k]).all() for k in expected)
    # Another architecture: one sentence.
    code = main(["train", str(tiny_data), "--init", str(tiny_run.path), "--model", "efficientnet_lite0",
                 "--out", str(tmp_path / "x")])
    assert code == 2 and "was trained with --model test_efficientnet" in capsys.readouterr().err
