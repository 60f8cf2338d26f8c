"""Recipes compared on the four real sets in ../shared/data, several seeds each: docs/recipes.md.

A recipe default is a guess until it holds on data it was not tuned on; this is where that is
decided. Sets: hymenoptera, sign_digits, eurosat10, trashnet (see ../shared/data/README.md).

Rows:
- default:  `visiontune train DATA` (linear probe as epoch 0, then fine-tuning every layer);
- before:   the default recipe before it was decided here (SGD at 0.003, BatchNorm statistics trained);
- fixed:    `visiontune train DATA --mode fixed` (frozen backbone, head only);
- staged:   `visiontune train DATA --mode staged`;
- auto:     `visiontune train DATA --mode auto --budget 4m`;
- tutorial: ../shared/bench/tutorial_baseline.py DATA finetune 25 (the tutorial's loop and recipe), one
            seed: over an hour per set on 2 cores;
- candidates and history (crop60, epochs6, lr3e-4w1, ema-lr1e-4, eval160, eval160-lr1e-4; bnauto and the
            others in HISTORY_ROWS, results only): see docs/recipes.md;
- fastai:   ../shared/bench/fastai_anchor.py DATA 3 (vision_learner + fine_tune(3)), one seed; needs a
            Python with fastai installed, given as --fastai-python (a venv of its own, same torch pin).

Every run is its own process, timed from launch to exit (imports included). Each (set, row) gets a
fresh cache folder: its first seed pays for decoding and features, later seeds reuse them, as a
user's second run would. Results are appended to bench/results/accuracy.json with the date, the
machine and the commit, so rows can be run at different times; the table and the targets are printed
from everything in it, and --write-doc puts them into docs/recipes.md.

usage: python bench/accuracy.py [--sets ...] [--rows ...] [--seeds 0 1 2] [--fastai-python PY]
                                [--table-only] [--write-doc]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VISIONTUNE_SHARED", REPO / ".." / "shared")).resolve()
DATA = SHARED / "data"
SETS = {"hymenoptera": "hymenoptera_data", "sign_digits": "sign_digits", "eurosat10": "eurosat10",
        "trashnet": "trashnet"}
VISIONTUNE_ROWS = {
    "default": [],
    # The default from 2026-11-30 to 2026-12-02 (pretrained BatchNorm statistics kept, AdamW 1e-4, on every set),
    # before --bn auto measured the policy on the data.
    "frozen": ["--bn", "frozen"],
    "before": ["--optimizer", "sgd", "--lr", "0.003", "--bn", "train"],
    "fixed": ["--mode", "fixed"],
    "staged": ["--mode", "staged"],
    "auto": ["--mode", "auto", "--budget", "4m"],
    # Candidate (2026-12-01): the default with milder fine-tuning crops (smallest area 60% instead of 25%).
    "crop60": ["--crop-scale", "0.6"],
    # Candidate (2026-12-01, fourth pass; not taken, docs/recipes.md): twice the fine-tuning epochs, for sets whose 3 epochs are few steps.
    "epochs6": ["--epochs", "6"],
    # Candidate (2026-12-01, fourth pass; not taken): a 3x larger AdamW step, reached over a one-epoch warm-up.
    "lr3e-4w1": ["--lr", "3e-4", "--warmup-epochs", "1"],
    # Candidate (2026-12-02, sixth pass): the default's weight EMA with AdamW 1e-4 also on far domains (on the
    # sets where --bn auto chooses frozen statistics; elsewhere it would replace SGD's 0.003).
    "ema-lr1e-4": ["--lr", "1e-4"],
    # Candidate (2026-12-04, seventh pass): evaluate (and probe) at the 160 px the fine-tuning crops are
    # taken at, for sets of small images (sign_digits 100 px, eurosat10 64 px): no train/test resolution gap.
    "eval160": ["--image-size", "160", "--train-size", "160"],
    # The same with the smaller far-domain step: does the stronger 160 px probe want a gentler start?
    "eval160-lr1e-4": ["--image-size", "160", "--train-size", "160", "--lr", "1e-4"],
    # Candidate (2026-12-04, eighth pass; then the default on far domains, and on every set from the eleventh
    # pass): 5 fine-tuning epochs instead of 3.
    "epochs5": ["--epochs", "5"],
    # Candidates (eighth pass; not taken): layer-wise lr decay 0.7 (timm's block groups: each block group from the head
    # down at 0.7x the lr of the one above), on the far domains with 5 epochs, elsewhere with the default's.
    "far-ld07": ["--epochs", "5", "--lr-decay", "0.7"],
    "ld07": ["--lr-decay", "0.7"],
    # A milder decay (not taken either: one seed each, the same trade).
    "far-ld085": ["--epochs", "5", "--lr-decay", "0.85"],
    # Candidate (2026-12-06, tenth pass): after each fine-tuning epoch the evaluated weights' head is fitted again
    # on their own features (the probe's recipe); val, best and the saved model use it.
    "refit": ["--refit-head"],
    # The same run without it: the eighth pass's default, step for step (training is the same either way).
    "no-refit": ["--no-refit-head"],
    # Candidate (2026-12-06, eleventh pass): a one-epoch linear warm-up before the cosine, with the refit: the
    # backbone moves about half as far in the first epoch, so the refitted head has features closer to the probe's.
    "warm1": ["--warmup-epochs", "1"],
    # The tenth pass's default on hymenoptera and trashnet (3 fine-tuning epochs), before the eleventh pass made it 5
    # on every set.
    "epochs3": ["--epochs", "3"],
    # Candidate (2026-12-06, twelfth pass; then the default through --freeze's rule): the stem and the first 2 stages
    # (everything at stride 4 and finer for efficientnet_lite0) keep their pretrained weights and statistics: no
    # backward pass through the largest activations.
    "freeze3": ["--freeze", "3"],
    # The eleventh pass's default (every layer trains), run beside the twelfth's for same-hour walls.
    "freeze0": ["--freeze", "0"],
    # Candidate (2026-12-07, twenty-first pass): one stage more kept pretrained (blocks.2, stride 8): a step at
    # 0.87x of --freeze 3's (bench/freeze_step.py), and a first epoch that moves fewer layers.
    "freeze4": ["--freeze", "4"],
    # The twelfth pass's default without the thirteenth's kept output of the frozen layers: the same numbers, every
    # val (and refit) pass through the whole model; run beside the default for same-hour walls.
    "whole": ["--frozen-cache-gb", "0"],
    # Candidate (2026-12-07, sixteenth pass): 8 fine-tuning epochs. The tutorial's recipe reaches 409/409 on
    # sign_digits' val in about 10 000 steps at batch 4; the default takes 260 steps at batch 32 and misses 1-2 images.
    "epochs8": ["--epochs", "8"],
    # Candidate (2026-12-07, eighteenth pass; not taken as a rule, docs/recipes.md): training crops and val at the
    # tutorial's 224 px on every set: the signs of sign_digits that the 160 px default confused differ by a few
    # pixels of 100 px images, which reach the last stage as 5x5 cells at 160 px, 7x7 at 224. Since the nineteenth
    # pass the default measures the size on small images with the probe, and takes 224 px on sign_digits.
    "size224": ["--image-size", "224", "--train-size", "224"],
    # Candidates (2026-12-07, twentieth pass; not taken, docs/recipes.md): cheaper 224 px fine-tuning on
    # sign_digits, whose wall was 9 s over a third of fastai's. Val at 224 px with training crops at 192 px (a
    # 224 px step costs about (224/192)^2 = 1.36x a 192 px one): 288 s, but 0.9976 against the tutorial's 0.9984.
    "crop192": ["--image-size", "224", "--train-size", "192"],
    # 224 px for the fine-tuning steps of 5 epochs at 160 px, 5 x (160/224)^2 = 2.6 epochs, rounded up:
    # 217 s, 0.9951.
    "size224-e3": ["--image-size", "224", "--train-size", "224", "--epochs", "3"],
}
# Earlier defaults that no flags reproduce any more: rows of recorded results only.
HISTORY_ROWS = {
    "bnauto": "the default of 2026-12-02 (f90a56a): --bn auto, no weight EMA, AdamW 1e-4 wherever statistics froze",
    # Its sign_digits and eurosat10 runs are the default row: a quarter epoch is 13 steps there, the floor
    # changes nothing.
    "ema-a72735a": "the default at a72735a on hymenoptera: the weight EMA over a quarter epoch without the 8-step floor",
    "default-6th": "the default of the sixth pass (9cf298e to 7016261) on sign_digits and eurosat10: val at 224 px "
                   "whatever the images' size",
    "default-7th": "the default of the seventh pass (008531e to a1af914) on sign_digits and eurosat10: 3 epochs on "
                   "far domains too",
    "staged-bnauto": "--mode staged with the bnauto default's fine-tuning (f90a56a)",
    "staged-8th": "--mode staged before --refit-head (e3f1e1b), on the sets whose statistics stay frozen",
    # The fastai row is measured on the machine of the default's rows (Intel, 2026-12-06); these runs were not.
    "fastai-before": "fastai's fine_tune(3) as first measured: AMD EPYC 2026-12-01 (hymenoptera, trashnet, eurosat10), "
                     "Intel Xeon 2026-12-02 (sign_digits)",
    "auto-bnauto": "--mode auto --budget 4m with the bnauto default's fine-tuning (f90a56a)",
    # The nineteenth pass ran the default on sign_digits and eurosat10 on the AMD EPYC, and fastai beside it there.
    "default-18th": "the default before the nineteenth pass (efec640) on sign_digits and eurosat10: small images at "
                    "the 160 px crop size, unmeasured; Intel Xeon, 2026-12-07 11:54-12:09 UTC",
    "fastai-intel": "fastai's fine_tune(3) on the Intel Xeon of the default-18th rows (2026-12-07 01:13-01:27 UTC "
                    "sign_digits, 03:20-03:35 eurosat10)",
    # The twentieth pass ran the default and fastai on sign_digits again, in one window (AMD EPYC, 22:09-23:05 UTC).
    "default-19th": "the same default on sign_digits in the nineteenth pass's window (4501bfb, AMD EPYC, 2026-12-07 "
                    "18:38-18:59 UTC)",
    "fastai-19th": "fastai's fine_tune(3) on sign_digits in the nineteenth pass's window (AMD EPYC, 2026-12-07 "
                   "19:13-19:33 UTC)",
    # The twenty-first pass ran the default on every set, and fastai on three, in one window (AMD EPYC, 2026-12-08).
    "default-20th": "the default before the twenty-first pass (to 1d139b5: --freeze 3 whatever the BatchNorm policy); "
                    "sign_digits and eurosat10 on the AMD EPYC (2026-12-07 18:38-22:58 UTC), hymenoptera and trashnet "
                    "on the Intel Xeon (11:43-11:54 UTC)",
    "fastai-20th": "fastai's fine_tune(3) beside the default-20th rows: sign_digits on the AMD EPYC (2026-12-07 "
                   "22:30-22:50 UTC), hymenoptera and trashnet on the Intel Xeon (11:44-11:54 UTC)",
}
RUNNABLE = [*VISIONTUNE_ROWS, "tutorial", "fastai"]
ROWS = [*VISIONTUNE_ROWS, *HISTORY_ROWS, "tutorial", "fastai"]
ONE_SEED_ROWS = {"tutorial", "fastai"}
# Today's default before the recipe was decided on four sets (docs/recipes.md): the floor on hymenoptera.
HYMENOPTERA_BEFORE = 0.9673
HYMENOPTERA_VAL = 153
DOC = REPO / "docs" / "recipes.md"
DOC_BEGIN, DOC_END = "<!-- accuracy.py table: begin -->", "<!-- accuracy.py table: end -->"

# The tutorial script seeds with 0; this runs it unchanged except for that seed.
SEEDED_TUTORIAL = """
import runpy, sys, torch
seed, script, data, device = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
manual_seed = torch.manual_seed
torch.manual_seed = lambda _ignored: manual_seed(seed)
sys.argv = [script, data, "finetune", "25", device]
runpy.run_path(script, run_name="__main__")
"""


def machine(device: str = "cpu") -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "cpu")
    cpu = f"{model}, {os.cpu_count()} cores"
    if device == "cpu":
        return cpu
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return f"{gpu.stdout.strip() or device} (the run on {device}), {cpu}"


def commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=REPO, capture_output=True, text=True)
    except OSError:  # a copy of the tree on a machine without git (the device tool's)
        return os.environ.get("BENCH_COMMIT", "unknown")
    if done.returncode != 0:
        return os.environ.get("BENCH_COMMIT", "unknown")
    return done.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def run_tutorial(data: Path, seed: int, device: str, log: Path) -> dict:
    """The tutorial's per-epoch lines go to `log` as they come, so a run cut short still shows how far it got."""
    start = time.perf_counter()
    with log.open("w") as err:
        subprocess.run([sys.executable, "-c", SEEDED_TUTORIAL, str(seed), str(SHARED / "bench" / "tutorial_baseline.py"),
                        str(data), device], stdout=subprocess.DEVNULL, stderr=err, check=True)
    wall = time.perf_counter() - start
    val_accs = [float(m) for m in re.findall(r"epoch \d+ val loss \S+ acc (\S+)", log.read_text())]
    return {"best_val_acc": max(val_accs), "val_accs": val_accs, "wall": wall}


