"""What keeping the frozen layers' output saves per epoch: the eval-transform features pass that every
fine-tuning epoch runs (val; with --refit-head the training images too), from the kept output of the
--freeze layers against the whole model, in one process on this machine.

usage: python bench/frozen_cache.py [DATA] [--limit 2000]

DATA defaults to ../shared/data/eurosat10 (its train and val images, at the 160 px a run of the default
recipe evaluates them at, here at most --limit of them). The model is the default backbone with the default
--freeze where the BatchNorm statistics stay pretrained, as on eurosat10; the decode cache is warm for both,
as in a run's later epochs. The first pass keeps the output
(what a run's first fine-tuning epoch does, untimed here); the whole model's pass and the pass from the
kept output are then timed twice, interleaved, and the faster of each kept (this machine is shared).
Targets: the pass from the kept output takes at most 0.6x the whole model's, and gives its features
(largest difference at most 1e-4 of the largest feature).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from visiontune.backbones import build_classifier, data_config
from visiontune.config import DEFAULT_BACKBONE, FREEZE_FINEST_REDUCTION
from visiontune.data import discover
from visiontune.features import extract_features
from visiontune.images import DecodeCache
from visiontune.prefix import FrozenPrefix
from visiontune.preprocess import Preprocessing
from visiontune.recipes import high_resolution_groups, leading_group_parameters

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "eurosat10"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=str(DEFAULT_DATA))
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--limit", type=int, default=2000)
    args = parser.parse_args()
    splits = discover(Path(args.data))
    paths = [p for split in ("train", "val") for p, _ in splits.samples[split]][: args.limit]
    torch.manual_seed(0)
    model, _ = build_classifier(DEFAULT_BACKBONE, len(splits.classes), None)
    model = model.to(memory_format=torch.channels_last).eval()
    # The default --freeze where --bn auto keeps the pretrained statistics, as it does on eurosat10.
    count, last = high_resolution_groups(model, FREEZE_FINEST_REDUCTION["frozen"])
    for p in leading_group_parameters(model, count):
        p.requires_grad_(False)
    pre = Preprocessing.from_data_config(data_config(model), args.size)
    with tempfile.TemporaryDirectory() as cache_dir:
        decode = DecodeCache(pre.resize, pre.interpolation, Path(cache_dir), 4 << 30)
        prefix = FrozenPrefix(model, 4 << 30)

        def features_pass(kept: FrozenPrefix | None) -> tuple[float, torch.Tensor]:
            start = time.perf_counter()
            features, _ = extract_features(model, paths, decode, pre, 1, 0, None, batch_size=64, prefix=kept)
            return time.perf_counter() - start, features[0]

        features_pass(prefix)  # decodes every image, keeps the frozen layers' output
        whole_s, resumed_s = float("inf"), float("inf")
        for _ in range(2):
            seconds, whole = features_pass(None)
            whole_s = min(whole_s, seconds)
            seconds, resumed = features_pass(prefix)
            resumed_s = min(resumed_s, seconds)
    difference = float((resumed - whole).abs().max() / whole.abs().max())
    print(f"{Path(args.data).name}: {len(paths)} images at {args.size} px, {DEFAULT_BACKBONE} with --freeze {count} "
          f"(up to {last}); kept output {prefix.used / (1 << 20):.0f} MiB")
    print(f"features pass, whole model:         {whole_s:.2f} s ({len(paths) / whole_s:.0f} images/s)")
    print(f"features pass, from the kept output: {resumed_s:.2f} s ({len(paths) / resumed_s:.0f} images/s)")
    ratio = resumed_s / whole_s
    print(f"from the kept output <= 0.6x of the whole model: {ratio:.2f}x {'PASS' if ratio <= 0.6 else 'FAIL'}")
    print(f"same features (largest difference <= 1e-4 of the largest): {difference:.1e} "
          f"{'PASS' if difference <= 1e-4 else 'FAIL'}")


if __name__ == "__main__":
    main()
