"""--freeze's frozen layers run once per image (prefix.FrozenPrefix): the features and the run's numbers are
those of the whole model every epoch."""

from functools import partial

import pytest
import torch
from torch import nn

import visiontune
from visiontune.features import FeatureCache, extract_features
from visiontune.images import decode_array
from visiontune.prefix import FrozenPrefix, frozen_module_names
from visiontune.preprocess import Preprocessing
from visiontune.recipes import leading_group_parameters

from .conftest import read_metrics


def _frozen_model(architecture: str, count: int) -> nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(architecture, num_classes=2).eval()
    for p in leading_group_parameters(model, count):
        p.requires_grad_(False)
    return model


def _features(model, paths, prefix=None, size=48, channels_last=False):
    pre = Preprocessing(size=size, resize=size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                        interpolation="bilinear", crop_pct=1.0)
    decode = partial(decode_array, short_side=pre.resize, interpolation=pre.interpolation)
    features, failed = extract_features(model, paths, decode, pre, 1, 0, None, batch_size=4, channels_last=channels_last,
                                        prefix=prefix)
    assert not failed
    return features[0]


@pytest.mark.parametrize("architecture, count, names", [
    ("test_efficientnet", 3, ["conv_stem", "bn1", "blocks.0", "blocks.1"]),
    ("test_efficientnet", 1, ["conv_stem", "bn1"]),
    # ResNet's stem ends in an activation and a max-pool, without parameters, before layer1.
    ("test_resnet", 2, ["conv1", "bn1", "act1", "maxpool", "layer1"]),
    ("test_convnext", 2, ["stem", "stages.0"]),
])
def test_frozen_modules_are_the_frozen_groups_in_order(architecture, count, names):
    assert frozen_module_names(_frozen_model(architecture, count)) == names


@pytest.mark.parametrize("architecture, count", [("test_efficientnet", 3), ("test_resnet", 2)])
def test_the_groups_to_freeze_name_the_same_modules_before_they_are_frozen(architecture, count):
    # The probe's pass keeps the output before the full stage freezes anything.
    import timm

    model = timm.create_model(architecture, num_classes=2)
    assert frozen_module_names(model) == []
    assert frozen_module_names(model, leading_group_parameters(model, count)) == \
        frozen_module_names(_frozen_model(architecture, count))


def test_keep_only_drops_the_other_images_and_their_bytes(tiny_data):
    paths = sorted(tiny_data.rglob("*.png"))[:3]
    model = _frozen_model("test_efficientnet", 3)
    prefix = FrozenPrefix(model, 1 << 30)
    _features(model, paths, prefix)
    one_image = prefix.used // 3
    kept = next(iter(prefix.outputs))
    prefix.keep_only({kept})
    assert list(prefix.outputs) == [kept] and prefix.used == one_image and prefix.kept_images == 1


@pytest.mark.parametrize("architecture, count", [("test_efficientnet", 3), ("test_resnet", 2), ("test_convnext", 2)])
def test_later_passes_start_from_the_kept_output_and_give_the_whole_models_features(tiny_data, architecture, count):
    paths = sorted(tiny_data.rglob("*.png"))
    model = _frozen_model(architecture, count)
    prefix = FrozenPrefix(model, 1 << 30)
    first = _features(model, paths, prefix)
    assert prefix.kept_images == len(paths) and prefix.resumed_images == 0
    assert torch.allclose(first, _features(model, paths), rtol=1e-5, atol=1e-6)
    # Training changes the layers after the frozen ones: the next pass uses them as they are now.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.1).add_(0.01)
    second = _features(model, paths, prefix)
    assert prefix.resumed_images == len(paths)
    assert not torch.allclose(second, first, rtol=1e-3)
    assert torch.allclose(second, _features(model, paths), rtol=1e-5, atol=1e-6)