def run_fastai(python: str, data: Path) -> dict:
    start = time.perf_counter()
    done = subprocess.run([python, str(SHARED / "bench" / "fastai_anchor.py"), str(data), "3"], capture_output=True,
                          text=True, check=True)
    wall = time.perf_counter() - start
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"best_val_acc": result["best_val_acc"], "val_accs": result["val_acc_per_epoch"], "wall": wall}


def run_visiontune(row: str, data: Path, seed: int, cache: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"accuracy-{row}-")) / "run"
    command = [sys.executable, "-m", "visiontune", "train", str(data), "--seed", str(seed), "--out", str(out),
               "--cache-dir", str(cache), "--quiet", *VISIONTUNE_ROWS[row]]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    model = json.loads((out / "model.json").read_text())
    record = json.loads((out / "config.json").read_text())
    config = record["config"]
    result = {"best_val_acc": float(model["val_acc"]), "best_epoch": int(model["best_epoch"]), "wall": wall,
              "val_accs": [float(r["val_acc"]) for r in rows], "stages": [r["stage"] for r in rows],
              "epochs": config["epochs"], "train_size": config["train_size"]}
    if "bn_decision" in record:
        result["bn"], result["bn_agreement"] = record["bn_decision"]["bn"], record["bn_decision"]["agreement"]
        result["bn_far"], result["lr"] = record["bn_decision"].get("far", False), config["lr"]
    if "ema" in record:
        result["ema_decay"] = record["ema"]["decay"]
    if "probe" in record.get("image_size_decision", {}):  # the size measured on small images: each size's probe
        result["size_probe"] = {str(e["size"]): e["val_acc"] for e in record["image_size_decision"]["probe"]}
    if (out / "auto.json").is_file():
        result["decision"] = json.loads((out / "auto.json").read_text())["decision"]
    shutil.rmtree(out.parent, ignore_errors=True)
    return result


