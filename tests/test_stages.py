"""Issue 6's remaining recipes: mixup/cutmix, --mode staged, --mode auto --budget."""

from __future__ import annotations

import json
import time

import pytest
import torch

import visiontune
from visiontune import checkpoint, pipeline, training
from visiontune.backbones import build_classifier
from visiontune.config import TrainConfig
from visiontune.engine import per_sample_loss
from visiontune.errors import UsageError
from visiontune.config import parse_duration
from visiontune.recipes import MixBatch
from visiontune.runtime import Runtime

from .conftest import assert_same_run, read_metrics, train_stopped_at, without_timing


@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixed_images_and_soft_targets_agree(mixup, cutmix):
    # Image i is the constant i; labels are the indices. A mixed image's mean must then equal the
    # target-weighted mean of the source values, whether pixels were blended (mixup) or pasted (cutmix).
    torch.manual_seed(3)
    batch = 8
    images = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 3, 16, 12).contiguous()
    mix = MixBatch(batch, mixup, cutmix)
    changed = 0
    for _ in range(20):
        mixed, targets = mix(images, torch.arange(batch))
        torch.testing.assert_close(targets.sum(1), torch.ones(batch))
        expected = targets @ torch.arange(batch, dtype=torch.float32)
        torch.testing.assert_close(mixed.mean(dim=(1, 2, 3)), expected, rtol=0, atol=1e-5)
        changed += not torch.equal(mixed, images)
    assert changed >= 15  # a cutmix box can round to nothing when lam is near 1


def test_soft_one_hot_targets_give_the_hard_target_loss():
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2, 1, 1, 0])
    onehot = torch.nn.functional.one_hot(labels, 3).float()
    for smoothing in (0.0, 0.1):
        torch.testing.assert_close(per_sample_loss(logits, onehot, label_smoothing=smoothing),
                                   per_sample_loss(logits, labels, label_smoothing=smoothing))


def test_strong_augment_turns_mixing_on_and_flags_override():
    assert (TrainConfig(data="d").resolved().mixup, TrainConfig(data="d").resolved().cutmix) == (0.0, 0.0)
    strong = TrainConfig(data="d", augment="strong").resolved()
    assert strong.mixup > 0 and strong.cutmix > 0
    assert TrainConfig(data="d", augment="strong", mixup=0.0).resolved().mixup == 0.0
    with pytest.raises(UsageError, match="--mixup"):
        TrainConfig(data="d", mixup=-1.0).resolved()


def test_training_mixes_every_batch_when_on(tiny_data, tiny_settings, tmp_path, monkeypatch):
    calls = []

    class Spy(MixBatch):
        def __call__(self, inputs, targets):
            calls.append(inputs.shape[0])
            return super().__call__(inputs, targets)

    monkeypatch.setattr(pipeline, "MixBatch", Spy)
    visiontune.train(tiny_data, out=str(tmp_path / "off"), **tiny_settings)
    assert calls == []
    run = visiontune.train(tiny_data, out=str(tmp_path / "on"), cutmix=1.0, mixup=0.2, **tiny_settings)
    # 17 training images in batches of 4: the last batch of one is dropped (BatchNorm), 16 per epoch.
    assert sum(calls) == 2 * 16 and [r["stage"] for r in run.metrics] == ["probe", "full", "full"]


def test_parse_duration():
    assert parse_duration("90") == 90 and parse_duration("90s") == 90 and parse_duration("5m") == 300
    assert parse_duration("1h") == 3600 and parse_duration("2m30s") == 150
    for bad in ("", "soon", "5x", "0s"):
        with pytest.raises(UsageError, match="--budget"):
            parse_duration(bad)


def test_budget_needs_auto_mode():
    with pytest.raises(UsageError, match="--budget 5m: only --mode auto"):
        TrainConfig(data="d", budget="5m").resolved()
    with pytest.raises(UsageError, match="--budget"):
        TrainConfig(data="d", mode="auto", budget="later").resolved()


