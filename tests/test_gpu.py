"""CUDA paths: device placement, bf16/fp16, determinism, torch.compile. Skipped without a GPU;
bench/gpu_check.sh runs them on the device machine (`pytest -m gpu`)."""

from __future__ import annotations


import pytest
import torch

import visiontune
from visiontune.evaluation import evaluate_run

from .conftest import StopInEpoch, assert_same_run, stop_in_epoch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_trains_on_the_gpu_and_val_matches_a_cpu_eval(tiny_data, tiny_settings, tmp_path, precision):
    run = visiontune.train(tiny_data, out=str(tmp_path / "run"), device="cuda", precision=precision,
                           **{**tiny_settings, "epochs": 3, "channels_last": True})
    assert next(run.model.parameters()).device.type == "cuda"
    assert torch.backends.cudnn.allow_tf32 == (precision != "fp32")  # fp32 convolutions stay fp32
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in run.metrics)
    on_cpu = evaluate_run(run.path, device="cpu")
    # fp32: the same decisions; bf16/fp16 round the logits, which may flip one borderline image, no more.
    one_image = 1 / on_cpu["n"]
    assert abs(on_cpu["accuracy"] - run.best_val_acc) <= (1e-12 if precision == "fp32" else one_image + 1e-12)
    # Mixed precision evaluates in reduced precision; fp32 on GPU and CPU differ in rounding only.
    assert on_cpu["loss"] == pytest.approx(run.best_val_loss, abs=1e-3 if precision == "fp32" else 5e-2)


def test_deterministic_gpu_runs_repeat_exactly(tiny_data, tiny_settings, tmp_path):
    settings = {**tiny_settings, "epochs": 3, "device": "cuda", "precision": "fp32", "deterministic": True}
    a = visiontune.train(tiny_data, out=str(tmp_path / "a"), **settings)
    b = visiontune.train(tiny_data, out=str(tmp_path / "b"), **settings)
    assert_same_run(a, b)


def test_fixed_mode_features_on_the_gpu_match_the_cpu(tiny_data, tiny_settings, tmp_path):
    gpu = visiontune.train(tiny_data, out=str(tmp_path / "gpu"), mode="fixed", device="cuda", precision="fp32",
                           **{**tiny_settings, "epochs": 3, "cache_dir": str(tmp_path / "c1")})
    cpu = visiontune.train(tiny_data, out=str(tmp_path / "cpu"), mode="fixed", device="cpu",
                           **{**tiny_settings, "epochs": 3, "cache_dir": str(tmp_path / "c2")})
    for a, b in zip(gpu.metrics, cpu.metrics):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-3)


def test_fp16_resume_equals_the_uninterrupted_run(tiny_data, tiny_settings, tmp_path, monkeypatch):
    # fp16 trains through a GradScaler whose scale moves with overflowing steps: last.ckpt carries its
    # state, so a resumed run takes exactly the steps the uninterrupted one took.
    from visiontune import checkpoint

    settings = {**tiny_settings, "epochs": 4, "device": "cuda", "precision": "fp16", "deterministic": True}
    whole = visiontune.train(tiny_data, out=str(tmp_path / "whole"), **settings)
    with monkeypatch.context() as patch:
        stop_in_epoch(patch, 3)
        with pytest.raises(StopInEpoch):
            visiontune.train(tiny_data, out=str(tmp_path / "split"), **settings)
    saved = checkpoint.load_training_state(tmp_path / "split" / "last.ckpt")
    assert saved["epoch"] == 2 and saved["scaler"] is not None and saved["scaler"]["scale"] > 0
    assert_same_run(whole, visiontune.resume(tmp_path / "split"))


# Last: compiling is the slowest test, and the device call has a time limit.
def test_compiled_training_tracks_eager_and_saves_usable_weights(tiny_data, tiny_settings, tmp_path):
    settings = {**tiny_settings, "epochs": 2, "device": "cuda", "precision": "fp32"}
    compiled = visiontune.train(tiny_data, out=str(tmp_path / "compiled"), compile=True, **settings)
    eager = visiontune.train(tiny_data, out=str(tmp_path / "eager"), **settings)
    # Same data order and augmentation draws: fused kernels change rounding, not the training.
    for c, e in zip(compiled.metrics, eager.metrics, strict=True):
        assert c["train_loss"] == pytest.approx(e["train_loss"], abs=2e-2)
    # The checkpoint holds the plain model's keys (no torch.compile wrapper prefix) and reproduces the
    # logged val loss when re-evaluated on the CPU.
    on_cpu = evaluate_run(compiled.path, device="cpu")
    assert on_cpu["loss"] == pytest.approx(compiled.best_val_loss, abs=1e-3)