def first_epoch_drop(result: dict) -> float | None:
    """Probe (epoch 0) val acc minus the first fine-tuning epoch's, for runs that log a probe."""
    stages = result.get("stages") or []
    if "probe" not in stages or len(stages) < 2:
        return None
    return result["val_accs"][stages.index("probe")] - result["val_accs"][stages.index("probe") + 1]


def summary(results: list[dict], name: str, row: str) -> dict | None:
    runs = sorted((r for r in results if r["set"] == name and r["row"] == row), key=lambda r: r["seed"])
    if not runs:
        return None
    accs = [r["best_val_acc"] for r in runs]
    # A GPU run's wall says nothing about the CPU rows: the mean wall is of the CPU runs where there are any.
    timed = [r for r in runs if not on_gpu(r)] or runs
    return {"seeds": [r["seed"] for r in runs], "mean": statistics.mean(accs), "min": min(accs),
            "wall": statistics.mean(r["wall"] for r in timed), "runs": runs}


def on_gpu(result: dict) -> bool:
    return "(the run on cuda" in result.get("machine", "")


def table(results: list[dict]) -> str:
    lines = ["| set | recipe | seeds | best val acc: mean (min) | per seed | wall s: mean | notes |",
             "|---|---|---|---|---|---|---|"]
    for name in SETS:
        for row in ROWS:
            s = summary(results, name, row)
            if s is None:
                continue
            notes = []
            drops = [d for d in (first_epoch_drop(r) for r in s["runs"]) if d is not None]
            if drops:
                probe = [r["val_accs"][r["stages"].index("probe")] for r in s["runs"]]
                notes.append(f"probe {' / '.join(f'{p:.3f}' for p in probe)}; 1st fine-tune epoch "
                             f"{' / '.join(f'{-d:+.3f}' for d in drops)}")
            if row == "default":
                notes.append(f"{s['runs'][0]['epochs']} epochs at {s['runs'][0]['train_size']} px")
            if any("size_probe" in r for r in s["runs"]):
                notes.append("size measured: probe " + " / ".join(
                    ", ".join(f"{acc:.3f} at {size}" for size, acc in r["size_probe"].items())
                    for r in s["runs"] if "size_probe" in r))
            if any("bn" in r for r in s["runs"]):
                notes.append("--bn auto chose " + " / ".join(
                    f"{r.get('bn')}{', far' if r.get('bn_far') else ''} ({r.get('bn_agreement')})" for r in s["runs"]))
            if any("ema_decay" in r for r in s["runs"]):
                notes.append("EMA decay " + " / ".join(f"{r['ema_decay']:.3f}" for r in s["runs"] if "ema_decay" in r))
            if row in ONE_SEED_ROWS and all(r.get("val_accs") for r in s["runs"]):
                # A best of 25 evaluations is a maximum of noisy numbers: how often it was reached says how
                # much of it a reader can count on.
                notes.append("best at " + " / ".join(
                    f"{sum(a == max(r['val_accs']) for a in r['val_accs'])} of {len(r['val_accs'])} epochs, "
                    f"last {r['val_accs'][-1]:.4f}" for r in s["runs"]))
            for source in sorted({r["source"] for r in s["runs"] if r.get("source")}):
                seeds = [str(r["seed"]) for r in s["runs"] if r.get("source") == source]
                whose = "" if len(seeds) == len(s["runs"]) else f"seed(s) {','.join(seeds)} "
                notes.append(f"{whose}from {source}")
            # Results merged from a device machine carry no hand-written source: say what their wall is.
            gpu_seeds = [str(r["seed"]) for r in s["runs"] if on_gpu(r) and not r.get("source")]
            if gpu_seeds:
                notes.append(f"seed(s) {','.join(gpu_seeds)} ran on a GPU: their wall is not comparable with the CPU rows")
            if any(on_gpu(r) for r in s["runs"]) and not all(on_gpu(r) for r in s["runs"]):
                notes.append("wall: of the seeds run on a CPU (" + "; ".join(
                    f"seed {r['seed']} {r['wall']:.0f} s on {r.get('machine', 'a CPU')}"
                    for r in s["runs"] if not on_gpu(r)) + ")")
            per_seed = " / ".join(f"{r['best_val_acc']:.4f}" for r in s["runs"])
            lines.append(f"| {name} | {row} | {','.join(map(str, s['seeds']))} | {s['mean']:.4f} ({s['min']:.4f}) | "
                         f"{per_seed} | {s['wall']:.0f} | {'; '.join(notes)} |")
    return "\n".join(lines)


