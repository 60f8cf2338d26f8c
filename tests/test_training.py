"""The whole pipeline on tiny generated images and the tiny test backbone."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest
import torch

import visiontune
from visiontune import checkpoint
from visiontune.errors import UsageError
from visiontune.runfolder import RunFolder

from .conftest import approx_loss, assert_same_run, read_metrics, train_stopped_in_epoch, without_timing


def test_run_folder_has_everything_predict_needs(tiny_data, tiny_settings, tmp_path):
    run = visiontune.train(tiny_data, out=str(tmp_path / "run"), **tiny_settings)
    files = {p.name for p in run.path.iterdir()}
    assert {"config.json", "metrics.csv", "best.safetensors", "model.json", "splits"} <= files
    meta = json.loads((run.path / "model.json").read_text())
    assert meta["classes"] == ["ants", "bees"]
    assert meta["architecture"] == "test_efficientnet"
    assert meta["preprocessing"]["size"] == 48
    header = (run.path / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds")
    assert [(r["epoch"], r["stage"]) for r in read_metrics(run.path)] == [("0", "probe"), ("1", "full"), ("2", "full")]
    with (run.path / "splits" / "val.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 6


def test_best_epoch_weights_are_restored_and_saved(tiny_data, tiny_settings, tmp_path):
    # A constant, too-high learning rate makes later epochs worse than an early one.
    settings = {**tiny_settings, "epochs": 4, "lr": 0.5, "schedule": "constant", "head_init": "random"}
    run = visiontune.train(tiny_data, out=str(tmp_path / "run"), **settings)
    rows = read_metrics(run.path)
    best_row = rows[run.best_epoch - 1]
    assert float(best_row["val_acc"]) == max(float(r["val_acc"]) for r in rows)
    saved = checkpoint.load_weights(run.path / "best.safetensors")
    for k, v in run.model.state_dict().items():
        assert torch.equal(saved[k], v), k
    stats = evaluate_saved_run(run.path, ["ants", "bees"])
    assert stats.accuracy == float(best_row["val_acc"])
    assert stats.loss == approx_loss(float(best_row["val_loss"]))
    assert run.best_epoch != 4 or float(rows[-1]["val_acc"]) == max(float(r["val_acc"]) for r in rows)


def evaluate_saved_run(run_dir: Path, classes: list[str]):
    """Loss and accuracy of RUN's best.safetensors on its val split, from the image files."""
    from visiontune.engine import evaluate
    from visiontune.images import decode_array
    from visiontune.preprocess import EvalTransform, Preprocessing, normalize_batch

    reloaded, _ = RunFolder(run_dir).load_model()
    pre = Preprocessing.from_json(json.loads((run_dir / "model.json").read_text())["preprocessing"])
    with (run_dir / "splits" / "val.csv").open() as f:
        items = [(Path(r["path"]), classes.index(r["label"])) for r in csv.DictReader(f)]
    x = torch.stack([EvalTransform(pre)(decode_array(p, pre.resize)) for p, _ in items])
    y = torch.tensor([label for _, label in items])
    return evaluate(reloaded, [(x, y)], lambda b: normalize_batch(b, pre))


