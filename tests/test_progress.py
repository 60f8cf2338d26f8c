"""Progress: bars where a person watches, plain timed lines in logs, nothing with --quiet."""

from __future__ import annotations

import io
import re

import visiontune
from visiontune import progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_style_follows_where_output_goes():
    assert progress.style(False, FakeTerminal()) == "off"
    assert progress.style(True, FakeTerminal()) == "bar"
    assert progress.style(True, io.StringIO()) == "lines"  # a CI log or a file


def test_plain_lines_say_count_rate_and_time_left(monkeypatch):
    import torch

    monkeypatch.setattr(progress, "PLAIN_INTERVAL", 0.0)
    out = io.StringIO()
    batches = [(torch.zeros(4, 3), torch.zeros(4))] * 3
    assert list(progress.plain_lines(iter(batches), 3, "epoch 1 train", out)) == batches
    lines = out.getvalue().splitlines()
    # One line per item but the last (the epoch line that follows reports the end).
    assert [line.split(" (")[0] for line in lines] == ["epoch 1 train: 1/3", "epoch 1 train: 2/3"]
    assert all(re.search(r"\(\d+\.\d images/s, about \d+s left\)$", line) for line in lines)
    monkeypatch.setattr(progress, "PLAIN_INTERVAL", 3600.0)
    out = io.StringIO()
    list(progress.plain_lines(iter(batches), 3, "x", out))
    assert out.getvalue() == ""  # a short loop prints nothing


def test_training_log_has_plain_lines_and_quiet_has_none(tiny_data, tiny_settings, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_INTERVAL", 0.0)
    visiontune.train(tiny_data, out=str(tmp_path / "loud"), **{**tiny_settings, "quiet": False, "epochs": 1,
                                                             "eval_batch_size": 4})
    captured = capsys.readouterr()
    assert re.search(r"^epoch 1 train: 1/\d+ \(", captured.err, re.M), captured.err
    assert re.search(r"^features view 0: 1/\d+ \(", captured.err, re.M)  # the probe's feature extraction
    assert "epoch 1/1" in captured.out
    visiontune.train(tiny_data, out=str(tmp_path / "quiet"), **{**tiny_settings, "quiet": True, "epochs": 1})
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