def test_the_budget_keeps_what_fits_and_the_rest_runs_whole(tiny_data):
    paths = sorted(tiny_data.rglob("*.png"))
    model = _frozen_model("test_efficientnet", 3)
    probe = FrozenPrefix(model, 1 << 30)
    _features(model, paths[:1], probe)
    one_image = probe.used
    prefix = FrozenPrefix(model, 2 * one_image + one_image // 2)
    _features(model, paths, prefix)
    assert prefix.kept_images == 2 and prefix.used == 2 * one_image
    again = _features(model, paths, prefix)
    assert prefix.resumed_images == 2
    assert torch.allclose(again, _features(model, paths), rtol=1e-5, atol=1e-6)


class _InputAfterTheFrozenLayer(nn.Module):
    """A model whose later layer reads the input image again: starting after the frozen layer is not the
    same model."""

    def __init__(self):
        super().__init__()
        self.stem, self.body = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward_features(self, x):
        return self.body(self.stem(x)) + x.mean(dim=1, keepdim=True)

    def forward_head(self, x, pre_logits=False):
        return x.mean(dim=(2, 3))


def test_a_model_the_split_does_not_fit_runs_whole(tiny_data):
    paths = sorted(tiny_data.rglob("*.png"))
    torch.manual_seed(0)
    model = _InputAfterTheFrozenLayer().eval()
    model.stem.requires_grad_(False)
    prefix = FrozenPrefix(model, 1 << 30)
    assert prefix.names == ["stem"]
    features = _features(model, paths, prefix)
    assert prefix.usable is False and prefix.kept_images == 0
    assert torch.allclose(features, _features(model, paths), rtol=1e-5, atol=1e-6)
    _features(model, paths, prefix)
    assert prefix.resumed_images == 0


@pytest.mark.parametrize("bn, refit", [("train", False), ("frozen", True)])
def test_a_run_gives_the_same_numbers_with_the_kept_output_as_without(tiny_data, tiny_settings, tmp_path, monkeypatch,
                                                                      bn, refit):
    resumed = []
    batch = FrozenPrefix.batch
    monkeypatch.setattr(FrozenPrefix, "batch", lambda self, ids, device: resumed.append(len(ids)) or
                        batch(self, ids, device))
    settings = {**tiny_settings, "epochs": 3, "bn": bn, "refit_head": refit, "lr": 0.05}
    passed_per_epoch = 6 + (17 if refit else 0)  # the val images, and with the refit the training ones
    # A first run (empty feature cache): the probe's pass computed the frozen layers' output (they are the
    # pretrained ones), so every fine-tuning epoch starts after them.
    kept = visiontune.train(tiny_data, out=str(tmp_path / "kept"), **settings)
    assert sum(resumed) == 3 * passed_per_epoch
    resumed.clear()
    # Again, on the cached features: the probe computes nothing, and the first epoch reads the output the
    # first run wrote beside the features.
    again = visiontune.train(tiny_data, out=str(tmp_path / "again"), **settings)
    assert sum(resumed) == 3 * passed_per_epoch
    resumed.clear()
    whole = visiontune.train(tiny_data, out=str(tmp_path / "whole"), frozen_cache_gb=0, **settings)
    assert not resumed
    # The val pass's random draw is kept too, so training sees the same crops in every epoch.
    for run in (kept, again):
        for a, b in zip(read_metrics(run.path, timing=False), read_metrics(whole.path, timing=False), strict=True):
            assert a["val_acc"] == b["val_acc"] and a["train_acc"] == b["train_acc"]
            assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-6)
            assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), rel=1e-5)


def _stored_reads(monkeypatch) -> list[int]:
    """Images each FrozenPrefix has read from its store, one entry per read."""
    reads, read_stored = [], FrozenPrefix.read_stored

    def counting(self, identities):
        before = self.read_images
        read_stored(self, identities)
        reads.append(self.read_images - before)

    monkeypatch.setattr(FrozenPrefix, "read_stored", counting)
    return reads