def test_the_linear_probe_is_epoch_0_and_competes_for_best(tiny_data, tiny_settings, tmp_path):
    # lr 1e-30 with frozen BatchNorm cannot change the model, so no fine-tuning epoch beats the probe
    # (ties go to the lower loss, and the loss is the same): the best weights must be the probe model.
    # Without --refit-head, whose 25 more head epochs on the same features could beat the probe.
    settings = {**tiny_settings, "epochs": 2, "lr": 1e-30, "schedule": "constant", "bn": "frozen", "refit_head": False}
    run = visiontune.train(tiny_data, out=str(tmp_path / "run"), **settings)
    rows = read_metrics(run.path)
    assert [(r["epoch"], r["stage"], r["lr"]) for r in rows[:1]] == [("0", "probe", "0")]
    assert run.best_epoch == 0 and json.loads((run.path / "model.json").read_text())["best_epoch"] == 0
    stats = evaluate_saved_run(run.path, ["ants", "bees"])
    assert stats.accuracy == float(rows[0]["val_acc"])
    assert stats.loss == approx_loss(float(rows[0]["val_loss"]))
    from visiontune.backbones import build_classifier

    pretrained, _ = build_classifier("test_efficientnet", 2, tiny_settings["weights"])
    saved = checkpoint.load_weights(run.path / "best.safetensors")
    for k, v in pretrained.state_dict().items():
        assert k.startswith("classifier.") or torch.equal(v, saved[k]), k
    assert not torch.equal(pretrained.state_dict()["classifier.weight"], saved["classifier.weight"])


def test_the_probe_is_fixed_modes_best_epoch(tiny_data, tiny_settings, tmp_path):
    # Epoch 0 of a fine-tune run must be the model --mode fixed gives with the same seed (its 25
    # head epochs, best on val), so that "fine-tuning adds to fixed mode" is measured from there.
    settings = {**tiny_settings, "seed": 3}
    finetune = visiontune.train(tiny_data, out=str(tmp_path / "finetune"), **{**settings, "epochs": 1})
    fixed = visiontune.train(tiny_data, mode="fixed", out=str(tmp_path / "fixed"), **{**settings, "epochs": 25})
    probe = read_metrics(finetune.path)[0]
    assert probe["stage"] == "probe"
    assert float(probe["val_acc"]) == fixed.best_val_acc
    assert float(probe["val_loss"]) == approx_loss(fixed.best_val_loss)
    best_fixed_row = next(r for r in read_metrics(fixed.path) if int(r["epoch"]) == fixed.best_epoch)
    assert float(probe["train_loss"]) == approx_loss(float(best_fixed_row["train_loss"]))


@pytest.mark.parametrize("feature_cache", [True, False])
def test_fixed_mode_leaves_backbone_bitwise_unchanged(tiny_data, tiny_settings, tiny_weights, tmp_path, feature_cache):
    from visiontune.backbones import build_classifier

    run = visiontune.train(tiny_data, mode="fixed", feature_cache=feature_cache, out=str(tmp_path / "run"),
                           **{**tiny_settings, "epochs": 3})
    original, _ = build_classifier("test_efficientnet", 2, tiny_weights)
    trained = run.model.state_dict()
    changed_head = False
    for k, v in original.state_dict().items():
        if k.startswith("classifier."):
            changed_head |= not torch.equal(v, trained[k])
        else:
            assert torch.equal(v, trained[k]), f"fixed mode changed backbone tensor {k}"
    assert changed_head


def test_cached_features_train_the_same_head_as_the_uncached_loop(tiny_data, tiny_settings, tmp_path):
    common = {**tiny_settings, "epochs": 3, "views": 1, "mode": "fixed"}
    cached = visiontune.train(tiny_data, feature_cache=True, out=str(tmp_path / "a"), **common)
    plain = visiontune.train(tiny_data, feature_cache=False, out=str(tmp_path / "b"), **common)
    for name in ("classifier.weight", "classifier.bias"):
        torch.testing.assert_close(cached.model.state_dict()[name], plain.model.state_dict()[name],
                                   rtol=0, atol=1e-5)
    for a, b in zip(read_metrics(cached.path), read_metrics(plain.path)):
        assert float(a["val_loss"]) == approx_loss(float(b["val_loss"]))


def test_same_seed_gives_identical_metrics(tiny_data, tiny_settings, tmp_path):
    first = visiontune.train(tiny_data, out=str(tmp_path / "a"), seed=3, **tiny_settings)
    second = visiontune.train(tiny_data, out=str(tmp_path / "b"), seed=3, **tiny_settings)
    assert without_timing(read_metrics(first.path)) == without_timing(read_metrics(second.path))