def at_least(value: float, bound: float) -> bool:
    """value >= bound for accuracies, which are image counts over a val set: 4 of 400 images is exactly
    1 point, but 0.93 - 0.92 > 0.01 in floats. The slack is far below one image of any set."""
    return value >= bound - 1e-9


def targets(results: list[dict]) -> list[str]:
    """Issue 17's targets, each PASS, FAIL or 'not measured'."""
    out = []

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("PASS" if ok else "FAIL")

    for name in SETS:
        default = summary(results, name, "default")
        if default is None:
            out.append(f"{name}: default not measured")
            continue
        for row in ("fixed", "tutorial", "fastai"):
            other = summary(results, name, row)
            ok = None if other is None else at_least(default["mean"], other["mean"])
            detail = "" if other is None else f" ({default['mean']:.4f} vs {other['mean']:.4f})"
            out.append(f"{name}: default mean best val acc >= {row}'s{detail}: {verdict(ok)}")
        fastai = summary(results, name, "fastai")
        ok = None if fastai is None else default["wall"] <= fastai["wall"] / 3
        detail = "" if fastai is None else f" ({default['wall']:.0f}s vs {fastai['wall']:.0f}s / 3)"
        out.append(f"{name}: default wall <= a third of fastai's{detail}: {verdict(ok)}")
        fixed = summary(results, name, "fixed")
        if name in ("eurosat10", "sign_digits"):
            ok = None if fixed is None else at_least(default["mean"], fixed["mean"] + 0.02)
            detail = "" if fixed is None else f" ({default['mean'] - fixed['mean']:+.4f})"
            out.append(f"{name}: fine-tuning adds >= 2 points over fixed{detail}: {verdict(ok)}")
        if name == "hymenoptera":
            floor = HYMENOPTERA_BEFORE - 1 / HYMENOPTERA_VAL
            out.append(f"hymenoptera: default mean {default['mean']:.4f} >= {floor:.4f} (before minus one image): "
                       f"{verdict(at_least(default['mean'], floor))}")
        drops = [d for d in (first_epoch_drop(r) for r in default["runs"]) if d is not None]
        ok = None if not drops else at_least(0.01, max(drops))
        detail = "" if not drops else f" (largest drop {max(drops):+.4f})"
        out.append(f"{name}: first fine-tuning epoch >= probe - 1 point on every seed{detail}: {verdict(ok)}")
        auto = summary(results, name, "auto")
        # On the seeds auto ran: its head stage is fixed mode's run with the same seed.
        fixed_same = [r["best_val_acc"] for r in (fixed or {}).get("runs", []) if auto and r["seed"] in auto["seeds"]]
        ok = None if auto is None or not fixed_same else at_least(auto["mean"], statistics.mean(fixed_same))
        detail = "" if ok is None else f" (seeds {','.join(map(str, auto['seeds']))}: {auto['mean']:.4f} vs " \
                                       f"{statistics.mean(fixed_same):.4f})"
        out.append(f"{name}: auto mean best val acc >= fixed's on the same seeds{detail}: {verdict(ok)}")
    return out


