"""The known data set `hymenoptera`: local lookup and a verified download from 127.0.0.1."""

from __future__ import annotations

import functools
import http.server
import threading
import zipfile
from pathlib import Path

import pytest

from visiontune.errors import VisiontuneError
from visiontune.known.datasets import KNOWN, download, find_local, resolve_dataset

from .conftest import HYMENOPTERA, needs_hymenoptera

pytestmark = needs_hymenoptera()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A local HTTP server with a good zip of the shared copy and two damaged ones."""
    folder = tmp_path_factory.mktemp("www")
    good = folder / "hymenoptera_data.zip"
    with zipfile.ZipFile(good, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(HYMENOPTERA.rglob("*")):
            if path.is_file():
                zf.write(path, Path("hymenoptera_data") / path.relative_to(HYMENOPTERA))
    data = bytearray(good.read_bytes())
    # Flip bytes in the middle of the archive: inside some member's data, so its CRC fails.
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    (folder / "corrupt.zip").write_bytes(bytes(data))
    # A complete, valid zip whose contents lack a file: caught by the manifest.
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(folder / "incomplete.zip", "w") as dst:
        for info in src.infolist()[:-1]:
            dst.writestr(info, src.read(info))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_found_through_visiontune_data(monkeypatch, tmp_path):
    monkeypatch.setenv("VISIONTUNE_DATA", f"{tmp_path}:{HYMENOPTERA.parent}")
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))
    assert find_local(KNOWN["hymenoptera"]) == HYMENOPTERA
    assert resolve_dataset("hymenoptera") == HYMENOPTERA
    assert resolve_dataset("not-a-known-name") is None


def test_download_verified_and_reused(monkeypatch, tmp_path, served):
    monkeypatch.setenv("VISIONTUNE_DATA", "")
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))
    assert find_local(KNOWN["hymenoptera"]) is None
    folder = resolve_dataset("hymenoptera", url=f"{served}/hymenoptera_data.zip")
    assert folder == tmp_path / "cache" / "datasets" / "hymenoptera_data"
    assert len(list((folder / "val" / "bees").iterdir())) == 83
    assert find_local(KNOWN["hymenoptera"]) == folder  # the next run finds it without downloading
    assert [p.name for p in (tmp_path / "cache" / "datasets").iterdir()] == ["hymenoptera_data"]


@pytest.mark.parametrize("name, words", [("corrupt.zip", "corrupt"), ("incomplete.zip", "incomplete"),
                                         ("missing.zip", "downloading")])
def test_bad_download_is_detected_and_not_used(tmp_path, served, name, words):
    dest = tmp_path / "datasets"
    with pytest.raises(VisiontuneError, match=words):
        download(KNOWN["hymenoptera"], url=f"{served}/{name}", dest=dest, quiet=True)
    assert list(dest.iterdir()) == []  # nothing half-extracted is left behind
