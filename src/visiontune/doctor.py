"""`visiontune doctor DATA`: decode every image and say plainly what is wrong with the data.

Problems (exit code 1): files that cannot be used (empty, truncated, not an
image, an HTML page saved as .jpg, unsupported, unreadable, a decompression
bomb), suspect images (tiny, extreme aspect ratio, placeholders), exact
duplicates (a duplicate across splits is a leak), class folders that differ
between splits or are empty, symlink loops. Notes (no effect on the exit
code): conversions to RGB that visiontune does for you (palette, grayscale,
CMYK, 16-bit, alpha, animated GIF, EXIF rotation), a PNG named .jpg, hidden
files that are ignored, class imbalance.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from .data import IMAGE_EXTENSIONS, find_layout
from .errors import UsageError
from .images import MAX_PIXELS, _to_rgb
TINY_SIDE = 32
EXTREME_ASPECT = 5.0
PLACEHOLDER_NAME = re.compile(r"not.?found|placeholder|no.?image|unavailable|missing", re.IGNORECASE)
_FORMAT_EXTENSIONS = {"JPEG": {".jpg", ".jpeg"}, "PNG": {".png"}, "GIF": {".gif"}, "BMP": {".bmp"},
                      "WEBP": {".webp"}, "TIFF": {".tif", ".tiff"}}


@dataclass
class FileCheck:
    path: str
    usable: bool = True
    problem: str | None = None  # why it cannot be used, or why it is suspect
    suspect: bool = False
    notes: list[str] = field(default_factory=list)
    size: tuple[int, int] | None = None
    sha256: str | None = None


def check_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> FileCheck:
    """Really decode one file and classify it."""
    path = Path(path)
    result = FileCheck(str(path))
    try:
        data = path.read_bytes()
    except PermissionError:
        return _unusable(result, "permission denied: make the file readable")
    except OSError as exc:
        return _unusable(result, f"cannot be read ({exc.strerror})")
    if not data:
        return _unusable(result, "empty file (0 bytes)")
    result.sha256 = hashlib.sha256(data).hexdigest()
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return _unusable(result, "an HTML/XML page saved with an image extension, not an image")
    try:
        with warnings.catch_warnings():
            # The size is checked against max_pixels below; Pillow's own warning adds nothing.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            w, h = image.size
            result.size = (w, h)
            if w * h > max_pixels:
                return _unusable(result, f"decompression bomb: {w}x{h} = {w * h:,} pixels is over the "
                                         f"{max_pixels:,} limit; refused without decoding")
            fmt = image.format or "?"
            if path.suffix.lower() not in _FORMAT_EXTENSIONS.get(fmt, {path.suffix.lower()}):
                result.notes.append(f"{fmt} data with a {path.suffix} extension (read as {fmt})")
            if getattr(image, "n_frames", 1) > 1:
                result.notes.append(f"animated ({image.n_frames} frames): the first frame is used")
            mode = image.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                result.notes.append("16-bit: scaled to 8-bit RGB")
            elif mode == "CMYK":
                result.notes.append("CMYK: converted to RGB")
            elif mode == "P":
                result.notes.append("palette: converted to RGB")
            elif mode in ("L", "1"):
                result.notes.append("grayscale: converted to RGB")
            if mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                result.notes.append("alpha channel: composited on white")
            orientation = image.getexif().get(0x0112, 1)
            if orientation not in (1, None):
                result.notes.append(f"EXIF orientation {orientation}: rotated on load")
            image.load()  # the real decode: truncated files fail here
            if PLACEHOLDER_NAME.search(path.stem) or _few_colours(image):
                result.suspect = True
                result.problem = "looks like a placeholder or graphic, not a photo of the class"
            image = ImageOps.exif_transpose(image)
            w, h = image.size
    except Image.DecompressionBombError:
        return _unusable(result, f"decompression bomb: over {max_pixels:,} pixels; refused")
    except (OSError, SyntaxError, ValueError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "cannot identify image file" in message:
            return _unusable(result, "not an image in a format Pillow reads (unsupported or not an image)")
        if "truncated" in message.lower():
            return _unusable(result, "truncated: the file ends before the image data does")
        return _unusable(result, f"cannot be decoded ({message})")
    if min(w, h) < TINY_SIDE:
        result.suspect, result.problem = True, f"tiny: {w}x{h}, under {TINY_SIDE} px on a side"
    elif max(w, h) / min(w, h) > EXTREME_ASPECT:
        result.suspect, result.problem = True, f"extreme aspect ratio {max(w, h) / min(w, h):.1f}:1 ({w}x{h})"
    return result


def _unusable(result: FileCheck, why: str) -> FileCheck:
    result.usable, result.problem = False, why
    return result


def _few_colours(image: Image.Image, limit: int = 64) -> bool:
    if min(image.size) < TINY_SIDE:
        return False
    small = _to_rgb(image).resize((64, 64))
    return small.getcolors(maxcolors=limit) is not None


def _walk(root: Path, report: dict) -> dict[str, list[Path]]:
    """Files under root by top-level folder, following symlinks once and reporting loops and hidden files."""
    seen_dirs: set[str] = set()
    files: dict[str, list[Path]] = defaultdict(list)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            report["symlink_loops"].append(dirpath)
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        for name in list(dirnames):
            full = os.path.join(dirpath, name)
            if name.startswith("."):
                report["hidden"].append(full)
                dirnames.remove(name)
            elif os.path.islink(full):
                target = os.path.realpath(full)
                # A link to this folder or one above it would walk the same files forever.
                if target in seen_dirs or real == target or real.startswith(target + os.sep):
                    report["symlink_loops"].append(full)
                    dirnames.remove(name)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if name.startswith("."):
                report["hidden"].append(str(p))
            elif p.suffix.lower() in IMAGE_EXTENSIONS:
                rel = p.relative_to(root)
                files[rel.parts[0] if len(rel.parts) > 1 else ""].append(p)
            else:
                report["other_files"].append(str(p))
    return files


def diagnose(data: str | Path) -> dict:
    root = Path(data)
    if not root.is_dir():
        raise UsageError(f"DATA {root}: is not a folder; pass the folder of images to check.")
    layout = find_layout(root, need_train=False)  # the layout training would read, or its one-sentence refusal
    report: dict = {"root": str(layout.root), "symlink_loops": [], "hidden": [], "other_files": [],
                    "split_folders": {split: d.name for split, d in layout.split_folders.items()}}
    folders = layout.split_folders or {"": layout.root}
    per_split_classes: dict[str, dict[str, list[Path]]] = {}
    for split, folder in folders.items():
        classes = {}
        for d in sorted(folder.iterdir()):
            if d.is_dir() and not d.name.startswith("."):
                found = _walk(d, report)
                classes[d.name] = sorted(p for group in found.values() for p in group)
        per_split_classes[split or "all"] = classes
    checks = {}
    for split, classes in per_split_classes.items():
        for cls, paths in classes.items():
            for p in paths:
                checks[str(p)] = (split, cls, check_image(p))
    unusable = [asdict(c) | {"split": s, "class": k} for s, k, c in checks.values() if not c.usable]
    suspect = [asdict(c) | {"split": s, "class": k} for s, k, c in checks.values() if c.usable and c.suspect]
    notes = [{"path": c.path, "notes": c.notes} for _, _, c in checks.values() if c.notes]
    by_hash = defaultdict(list)
    for path, (split, _, c) in checks.items():
        if c.sha256:
            by_hash[c.sha256].append((split, path))
    duplicates, leaks = [], []
    for group in by_hash.values():
        if len(group) > 1:
            (leaks if len({s for s, _ in group}) > 1 else duplicates).append(sorted(p for _, p in group))
    class_sets = {s: sorted(c for c, paths in classes.items() if paths) for s, classes in per_split_classes.items()}
    reference = class_sets.get("train") or next(iter(class_sets.values()), [])
    mismatched = {s: {"extra": sorted(set(c) - set(reference)), "missing": sorted(set(reference) - set(c))}
                  for s, c in class_sets.items() if c != reference}
    empty = [f"{s}/{c}" if s != "all" else c for s, classes in per_split_classes.items()
             for c, paths in classes.items() if not paths]
    counts = {s: {c: len(paths) for c, paths in classes.items()} for s, classes in per_split_classes.items()}
    totals = defaultdict(int)
    for classes in counts.values():
        for c, n in classes.items():
            totals[c] += n
    nonzero = [n for n in totals.values() if n]
    report.update({
        "counts": counts,
        "imbalance_ratio": (max(nonzero) / min(nonzero)) if nonzero else None,
        "unusable": unusable,
        "suspect": suspect,
        "notes": notes,
        "duplicates_within_split": duplicates,
        "duplicates_across_splits": leaks,
        "class_mismatch": mismatched,
        "empty_class_folders": empty,
        "images": len(checks),
    })
    report["problems"] = (len(unusable) + len(suspect) + len(duplicates) + len(leaks) + len(mismatched)
                          + len(empty) + len(report["symlink_loops"]))
    return report


def format_report(r: dict) -> str:
    lines = [f"{r['images']} images under {r['root']}"]
    if r["split_folders"]:
        lines.append("  split folders: " + ", ".join(f"{name}/ = {split}" for split, name in r["split_folders"].items()))
    for split, classes in r["counts"].items():
        lines.append(f"  {split}: " + ", ".join(f"{c} {n}" for c, n in classes.items()))
    if r["imbalance_ratio"] and r["imbalance_ratio"] > 1:
        lines.append(f"  class imbalance: largest/smallest class = {r['imbalance_ratio']:.2f}")
    sections = [
        ("cannot be used", [f"{u['path']}: {u['problem']}" for u in r["unusable"]]),
        ("suspect", [f"{s['path']}: {s['problem']}" for s in r["suspect"]]),
        ("LEAK: identical files in different splits", [" = ".join(g) for g in r["duplicates_across_splits"]]),
        ("identical files within a split", [" = ".join(g) for g in r["duplicates_within_split"]]),
        ("class folders differ between splits", [f"{s}: extra {', '.join(v['extra']) or '-'}; missing "
                                                 f"{', '.join(v['missing']) or '-'}" for s, v in r["class_mismatch"].items()]),
        ("empty class folders", r["empty_class_folders"]),
        ("symlink loops (not followed)", r["symlink_loops"]),
        ("notes (handled automatically)", [f"{n['path']}: {'; '.join(n['notes'])}" for n in r["notes"]]),
        ("ignored hidden files", r["hidden"]),
    ]
    for title, items in sections:
        if items:
            lines.append(f"{title} ({len(items)}):")
            lines += [f"  {item}" for item in items]
    lines.append(f"{r['problems']} problem(s)" if r["problems"] else "no problems found")
    return "\n".join(lines)
