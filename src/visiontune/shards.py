"""WebDataset tar shards: `visiontune shard DATA OUT` writes them, `visiontune train OUT` trains from them.

    OUT/visiontune-shards.json      classes, splits, counts, the shard files of each split
    OUT/train-000000.tar ...        WebDataset samples: <key>.<jpg|png|...> (the file's own bytes),
                                    <key>.cls (class index, or indices joined by | for multi-label),
                                    <key>.path.txt (where the image came from)

Shards are written with webdataset's ShardWriter, so any WebDataset reader (timm, open_clip,
webdataset itself) streams them. visiontune itself reads a sample by its byte offset in the tar
(an index of the tar headers, built once per shard and process), so that training from shards
draws the same batches as training from the folder, with the same seed and sampler: a streaming
reader's shuffle buffer cannot give that order, and the acceptance is the folder run's metrics
to 1e-5. Under torchrun each rank reads its own share of the samples, as for files.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError, UsageError

MANIFEST = "visiontune-shards.json"
FORMAT = "visiontune-shards-v1"
_INDEX: dict[str, dict[str, tuple[int, int]]] = {}  # shard path -> {member name: (offset, size)}


@dataclass(frozen=True)
class ShardMember:
    """One image inside a tar shard; stands in for a file path wherever a sample's image is read."""

    shard: Path
    name: str  # the member's name inside the tar, e.g. 00000012.jpg

    def __str__(self) -> str:
        return f"{self.shard}#{self.name}"

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    def _location(self) -> tuple[int, int]:
        key = str(self.shard)
        if key not in _INDEX:
            try:
                with tarfile.open(self.shard, "r:") as tar:  # headers only: a seek per member
                    _INDEX[key] = {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
            except (OSError, tarfile.TarError) as exc:
                raise OSError(f"shard {self.shard} cannot be read ({exc})") from None
        try:
            return _INDEX[key][self.name]
        except KeyError:
            raise OSError(f"shard {self.shard} has no member {self.name}") from None

    def read_bytes(self) -> bytes:
        offset, size = self._location()
        with open(self.shard, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def stat(self) -> os.stat_result:
        """The shard's stat with the member's size: what the decode cache and duplicate check key on."""
        st = os.stat(self.shard)
        return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid,
                               self._location()[1], int(st.st_atime), int(st.st_mtime), int(st.st_ctime)))

    def identity(self) -> str:
        st = os.stat(self.shard)
        return f"{self.shard.resolve()}#{self.name}|{st.st_size}|{st.st_mtime_ns}"


def sample_path(text: str) -> Path | ShardMember:
    """A path as written in a run's splits/*.csv back to what it names: a file, or a shard member."""
    shard, sep, name = text.rpartition(".tar#")
    return ShardMember(Path(shard + ".tar"), name) if sep else Path(text)


def is_shard_folder(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def write_shards(data: str | Path, out: str | Path, shard_size: int = 1000, val_fraction: float = 0.2,
                 seed: int = 0) -> Path:
    """DATA (any layout visiontune reads) -> WebDataset shards in OUT, split by split; returns the manifest."""
    import webdataset as wds

    from .data import LABEL_SEPARATOR, discover
    from .known.datasets import resolve_dataset

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"OUT {out}: exists and is not an empty folder; pass a new folder for the shards.")
    if shard_size < 1:
        raise UsageError(f"--shard-size {shard_size}: use 1 or more images per shard.")
    splits = discover(resolve_dataset(str(data)) or data, val_fraction=val_fraction, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "classes": splits.classes, "multi_label": splits.multi_label,
                "source": str(Path(splits.root).resolve()), "layout": splits.layout, "auto_split": splits.auto_split,
                "splits": {}}
    for split, items in splits.samples.items():
        pattern = str(out / f"{split}-%06d.tar")
        with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
            for number, (path, label) in enumerate(items):
                ext = (path.suffix.lower().lstrip(".") or "img")
                cls = LABEL_SEPARATOR.join(map(str, label)) if isinstance(label, tuple) else str(label)
                # Raw bytes under the file's own extension: decoded by content when read, like the file.
                sink.write({"__key__": f"{number:08d}", ext: path.read_bytes(), "cls": cls.encode(),
                            "path.txt": str(path).encode()})
        files = sorted(out.glob(f"{split}-*.tar"))
        manifest["splits"][split] = {"shards": [f.name for f in files], "count": len(items)}
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2))
    return path


def read_shards(folder: Path):
    """The Splits of a shard folder: samples are ShardMembers, in the order they were written."""
    from .data import LABEL_SEPARATOR, Splits

    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"DATA {folder}: {MANIFEST} cannot be read ({exc}); write the shards again with "
                        "`visiontune shard`.") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"DATA {folder}: {MANIFEST} is not of format {FORMAT}; write the shards again with "
                        "`visiontune shard`.")
    multi = bool(manifest.get("multi_label"))
    samples = {}
    for split, entry in manifest["splits"].items():
        items = []
        for shard_name in entry["shards"]:
            shard = folder / shard_name
            if not shard.is_file():
                raise DataError(f"DATA {folder}: shard {shard_name} is missing; copy every shard the manifest lists.")
            with tarfile.open(shard, "r:") as tar:
                members = [m for m in tar if m.isfile()]
            _INDEX[str(shard)] = {m.name: (m.offset_data, m.size) for m in members}
            labels = {}
            images = {}
            with open(shard, "rb") as f:  # one open per shard, not one per label
                for m in members:
                    key, _, field = m.name.partition(".")
                    if field == "cls":
                        f.seek(m.offset_data)
                        labels[key] = f.read(m.size).decode()
                    elif field != "path.txt":
                        images[key] = m.name
            for key in sorted(images):
                text = labels.get(key)
                if text is None:
                    raise DataError(f"DATA {shard}: sample {key} has no .cls label; write the shards with "
                                    "`visiontune shard`.")
                label = tuple(int(c) for c in text.split(LABEL_SEPARATOR) if c) if multi else int(text)
                items.append((ShardMember(shard, images[key]), label))
        if len(items) != entry["count"]:
            raise DataError(f"DATA {folder}: the {split} shards hold {len(items)} images, the manifest says "
                            f"{entry['count']}; write the shards again.")
        samples[split] = items
    return Splits(root=folder, classes=manifest["classes"], samples=samples, layout="shards",
                  auto_split=manifest.get("auto_split") or {}, multi_label=multi)