def with_result(results: list[dict], result: dict) -> list[dict]:
    """A rerun of a set, row and seed replaces its earlier result rather than averaging with it."""
    key = (result["set"], result["row"], result["seed"])
    return [r for r in results if (r["set"], r["row"], r["seed"]) != key] + [result]


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    if DOC_BEGIN in doc:
        head, rest = doc.split(DOC_BEGIN, 1)
        doc = head + DOC_BEGIN + "\n" + text + "\n" + DOC_END + rest.split(DOC_END, 1)[1]
    else:
        doc += f"\n{DOC_BEGIN}\n{text}\n{DOC_END}\n"
    DOC.write_text(doc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--rows", nargs="+", default=["default", "fixed", "staged", "auto"], choices=RUNNABLE)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fastai-python", help="a Python that has fastai (for the fastai row)")
    parser.add_argument("--tutorial-device", default="cpu",
                        help="where the tutorial row runs (cuda: its own model.to(device) path, for its accuracy; "
                             "its wall is then not comparable with the CPU rows)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "accuracy.json")
    parser.add_argument("--merge", type=Path, nargs="+", default=[], metavar="FILE",
                        help="results files of runs made elsewhere (bench/gpu_check.sh's tutorial rows, one file per "
                             "set and seed): each of their results replaces the one of the same set, row and seed in "
                             "--results; nothing is run")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--write-doc", action="store_true", help="put the table and targets into docs/recipes.md")
    args = parser.parse_args()
    if "fastai" in args.rows and not args.table_only and not args.fastai_python:
        parser.error("the fastai row needs --fastai-python PATH (a Python with fastai installed)")
    results = json.loads(args.results.read_text()) if args.results.is_file() else []
    if args.merge:
        for path in args.merge:
            for result in json.loads(path.read_text()):
                results = with_result(results, result)
                print(f"merged {result['set']} {result['row']} seed {result['seed']} from {path}", flush=True)
        args.results.write_text(json.dumps(results, indent=1))
    elif not args.table_only:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        for name in args.sets:
            data = DATA / SETS[name]
            for row in args.rows:
                cache = Path(tempfile.mkdtemp(prefix=f"accuracy-cache-{row}-"))
                for seed in (args.seeds[:1] if row in ONE_SEED_ROWS else args.seeds):
                    load_before = os.getloadavg()[0]
                    if row == "tutorial":
                        log = args.results.parent / f"tutorial-{name}-seed{seed}.log"
                        result = run_tutorial(data, seed, args.tutorial_device, log)
                    elif row == "fastai":
                        result = run_fastai(args.fastai_python, data)
                    else:
                        result = run_visiontune(row, data, seed, cache)
                    result.update(set=name, row=row, seed=seed, load_before=round(load_before, 2),
                                  when=time.strftime("%Y-%m-%d %H:%M:%S"), commit=commit(),
                                  machine=machine(args.tutorial_device if row == "tutorial" else "cpu"))
                    print(json.dumps({k: v for k, v in result.items() if k != "val_accs"}), flush=True)
                    results = with_result(results, result)
                    args.results.write_text(json.dumps(results, indent=1))
                shutil.rmtree(cache, ignore_errors=True)
    text = table(results) + "\n\n```\n" + "\n".join(targets(results)) + "\n```"
    print(text)
    if args.write_doc:
        write_doc(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
