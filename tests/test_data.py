"""Finding images, splits, the class index, and decoding to RGB."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from visiontune.data import discover, stratified_split
from visiontune.errors import DataError, UsageError
from visiontune.images import DecodeCache, decode_array, decode_rgb

from .conftest import make_folder, make_image


def test_tutorial_layout_and_sorted_class_index(tmp_path):
    root = make_folder(tmp_path, {"zebra": 3, "ant": 4})
    splits = discover(root)
    assert splits.classes == ["ant", "zebra"]
    assert splits.layout == "folders"
    assert [label for _, label in splits.samples["train"]].count(0) == 4
    assert {label for _, label in splits.samples["val"]} == {0, 1}
    assert not splits.auto_split


def test_optional_test_split(tmp_path):
    root = make_folder(tmp_path, {"a": 2, "b": 2})
    rng = np.random.default_rng(0)
    for cls, label in (("a", 0), ("b", 1)):
        make_image(root / "test" / cls / "t.png", label, rng)
    assert len(discover(root).samples["test"]) == 2


def test_class_folders_split_stratified_and_seeded(tmp_path):
    root = make_folder(tmp_path, {"a": 10, "b": 20}, layout="flat")
    s1, s2, s3 = discover(root, seed=0), discover(root, seed=0), discover(root, seed=1)
    assert s1.samples == s2.samples
    assert s1.samples["val"] != s3.samples["val"]
    val_labels = [label for _, label in s1.samples["val"]]
    assert val_labels.count(0) == 2 and val_labels.count(1) == 4
    assert not set(s1.samples["train"]) & set(s1.samples["val"])
    assert s1.auto_split["seed"] == 0


def test_stratified_split_keeps_every_class_in_train():
    items = [(f"x{i}", 0) for i in range(2)] + [(f"y{i}", 1) for i in range(5)]
    train, val = stratified_split(items, 0.5, 0)
    assert {label for _, label in train} == {0, 1}
    assert len(val) == 1 + 2  # round(1.0)=1 and round(2.5)=2


def test_extensions_any_case_and_hidden_files_skipped(tmp_path):
    rng = np.random.default_rng(0)
    for i, ext in enumerate([".JPG", ".jpeg", ".Png", ".bmp", ".gif", ".webp", ".TIF"]):
        make_image(tmp_path / "a" / f"img{i}{ext}", 0, rng, fmt={".JPG": "JPEG", ".jpeg": "JPEG", ".TIF": "TIFF"}.get(ext))
        make_image(tmp_path / "b" / f"img{i}{ext}", 1, rng, fmt={".JPG": "JPEG", ".jpeg": "JPEG", ".TIF": "TIFF"}.get(ext))
    (tmp_path / "a" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    make_image(tmp_path / "a" / "._hidden.jpg", 0, rng, fmt="JPEG")
    splits = discover(tmp_path)
    total = sum(len(v) for v in splits.samples.values())
    assert total == 14


def test_csv_layout(tmp_path):
    make_folder(tmp_path / "imgs", {"a": 3, "b": 3}, layout="flat")
    rows = ["path,label,split"] + [f"imgs/a/a_{i}.png,a,{'val' if i == 0 else 'train'}" for i in range(3)] + [
        f"imgs/b/b_{i}.png,b,{'val' if i == 0 else 'train'}" for i in range(3)]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    splits = discover(tmp_path / "list.csv")
    assert splits.classes == ["a", "b"] and len(splits.samples["val"]) == 2 and len(splits.samples["train"]) == 4


@pytest.mark.parametrize(
    "setup, error, words",
    [
        (lambda p: p / "missing", UsageError, "no such file"),
        (lambda p: (p / "empty").mkdir() or p / "empty", DataError, "no images"),
        (lambda p: make_folder(p / "one", {"a": 4}, layout="flat"), DataError, "single class"),
    ],
)
def test_unusable_data_gets_one_sentence(tmp_path, setup, error, words):
    with pytest.raises(error) as info:
        discover(setup(tmp_path))
    message = str(info.value)
    assert words in message and "\n" not in message and str(tmp_path) in message


def test_val_classes_that_differ_from_train_are_named(tmp_path):
    root = make_folder(tmp_path, {"a": 2, "b": 2})
    make_image(root / "val" / "c" / "x.png", 2, np.random.default_rng(0))
    with pytest.raises(DataError, match="val has c which train lacks"):
        discover(root)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = 255  # left half white
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "r.jpg", exif=exif, quality=95)
    shown = decode_rgb(tmp_path / "r.jpg")
    assert shown.size == (20, 40)  # portrait after rotation
    top = np.asarray(shown)[:10].mean()
    bottom = np.asarray(shown)[-10:].mean()
    assert top > 200 and bottom < 50  # the white half is now on top


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.full((8, 8, 3), 100, dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(np.full((8, 8), 100 * 257, dtype=np.uint16))
    else:
        image = rgb.convert(mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    image.save(path)
    out = np.asarray(decode_rgb(path))
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert abs(int(out.mean()) - 100) <= 3


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "t.png")
    assert np.asarray(decode_rgb(tmp_path / "t.png")).min() == 255


def test_decode_cache_returns_the_direct_decode(tmp_path):
    rng = np.random.default_rng(0)
    make_image(tmp_path / "big.jpg", 0, rng, size=(1200, 900), fmt="JPEG")
    cache = DecodeCache(256, directory=tmp_path / "cache")
    first = np.array(cache(tmp_path / "big.jpg"))
    again = cache(tmp_path / "big.jpg")  # now from disk
    assert isinstance(again, np.memmap) or again.base is not None
    assert np.array_equal(first, np.asarray(again))
    assert first.shape == (256, 341, 3)
    # Draft-mode decoding (DCT scaling) vs a full decode then resize: documented tolerance.
    with Image.open(tmp_path / "big.jpg") as im:
        full = np.asarray(im.convert("RGB").resize((341, 256), Image.BICUBIC), dtype=np.float64)
    diff = np.abs(first.astype(np.float64) - full)
    assert diff.mean() < 3.0


def test_decode_cache_bound_streams_past_it(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        make_image(tmp_path / f"{i}.png", 0, rng, size=(64, 64))
    cache = DecodeCache(32, directory=tmp_path / "cache", max_bytes=32 * 32 * 3 * 2)
    for i in range(3):
        assert cache(tmp_path / f"{i}.png").shape == (32, 32, 3)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2
    assert np.array_equal(np.asarray(cache(tmp_path / "2.png")), decode_array(tmp_path / "2.png", 32))


def test_decode_cache_pickles_with_its_budget(tmp_path):
    # A loader worker started by spawn or forkserver gets a pickled copy; the cache holds a lock (a batch is
    # decoded on several threads), which does not pickle itself.
    import pickle

    rng = np.random.default_rng(0)
    for i in range(2):
        make_image(tmp_path / f"{i}.png", 0, rng, size=(64, 64))
    cache = DecodeCache(32, directory=tmp_path / "cache", max_bytes=32 * 32 * 3)
    cache(tmp_path / "0.png")
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.bytes_written == cache.bytes_written == 32 * 32 * 3
    assert np.array_equal(np.asarray(copy(tmp_path / "1.png")), decode_array(tmp_path / "1.png", 32))
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 1  # the copy's budget was spent too


@pytest.mark.parametrize("decode_cache", [True, False])
def test_loader_workers_give_the_same_batches_as_the_main_process(tmp_path, decode_cache):
    # Workers decode and crop; with the eval transform (no randomness) their batches must be exactly the
    # main process's, in the same order. The decoder is picklable either way (forkserver/spawn need it).
    from functools import partial
    from types import SimpleNamespace

    import torch

    from visiontune.data import train_loader, val_loader
    from visiontune.preprocess import EvalTransform, Preprocessing

    root = make_folder(tmp_path / "d", {"a": 5, "b": 5}, layout="flat")
    items = [(p, i) for i, c in enumerate("ab") for p in sorted((root / c).iterdir())]
    pre = Preprocessing(size=32, resize=36, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875)
    decode = DecodeCache(36, directory=tmp_path / "cache") if decode_cache else partial(decode_array, short_side=36)
    rt = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), shard=lambda xs: xs)

    def batches(workers: int, loader):
        cfg = SimpleNamespace(workers=workers, batch_size=4, eval_batch_size=4, sampler="random", mode="finetune")
        made = loader(cfg)
        if workers:
            assert made.multiprocessing_context.get_start_method() == "fork"
        return [(x.clone(), y.clone()) for x, y, failed in made if not failed]

    for make in (lambda cfg: train_loader(items, decode, EvalTransform(pre), cfg, rt, torch.Generator().manual_seed(0)),
                 lambda cfg: val_loader(items, decode, EvalTransform(pre), cfg, rt)):
        in_process, in_workers = batches(0, make), batches(2, make)
        assert len(in_process) == 3
        for (x0, y0), (x1, y1) in zip(in_process, in_workers):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
