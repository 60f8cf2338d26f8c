"""`visiontune doctor` on a generated corpus with every kind of bad file, and training on salted data."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import visiontune
from visiontune.cli import main
from visiontune.doctor import diagnose

from .conftest import HYMENOPTERA, make_folder, make_image, needs_hymenoptera


def jpeg_bytes(size=(64, 48), seed=0) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def salt(folder: Path) -> dict[str, str]:
    """Write one file of every troublesome kind into `folder`; return name -> expected category."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpeg_bytes((300, 200))[:700])
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (60, 60, 3), dtype=np.uint8)).save(png, "PNG")
    (folder / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (folder / "page.jpg").write_bytes(b"<!DOCTYPE html><html><body>404 Not Found</body></html>")
    (folder / "random.webp").write_bytes(rng.integers(0, 255, 2048, dtype=np.uint8).tobytes())
    (folder / "png_named.jpg").write_bytes(png.getvalue())
    Image.new("1", (10000, 9000)).save(folder / "bomb.png")  # 90M pixels, a few kB on disk
    make_image(folder / "tiny.png", 0, rng, size=(12, 10))
    make_image(folder / "wide.png", 0, rng, size=(400, 40))
    Image.new("RGB", (100, 100), (200, 200, 200)).save(folder / "imageNotFound.png")
    frames = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(2)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(folder / "sixteen.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).convert("P").save(folder / "palette.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "RGBA").save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(folder / "gray.png")
    rotated = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(folder / "rotated.jpg", exif=exif)
    return {
        "zero.jpg": "unusable:empty", "truncated.jpg": "unusable:truncated", "truncated.png": "unusable:",
        "page.jpg": "unusable:HTML", "random.webp": "unusable:not an image", "bomb.png": "unusable:decompression bomb",
        "png_named.jpg": "note:PNG data", "tiny.png": "suspect:tiny", "wide.png": "suspect:extreme aspect",
        "imageNotFound.png": "suspect:placeholder", "animated.gif": "note:animated", "sixteen.png": "note:16-bit",
        "cmyk.jpg": "note:CMYK", "palette.png": "note:palette", "alpha.png": "note:alpha",
        "gray.png": "note:grayscale", "rotated.jpg": "note:EXIF orientation 6",
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = make_folder(tmp_path_factory.mktemp("doctor") / "data", {"a": 4, "b": 4})
    expected = salt(root / "train" / "a")
    dup = root / "train" / "b" / "b_0.png"
    (root / "train" / "b" / "copy_of_b0.png").write_bytes(dup.read_bytes())  # duplicate within train
    (root / "val" / "a" / "leaked.png").write_bytes((root / "train" / "a" / "a_1.png").read_bytes())  # leak
    make_image(root / "val" / "c" / "only_in_val.png", 2, np.random.default_rng(0))
    (root / "train" / "empty").mkdir()
    (root / "train" / "a" / ".DS_Store").write_bytes(b"\0")
    (root / "train" / "a" / "._a_0.png").write_bytes(b"\0")
    os.symlink("..", root / "train" / "b" / "loop")
    return root, expected, diagnose(root)


def _category(report: dict, name: str) -> str:
    for kind in ("unusable", "suspect"):
        for item in report[kind]:
            if Path(item["path"]).name == name:
                return f"{kind}:{item['problem']}"
    for item in report["notes"]:
        if Path(item["path"]).name == name:
            return "note:" + "; ".join(item["notes"])
    return "ok"


CASES = [
    "zero.jpg", "truncated.jpg", "truncated.png", "page.jpg", "random.webp", "bomb.png", "png_named.jpg",
    "tiny.png", "wide.png", "imageNotFound.png", "animated.gif", "sixteen.png", "cmyk.jpg", "palette.png",
    "alpha.png", "gray.png", "rotated.jpg"]


@pytest.mark.parametrize("name", CASES)
def test_each_bad_file_is_reported_as_what_it_is(corpus, name):
    _, expected, report = corpus
    kind, words = expected[name].split(":", 1)
    got = _category(report, name)
    assert got.startswith(kind + ":") and words in got, got


def test_duplicates_leaks_classes_hidden_and_loops(corpus):
    root, _, report = corpus
    assert [Path(p).name for p in report["duplicates_within_split"][0]] == ["b_0.png", "copy_of_b0.png"]
    assert sorted(Path(p).name for p in report["duplicates_across_splits"][0]) == ["a_1.png", "leaked.png"]
    assert report["class_mismatch"]["val"] == {"extra": ["c"], "missing": []}
    assert "train/empty" in report["empty_class_folders"]
    assert {Path(p).name for p in report["hidden"]} >= {".DS_Store", "._a_0.png"}
    assert report["symlink_loops"] and report["symlink_loops"][0].endswith("loop")
    assert report["counts"]["train"]["b"] == 5


def test_doctor_cli_exit_codes_and_json(corpus, tmp_path, capsys):
    root, _, _ = corpus
    assert main(["doctor", str(root), "--format", "json"]) == 1
    assert json.loads(capsys.readouterr().out)["problems"] > 0
    clean = make_folder(tmp_path / "clean", {"x": 3, "y": 3})
    assert main(["doctor", str(clean)]) == 0
    assert "no problems found" in capsys.readouterr().out
    assert main(["doctor", str(tmp_path / "missing")]) == 2


@needs_hymenoptera()
def test_doctor_flags_the_hymenoptera_placeholder(capsys):
    assert main(["doctor", str(HYMENOPTERA)]) == 1
    out = capsys.readouterr().out
    assert "imageNotFound.gif" in out and "placeholder" in out
    assert "train: ants 124, bees 121" in out and "val: ants 70, bees 83" in out


def test_training_on_salted_folder_leaves_bad_files_out(tmp_path, tiny_settings, capsys):
    root = make_folder(tmp_path / "data", {"a": 6, "b": 6})
    salt(root / "train" / "a")
    run = visiontune.train(root, out=str(tmp_path / "run"), **tiny_settings)
    excluded = (run.path / "excluded.csv").read_text()
    for name in ("zero.jpg", "truncated.jpg", "page.jpg", "random.webp", "bomb.png"):
        assert name in excluded
    for name in ("cmyk.jpg", "sixteen.png", "palette.png", "alpha.png", "rotated.jpg", "png_named.jpg"):
        assert name not in excluded and name in (run.path / "splits" / "train.csv").read_text()
    assert "left out" in capsys.readouterr().err
    with pytest.raises(visiontune.DataError, match="--strict"):
        visiontune.train(root, out=str(tmp_path / "strict"), strict=True, **tiny_settings)
    assert not (tmp_path / "strict").exists()


def test_unreadable_images_are_found_while_training_not_before(tmp_path, tiny_settings, capsys, monkeypatch):
    """No pass over the files before training: a bad file is met by the image batches (here: no probe,
    so no feature pass), left out from then on, listed once and gone from the run's splits."""
    import visiontune.pipeline as pipeline

    def no_screening(*args, **kwargs):
        raise AssertionError("a separate screening pass ran before training")

    monkeypatch.setattr(pipeline, "screen_images", no_screening)
    root = make_folder(tmp_path / "data", {"a": 6, "b": 6})
    (root / "train" / "a" / "broken.jpg").write_bytes(b"<html>not an image</html>")
    (root / "val" / "b" / "empty.png").write_bytes(b"")
    run = visiontune.train(root, out=str(tmp_path / "run"), **{**tiny_settings, "head_init": "random", "epochs": 2})
    err = capsys.readouterr().err
    assert err.count("left out") == 1 and "broken.jpg" in err and "empty.png" in err
    excluded = (run.path / "excluded.csv").read_text()
    assert "broken.jpg" in excluded and "empty.png" in excluded
    assert "broken.jpg" not in (run.path / "splits" / "train.csv").read_text()
    assert "empty.png" not in (run.path / "splits" / "val.csv").read_text()
    assert [r["epoch"] for r in run.metrics] == [1, 2]
    # Val metrics count the readable images only: 3 + 3, not the empty file.
    assert main(["eval", str(run.path), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 6
    # The default recipe meets them in its feature pass (the probe's), before any image batch.
    run = visiontune.train(root, out=str(tmp_path / "probe"), **tiny_settings)
    assert capsys.readouterr().err.count("left out") == 1
    assert run.metrics[0]["stage"] == "probe" and "broken.jpg" in (run.path / "excluded.csv").read_text()
