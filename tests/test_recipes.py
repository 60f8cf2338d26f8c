"""Training recipe options: each one checked by a test that can fail."""

from __future__ import annotations

import copy
import csv
import json

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.transforms import v2

import visiontune
from visiontune.config import TrainConfig
from visiontune.errors import VisiontuneError
from visiontune.engine import train_one_epoch
from visiontune.preprocess import Preprocessing, TrainTransform
from visiontune.recipes import (inverse_frequency_weights, layer_decay_groups, lr_multiplier, make_optimizer,
                                make_sampler, param_groups)

from .conftest import approx_loss, make_image, without_timing


def test_accumulating_k_batches_equals_one_big_batch():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(14, 6, generator=g), torch.randint(0, 3, (14,), generator=g)
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    big = copy.deepcopy(small)
    # 14 samples: K=3 groups of 3 batches of 4 would be 12, then a short group of 2.
    small_batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 14, 4)]
    big_batches = [(x[:12], y[:12]), (x[12:], y[12:])]
    opt_small = torch.optim.SGD(small.parameters(), lr=0.3, momentum=0.9)
    opt_big = torch.optim.SGD(big.parameters(), lr=0.3, momentum=0.9)
    a = train_one_epoch(small, small_batches, opt_small, accumulate=3)
    b = train_one_epoch(big, big_batches, opt_big)
    for p, q in zip(small.parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert a.loss == approx_loss(b.loss)


def test_inverse_frequency_class_weights():
    w = inverse_frequency_weights(torch.tensor([0, 0, 0, 1]), 2)
    torch.testing.assert_close(w, torch.tensor([4 / 6, 2.0]))
    assert torch.equal(inverse_frequency_weights(torch.tensor([0, 1, 0, 1]), 2), torch.ones(2))


def test_balanced_sampler_draws_classes_evenly():
    labels = torch.tensor([0] * 90 + [1] * 10)
    cfg = TrainConfig(data="x", sampler="balanced")
    drawn = []
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        drawn += labels[list(make_sampler(cfg, range(100), labels, g))].tolist()
    share = sum(drawn) / len(drawn)
    assert 0.45 < share < 0.55
    plain = labels[list(make_sampler(TrainConfig(data="x"), range(100), labels, g))]
    assert plain.sum().item() == 10  # the plain sampler is a permutation


def test_onecycle_schedule():
    assert lr_multiplier("onecycle", 0, 10, 10, 0) == pytest.approx(1 / 25)
    assert lr_multiplier("onecycle", 30, 10, 10, 0) == pytest.approx(1.0)
    assert lr_multiplier("onecycle", 100, 10, 10, 0) == pytest.approx(1e-4)


def test_weight_decay_skips_norms_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = param_groups(list(model.named_parameters()), 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert len(no_decay["params"]) == 4  # conv bias, BN weight+bias, linear bias


def test_layer_decay_gives_lower_rates_to_earlier_blocks(tiny_weights):
    from visiontune.backbones import build_classifier

    model, _ = build_classifier("test_efficientnet", 2, tiny_weights)
    groups = layer_decay_groups(model, 0.01, 1e-4, 0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(model.classifier.weight)] == pytest.approx(0.01)
    assert lr_of[id(model.conv_stem.weight)] < lr_of[id(model.blocks[-1][0].conv_pw.weight)] < 0.01
    optimizer = make_optimizer(TrainConfig(data="x", lr=0.01, lr_decay=0.5, optimizer="adamw"),
                               list(model.named_parameters()), model)
    assert isinstance(optimizer, torch.optim.AdamW) and len({g["lr"] for g in optimizer.param_groups}) > 2


def test_head_lr_mult_gives_the_new_head_its_own_rate(tiny_weights):
    from visiontune.backbones import build_classifier

    model, _ = build_classifier("test_efficientnet", 2, tiny_weights)
    for lr_decay in (None, 0.5):
        cfg = TrainConfig(data="x", lr=0.01, optimizer="adamw", head_lr_mult=30, lr_decay=lr_decay)
        optimizer = make_optimizer(cfg, list(model.named_parameters()), model)
        lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        assert len(lr_of) == len(list(model.parameters()))  # every parameter once
        assert lr_of[id(model.classifier.weight)] == lr_of[id(model.classifier.bias)] == pytest.approx(0.3)
        assert lr_of[id(model.conv_head.weight)] <= 0.01  # the pretrained body keeps lr (or less, decayed)
        # Decay stays off norms and biases in the head's own groups too.
        decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
        assert decay_of[id(model.classifier.weight)] > 0 and decay_of[id(model.classifier.bias)] == 0
        # The schedule scales every group alike: the head stays 30x the body.
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
        scheduled = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        assert scheduled[id(model.classifier.weight)] == pytest.approx(0.15)
        assert scheduled[id(model.conv_head.weight)] == pytest.approx(lr_of[id(model.conv_head.weight)] / 2)
    with pytest.raises(VisiontuneError, match="--head-lr-mult"):
        TrainConfig(data="x", head_lr_mult=0).resolved()


def test_crop_scale_reaches_the_fine_tuning_crops(tiny_data, tiny_settings):
    from visiontune import runtime
    from visiontune.pipeline import build_setup, full_stage

    cfg = TrainConfig(data=str(tiny_data), **{k: v for k, v in tiny_settings.items() if k != "epochs"},
                      crop_scale=0.6, bn="frozen").resolved()
    stage = full_stage(build_setup(cfg, runtime.start("cpu", "fp32", False)), 1)
    crops = [t for t in stage.train_batches.loader.dataset.transform.augment.transforms
             if isinstance(t, v2.RandomResizedCrop)]
    assert [c.scale for c in crops] == [(0.6, 1.0)]


def test_augment_levels():
    pre = Preprocessing(size=32, resize=36, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875)
    image = np.random.default_rng(0).integers(0, 255, (36, 48, 3), dtype=np.uint8)
    torch.manual_seed(0)
    none = TrainTransform(pre, strength="none")
    assert torch.equal(none(image), none(image))
    light, strong = TrainTransform(pre), TrainTransform(pre, strength="strong")
    assert light(image).shape == strong(image).shape == (3, 32, 32)
    assert not torch.equal(light(image), light(image))
    # Same seed, same crop and flip draws: strong differs from light only by its extra colour/geometry op,
    # so from the same random state the two must give different pixels in most draws.
    differ = 0
    for seed in range(10):
        torch.manual_seed(seed)
        a = light(image)
        torch.manual_seed(seed)
        differ += not torch.equal(a, strong(image))
    assert differ >= 8
    assert [type(t).__name__ for t in strong.augment.transforms][-1] == "TrivialAugmentWide"


def test_frozen_bn_policy_keeps_running_statistics(tiny_data, tiny_settings, tmp_path):
    from visiontune.backbones import build_classifier

    run = visiontune.train(tiny_data, out=str(tmp_path / "r"), bn="frozen", **tiny_settings)
    original, _ = build_classifier("test_efficientnet", 2, tiny_settings["weights"])
    trained = run.model.state_dict()
    for k, v in original.state_dict().items():
        if "running_" in k:
            assert torch.equal(v, trained[k]), k
    # The layers after --freeze's default with the statistics kept (the stem and blocks 0-2) train; those do not.
    assert not torch.equal(original.state_dict()["blocks.3.0.conv_pw.weight"], trained["blocks.3.0.conv_pw.weight"])
    assert torch.equal(original.state_dict()["blocks.2.0.conv_exp.weight"], trained["blocks.2.0.conv_exp.weight"])


@pytest.mark.parametrize("count", [1, 3])
def test_freeze_keeps_the_first_layer_groups_as_pretrained_and_trains_the_rest(tiny_data, tiny_settings, tmp_path,
                                                                                count):
    from visiontune.backbones import build_classifier

    # BatchNorm statistics follow the batches (--bn train) everywhere but in the frozen groups.
    run = visiontune.train(tiny_data, out=str(tmp_path / "r"), bn="train", lr=0.05, freeze=count, **tiny_settings)
    original, _ = build_classifier("test_efficientnet", 2, tiny_settings["weights"])
    trained = run.model.state_dict()
    # test_efficientnet's groups: the stem (conv_stem, bn1), then blocks.0 ... blocks.4, then the classifier.
    frozen_prefixes = ("conv_stem.", "bn1.", *(f"blocks.{i}." for i in range(count - 1)))
    changed = {k for k, v in original.state_dict().items() if v.is_floating_point() and not torch.equal(v, trained[k])}
    assert not {k for k in changed if k.startswith(frozen_prefixes)}
    assert f"blocks.{count - 1}.0.bn1.running_mean" in changed and f"blocks.{count}.0.bn1.weight" in changed
    assert "classifier.weight" in changed
    assert json.loads((run.path / "config.json").read_text())["config"]["freeze"] == count


@pytest.mark.parametrize("architecture, bn, count, last", [
    ("test_efficientnet", "train", 3, "blocks.1"), ("test_efficientnet", "frozen", 4, "blocks.2"),
    ("test_resnet", "train", 2, "layer1"), ("test_resnet", "frozen", 3, "layer2"),
    ("test_convnext", "train", 2, "stages.0"), ("test_convnext", "frozen", 3, "stages.1"),
    ("test_vit", "train", 0, None), ("test_vit", "frozen", 0, None)])
def test_freeze_default_is_the_layers_at_a_quarter_or_with_pretrained_statistics_an_eighth_resolution(
        architecture, bn, count, last):
    import timm

    from visiontune.pipeline import default_freeze
    from visiontune.recipes import leading_group_parameters

    model = timm.create_model(architecture, num_classes=2)
    said_count, line = default_freeze(model, bn)
    assert said_count == count and (line is None if last is None else f"the layers up to {last} (" in line)
    frozen = {id(p) for p in leading_group_parameters(model, count)}
    # What it freezes is every parameter up to that module and nothing after it (a ViT: nothing).
    finest = [n for n, p in model.named_parameters() if id(p) in frozen]
    assert (finest[-1].startswith(f"{last}.") if last else not finest)
    later = [n for n, p in model.named_parameters() if id(p) not in frozen]
    assert all(not n.startswith(f"{last}.") for n in later) if last else len(later) == len(list(model.parameters()))


def test_freeze_beyond_the_backbones_groups_is_one_sentence(tiny_data, tiny_settings, tmp_path):
    with pytest.raises(VisiontuneError, match=r"^--freeze 6: EfficientNet has 6 layer groups below its classifier "
                                              r"and at least the last must train; use at most 5\.$"):
        visiontune.train(tiny_data, out=str(tmp_path / "r"), freeze=6, **tiny_settings)
    with pytest.raises(VisiontuneError, match="--freeze -1"):
        visiontune.train(tiny_data, out=str(tmp_path / "r2"), freeze=-1, **tiny_settings)


def test_patience_stops_early(tiny_data, tiny_settings, tmp_path):
    # An update of 1e-30 * grad vanishes in float32 and frozen BatchNorm keeps its statistics: the model
    # cannot change, so epoch 1 stays best.
    settings = {**tiny_settings, "epochs": 12, "lr": 1e-30, "schedule": "constant", "head_init": "random",
                "bn": "frozen"}
    run = visiontune.train(tiny_data, out=str(tmp_path / "r"), patience=2, **settings)
    with (run.path / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and run.best_epoch == 1  # 2 more epochs without improvement, then stop


def test_recipe_options_run_end_to_end(tiny_data, tiny_settings, tmp_path):
    run = visiontune.train(tiny_data, out=str(tmp_path / "r"), class_weights="auto", sampler="balanced",
                           accumulate=2, augment="strong", schedule="onecycle", optimizer="adamw", lr_decay=0.7,
                           label_smoothing=0.1, **{**tiny_settings, "lr": 0.001})
    assert [r["stage"] for r in run.metrics] == ["probe", "full", "full"]
    assert all(np.isfinite(r["train_loss"]) for r in run.metrics)


def test_lr_find_suggests_and_changes_nothing(tiny_data, tiny_settings, tmp_path, capsys):
    import hashlib

    from visiontune.cli import main
    from visiontune.lr_find import suggest

    weights_hash = hashlib.sha256(open(tiny_settings["weights"], "rb").read()).hexdigest()
    before = visiontune.train(tiny_data, out=str(tmp_path / "before"), **tiny_settings).metrics
    torch_state = torch.get_rng_state()
    code = main(["lr-find", str(tiny_data), "--model", "test_efficientnet", "--weights", tiny_settings["weights"],
                 "--batch-size", "4", "--cache-dir", tiny_settings["cache_dir"], "--steps", "30",
                 "--out", str(tmp_path / "lr"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "suggested learning rates: valley" in out
    assert (tmp_path / "lr" / "lr_find.png").stat().st_size > 1000 and f"plot {tmp_path / 'lr'}" in out
    # The engine's loop with a per-step hook: one recorded lr per optimizer step, on the exponential schedule.
    from visiontune.lr_find import lr_find

    curve = lr_find(tiny_data, steps=30, out=tmp_path / "lr2", model="test_efficientnet",
                    weights=tiny_settings["weights"], batch_size=4, cache_dir=tiny_settings["cache_dir"])
    factor = (1.0 / 1e-6) ** (1 / 29)
    assert 5 <= len(curve["lrs"]) == len(curve["losses"]) <= 30
    assert curve["lrs"] == pytest.approx([1e-6 * factor**i for i in range(len(curve["lrs"]))], rel=1e-9)
    assert torch.equal(torch_state, torch.get_rng_state())
    assert hashlib.sha256(open(tiny_settings["weights"], "rb").read()).hexdigest() == weights_hash
    after = visiontune.train(tiny_data, out=str(tmp_path / "after"), **tiny_settings).metrics
    assert without_timing(before) == without_timing(after)
    # The suggestion logic on a known curve: flat, falling fastest at 1e-3, then rising.
    lrs = [10 ** e for e in np.linspace(-6, 0, 61)]
    losses = [1.0 if lr < 1e-4 else max(0.2, 1.0 - 0.8 * (np.log10(lr) + 4) / 2) if lr < 1e-1 else 0.2 + (np.log10(lr) + 1)
              for lr in lrs]
    result = suggest(lrs, losses)
    assert 1e-4 <= result["steepest"] <= 1e-2 and 1e-4 <= result["valley"] <= 1e-1


def _generated_images(n: int, scale: float, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Smooth random images (noise upsampled from 8x8), their pixel statistics set by scale and shift."""
    coarse = torch.randn(n, 3, 8, 8, generator=generator)
    return nn.functional.interpolate(coarse, size=48, mode="bilinear") * scale + shift


def test_bn_policy_is_measured_on_the_data_two_generated_sets():
    """--bn auto's check on two generated sets: one like the data the running statistics come from
    (batch statistics change few decisions: train), one far from it (they change most: frozen). The
    check leaves every parameter and buffer as it found them."""
    import contextlib

    import timm

    from visiontune.engine import evaluate
    from visiontune.recipes import BN_TRAIN_MIN_AGREEMENT, choose_bn_policy

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # running statistics = the average over every batch seen: "pretrained" on near
    near = _generated_images(128, 1.0, 0.0, g)
    model.train()
    with torch.no_grad():
        for batch in near.split(32):
            model(batch)
    model.eval()
    decisions = {}
    for name, images in (("near", near), ("far", _generated_images(128, 0.2, 1.5, g))):
        batches = [(b, torch.zeros(len(b), dtype=torch.long)) for b in images.split(32)]
        running = evaluate(model, batches, keep_outputs=True).probabilities
        before = copy.deepcopy(model.state_dict())
        decisions[name] = choose_bn_policy(model, running, batches, lambda x: x, "cpu", contextlib.nullcontext)
        after = model.state_dict()
        assert all(torch.equal(v, after[k]) for k, v in before.items())
        assert all(m.running_mean is not None for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    # Measured: 0.906 and 0.234; the margins keep the test independent of one CPU's rounding.
    assert decisions["near"]["bn"] == "train" and decisions["near"]["agreement"] >= BN_TRAIN_MIN_AGREEMENT + 0.1
    assert decisions["far"]["bn"] == "frozen" and decisions["far"]["agreement"] <= BN_TRAIN_MIN_AGREEMENT - 0.3
    assert decisions["near"]["images"] == 128 and decisions["near"]["layers"] > 0
    # Without BatchNorm there is nothing to measure: the pretrained-statistics recipe (AdamW 1e-4).
    no_bn = nn.Sequential(nn.Flatten(), nn.Linear(3 * 48 * 48, 3))
    assert choose_bn_policy(no_bn, running, batches, lambda x: x, "cpu", contextlib.nullcontext)["bn"] == "frozen"


@pytest.mark.parametrize("threshold, far_threshold, policy, far",
                         [(0.0, 0.0, "train", False), (1.01, 0.0, "frozen", False), (1.01, 1.01, "frozen", True)])
def test_bn_auto_decision_reaches_config_and_training(tiny_data, tiny_settings, tmp_path, monkeypatch, capsys,
                                                       threshold, far_threshold, policy, far):
    """The decision is said in one line, written to config.json with the measurement, brings its
    optimizer, lr and epochs (a larger step for frozen statistics on a far domain), and
    is what training does: train moves the running statistics, frozen keeps them."""
    import json

    from visiontune import recipes
    from visiontune.backbones import build_classifier
    from visiontune.config import BN_RECIPES, FAR_DOMAIN_RECIPE

    monkeypatch.setattr(recipes, "BN_TRAIN_MIN_AGREEMENT", threshold)
    monkeypatch.setattr(recipes, "FAR_DOMAIN_MAX_AGREEMENT", far_threshold)
    settings = {k: v for k, v in tiny_settings.items() if k != "epochs"}  # the recipe's own epochs
    run = visiontune.train(tiny_data, out=str(tmp_path / "r"), **{**settings, "quiet": False})
    record = json.loads((run.path / "config.json").read_text())
    recipe = FAR_DOMAIN_RECIPE if far else BN_RECIPES[policy]
    assert recipe["lr"] != BN_RECIPES["frozen"]["lr"] or not far
    assert (record["bn_decision"]["bn"], record["bn_decision"]["far"]) == (policy, far)
    assert record["bn_decision"]["images"] == 17 and 0 <= record["bn_decision"]["agreement"] <= 1
    assert {k: record["config"][k] for k in ("bn", "optimizer", "lr", "epochs", "refit_head")} == {"bn": policy, **recipe}
    assert run.config.bn == policy and run.config.lr == recipe["lr"]
    assert [row["epoch"] for row in run.metrics] == list(range(recipe["epochs"] + 1))  # the probe, then the recipe's
    said = capsys.readouterr().out
    assert f"--bn auto: {policy} ({recipe['optimizer']} lr {recipe['lr']:g}, {recipe['epochs']} epochs)" in said
    assert ("a domain far from the backbone's, a larger step" in said) == far
    assert "epoch 0 probe" in said and f"epoch 1/{recipe['epochs']} full" in said
    assert ("--refit-head: " in said) == (policy == "frozen")  # AdamW's recipes refit the head, SGD's does not
    original, _ = build_classifier("test_efficientnet", 2, tiny_settings["weights"])
    trained = run.model.state_dict()
    # --freeze's default comes with the policy: the stem and blocks 0-1 (1/4 resolution and finer) where the
    # statistics train, blocks 0-2 (1/8) where they stay pretrained; said after the policy, kept in config.json.
    count = 4 if policy == "frozen" else 3
    pretrained = ("conv_stem.", "bn1.", *(f"blocks.{i}." for i in range(count - 1)))
    assert record["config"]["freeze"] == count and record["freeze_decision"].startswith(f"--freeze {count}: ")
    assert f"{record['bn_decision']['why']}\n{record['freeze_decision']}\n" in said
    kept = {k: torch.equal(v, trained[k]) for k, v in original.state_dict().items() if v.is_floating_point()}
    assert all(v for k, v in kept.items() if k.startswith(pretrained))
    assert not kept[f"blocks.{count - 1}.0.conv_pwl.weight"]  # the first group after them trains
    # The policy decides the statistics of the rest.
    after = [v for k, v in kept.items() if "running_mean" in k and not k.startswith(pretrained)]
    assert after and (all(after) if policy == "frozen" else not any(after))


def test_bn_auto_keeps_the_users_optimizer_and_lr(tiny_data, tiny_settings, tmp_path, monkeypatch):
    from visiontune import recipes

    monkeypatch.setattr(recipes, "BN_TRAIN_MIN_AGREEMENT", 0.0)
    run = visiontune.train(tiny_data, out=str(tmp_path / "r"), lr=0.05, **tiny_settings)
    assert (run.config.bn, run.config.optimizer, run.config.lr) == ("train", "sgd", 0.05)
    run = visiontune.train(tiny_data, out=str(tmp_path / "s"), optimizer="adamw", **tiny_settings)
    assert (run.config.bn, run.config.optimizer, run.config.lr) == ("train", "adamw", 0.003)
    # --epochs too, on a far domain.
    monkeypatch.setattr(recipes, "BN_TRAIN_MIN_AGREEMENT", 1.01)
    monkeypatch.setattr(recipes, "FAR_DOMAIN_MAX_AGREEMENT", 1.01)
    run = visiontune.train(tiny_data, out=str(tmp_path / "t"), **tiny_settings)
    assert (run.config.bn, run.config.lr, run.config.epochs, len(run.metrics)) == ("frozen", 3e-4, 2, 3)
    # Resolving never guesses: an explicit policy brings its recipe at once, auto leaves it open.
    assert (TrainConfig(data="d", bn="frozen").resolved().optimizer, TrainConfig(data="d").resolved().lr) == ("adamw", None)
    assert (TrainConfig(data="d", bn="frozen").resolved().epochs, TrainConfig(data="d").resolved().epochs) == (5, None)
    assert TrainConfig(data="d", mode="fixed", bn="auto").resolved().bn == "frozen"


@pytest.mark.parametrize("epochs", [None, 4])
def test_a_run_stopped_before_bn_auto_chose_its_recipe_resumes_and_chooses_it(tiny_data, tiny_settings, tmp_path,
                                                                                monkeypatch, epochs):
    """Stopped after the probe, before --bn auto chose the recipe: config.json has no epochs yet. The
    resumed run chooses them (a far domain's), or takes --epochs N as a new run would."""
    import json

    from visiontune import recipes
    from visiontune.config import FAR_DOMAIN_RECIPE

    from .conftest import train_stopped_at

    monkeypatch.setattr(recipes, "BN_TRAIN_MIN_AGREEMENT", 1.01)
    monkeypatch.setattr(recipes, "FAR_DOMAIN_MAX_AGREEMENT", 1.01)
    settings = {k: v for k, v in tiny_settings.items() if k != "epochs"}
    train_stopped_at(monkeypatch, "_choose_bn", tiny_data, tmp_path / "r", settings)
    stopped = json.loads((tmp_path / "r" / "config.json").read_text())["config"]
    assert stopped["epochs"] is None and stopped["freeze"] is None  # --freeze's default comes with the policy
    run = visiontune.resume(tmp_path / "r", epochs=epochs)
    expected = epochs or FAR_DOMAIN_RECIPE["epochs"]
    assert (run.config.epochs, run.config.lr, run.config.freeze) == (expected, FAR_DOMAIN_RECIPE["lr"], 4)
    assert [row["epoch"] for row in run.metrics] == list(range(expected + 1))
    assert {k: json.loads((run.path / "config.json").read_text())["config"][k]
            for k in ("epochs", "freeze")} == {"epochs": expected, "freeze": 4}


def test_weight_average_follows_the_update_rule_with_a_decay_from_steps_per_epoch():
    from visiontune.pipeline import WeightAverage

    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    average = WeightAverage(model, epochs=0.5, steps_per_epoch=8, min_steps=1)  # 4 steps: decay 1 - 1/4
    assert average.decay == 0.75
    for value in (3.0, 5.0):
        with torch.no_grad():
            model.weight.fill_(value)
        average.update(model)
    # 0.75 * (0.75 * 1 + 0.25 * 3) + 0.25 * 5
    assert torch.allclose(average.module.weight, torch.full((1, 2), 2.375))
    assert model.weight[0, 0].item() == 5.0  # the model itself is untouched
    assert WeightAverage(model, epochs=0.25, steps_per_epoch=2, min_steps=1).decay == 0.0  # one step: the raw weights
    assert WeightAverage(model, epochs=0.25, steps_per_epoch=8).decay == 0.875  # 2 steps, raised to the default 8


def test_ema_decay_is_derived_from_the_data_size_and_said(tiny_settings, tmp_path, capsys):
    """Two generated sets of different sizes: the same --ema-epochs gives each its own decay per step,
    printed in one line and recorded in config.json."""
    import json

    from .conftest import make_folder

    decays = {}
    for name, per_class in (("small", {"a": 9, "b": 8}), ("large", {"a": 20, "b": 20})):
        data = make_folder(tmp_path / name, per_class)
        run = visiontune.train(data, out=str(tmp_path / f"run-{name}"), ema_epochs=4, bn="frozen",
                               **{**tiny_settings, "epochs": 1, "quiet": False})
        record = json.loads((run.path / "config.json").read_text())["ema"]
        decays[name] = record["decay"]
        assert record["decay"] == pytest.approx(1 - 1 / (4 * record["steps_per_epoch"]))
        assert f"EMA decay {record['decay']:.4f} per step" in capsys.readouterr().out
    # 17 images in batches of 4 (a last batch of one is dropped): 4 steps an epoch; 40 images: 10 steps.
    assert decays == pytest.approx({"small": 1 - 1 / 16, "large": 1 - 1 / 40})
    assert TrainConfig(data="d").resolved().ema_epochs == 0.25
    assert TrainConfig(data="d", mode="fixed").resolved().ema_epochs == 0.0


@pytest.mark.parametrize("ema_epochs", [0.5, 0.0])
def test_val_and_the_saved_model_are_the_average(tiny_data, tiny_settings, tmp_path, ema_epochs):
    """With an EMA the best weights saved are the average's (last.ckpt keeps both, for resume); without
    one they are the trained weights themselves."""
    from visiontune import checkpoint
    from visiontune.engine import evaluate
    from visiontune.pipeline import build_setup, image_val_batches
    from visiontune.runfolder import RunFolder
    from visiontune import runtime

    settings = {**tiny_settings, "epochs": 1, "head_init": "random", "bn": "frozen", "lr": 0.01, "refit_head": False}
    run = visiontune.train(tiny_data, out=str(tmp_path / "r"), ema_epochs=ema_epochs, **settings)
    assert run.best_epoch == 1  # the only epoch: no probe
    last = checkpoint.load_training_state(run.path / "last.ckpt")
    best = RunFolder(run.path).load_best_weights()
    raw, average = last["model"], last["ema"]
    if ema_epochs:
        assert all(torch.equal(best[k], average[k]) for k in best)
        assert not torch.equal(best["blocks.3.0.conv_pw.weight"], raw["blocks.3.0.conv_pw.weight"])
    else:
        assert average is None and all(torch.equal(best[k], raw[k]) for k in best)
    # The epoch's val accuracy is the saved model's.
    s = build_setup(TrainConfig(data=str(tiny_data), **settings).resolved(), runtime.start("cpu", "fp32", False))
    s.model.load_state_dict(best)
    assert evaluate(s.model, image_val_batches(s), s.prepare).accuracy == pytest.approx(run.metrics[-1]["val_acc"])


def test_refit_head_is_what_val_and_the_saved_model_use_and_training_keeps_its_own(tiny_data, tiny_settings,
                                                                                    tmp_path):
    """--refit-head: the saved model is the average's backbone with a head fitted again on its features,
    the logged val numbers are that model's, and training (weights, average, batch order) is the run
    without it, step for step."""
    from visiontune import checkpoint, runtime
    from visiontune.engine import evaluate
    from visiontune.pipeline import build_setup, image_val_batches
    from visiontune.runfolder import RunFolder

    settings = {**tiny_settings, "epochs": 1, "head_init": "random", "bn": "frozen", "lr": 0.01, "ema_epochs": 0.5}
    refit = visiontune.train(tiny_data, out=str(tmp_path / "refit"), refit_head=True, **settings)
    plain = visiontune.train(tiny_data, out=str(tmp_path / "plain"), refit_head=False, **settings)
    assert refit.best_epoch == plain.best_epoch == 1  # the only epoch: no probe
    last_refit = checkpoint.load_training_state(refit.path / "last.ckpt")
    last_plain = checkpoint.load_training_state(plain.path / "last.ckpt")
    for part in ("model", "ema"):
        assert all(torch.equal(last_refit[part][k], last_plain[part][k]) for k in last_plain[part])
    best, average = RunFolder(refit.path).load_best_weights(), last_refit["ema"]
    head = {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(best[k], average[k]) for k in best if k not in head)
    assert not torch.equal(best["classifier.weight"], average["classifier.weight"])
    s = build_setup(TrainConfig(data=str(tiny_data), **settings).resolved(), runtime.start("cpu", "fp32", False))
    s.model.load_state_dict(best)
    val = evaluate(s.model, image_val_batches(s), s.prepare)
    assert (val.accuracy, val.loss) == pytest.approx((refit.metrics[-1]["val_acc"], refit.metrics[-1]["val_loss"]),
                                                     rel=1e-4)
    assert refit.metrics[-1]["val_loss"] != pytest.approx(plain.metrics[-1]["val_loss"], rel=1e-3)
    # On with frozen statistics (AdamW), off with trained ones (SGD); --bn auto decides it with the policy.
    assert TrainConfig(data="d").resolved().refit_head is None
    assert TrainConfig(data="d").resolved().with_bn_policy("frozen", far=True).refit_head is True
    assert TrainConfig(data="d", mode="staged").resolved().with_bn_policy("train").refit_head is False
    assert TrainConfig(data="d", bn="frozen").resolved().refit_head is True
    assert TrainConfig(data="d", bn="train", refit_head=True).resolved().refit_head is True  # given: kept
    assert TrainConfig(data="d", mode="fixed").resolved().refit_head is False


def small_image_settings(tiny_settings: dict) -> dict:
    return {**{k: v for k, v in tiny_settings.items() if k not in ("image_size", "train_size", "quiet")}, "epochs": 1}


def test_small_images_are_trained_at_the_size_the_probe_fits_better(tiny_data, tiny_settings, tmp_path, capsys,
                                                                   monkeypatch):
    # test_efficientnet's own size is 160 px, so fine-tuning crops are 112 px. The generated images are
    # 40x32, below the crops: the probe is fitted at 112 and 160 px, and val and training both use the
    # size it did better at, said once and kept in config.json and model.json.
    from visiontune import training
    from visiontune.pipeline import choose_measured_size

    settings = small_image_settings(tiny_settings)
    run = visiontune.train(tiny_data, out=str(tmp_path / "measured"), **settings)
    record = json.loads((run.path / "config.json").read_text())
    decision = record["image_size_decision"]
    scores = {entry["size"]: (entry["val_acc"], entry["val_loss"]) for entry in decision["probe"]}
    assert sorted(scores) == [112, 160] and "pending" not in decision
    chosen = choose_measured_size(scores)
    assert (record["config"]["image_size"], record["config"]["train_size"]) == (chosen, chosen)
    assert (decision["image_size"], decision["train_size"], decision["median_short_side"]) == (chosen, chosen, 32)
    assert json.loads((run.path / "model.json").read_text())["preprocessing"]["size"] == chosen
    # Each fit starts where the probe does: the chosen size's score is epoch 0's row.
    probe = run.metrics[0]
    assert (probe["stage"], probe["val_acc"]) == ("probe", scores[chosen][0])
    assert probe["val_loss"] == approx_loss(scores[chosen][1])
    printed = capsys.readouterr().out
    assert printed.count("image size") == 1
    assert (f"image size {chosen} px for val and training: the training images' median short side is 32 px, below "
            f"the 112 px training crops, and the linear probe's val acc was {scores[112][0]:.4f} at 112 px, "
            f"{scores[160][0]:.4f} at 160 px (--image-size sets it)") in printed
    # Whichever size wins, the run goes on at it: preprocessing, crops, probe and config.
    for forced in (112, 160):
        monkeypatch.setattr(training, "choose_measured_size", lambda scores, size=forced: size)
        run = visiontune.train(tiny_data, out=str(tmp_path / f"forced{forced}"), **settings)
        record = json.loads((run.path / "config.json").read_text())
        assert (record["config"]["image_size"], record["config"]["train_size"]) == (forced, forced)
        assert json.loads((run.path / "model.json").read_text())["preprocessing"]["size"] == forced
        assert run.metrics[0]["val_acc"] == scores[forced][0]
        assert run.metrics[0]["val_loss"] == approx_loss(scores[forced][1])
    monkeypatch.undo()
    # Sizes given, or fixed mode (no crops): the backbone's sizes, no decision.
    for name, extra in (("given", {"image_size": 64}), ("fixed", {"mode": "fixed"})):
        run = visiontune.train(tiny_data, out=str(tmp_path / name), **{**settings, **extra})
        record = json.loads((run.path / "config.json").read_text())
        assert "image_size_decision" not in record
        assert record["config"]["image_size"] == extra.get("image_size", 160)


def test_only_the_chosen_size_keeps_its_frozen_layers_output_on_disk(tiny_data, tiny_settings, tmp_path, monkeypatch):
    # Both sizes' features are cached (a later run measures from them), but only the chosen size's
    # frozen-layer output is read again (by val and the refit): the other's is not written.
    from visiontune import training
    from visiontune.prefix import FrozenPrefix

    written = []
    write_new = FrozenPrefix.write_new

    def recording(self, identities):
        before = self.written_images
        write_new(self, identities)
        if self.written_images > before:
            written.append((self.image_shape, self.written_images - before))

    monkeypatch.setattr(FrozenPrefix, "write_new", recording)
    settings = small_image_settings(tiny_settings)
    for forced in (112, 160):
        written.clear()
        monkeypatch.setattr(training, "choose_measured_size", lambda scores, size=forced: size)
        run = visiontune.train(tiny_data, out=str(tmp_path / f"forced{forced}"),
                               **{**settings, "cache_dir": str(tmp_path / f"cache{forced}")})
        counts = json.loads((run.path / "config.json").read_text())["data"]["counts"]
        train_and_val = sum(sum(counts[split].values()) for split in ("train", "val"))
        # Before --bn auto has decided, the probe's pass keeps the output of the most layers either policy
        # freezes: test_efficientnet's blocks.2, at an eighth of the input size (14 px for 112, 20 for 160).
        assert [(shape[1:], count) for shape, count in written] == [((forced // 8, forced // 8), train_and_val)]


def test_a_run_stopped_before_the_size_is_measured_resumes_as_if_never_stopped(tiny_data, tiny_settings, tmp_path,
                                                                               monkeypatch):
    from .conftest import assert_same_run, train_stopped_at

    settings = small_image_settings(tiny_settings)
    expected = visiontune.train(tiny_data, out=str(tmp_path / "whole"), **settings)
    train_stopped_at(monkeypatch, "_choose_image_size", tiny_data, tmp_path / "stopped", settings)
    record = json.loads((tmp_path / "stopped" / "config.json").read_text())
    # Not yet measured: no size is written that the resumed run would take as given.
    assert (record["config"]["image_size"], record["config"]["train_size"]) == (None, None)
    assert record["image_size_decision"]["pending"] is True
    resumed = visiontune.resume(tmp_path / "stopped", quiet=True)
    assert_same_run(expected, resumed)
    assert (json.loads((tmp_path / "stopped" / "config.json").read_text())["image_size_decision"]
            == json.loads((expected.path / "config.json").read_text())["image_size_decision"])


def test_the_measured_size_is_the_better_probe_then_the_cheaper_one():
    from visiontune.pipeline import choose_measured_size

    assert choose_measured_size({160: (0.934, 0.25), 224: (0.951, 0.20)}) == 224  # sign_digits, seed 0
    assert choose_measured_size({160: (0.950, 0.18), 224: (0.930, 0.22)}) == 160  # eurosat10, seed 0
    assert choose_measured_size({224: (0.90, 0.30), 160: (0.90, 0.31)}) == 224  # same acc: the lower loss
    assert choose_measured_size({224: (0.90, 0.30), 160: (0.90, 0.30)}) == 160  # a tie: the cheaper size


def test_small_images_without_a_probe_take_the_crop_size(tiny_data):
    from visiontune.pipeline import choose_image_sizes, resolve_data

    cfg = TrainConfig(data=str(tiny_data), model="test_efficientnet", mode="staged").resolved()
    eval_size, train_size, decision = choose_image_sizes(cfg, resolve_data(cfg), 160, measure=False)
    assert (eval_size, train_size) == (112, 112)
    assert decision == {
        "median_short_side": 32, "images_read": 17, "small": True, "image_size": 112, "train_size": 112,
        "why": "image size 112 px for val and training: the training images' median short side is 32 px, below "
               "the 112 px training crops, and a larger val size would only upscale them (--image-size sets it)"}
    measured = choose_image_sizes(cfg, resolve_data(cfg), 160, measure=True)
    assert measured[:2] == (112, 112)
    assert measured[2] == {**decision, "why": None, "pending": True, "candidates": [112, 160]}


def test_large_images_keep_the_backbone_eval_size(tmp_path):
    from visiontune.pipeline import choose_image_sizes, resolve_data

    rng = np.random.default_rng(0)
    for label, cls in enumerate(("ants", "bees")):
        for i in range(5):  # one small image among large ones: the median decides
            make_image(tmp_path / "data" / "train" / cls / f"{i}.png", label, rng, size=(40, 30) if i == 0 else (300, 200))
        make_image(tmp_path / "data" / "val" / cls / "v.png", label, rng)
    cfg = TrainConfig(data=str(tmp_path / "data")).resolved()
    eval_size, train_size, decision = choose_image_sizes(cfg, resolve_data(cfg), 224)
    assert (eval_size, train_size) == (224, 160)
    assert decision == {"median_short_side": 200, "images_read": 10, "small": False, "image_size": 224,
                        "train_size": 160, "why": None}
    assert choose_image_sizes(cfg, resolve_data(cfg), 224, measure=True) == (eval_size, train_size, decision)