def test_training_learns_the_tiny_task(tiny_data, tiny_settings, tmp_path):
    run = visiontune.train(tiny_data, out=str(tmp_path / "run"),
                           **{**tiny_settings, "epochs": 5, "lr": 0.02, "head_init": "random"})
    rows = read_metrics(run.path)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def test_existing_nonempty_out_is_never_overwritten(tiny_data, tiny_settings, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(UsageError, match="--out"):
        visiontune.train(tiny_data, out=str(out), **tiny_settings)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_feature_cache_reuses_entries_and_re_extracts_a_changed_file(tiny_data, tiny_settings, tmp_path):
    from visiontune.backbones import build_classifier, data_config
    from visiontune.features import FeatureCache, extract_features
    from visiontune.images import DecodeCache
    from visiontune.preprocess import Preprocessing

    model, source = build_classifier("test_efficientnet", 2, Path(tiny_settings["weights"]))
    pre = Preprocessing.from_data_config(data_config(model), 48)
    paths = sorted((tiny_data / "train" / "ants").glob("*.png"))[:3]
    cache = FeatureCache(tmp_path / "fc", {"arch": "t", "weights": source})
    decode = DecodeCache(pre.resize, directory=tmp_path / "dc")
    first, failed = extract_features(model, paths, decode, pre, 2, 0, cache, channels_last=False)
    assert failed == {}
    assert first.shape[:2] == (2, 3)
    assert not torch.equal(first[0], first[1])  # view 1 is augmented

    calls = []
    counting = lambda p: calls.append(Path(p).name) or decode(p)  # noqa: E731
    again, _ = extract_features(model, paths, counting, pre, 2, 0, cache, channels_last=False)
    assert calls == [] and torch.equal(first, again)

    bees = sorted((tiny_data / "train" / "bees").glob("*.png"))[0]
    paths[1].write_bytes(bees.read_bytes())
    os.utime(paths[1], (time.time() + 5, time.time() + 5))
    changed, _ = extract_features(model, paths, counting, pre, 2, 0, cache, channels_last=False)
    assert sorted(set(calls)) == [paths[1].name]
    assert torch.equal(changed[:, 0], first[:, 0]) and not torch.equal(changed[0, 1], first[0, 1])

    # An unreadable image is left out of the rows and named, in every view; the others are the same.
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    rows, failed = extract_features(model, [paths[0], bad, paths[2]], decode, pre, 2, 0, cache, channels_last=False)
    assert list(failed) == [str(bad)] and rows.shape[:2] == (2, 2)
    assert torch.equal(rows[:, 0], changed[:, 0]) and torch.equal(rows[:, 1], changed[:, 2])



def test_feature_extraction_decodes_each_batch_on_torchs_threads_and_keeps_the_order(tiny_data, tiny_settings,
                                                                                     tmp_path):
    import threading

    from visiontune.backbones import build_classifier, data_config
    from visiontune.features import extract_features
    from visiontune.folding import pooled_features
    from visiontune.images import decode_array
    from visiontune.preprocess import EvalTransform, Preprocessing, normalize_batch

    model, _ = build_classifier("test_efficientnet", 2, Path(tiny_settings["weights"]))
    pre = Preprocessing.from_data_config(data_config(model), 48)
    paths = sorted((tiny_data / "train").rglob("*.png"))[:7]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    paths.insert(3, bad)
    threads = set()

    def slow_decode(path):
        threads.add(threading.current_thread().name)
        time.sleep(0.02)  # long enough that both threads take part
        return decode_array(path, pre.resize)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        features, failed = extract_features(model, paths, slow_decode, pre, 1, 0, None, batch_size=4,
                                            channels_last=False)
    finally:
        torch.set_num_threads(before)
    assert len(threads) == 2 and threading.current_thread().name not in threads
    assert list(failed) == [str(bad)]
    good = [p for p in paths if p != bad]
    with torch.inference_mode():
        reference = pooled_features(model.eval(), normalize_batch(
            torch.stack([EvalTransform(pre)(decode_array(p, pre.resize)) for p in good]), pre))
    assert features.shape[1] == len(good)
    torch.testing.assert_close(features[0], reference, rtol=1e-4, atol=1e-4)


def test_feature_cache_adds_a_part_per_save_and_merges_past_the_limit(tmp_path, monkeypatch):
    import numpy as np

    from visiontune.features import FeatureCache

    cache = FeatureCache(tmp_path, {"arch": "t"})
    rows = np.arange(12, dtype=np.float32).reshape(6, 2)
    cache.save(0, 0, ["a", "b"], rows[:2])
    cache.save(0, 0, ["c"], rows[2:3])  # only the new entry is written, the first part is untouched
    assert len(list((tmp_path / "features").glob("*.ids.npy"))) == 2
    found, got = cache.load(0, 0, ["c", "x", "a"])
    assert found == [2, 0] and got.tolist() == [rows[0].tolist(), rows[2].tolist()]
    assert cache.load(1, 0, ["a"]) == ([], None)  # another view: its own parts
    monkeypatch.setattr(FeatureCache, "MAX_PARTS", 2)
    cache.save(0, 0, ["d", "e"], rows[3:5])
    assert len(list((tmp_path / "features").glob("*.ids.npy"))) == 1
    found, got = cache.load(0, 0, ["a", "b", "c", "d", "e"])
    assert found == [0, 1, 2, 3, 4] and got.tolist() == rows[:5].tolist()
    # A part written row by row as computed, two of its places left empty (unreadable images): those
    # are never found, and a merge leaves them out.
    written = FeatureCache(tmp_path / "written", {"arch": "t"})
    writer = written.new_part(0, 0, 5, 2)
    writer.write([3, 0], ["w3", "w0"], rows[[3, 0]])
    writer.write([2], ["w2"], rows[[2]])
    writer.finish()
    assert written.locate(0, 0, ["w0", "w1", "w2", "w3"])[0] == [0, 2, 3]
    monkeypatch.setattr(FeatureCache, "MAX_PARTS", 1)
    written.save(0, 0, ["s5"], rows[5:6])
    (ids_file,) = (tmp_path / "written" / "features").glob("*.ids.npy")
    assert np.load(ids_file).tolist() == ["w0", "w2", "w3", "s5"]
    found, got = written.load(0, 0, ["s5", "w3", "w2", "w0"])
    assert found == [3, 2, 1, 0] and got.tolist() == rows[[0, 2, 3, 5]].tolist()
    # Only some rows of an array (the others were unreadable images): written a block at a time.
    picked = FeatureCache(tmp_path / "picked", {"arch": "t"})
    picked.save(0, 0, ["p", "q", "r"], rows, which=[4, 1, 5])
    found, got = picked.load(0, 0, ["q", "r", "p"])
    assert found == [2, 0, 1] and got.tolist() == [rows[4].tolist(), rows[1].tolist(), rows[5].tolist()]


def test_unreadable_rows_leave_the_features_in_place_not_in_a_copy():
    import numpy as np

    from visiontune.features import _drop_rows

    rng = np.random.default_rng(0)
    for views, n, block in ((1, 50, 4096), (2, 50, 7), (2, 200, 3)):
        out = rng.standard_normal((views, n, 3)).astype(np.float32)
        keep = sorted(rng.choice(n, n - 5, replace=False).tolist())  # five unreadable images
        expected = out[:, keep].copy()
        kept = _drop_rows(out, keep, block)
        assert np.array_equal(kept, expected)
        # The rows moved inside the extraction's own array: no second array of every row at the peak.
        assert np.shares_memory(kept, out) and kept.base is out
    assert _drop_rows(out, list(range(n))) is out


@pytest.mark.parametrize("views", [1, 2])
def test_large_feature_sets_are_read_from_the_cache_files_exactly_as_in_memory(tiny_data, tiny_settings, tmp_path,
                                                                               monkeypatch, views):
    from safetensors.torch import load_file

    from visiontune import features

    (tiny_data / "train" / "ants" / "broken.png").write_bytes(b"not a png")  # left out of the rows
    settings = {**tiny_settings, "mode": "fixed", "epochs": 3, "views": views}
    in_memory = tmp_path / "in-memory"
    visiontune.train(tiny_data, out=str(in_memory), **{**settings, "cache_dir": str(tmp_path / "c1")})
    monkeypatch.setattr(features, "ON_DISK_MIN_ROWS", 0)  # what a set of tens of thousands of images gets
    opened = []
    original_init = features.FeaturesOnDisk.__init__
    monkeypatch.setattr(features.FeaturesOnDisk, "__init__",
                        lambda self, *a: (opened.append(len(a[0])), original_init(self, *a))[1])
    for name in ("on-disk", "on-disk-again"):  # rows written part by part, then all read back from the cache
        visiontune.train(tiny_data, out=str(tmp_path / name), **{**settings, "cache_dir": str(tmp_path / "c2")})
        assert read_metrics(tmp_path / name, timing=False) == read_metrics(in_memory, timing=False)
        trained, expected = load_file(str(tmp_path / name / "best.safetensors")), load_file(str(in_memory / "best.safetensors"))
        assert all(torch.equal(trained[k], expected[k]) for k in expected)
    assert opened == [views, 1, views, 1]  # part files of train (a part per view) and val, in both runs
    assert (tmp_path / "on-disk" / "excluded.csv").read_text().count("broken.png") == 1


def test_head_stage_writes_last_ckpt_sparingly_and_resumes_exactly(tiny_data, tiny_settings, tmp_path, monkeypatch):
    from visiontune import training

    saved = []
    original_save = RunFolder.save_last
    monkeypatch.setattr(RunFolder, "save_last", lambda self, state: (saved.append(state["epoch"]),
                                                                     original_save(self, state)))
    settings = {**tiny_settings, "mode": "fixed", "epochs": 6}
    whole = visiontune.train(tiny_data, out=str(tmp_path / "whole"), **settings)
    # Epochs of milliseconds on cached features: the start, the stage's end, the finish; not every epoch.
    assert saved == [0, 6, 6]
    saved.clear()
    monkeypatch.setattr(training, "HEAD_STAGE_SAVE_EVERY_S", 0.0)
    visiontune.train(tiny_data, out=str(tmp_path / "every"), **settings)
    assert saved == [0, 1, 2, 3, 4, 5, 6, 6]
    # Stopped in epoch 4 with last.ckpt from epoch 0: the resumed run is the uninterrupted one.
    monkeypatch.setattr(training, "HEAD_STAGE_SAVE_EVERY_S", 10.0)
    train_stopped_in_epoch(monkeypatch, 4, tiny_data, tmp_path / "split", settings)
    assert checkpoint.load_training_state(tmp_path / "split" / "last.ckpt")["epoch"] == 0
    assert_same_run(whole, visiontune.resume(tmp_path / "split"))


def test_resume_with_loader_workers_equals_the_uninterrupted_run(tiny_data, tiny_settings, tmp_path, monkeypatch):
    # GPUs get loader workers by default. Their augmentation streams must restart from the checkpointed
    # global RNG each epoch (persistent workers would carry theirs across epochs, past any checkpoint).
    settings = {**tiny_settings, "epochs": 4, "workers": 2, "deterministic": True}
    whole = visiontune.train(tiny_data, out=str(tmp_path / "whole"), **settings)
    train_stopped_in_epoch(monkeypatch, 3, tiny_data, tmp_path / "split", settings)
    assert checkpoint.load_training_state(tmp_path / "split" / "last.ckpt")["epoch"] == 2
    assert_same_run(whole, visiontune.resume(tmp_path / "split"))
