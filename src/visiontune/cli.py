"""Command line: `main(argv)` parses flags and calls the library; errors become one line."""

from __future__ import annotations

import argparse
import csv
import json
import sys

from .config import (AUGMENTS, BN_POLICIES, CLASS_WEIGHTS, DEFAULT_TOP_K, EXPLAIN_METHODS, HEAD_INITS, MODES,
                     OPTIMIZERS, PRECISIONS, SAMPLERS, SCHEDULES, TrainConfig)
from . import __version__
from .errors import DataError, UsageError, VisiontuneError


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a pretrained backbone on a folder of images",
                       description="Train on DATA: a folder (train/ and val/, or one folder per class), "
                                   "a path,label CSV, or a known data set name (hymenoptera).")
    p.add_argument("data", metavar="DATA", nargs="?")
    p.add_argument("--resume", metavar="RUN", help="continue a stopped or killed run from RUN/last.ckpt")
    p.add_argument("--mode", choices=MODES, default="finetune",
                   help="finetune: train every weight (default); fixed: frozen backbone, new head only; "
                        "staged: head first, then every layer; auto: staged within --budget")
    p.add_argument("--model", default=TrainConfig.model, help="backbone (see `visiontune models`)")
    p.add_argument("--weights", help="backbone weights file (.safetensors or state dict)")
    p.add_argument("--epochs", type=int, help="default: 3 (finetune, staged; at most 3 for auto), 25 (fixed)")
    p.add_argument("--head-epochs", type=int, help="staged/auto: head-only epochs first, fixed mode's head recipe (default 25)")
    p.add_argument("--head-lr", type=float, help="staged/auto: learning rate of the head-only epochs (default 0.01)")
    p.add_argument("--budget", help="auto: wall-clock budget for the run, e.g. 90s, 5m, 1h (default 5m)")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--eval-batch-size", type=int, default=TrainConfig.eval_batch_size)
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-4 AdamW finetune/staged/auto, 0.01 SGD fixed)")
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--momentum", type=float, default=TrainConfig.momentum)
    p.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    p.add_argument("--schedule", choices=SCHEDULES)
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--bn", choices=BN_POLICIES,
                   help="fine-tune BatchNorm statistics: frozen (default: the pretrained ones) or train")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--augment", choices=AUGMENTS, default=TrainConfig.augment)
    p.add_argument("--mixup", type=float, help="mixup Beta alpha, 0 off (default 0.2 with --augment strong, else 0)")
    p.add_argument("--cutmix", type=float, help="CutMix Beta alpha, 0 off (default 1.0 with --augment strong, else 0)")
    p.add_argument("--class-weights", choices=CLASS_WEIGHTS, default=TrainConfig.class_weights)
    p.add_argument("--sampler", choices=SAMPLERS, default=TrainConfig.sampler)
    p.add_argument("--accumulate", type=int, default=1, help="optimizer step every K batches")
    p.add_argument("--patience", type=int, help="stop after this many epochs without val improvement")
    p.add_argument("--lr-decay", type=float, help="layer-wise lr decay per block group, e.g. 0.7")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="run folder (default runs/<data>-<mode>); must be new or empty")
    p.add_argument("--val-fraction", type=float, default=TrainConfig.val_fraction)
    p.add_argument("--views", type=int, default=TrainConfig.views, help="fixed mode: feature views per image")
    p.add_argument("--image-size", type=int, help="eval input size (default: the backbone's)")
    p.add_argument("--train-size", type=int, help="fine-tune crop size (default 5/7 of the eval size)")
    p.add_argument("--head-init", choices=HEAD_INITS, help="fine-tune: probe (default) or random")
    p.add_argument("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory layout (default on: faster convolutions on CPU and on tensor cores)")
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default=TrainConfig.device, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default=TrainConfig.precision,
                   help="auto (default): bf16 on GPUs that support it, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU; costs a minute up front)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels, so GPU runs repeat exactly (slower)")
    p.add_argument("--workers", type=int, help="data loader processes (default 0 on CPU, up to 8 on GPU)")
    p.add_argument("--cache-dir")
    p.add_argument("--decode-cache-gb", type=float, default=TrainConfig.decode_cache_gb)
    p.add_argument("--no-feature-cache", dest="feature_cache", action="store_false")
    p.add_argument("--strict", action="store_true", help="stop on unreadable images instead of leaving them out")
    p.add_argument("--quiet", action="store_true", help="print nothing but warnings and errors")


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import resume, train

    if args.resume:
        if args.data:
            raise UsageError(f"--resume {args.resume}: takes its data and settings from the run; drop DATA ({args.data}).")
        resume(args.resume, quiet=args.quiet)
        return 0
    if not args.data:
        raise UsageError("DATA is missing: pass a folder, a CSV or a known data set name (hymenoptera), or --resume RUN.")
    settings = {k: v for k, v in vars(args).items() if k not in ("command", "data", "resume")}
    train(args.data, **settings)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .backbones import DEFAULT_BACKBONE, REGISTRY

    print(f"{'name':22} {'offline':8} description")
    for name, b in REGISTRY.items():
        mark = " (default)" if name == DEFAULT_BACKBONE else ""
        print(f"{name:22} {'yes' if b.offline() else 'no':8} {b.description}{mark}")
    print("Any other timm architecture works with --model NAME and --weights FILE (or hub weights when online).")
    return 0