def test_the_stored_output_serves_only_the_same_frozen_layers(tiny_data, tiny_settings, tmp_path, monkeypatch):
    reads = _stored_reads(monkeypatch)
    settings = {**tiny_settings, "epochs": 2, "bn": "frozen", "refit_head": True}
    visiontune.train(tiny_data, out=str(tmp_path / "first"), freeze=3, **settings)
    assert sum(reads) == 0  # nothing stored yet: the probe's pass computed and wrote 23 outputs
    reads.clear()
    visiontune.train(tiny_data, out=str(tmp_path / "fewer"), freeze=1, **settings)
    assert sum(reads) == 0  # other layers frozen: another key
    reads.clear()
    same = visiontune.train(tiny_data, out=str(tmp_path / "same"), freeze=3, **settings)
    assert sum(reads) == 6 + 17
    reads.clear()
    uncached = visiontune.train(tiny_data, out=str(tmp_path / "uncached"), freeze=3, feature_cache=False, **settings)
    assert sum(reads) == 0  # --no-feature-cache: nothing read from (or written to) the cache folder
    for a, b in zip(read_metrics(same.path, timing=False), read_metrics(uncached.path, timing=False), strict=True):
        assert a["val_acc"] == b["val_acc"] and float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), rel=1e-5)


def test_a_damaged_store_is_computed_again(tiny_data, tiny_settings, tmp_path, monkeypatch):
    settings = {**tiny_settings, "epochs": 1, "bn": "frozen", "refit_head": True}
    first = visiontune.train(tiny_data, out=str(tmp_path / "first"), **settings)
    features = tmp_path / "cache" / "features"
    parts = sorted(features.glob("*.npy"))
    for part in parts:
        part.write_bytes(b"not an array")  # every part: the features' and the frozen outputs'
    reads = _stored_reads(monkeypatch)
    again = visiontune.train(tiny_data, out=str(tmp_path / "again"), **settings)
    assert sum(reads) == 0
    for a, b in zip(read_metrics(first.path, timing=False), read_metrics(again.path, timing=False), strict=True):
        assert a["val_acc"] == b["val_acc"] and float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), rel=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_stored_outputs_read_back_as_they_were_kept(tiny_data, tmp_path, channels_last):
    model = _frozen_model("test_efficientnet", 3)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    paths = sorted(tiny_data.rglob("*.png"))[:5]
    store = FeatureCache(tmp_path, {"the test's": "key"})
    first = FrozenPrefix(model, 1 << 30, store=store)
    features = _features(model, paths, first, channels_last=channels_last)
    assert first.written_images == 5 and first.read_images == 0 and first.image_channels_last == channels_last
    second = FrozenPrefix(model, 1 << 30, store=store)
    again = _features(model, paths, second, channels_last=channels_last)
    # Every image started from the stored output: none was decoded or run through the frozen layers.
    assert second.read_images == 5 and second.resumed_images == 5 and second.written_images == 0
    for identity, output in first.outputs.items():
        assert torch.equal(second.outputs[identity], output)
        assert second.outputs[identity].stride() == output.stride()  # the layout the later passes batch in
    assert torch.equal(features, again)


def test_a_store_that_cannot_be_written_leaves_the_run_as_it_was(tiny_data, tiny_settings, tmp_path, monkeypatch,
                                                                capsys):
    settings = {**tiny_settings, "epochs": 2, "bn": "frozen", "refit_head": True}
    whole = visiontune.train(tiny_data, out=str(tmp_path / "whole"), frozen_cache_gb=0, **settings)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FeatureCache, "new_part", disk_full)
    capsys.readouterr()
    full = visiontune.train(tiny_data, out=str(tmp_path / "full"), cache_dir=str(tmp_path / "other"),
                            **{k: v for k, v in settings.items() if k != "cache_dir"})
    warnings = [line for line in capsys.readouterr().err.splitlines() if "could not keep the frozen" in line]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert not list((tmp_path / "other" / "features").glob(".part.*"))
    for a, b in zip(read_metrics(whole.path, timing=False), read_metrics(full.path, timing=False), strict=True):
        assert a["val_acc"] == b["val_acc"] and float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), rel=1e-5)
