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


def _config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("data",)) -> None:
    """One --flag per TrainConfig field: type from its annotation, choices from its metadata, help
    from its docstring. Flags the user does not give are absent from the namespace (SUPPRESS), so
    that a --config file's values stand unless a flag overrides them."""
    from dataclasses import MISSING, fields

    from .config import field_docs

    docs = field_docs()
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        default = "" if f.default in (MISSING, None) or kind == "bool" else f" (default {f.default})"
        options = {"help": (docs.get(f.name, "") + default).replace("%", "%%"), "default": argparse.SUPPRESS}
        if kind in ("bool", "bool | None"):
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = int if kind.startswith("int") else float if kind.startswith("float") else str
            options["metavar"] = f.name.upper()
            if "choices" in f.metadata:
                options["choices"] = f.metadata["choices"]
                options.pop("metavar")
        parser.add_argument(flag, **options)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a pretrained backbone on your images",
                       description="Train on DATA: a folder (train/ and val/, or one folder per class), "
                                   "a path,label CSV, or a known data set name (hymenoptera).")
    p.add_argument("data", metavar="DATA", nargs="?")
    p.add_argument("--config", metavar="FILE",
                   help="YAML or JSON file of these settings (names with _), or a run's config.json to repeat "
                        "that run; flags given here override it")
    p.add_argument("--resume", metavar="RUN",
                   help="continue a stopped or killed run from RUN/last.ckpt; with --epochs N, extend a run to N "
                        "epochs")
    _config_flags(p)


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import read_settings_file

    given = {k: v for k, v in vars(args).items() if k not in ("command", "data", "resume", "config")}
    if args.resume:
        from .training import RESUME_OVERRIDES, resume

        if args.data or args.config:
            raise UsageError(f"--resume {args.resume}: takes its data and settings from the run; drop "
                             f"{'DATA (' + args.data + ')' if args.data else '--config'}.")
        extra = sorted(set(given) - {"quiet", "epochs"} - set(RESUME_OVERRIDES))
        if extra:
            raise UsageError(f"--resume {args.resume}: takes its settings from the run; only --epochs (to extend "
                             f"it), --quiet and where it runs ({', '.join('--' + k.replace('_', '-') for k in RESUME_OVERRIDES)}) "
                             f"can be given, not --{extra[0].replace('_', '-')}.")
        resume(args.resume, quiet=given.get("quiet", False), epochs=given.get("epochs"),
               **{k: v for k, v in given.items() if k in RESUME_OVERRIDES})
        return 0
    settings = read_settings_file(args.config) if args.config else {}
    data = args.data or settings.pop("data", None)
    settings.pop("data", None)
    if not data:
        raise UsageError("DATA is missing: pass a folder, a CSV or a known data set name (hymenoptera), "
                         "--config FILE with data, or --resume RUN.")
    from pathlib import Path

    from .data import missing_data
    from .known.datasets import KNOWN

    # Said before torch and timm load (several seconds; under torchrun in every process): a mistyped
    # path should not cost the user that wait.
    if str(data) not in KNOWN and not Path(data).expanduser().exists():
        raise missing_data(Path(data).expanduser())
    from .training import train

    train(data, **{**settings, **given})
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

    path, diff = export_run(args.run, args.format, args.out, output=args.output)
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


