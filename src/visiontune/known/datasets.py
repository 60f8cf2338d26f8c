"""Known data sets by name, e.g. `visiontune train hymenoptera`.

Lookup order: every folder in `VISIONTUNE_DATA` (a path list, like PATH), then
the user cache (`~/.cache/visiontune/datasets`). If absent there, the data set
is downloaded from its official address, its zip CRCs checked, extracted into a
temporary folder, every file's sha256 compared with the manifest shipped in
this package, and only then moved into the cache under its final name. A
corrupted or incomplete download is deleted and never used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import VisiontuneError
from ..images import default_cache_dir


@dataclass(frozen=True)
class KnownDataset:
    name: str
    folder: str  # the folder name inside the zip and in the cache
    url: str
    counts: dict  # split -> class -> number of files
    manifest: str  # sha256 list shipped beside this module
    description: str

    def manifest_entries(self) -> dict[str, str]:
        entries = {}
        for line in (Path(__file__).parent / self.manifest).read_text().splitlines():
            if line.strip():
                digest, rel = line.split(None, 1)
                entries[rel.strip().removeprefix("./")] = digest
        return entries


KNOWN = {
    "hymenoptera": KnownDataset(
        name="hymenoptera",
        folder="hymenoptera_data",
        url="https://download.pytorch.org/tutorial/hymenoptera_data.zip",
        counts={"train": {"ants": 124, "bees": 121}, "val": {"ants": 70, "bees": 83}},
        manifest="hymenoptera_data.sha256",
        description="ants vs bees, the PyTorch transfer-learning tutorial's data (398 images, 45 MB)",
    )
}


def search_folders() -> list[Path]:
    folders = [Path(p).expanduser() for p in os.environ.get("VISIONTUNE_DATA", "").split(os.pathsep) if p]
    return folders + [default_cache_dir() / "datasets"]


def has_expected_counts(root: Path, known: KnownDataset) -> bool:
    for split, classes in known.counts.items():
        for cls, expected in classes.items():
            folder = root / split / cls
            if not folder.is_dir() or sum(1 for p in folder.iterdir() if p.is_file()) != expected:
                return False
    return True


def find_local(known: KnownDataset) -> Path | None:
    for folder in search_folders():
        for candidate in (folder / known.folder, folder):
            if candidate.is_dir() and has_expected_counts(candidate, known):
                return candidate
    return None


def verify_tree(root: Path, known: KnownDataset) -> None:
    """Raise unless every file listed in the manifest is present with its sha256."""
    for rel, digest in known.manifest_entries().items():
        path = root / rel
        if not path.is_file():
            raise VisiontuneError(f"{known.name}: the download lacks {rel}; it is incomplete and was not used.")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise VisiontuneError(f"{known.name}: {rel} has the wrong sha256; the download is corrupt and was not used.")
    if not has_expected_counts(root, known):
        raise VisiontuneError(f"{known.name}: the download has unexpected class folders or file counts and was not used.")


def download(known: KnownDataset, url: str | None = None, dest: Path | None = None, quiet: bool = False) -> Path:
    """Fetch, check and install `known` into `dest` (default: the user cache); return its folder."""
    url = url or known.url
    dest = dest or default_cache_dir() / "datasets"
    dest.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{known.name}-", dir=dest))
    try:
        archive = work / "download.zip"
        if not quiet:
            print(f"downloading {known.name} from {url}", file=sys.stderr)
        try:
            with urllib.request.urlopen(url, timeout=60) as response, archive.open("wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as exc:
            raise VisiontuneError(
                f"{known.name} is not on this machine and downloading {url} failed ({exc}); "
                f"connect to the internet or set VISIONTUNE_DATA to a folder holding {known.folder}/."
            ) from None
        try:
            with zipfile.ZipFile(archive) as zf:
                bad = zf.testzip()  # reads every member and checks its CRC
                if bad is not None:
                    raise VisiontuneError(f"{known.name}: {bad} fails its CRC check; the download is corrupt and was not used.")
                zf.extractall(work / "extracted")
        except zipfile.BadZipFile:
            raise VisiontuneError(f"{known.name}: the file from {url} is not a valid zip; the download is corrupt and was not used.") from None
        extracted = work / "extracted" / known.folder
        verify_tree(extracted, known)
        final = dest / known.folder
        if final.exists():
            shutil.rmtree(final)
        os.replace(extracted, final)
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def resolve_dataset(name_or_path: str, url: str | None = None) -> Path | None:
    """The folder of a known data set name (found or downloaded), or None if not a known name."""
    known = KNOWN.get(name_or_path)
    if known is None or Path(name_or_path).exists():
        return None
    return find_local(known) or download(known, url=url)