def test_staged_head_epochs_leave_the_backbone_untouched(tiny_data, tiny_settings, tmp_path, monkeypatch):
    settings = {**tiny_settings, "mode": "staged", "head_epochs": 2, "epochs": 1}
    train_stopped_at(monkeypatch, "full_stage", tiny_data, tmp_path / "run", settings)
    state = checkpoint.load_training_state(tmp_path / "run" / "last.ckpt")
    assert state["epoch"] == 2 and state["stage"] == "head"
    pretrained, _ = build_classifier("test_efficientnet", 2, tiny_settings["weights"])
    after_head = state["model"]
    for key, value in pretrained.state_dict().items():
        if key.startswith("classifier."):
            assert not torch.equal(value, after_head[key]), key  # the head trained
        else:
            assert torch.equal(value, after_head[key]), key  # weights and BatchNorm statistics did not move


def test_staged_runs_head_then_every_layer_at_its_own_lr(tiny_data, tiny_settings, tmp_path):
    run = visiontune.train(tiny_data, out=str(tmp_path / "run"), mode="staged", head_epochs=2, head_lr=0.05,
                           lr=0.002, schedule="constant", **{**tiny_settings, "epochs": 2})
    rows = read_metrics(run.path)
    assert [r["stage"] for r in rows] == ["head", "head", "full", "full"]
    assert [float(r["lr"]) for r in rows] == [0.05, 0.05, 0.002, 0.002]
    pretrained, _ = build_classifier("test_efficientnet", 2, tiny_settings["weights"])
    final = torch.load(run.path / "last.ckpt", weights_only=True)["model"]
    assert not torch.equal(pretrained.state_dict()["blocks.2.0.conv_exp.weight"], final["blocks.2.0.conv_exp.weight"])


def test_staged_resume_across_the_stage_boundary_is_exact(tiny_data, tiny_settings, tmp_path, monkeypatch):
    settings = {**tiny_settings, "mode": "staged", "head_epochs": 2, "epochs": 2}
    whole = visiontune.train(tiny_data, out=str(tmp_path / "whole"), **settings)
    train_stopped_at(monkeypatch, "full_stage", tiny_data, tmp_path / "split", settings)
    assert_same_run(whole, visiontune.resume(tmp_path / "split"))


def test_auto_plans_fine_tuning_epochs_from_measured_times(tiny_data, tiny_settings, tmp_path, monkeypatch):
    # Measured step 0.05 s, val batch 0.02 s, fold 0.01 s: one epoch of 17 images in batches of 4
    # (5 steps) and, with --refit-head, the features of those and the 6 val images (6 batches of 4) is
    # 1.1 * (0.25 + 0.12 + 0.01) + 0.5 = 0.918 s.
    monkeypatch.setattr(training, "_time_fine_tune_step", lambda s: training.FineTuneTimes(0.05, 0.02, 0.01))
    settings = {**tiny_settings, "mode": "auto", "epochs": 3, "eval_batch_size": 4}
    run = visiontune.train(tiny_data, out=str(tmp_path / "big"), budget="1h", **settings)
    plan = json.loads((run.path / "auto.json").read_text())
    assert plan["estimated_epoch_seconds"] == pytest.approx(0.92)
    assert plan["full_epochs"] == 3 and run.decision.startswith("auto: fine-tuning for 3 epoch(s)")
    assert [r["stage"] for r in read_metrics(run.path)] == ["head"] * 25 + ["full"] * 3


def test_auto_keeps_the_head_when_the_budget_is_spent(tiny_data, tiny_settings, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "_time_fine_tune_step", lambda s: training.FineTuneTimes(100.0, 1.0, 1.0))
    run = visiontune.train(tiny_data, out=str(tmp_path / "small"), mode="auto", budget="60s",
                           **{**tiny_settings, "head_epochs": 3})
    plan = json.loads((run.path / "auto.json").read_text())
    assert plan["full_epochs"] == 0 and "one fine-tuning epoch needs about" in plan["decision"]
    assert [r["stage"] for r in read_metrics(run.path)] == ["head"] * 3
    pretrained, _ = build_classifier("test_efficientnet", 2, tiny_settings["weights"])
    best = checkpoint.load_weights(run.path / "best.safetensors")
    assert torch.equal(pretrained.state_dict()["blocks.2.0.conv_exp.weight"], best["blocks.2.0.conv_exp.weight"])