def _cmd_datasets(args: argparse.Namespace) -> int:
    from .known.datasets import KNOWN, find_local

    if args.data is not None:
        from .data import cross_split_duplicates, discover
        from .known.datasets import resolve_dataset

        splits = discover(resolve_dataset(args.data) or args.data, val_fraction=args.val_fraction, seed=args.seed)
        print(splits.describe())
        leaks = cross_split_duplicates(splits)
        if leaks:
            print(f"  {len(leaks)} image(s) are byte-identical in more than one split (visiontune doctor DATA lists them)")
        return 0
    print(f"{'name':14} {'status':10} description")
    for name, d in KNOWN.items():
        local = find_local(d)
        print(f"{name:14} {('local' if local else 'download'):10} {d.description}" + (f"  [{local}]" if local else ""))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_run, format_table

    result = evaluate_run(args.run, args.data, split=args.split, tta=args.tta, batch_size=args.batch_size,
                          top_n=args.top_n, device=args.device)
    if result is None:  # torchrun: a rank other than 0, whose share rank 0 prints
        return 0
    print(json.dumps(result, indent=2) if args.format == "json" else format_table(result))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    print(write_report(args.run))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    path, diff = export_run(args.run, args.format, args.out)
    print(f"wrote {path} (max |p - p_torch| = {diff:.1e} on real val images)")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predict import expand_inputs, load

    predictor = load(args.model, device=args.device, tta=args.tta)
    paths, missing = expand_inputs(args.paths)
    results = predictor.predict(paths, batch_size=args.batch_size, top_k=args.top_k) + missing
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"visiontune: cannot classify {r['path']}: {r['error']}", file=sys.stderr)
    out = open(args.output, "w", newline="") if args.output else sys.stdout
    try:
        if args.format == "jsonl":
            for r in results:
                row = {k: r[k] for k in ("path", "label", "score", "top_k", "probs") if k in r}
                if "error" in r:
                    row["error"] = r["error"]
                out.write(json.dumps(row) + "\n")
        elif args.format == "csv":
            writer = csv.writer(out)
            writer.writerow(["path", "label", "score"] + [f"top{i + 1}" for i in range(args.top_k)] + ["error"])
            for r in results:
                tops = [f"{t['label']}:{t['score']:.4f}" for t in r.get("top_k", [])]
                tops += [""] * (args.top_k - len(tops))
                writer.writerow([r["path"], r.get("label", ""), f"{r['score']:.6f}" if "score" in r else ""]
                                + tops + [r.get("error", "")])
        else:
            for r in results:
                if "error" in r:
                    out.write(f"{r['path']}  ERROR {r['error']}\n")
                else:
                    tops = "  ".join(f"{t['label']} {t['score']:.3f}" for t in r["top_k"])
                    out.write(f"{r['path']}  {tops}\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 1 if failed else 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain_images

    log, rows = explain_images(args.run, args.paths, args.out, class_name=args.class_name, method=args.method,
                               device=args.device)
    for r in rows:
        if "error" in r:
            print(f"visiontune: cannot explain {r['path']}: {r['error']}", file=sys.stderr)
        else:
            print(f"{r['path']}  {r['label']} {r['score']:.3f}  heatmap of {r['explained_class']}: {r['heatmap']}")
    print(f"wrote {log}")
    return 1 if any("error" in r for r in rows) else 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    serve(args.model, host=args.host, port=args.port, device=args.device, tta=args.tta, top_k=args.top_k,
          batch_window_ms=args.batch_window_ms, max_batch=args.max_batch, max_upload_mb=args.max_upload_mb)
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import diagnose, format_report

    report = diagnose(args.data)
    print(json.dumps(report, indent=2) if args.format == "json" else format_report(report))
    return 1 if report["problems"] else 0


def _cmd_lr_find(args: argparse.Namespace) -> int:
    from .lr_find import lr_find

    settings = {k: v for k, v in vars(args).items()
                if k in ("mode", "model", "weights", "batch_size", "optimizer", "seed", "cache_dir", "bn", "device")
                and v is not None}
    result = lr_find(args.data, steps=args.steps, start=args.start, end=args.end, out=args.out, **settings)
    print(f"suggested learning rates: valley {result['valley']:.2e}, steepest {result['steepest']:.2e} "
          f"({len(result['lrs'])} steps; plot {result['plot']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visiontune", description="Fine-tune pretrained image classifiers.")
    parser.add_argument("-V", "--version", action="version", version=f"visiontune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    sub.add_parser("models", help="list registered backbones and whether they work offline")
    p = sub.add_parser("datasets", help="list known data sets; with DATA: the layout, classes and counts "
                                        "training would use")
    p.add_argument("data", nargs="?", help="a folder, CSV or known data set name to inspect")
    p.add_argument("--val-fraction", type=float, default=0.2, help="as for train, when DATA has no val split")
    p.add_argument("--seed", type=int, default=0, help="as for train, when DATA has no val split")

    p = sub.add_parser("lr-find", help="learning-rate range test: suggests a learning rate, changes nothing")
    p.add_argument("data", metavar="DATA")
    p.add_argument("--mode", choices=MODES, default="finetune")
    p.add_argument("--model", default=TrainConfig.model)
    p.add_argument("--weights")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--bn", choices=BN_POLICIES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--start", type=float, default=1e-6)
    p.add_argument("--end", type=float, default=1.0)
    p.add_argument("--out", help="new or empty folder for lr_find.png (default runs/<data>-lr-find[-N])")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N, as for train")

    p = sub.add_parser("doctor", help="decode every image and report what is wrong with the data")
    p.add_argument("data", metavar="DATA")
    p.add_argument("--format", choices=["table", "json"], default="table")

    p = sub.add_parser("eval", help="metrics of a run on its val/test split or on DATA")
    p.add_argument("run", metavar="RUN")
    p.add_argument("data", metavar="DATA", nargs="?")
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--top-n", type=int, default=10, help="most confident mistakes to list")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")

    p = sub.add_parser("report", help="write RUN/report.html (curves, confusion matrix, mistakes)")
    p.add_argument("run", metavar="RUN")

    p = sub.add_parser("predict", help="classify images with a run folder or an exported model")
    p.add_argument("model", metavar="RUN_OR_ARTIFACT")
    p.add_argument("paths", metavar="PATH", nargs="+", help="files, folders (recursive) or globs")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K)
    p.add_argument("--format", choices=["table", "csv", "jsonl"], default="table")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output", help="write results to this file instead of stdout")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")

    p = sub.add_parser("explain", help="heatmaps of what each prediction looked at (Grad-CAM), one PNG per image")
    p.add_argument("run", metavar="RUN")
    p.add_argument("paths", metavar="PATH", nargs="+", help="files, folders (recursive) or globs")
    p.add_argument("--out", required=True, help="folder for the heatmaps and explanations.jsonl")
    p.add_argument("--class", dest="class_name", metavar="NAME",
                   help="show the evidence for this class instead of the predicted one")
    p.add_argument("--method", choices=EXPLAIN_METHODS, default="gradcam")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")

    p = sub.add_parser("serve", help="HTTP server: POST /predict, a web page at /, GET /health and /model")
    p.add_argument("model", metavar="RUN_OR_ONNX", help="a run folder, or an exported .onnx file (served without torch)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K)
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="wait this long for more requests to batch together (0: no batching)")
    p.add_argument("--max-batch", type=int, default=32, help="most images in one batch")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body accepted, in MB")

    p = sub.add_parser("export", help="export a run to ONNX or TorchScript, checked against PyTorch")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("--out", help="output file (default RUN/model.onnx or RUN/model.pt)")
    return parser


COMMANDS = {"train": _cmd_train, "models": _cmd_models, "datasets": _cmd_datasets, "eval": _cmd_eval,
            "report": _cmd_report, "doctor": _cmd_doctor, "lr-find": _cmd_lr_find, "predict": _cmd_predict,
            "explain": _cmd_explain, "serve": _cmd_serve, "export": _cmd_export}


def _print_error(exc: VisiontuneError) -> None:
    """One line. Under torchrun a bad flag or bad data fails every rank alike, so rank 0 alone says
    so; any other failure is said by the rank it happened on, tagged with that rank (torchrun then
    ends the other ranks)."""
    from .runtime import env_world

    rank, _, world = env_world()
    if world > 1 and rank > 0:
        if isinstance(exc, (UsageError, DataError)) or getattr(exc, "same_on_every_rank", False):  # said by rank 0
            return
        print(f"visiontune: error (rank {rank}): {exc}", file=sys.stderr)
        return
    print(f"visiontune: error: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    try:
        return COMMANDS[args.command](args)
    except VisiontuneError as exc:
        _print_error(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print("visiontune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
