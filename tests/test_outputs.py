"""eval, predict, export, report: on tiny runs (fast) and on a real hymenoptera run (acceptance)."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import visiontune
from visiontune.cli import main
from visiontune.metrics import confusion_matrix, per_class_report, wilson_interval

from .conftest import HYMENOPTERA, WITHOUT_TORCH, approx_loss, make_folder, make_image, needs_hymenoptera


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


# --- pure metrics -------------------------------------------------------------


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(146, 153)
    assert (round(lo, 4), round(hi, 4)) == (0.9086, 0.9777)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0) and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)


def test_confusion_and_per_class_report():
    m = confusion_matrix(np.array([0, 0, 0, 1, 1, 2]), np.array([0, 1, 0, 1, 1, 1]), 3)
    assert m.tolist() == [[2, 1, 0], [0, 2, 0], [0, 1, 0]]
    r = per_class_report(m, ["a", "b", "c"])
    assert r["per_class"]["a"] == {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    assert r["per_class"]["b"]["precision"] == 0.5 and r["per_class"]["c"]["f1"] == 0.0
    assert r["macro_avg"]["recall"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert r["weighted_avg"]["recall"] == pytest.approx((2 + 2 + 0) / 6)


# --- a tiny run -----------------------------------------------------------------


def test_eval_json_matches_best_epoch(tiny_run, capsys):
    code, out, _ = run_cli(["eval", str(tiny_run.path), "--format", "json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert {"accuracy", "accuracy_ci", "loss", "n", "classes", "per_class", "confusion_matrix", "top_mistakes"} <= set(result)
    assert result["n"] == 6 and result["accuracy"] == tiny_run.best_val_acc
    assert result["loss"] == approx_loss(tiny_run.best_val_loss)
    assert sum(map(sum, result["confusion_matrix"])) == 6


def test_eval_table_says_what_one_image_is_worth(tiny_run, capsys):
    code, out, _ = run_cli(["eval", str(tiny_run.path)], capsys)
    assert code == 0 and "one image is 16.67 points" in out and "confusion matrix" in out


def test_eval_on_other_data_with_unknown_class_is_an_error(tiny_run, tmp_path, capsys):
    other = make_folder(tmp_path / "other", {"ants": 2, "wasps": 2}, layout="flat")
    code, _, err = run_cli(["eval", str(tiny_run.path), str(other)], capsys)
    assert code == 3 and "wasps" in err and "Traceback" not in err
    same = make_folder(tmp_path / "same", {"ants": 2, "bees": 3}, layout="flat")
    code, out, _ = run_cli(["eval", str(tiny_run.path), str(same), "--format", "json"], capsys)
    assert code == 0 and json.loads(out)["n"] == 5


def test_eval_tta_averages_flipped_probabilities(tiny_run, capsys):
    import torch

    from visiontune.runfolder import RunFolder
    from visiontune.images import decode_array
    from visiontune.preprocess import EvalTransform, Preprocessing, normalize_batch

    code, out, _ = run_cli(["eval", str(tiny_run.path), "--format", "json", "--tta"], capsys)
    assert code == 0
    result = json.loads(out)
    from visiontune.evaluation import evaluate_run

    plain = evaluate_run(tiny_run.path)
    # Independent recomputation: mean of -log((softmax(x) + softmax(mirror of x)) / 2)[true class].
    model, _ = RunFolder(tiny_run.path).load_model()
    model.eval()
    pre = Preprocessing.from_json(json.loads((tiny_run.path / "model.json").read_text())["preprocessing"])
    classes = json.loads((tiny_run.path / "model.json").read_text())["classes"]
    with (tiny_run.path / "splits" / "val.csv").open() as f:
        items = [(Path(r["path"]), classes.index(r["label"])) for r in csv.DictReader(f)]
    x = normalize_batch(torch.stack([EvalTransform(pre)(decode_array(p, pre.resize)) for p, _ in items]), pre)
    y = torch.tensor([label for _, label in items])
    with torch.inference_mode():
        probs = (torch.softmax(model(x), 1) + torch.softmax(model(torch.flip(x, dims=[3])), 1)) / 2
    expected = -torch.log(probs[torch.arange(len(y)), y]).mean().item()
    assert result["tta"] is True and result["loss"] == approx_loss(expected)
    assert result["loss"] != approx_loss(plain["loss"])  # the mirror images did change the answer


def test_predict_reports_unreadable_files_and_classifies_the_rest(tiny_run, tiny_data, tmp_path, capsys):
    folder = tmp_path / "inbox"
    make_image(folder / "good.png", 0, np.random.default_rng(1))
    (folder / "broken.jpg").write_bytes(b"<html>not found</html>")
    make_image(folder / "sub" / "deeper.png", 1, np.random.default_rng(2))
    code, out, err = run_cli(["predict", str(tiny_run.path), str(folder), str(tmp_path / "nothing*.png"),
                              "--format", "jsonl"], capsys)
    assert code == 1
    rows = [json.loads(line) for line in out.splitlines()]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert set(by_name) == {"good.png", "broken.jpg", "deeper.png", "nothing*.png"}
    assert "error" in by_name["broken.jpg"] and "error" in by_name["nothing*.png"]
    good = by_name["good.png"]
    assert set(good) == {"path", "label", "score", "top_k", "probs"}
    assert sum(good["probs"].values()) == pytest.approx(1.0, abs=1e-5)
    assert good["score"] == max(good["probs"].values())
    assert err.count("cannot classify") == 2
    code, out, _ = run_cli(["predict", str(tiny_run.path), str(folder / "good.png"), "--format", "csv",
                            "--top-k", "2"], capsys)
    assert code == 0
    header, row = list(csv.reader(out.splitlines()))
    assert header[:5] == ["path", "label", "score", "top1", "top2"] and row[1] in ("ants", "bees")


def test_python_load_predict(tiny_run, tiny_data):
    model = visiontune.load(tiny_run.path)
    results = model.predict(sorted((tiny_data / "val" / "ants").glob("*.png")))
    assert len(results) == 3 and all(r["label"] in ("ants", "bees") for r in results)
    assert all(len(r["top_k"]) == 2 for r in results)  # top_k default (3) = the CLI's, capped by 2 classes


def test_predict_holds_one_batch_of_inputs_at_a_time(tiny_run, tiny_data, tmp_path):
    # A folder of 10 000 images was preprocessed whole before the first batch ran (6 GB at 224 px).
    model = visiontune.load(tiny_run.path)
    paths = sorted((tiny_data / "train").rglob("*.png"))[:10]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    paths.insert(2, bad)
    expected = [model.predict(p) for p in paths]
    preprocess, backend = model.preprocess, model.backend
    done, ahead = [], []  # images preprocessed so far; at each batch, how many were not yet classified
    classified = [0]

    def counting_preprocess(item):
        done.append(item)
        return preprocess(item)

    def counting_backend(batch):
        ahead.append(len(done) - classified[0])
        classified[0] = len(done)
        return backend(batch)

    model.preprocess, model.backend = counting_preprocess, counting_backend
    results = model.predict(paths, batch_size=4)
    assert len(ahead) == 3 and max(ahead) <= 2 * 4
    assert [r.get("label") for r in results] == [r.get("label") for r in expected]
    assert "error" in results[2] and results[2]["path"] == str(bad)
    for got, want in zip(results, expected):
        for c in want.get("probs", {}):
            assert abs(got["probs"][c] - want["probs"][c]) <= 1e-6


def test_predict_from_memory_matches_the_file(tiny_run, tiny_data, tmp_path):
    """The same image as a path, bytes, a file object, a PIL image and an HWC uint8 array."""
    from PIL import Image

    model = visiontune.load(tiny_run.path)
    for path in (tiny_data / "val" / "ants" / "ants_v0.png", tmp_path / "small.jpg"):
        if path.suffix == ".jpg":  # a JPEG too small for draft mode: decoded alike in every form
            Image.open(tiny_data / "val" / "bees" / "bees_v1.png").convert("RGB").save(path, quality=90)
        data = path.read_bytes()
        reference = model.predict(path)
        assert reference["path"] == str(path) and set(reference) == {"path", "label", "score", "probs", "top_k"}
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
            forms = [str(path), data, bytearray(data), open(path, "rb"), image, array, Image.fromarray(array)]
            results = model.predict(forms)
        for result in results:
            for c in reference["probs"]:
                assert abs(result["probs"][c] - reference["probs"][c]) <= 1e-6
        assert results[1]["input"] == f"<{len(data)} bytes>" and "path" not in results[1]
        assert results[5]["input"].startswith("<array 32x40x3 uint8")
    # A batch of arrays (N, H, W, 3) is a list; a single array is one result.
    batch = model.predict(np.stack([array, array]))
    assert isinstance(batch, list) and len(batch) == 2 and batch[0]["probs"] == batch[1]["probs"]
    bad = model.predict([b"", np.zeros((4, 4), dtype=np.float32), b"GIF89a broken"])
    assert [r["error"].split(":")[0] for r in bad] == ["cannot read image"] * 3
    assert "empty" in bad[0]["error"] and "uint8" in bad[1]["error"]


def test_predict_tta_device_and_jsonl_top_k(tiny_run, tiny_data, capsys):
    import torch

    paths = sorted((tiny_data / "val").rglob("*.png"))
    code, out, _ = run_cli(["predict", str(tiny_run.path), *map(str, paths), "--format", "jsonl", "--tta",
                            "--device", "cpu", "--top-k", "1"], capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert all(r["top_k"] == [{"label": r["label"], "score": r["score"]}] for r in rows)
    # --tta averages each image's probabilities with its mirror image's.
    model, _ = visiontune.runfolder.RunFolder(tiny_run.path).load_model()
    plain = visiontune.load(tiny_run.path)
    x = torch.from_numpy(np.stack([plain.preprocess(p) for p in paths]))
    with torch.inference_mode():
        expected = (torch.softmax(model(x), 1) + torch.softmax(model(torch.flip(x, dims=[3])), 1)) / 2
    for row, p in zip(rows, expected.numpy()):
        assert row["probs"]["ants"] == pytest.approx(float(p[0]), abs=1e-6)
    assert any(abs(r["probs"]["ants"] - q["probs"]["ants"]) > 1e-6 for r, q in zip(rows, plain.predict(paths)))
    code, _, err = run_cli(["predict", str(tiny_run.path), str(paths[0]), "--device", "cuda:7"], capsys)
    assert code == 2 and "--device cuda:7" in err


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_logits_output(tiny_run, tiny_data, tmp_path, fmt):
    import onnxruntime as ort
    import torch

    artifact = tmp_path / f"m.{fmt}"
    assert main(["export", str(tiny_run.path), "--format", fmt, "--out", str(artifact), "--output", "logits"]) == 0
    meta = json.loads((tmp_path / f"m.{fmt}.json").read_text())
    assert meta["output"] == "logits"
    images = sorted((tiny_data / "val").rglob("*.png"))
    model, _ = visiontune.runfolder.RunFolder(tiny_run.path).load_model()
    x = np.stack([visiontune.load(tiny_run.path).preprocess(p) for p in images])
    with torch.inference_mode():
        logits = model(torch.from_numpy(x)).numpy()
    if fmt == "onnx":
        session = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
        raw = session.run(None, {"input": x})[0]
        assert session.get_outputs()[0].name == "logits"
        assert json.loads(session.get_modelmeta().custom_metadata_map["visiontune"])["output"] == "logits"
    else:
        with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript; the artifact is still read as users read it
            warnings.simplefilter("ignore", category=FutureWarning)
            raw = torch.jit.load(str(artifact))(torch.from_numpy(x)).detach().numpy()
    assert np.abs(raw - logits).max() <= 1e-4  # the raw output is the logits, not probabilities
    # predict still gives probabilities, equal to the run's.
    exported = visiontune.load(artifact).predict(images)
    for a, b in zip(exported, visiontune.load(tiny_run.path).predict(images)):
        assert a["label"] == b["label"] and abs(a["score"] - b["score"]) <= 1e-4
    with pytest.raises(SystemExit) as exit_info:  # argparse: one line, exit 2
        main(["export", str(tiny_run.path), "--out", str(tmp_path / "n.onnx"), "--output", "scores"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("fmt, suffix", [("onnx", ".onnx"), ("torchscript", ".pt")])
def test_export_matches_pytorch_and_carries_metadata(tiny_run, tiny_data, capsys, fmt, suffix):
    code, out, err = run_cli(["export", str(tiny_run.path), "--format", fmt], capsys)
    assert code == 0, err
    artifact = tiny_run.path / f"model{suffix}"
    assert artifact.is_file() and re.search(r"max \|p - p_torch\| = ", out)
    images = sorted((tiny_data / "val").rglob("*.png"))
    exported = visiontune.load(artifact).predict(images)
    reference = visiontune.load(tiny_run.path).predict(images)
    for a, b in zip(exported, reference):
        assert a["label"] == b["label"]
        for c in a["probs"]:
            assert abs(a["probs"][c] - b["probs"][c]) <= 1e-4
    sidecar = json.loads((artifact.parent / (artifact.name + ".json")).read_text())
    assert sidecar["classes"] == ["ants", "bees"] and sidecar["output"] == "probs"
    # Never overwrite an existing artifact.
    code, _, err = run_cli(["export", str(tiny_run.path), "--format", fmt], capsys)
    assert code == 2 and "--out" in err


def test_onnx_predict_runs_without_torch(tiny_run, tiny_data, tmp_path, capsys):
    assert run_cli(["export", str(tiny_run.path), "--out", str(tmp_path / "m.onnx")], capsys)[0] == 0
    blocker = (
        WITHOUT_TORCH +
        "from visiontune.cli import main\n"
        f"sys.exit(main(['predict', {str(tmp_path / 'm.onnx')!r}, {str(tiny_data / 'val')!r}, '--format', 'jsonl']))\n"
    )
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 6


def test_report_is_self_contained(tiny_run, capsys):
    code, out, _ = run_cli(["report", str(tiny_run.path)], capsys)
    assert code == 0
    page = Path(out.strip()).read_text()
    sources = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page)
    assert sources and all(s.startswith("data:") for s in sources)
    assert "Training curves" in page and "confusion matrix" in page and "Mistakes" in page
    assert page.count("<figure") == 6  # every val image is either a mistake or a correct one


def test_report_shows_a_heatmap_beside_each_mistake(tiny_data, tiny_settings, tmp_path, capsys):
    # Val "ants" drawn in the bees' colour: mistakes the model is sure to make.
    rng = np.random.default_rng(5)
    for i in range(3):
        make_image(tiny_data / "val" / "ants" / f"ants_v{i}.png", 1, rng)
    run = visiontune.train(tiny_data, out=str(tmp_path / "run"), **{**tiny_settings, "epochs": 3})
    code, out, _ = run_cli(["report", str(run.path)], capsys)
    assert code == 0
    page = Path(out.strip()).read_text()
    wrong = page.count("<figure class='wrong pair'>")
    mistakes = run_cli(["eval", str(run.path), "--format", "json"], capsys)[1]
    assert wrong == 6 - json.loads(mistakes)["correct"] and wrong >= 3
    assert page.count("class='heatmap'") == wrong  # one per mistake, none beside the correct ones
    assert page.count("<figure class='right'>") == 6 - wrong


# --- acceptance on hymenoptera ---------------------------------------------------


@pytest.fixture
def hymenoptera_run(hymenoptera_fixed_run):
    return hymenoptera_fixed_run


@needs_hymenoptera()
@pytest.mark.integration
def test_hymenoptera_eval_and_predict_reproduce_training_metrics(hymenoptera_run, capsys):
    run = hymenoptera_run.path
    with (run / "metrics.csv").open() as f:
        best = list(csv.DictReader(f))[hymenoptera_run.best_epoch - 1]
    code, out, _ = run_cli(["eval", str(run), "--format", "json"], capsys)
    result = json.loads(out)
    assert result["n"] == 153 and result["accuracy"] == float(best["val_acc"])
    assert result["loss"] == pytest.approx(float(best["val_loss"]), abs=1e-4)

    code, out, _ = run_cli(["predict", str(run), str(HYMENOPTERA / "val"), "--format", "jsonl"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 153
    nll = [-math.log(r["probs"][Path(r["path"]).parent.name]) for r in rows]
    assert sum(nll) / len(nll) == pytest.approx(float(best["val_loss"]), abs=1e-4)


@needs_hymenoptera()
@pytest.mark.integration
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_hymenoptera_exports_agree_on_every_val_image(hymenoptera_run, fmt, tmp_path):
    from visiontune.export import export_run

    path, diff = export_run(hymenoptera_run.path, fmt, tmp_path / f"m.{fmt}", check_images=None)
    assert diff <= 1e-4