def test_auto_step_timing_leaves_the_run_untouched(tiny_data, tiny_settings):
    cfg = TrainConfig(data=str(tiny_data), mode="auto", bn="frozen", **tiny_settings).resolved()
    s = pipeline.build_setup(cfg, Runtime())
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    rng, sampler = torch.get_rng_state(), s.generator.get_state()
    times = training._time_fine_tune_step(s)
    assert times.step_s > 0 and times.val_batch_s > 0 and times.fold_s >= 0
    assert torch.equal(rng, torch.get_rng_state()) and torch.equal(sampler, s.generator.get_state())
    for k, v in s.model.state_dict().items():
        assert torch.equal(before[k], v), k


def test_auto_step_timing_is_not_set_by_one_slow_step(tiny_data, tiny_settings, monkeypatch):
    # A step slowed by another process (here: by a second) must not become the epoch estimate.
    cfg = TrainConfig(data=str(tiny_data), mode="auto", bn="frozen", **tiny_settings).resolved()
    s = pipeline.build_setup(cfg, Runtime())
    calls, real = [], training.train_one_epoch

    def one_slow_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_one_epoch", one_slow_step)
    times = training._time_fine_tune_step(s)
    assert len(calls) == 4 and times.step_s < 0.25


@pytest.mark.parametrize("left, first, later, most, fits", [
    (9.9, 10.0, 5.0, 5, 0), (10.0, 10.0, 5.0, 5, 1), (24.9, 10.0, 5.0, 5, 3), (25.0, 10.0, 5.0, 5, 4),
    (1000.0, 10.0, 5.0, 5, 5), (30.0, 10.0, 10.0, 5, 3),
])
def test_epochs_that_fit_count_the_first_epoch_at_its_own_cost(left, first, later, most, fits):
    assert training.epochs_that_fit(left, first, later, most) == fits


@pytest.mark.parametrize("kept_cache_gb, resumed", [(1.0, True), (0, False)])
def test_auto_times_evaluation_from_the_kept_output_when_the_stage_keeps_it(tiny_data, tiny_settings, kept_cache_gb,
                                                                           resumed):
    # Before the head stage nothing is kept (resumed_first 0); after one pass every evaluated image fits the budget.
    cfg = TrainConfig(data=str(tiny_data), mode="auto", bn="frozen", frozen_cache_gb=kept_cache_gb,
                      **tiny_settings).resolved()
    times = training._time_fine_tune_step(pipeline.build_setup(cfg, Runtime()))
    if resumed:
        assert times.resumed_batch_s > 0 and times.resumed_first == 0.0 and times.resumed_later == 1.0
    else:
        assert times.resumed_batch_s is None and times.resumed_first == times.resumed_later == 0.0


@pytest.mark.parametrize("resumed_batch_s, epochs", [(0.0, 5), (None, 2)])
def test_auto_plans_later_epochs_at_their_cost_from_the_kept_output(tiny_data, tiny_settings, tmp_path, monkeypatch,
                                                                    resumed_batch_s, epochs):
    # 5 steps of 100 s and 6 eval batches (17 training images refitted + 6 val, by 4) of 100 s whole, 0 s from
    # the kept output: the first epoch 1.1 * 1100 + 0.5 = 1210.5 s, each later one 1.1 * 500 + 0.5 = 550.5 s.
    # An hour fits 1 + 4 of them (2 at the first epoch's cost, as the plan counted before the kept output).
    times = training.FineTuneTimes(100.0, 100.0, 0.0, resumed_batch_s, 0.0, 1.0)
    monkeypatch.setattr(training, "_time_fine_tune_step", lambda s: times)
    settings = {**tiny_settings, "mode": "auto", "epochs": 5, "eval_batch_size": 4, "head_epochs": 2,
                "bn": "frozen", "refit_head": True}
    run = visiontune.train(tiny_data, out=str(tmp_path / "run"), budget="1h", **settings)
    plan = json.loads((run.path / "auto.json").read_text())
    assert plan["full_epochs"] == epochs
    assert plan["estimated_epoch_seconds"] == pytest.approx(1210.5)
    assert plan["estimated_later_epoch_seconds"] == pytest.approx(550.5 if resumed_batch_s is not None else 1210.5)


