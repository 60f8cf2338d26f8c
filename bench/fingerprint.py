"""A bitwise fingerprint of tiny runs in every mode, to show that a restructuring changed no behaviour.

Run it before and after a change (each into its own folder) and compare the two JSON outputs: file
list, metrics.csv without the seconds column, best.safetensors and last.ckpt's model tensors (sha256),
last.ckpt's keys, the last and best epochs. On a CPU the same seed must give the same fingerprint.

usage: python bench/fingerprint.py OUT_DIR [--recipe-before-2026-11-30] > fingerprint.json
  --recipe-before-2026-11-30: fine-tune with SGD 0.003 and BatchNorm statistics in train mode (the
  default before docs/recipes.md's decision), to compare with fingerprints taken before it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import timm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import visiontune  # noqa: E402
from tests.conftest import make_folder  # noqa: E402
from visiontune import checkpoint  # noqa: E402


def main() -> int:
    out = Path(sys.argv[1])
    before = {"optimizer": "sgd", "lr": 0.003, "bn": "train"} if "--recipe-before-2026-11-30" in sys.argv else {}
    shutil.rmtree(out, ignore_errors=True)
    base = out / "base"
    make_folder(base / "data", {"ants": 9, "bees": 8})
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base / "w.safetensors"))
    common = {"model": "test_efficientnet", "weights": str(base / "w.safetensors"), "image_size": 48,
              "train_size": 48, "batch_size": 4, "cache_dir": str(out / "cache"), "quiet": True,
              "channels_last": False, "seed": 1}
    modes = {"finetune": {"epochs": 2, **before}, "fixed": {"mode": "fixed", "epochs": 3},
             "staged": {"mode": "staged", "head_epochs": 2, "epochs": 2, **before},
             "auto": {"mode": "auto", "head_epochs": 2, "epochs": 2, "budget": "10m", **before}}
    result = {}
    for name, extra in modes.items():
        run = visiontune.train(base / "data", out=str(out / name), **{**common, **extra})
        folder = run.path
        rows = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(folder / "metrics.csv"))]
        state = checkpoint.load_training_state(folder / "last.ckpt")
        result[name] = {
            "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()),
            "metrics": hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16],
            "best": hashlib.sha256((folder / "best.safetensors").read_bytes()).hexdigest()[:16],
            "last_model": hashlib.sha256(b"".join(v.numpy().tobytes() for v in state["model"].values())).hexdigest()[:16],
            "last_keys": sorted(state), "epoch": state["epoch"], "best_epoch": run.best_epoch}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