def _cmd_shard(args: argparse.Namespace) -> int:
    from .shards import write_shards

    manifest = write_shards(args.data, args.out, shard_size=args.shard_size, val_fraction=args.val_fraction,
                            seed=args.seed)
    print(f"wrote {manifest}; train from it with: visiontune train {args.out}")
    return 0


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
    sub.add_parser("models", help="list backbones and whether they work offline")
    p = sub.add_parser("datasets", help="known data sets; with DATA: the layout it reads")
    p.add_argument("data", nargs="?", help="a folder, CSV or known data set name to inspect")
    p.add_argument("--val-fraction", type=float, default=0.2, help="as for train, when DATA has no val split")
    p.add_argument("--seed", type=int, default=0, help="as for train, when DATA has no val split")

    p = sub.add_parser("lr-find", help="learning-rate range test; suggests a rate")
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

    p = sub.add_parser("shard", help="write DATA as WebDataset tar shards to train from")
    p.add_argument("data", metavar="DATA", help="a folder, CSV or known data set, as for train")
    p.add_argument("out", metavar="OUT", help="a new folder for the shards and their manifest")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="as for train, when DATA has no val split")
    p.add_argument("--seed", type=int, default=0, help="as for train, when DATA has no val split")

    p = sub.add_parser("doctor", help="check every image file and report problems")
    p.add_argument("data", metavar="DATA")
    p.add_argument("--format", choices=["table", "json"], default="table")

    p = sub.add_parser("eval", help="metrics of a run on its val/test split or DATA")
    p.add_argument("run", metavar="RUN")
    p.add_argument("data", metavar="DATA", nargs="?")
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--top-n", type=int, default=10, help="most confident mistakes to list")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")

    p = sub.add_parser("report", help="write RUN/report.html: curves, mistakes, heatmaps")
    p.add_argument("run", metavar="RUN")

    p = sub.add_parser("predict", help="classify images with a run or an exported model")
    p.add_argument("model", metavar="RUN_OR_ARTIFACT")
    p.add_argument("paths", metavar="PATH", nargs="+", help="files, folders (recursive) or globs")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K)
    p.add_argument("--format", choices=["table", "csv", "jsonl"], default="table")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output", help="write results to this file instead of stdout")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")

    p = sub.add_parser("explain", help="Grad-CAM heatmaps of what each prediction used")
    p.add_argument("run", metavar="RUN")
    p.add_argument("paths", metavar="PATH", nargs="+", help="files, folders (recursive) or globs")
    p.add_argument("--out", required=True, help="folder for the heatmaps and explanations.jsonl")
    p.add_argument("--class", dest="class_name", metavar="NAME",
                   help="show the evidence for this class instead of the predicted one")
    p.add_argument("--method", choices=EXPLAIN_METHODS, default="gradcam")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")

    p = sub.add_parser("serve", help="HTTP server and web page for a run or ONNX file")
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

    p = sub.add_parser("export", help="export to ONNX or TorchScript, checked vs PyTorch")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("--out", help="output file (default RUN/model.onnx or RUN/model.pt)")
    p.add_argument("--output", choices=["probs", "logits"], default="probs",
                   help="what the exported model outputs: probs (softmax, default) or logits (as timm exports)")
    return parser


COMMANDS = {"train": _cmd_train, "models": _cmd_models, "datasets": _cmd_datasets, "eval": _cmd_eval,
            "report": _cmd_report, "doctor": _cmd_doctor, "lr-find": _cmd_lr_find, "predict": _cmd_predict,
            "explain": _cmd_explain, "serve": _cmd_serve, "export": _cmd_export, "shard": _cmd_shard}


def _print_error(exc: VisiontuneError) -> None:
    """One line. Under torchrun a bad flag or bad data fails every rank alike, so rank 0 alone says
    so; any other failure is said by the rank it happened on, tagged with that rank (torchrun then
    ends the other ranks)."""
    from .errors import env_world

    rank, _, world = env_world()
    if world > 1 and rank > 0:
        if isinstance(exc, (UsageError, DataError)) or getattr(exc, "same_on_every_rank", False):  # said by rank 0
            # torchrun ends every rank once one exits with an error: exiting at once here could end rank 0
            # before it has said the error (seen in about 1 run in 3 of the torchrun bad-input test).
            import time

            time.sleep(2.0)
            return
        print(f"visiontune: error (rank {rank}): {exc}", file=sys.stderr)
        return
    print(f"visiontune: error: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .memory import reuse_freed_memory

    reuse_freed_memory()
    try:
        return COMMANDS[args.command](args)
    except VisiontuneError as exc:
        _print_error(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print("visiontune: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The `visiontune` command (and `python -m visiontune`): main(), then the process ends without Python's
    teardown of the modules it imported. Destroying torch's, timm's and their imports' objects one by one
    costs 1.3 s after a bare import and 2.3 s after a training run on 2 cores, time in which the work is
    done and every file is written and closed; the OS reclaims the memory at once. The atexit handlers
    (logging, multiprocessing's children, torchrun's process group) still run, and the standard streams
    are flushed."""
    import atexit
    import os
    import threading

    try:
        code = main()
    except BrokenPipeError:  # the reader went away (`visiontune models | head -2`): not an error to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the final flush cannot fail
        code = 1
    code = 0 if code is None else code
    # Python's own exit when a profiler or tracer (cProfile, coverage) writes its data after the command
    # returns, or a non-daemon thread is still running.
    if sys.getprofile() is not None or sys.gettrace() is not None or any(
            t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`visiontune models | head`): nothing more to say
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