def test_deterministic_flag_on_cpu_changes_nothing(tiny_data, tiny_settings, tmp_path):
    try:
        plain = visiontune.train(tiny_data, out=str(tmp_path / "plain"), **tiny_settings)
        strict = visiontune.train(tiny_data, out=str(tmp_path / "strict"), deterministic=True, **tiny_settings)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert without_timing(read_metrics(plain.path)) == without_timing(read_metrics(strict.path))


def test_auto_budget_counts_the_time_spent_before_a_resume(tiny_data, tiny_settings, tmp_path, monkeypatch):
    # One fine-tuning epoch is estimated at 0.83 s (as above): with a 1 h budget all 3 epochs fit; a
    # run that had already used 3598 s before it was stopped has no time left for any of them.
    monkeypatch.setattr(training, "_time_fine_tune_step", lambda s: training.FineTuneTimes(0.05, 0.02, 0.01))
    settings = {**tiny_settings, "mode": "auto", "epochs": 3, "eval_batch_size": 4, "head_epochs": 2,
                "budget": "1h"}
    train_stopped_at(monkeypatch, "_plan_auto", tiny_data, tmp_path / "run", settings)
    last = tmp_path / "run" / "last.ckpt"
    state = checkpoint.load_training_state(last)
    assert 0 < state["seconds"] < 600 and "full_epochs" not in state["plan"]
    state["seconds"] = 3598.0  # as if the first process had worked for almost the whole hour
    checkpoint.save_training_state(last, state)
    resumed = visiontune.resume(tmp_path / "run")
    plan = json.loads((resumed.path / "auto.json").read_text())
    assert plan["seconds_used"] >= 3598 and plan["full_epochs"] == 0
    assert resumed.seconds >= 3598


def test_the_fp16_loss_scale_is_part_of_the_checkpoint():
    # A resumed fp16 run must go on with the loss scale it had, not start again from 65536.
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    stage = type("StageStub", (), {"name": "full", "optimizer": torch.optim.SGD([torch.nn.Parameter(torch.ones(1))],
                                                                                 lr=0.1), "scaler": scaler, "ema": None})()
    state = training.LoopState().to_checkpoint(torch.nn.Linear(1, 1), stage, torch.Generator())
    assert state["scaler"]["scale"] == 1024.0
    assert training.LoopState().to_checkpoint(torch.nn.Linear(1, 1), None, torch.Generator())["scaler"] is None


def test_the_head_stage_of_staged_and_auto_is_fixed_mode(tiny_data, tiny_settings, tmp_path):
    # Same seed: the head stage's rows are fixed mode's rows, so auto's best is never below fixed's.
    fixed = visiontune.train(tiny_data, mode="fixed", out=str(tmp_path / "fixed"), **{**tiny_settings, "epochs": 25})
    staged = visiontune.train(tiny_data, mode="staged", out=str(tmp_path / "staged"), **{**tiny_settings, "epochs": 1})
    head_rows = [r for r in read_metrics(staged.path) if r["stage"] == "head"]
    assert len(head_rows) == 25
    assert [r["val_acc"] for r in head_rows] == [r["val_acc"] for r in read_metrics(fixed.path)]
    assert staged.best_val_acc >= fixed.best_val_acc


def test_staged_head_lines_count_their_stage_until_the_recipe_brings_the_total(tiny_data, tiny_settings, tmp_path,
                                                                               capsys):
    # --bn auto decides the fine-tuning epochs after the head stage: until then no total can be printed.
    settings = {k: v for k, v in tiny_settings.items() if k != "epochs"}
    run = visiontune.train(tiny_data, out=str(tmp_path / "r"), mode="staged", head_epochs=2,
                           **{**settings, "quiet": False})
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    total = 2 + run.config.epochs
    assert [line.split(" train loss")[0] for line in lines] == (
        ["epoch 1 head (1/2)", "epoch 2 head (2/2)"] + [f"epoch {n}/{total} full " for n in range(3, total + 1)])
