"""Acceptance on the real data set and backbone: the two scenarios end to end."""

from __future__ import annotations

import csv

import pytest

from visiontune.cli import main

from .conftest import HYMENOPTERA, needs_hymenoptera

pytestmark = [needs_hymenoptera(), pytest.mark.integration]


@pytest.fixture
def env(monkeypatch, tmp_path, hymenoptera_cache):
    monkeypatch.setenv("VISIONTUNE_DATA", str(HYMENOPTERA.parent))
    monkeypatch.setenv("VISIONTUNE_CACHE", str(hymenoptera_cache))
    return tmp_path


def best_val_acc(run_dir) -> float:
    with (run_dir / "metrics.csv").open() as f:
        return max(float(r["val_acc"]) for r in csv.DictReader(f))


def test_fixed_mode_five_epochs(hymenoptera_fixed_run):
    assert best_val_acc(hymenoptera_fixed_run.path) >= 0.94


def test_default_recipe(env, capsys):
    out = env / "default"
    assert main(["train", "hymenoptera", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out.splitlines()[-1]
    assert best_val_acc(out) >= 0.95
