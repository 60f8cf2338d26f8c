"""The training-loop mechanics, each checked against an independent recomputation."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visiontune.engine import evaluate, is_better, train_one_epoch
from visiontune.recipes import lr_multiplier

from .conftest import approx_loss


def batches_of(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


@pytest.fixture
def toy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(23, 5, generator=g)  # 23: not divisible by 3 or 7, so last batches are partial
    y = torch.randint(0, 3, (23,), generator=g)
    torch.manual_seed(0)
    return x, y, nn.Linear(5, 3)


class BNNet(nn.Module):
    """Small model with BatchNorm and dropout: both behave differently in train and eval."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


def test_zero_grad_once_per_step_matches_manual_sgd(toy):
    """Each step's update uses only that batch's gradient (backward adds into .grad)."""
    x, y, model = toy
    reference = copy.deepcopy(model)
    train_one_epoch(model, batches_of(x, y, 8), torch.optim.SGD(model.parameters(), lr=0.1))
    for xb, yb in batches_of(x, y, 8):
        loss = F.cross_entropy(reference(xb), yb)
        grads = torch.autograd.grad(loss, list(reference.parameters()))
        with torch.no_grad():
            for p, g in zip(reference.parameters(), grads):
                p -= 0.1 * g
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_evaluate_changes_no_parameter_and_no_buffer(toy):
    x, y, _ = toy
    torch.manual_seed(1)
    model = BNNet()
    train_one_epoch(model, batches_of(x, y, 8), torch.optim.SGD(model.parameters(), lr=0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = evaluate(model, batches_of(x, y, 4), keep_outputs=True)
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), f"evaluate changed {k}"
    assert not out.probabilities.requires_grad
    # Deterministic: dropout off and BatchNorm on running statistics.
    assert torch.equal(evaluate(model, batches_of(x, y, 4), keep_outputs=True).probabilities, out.probabilities)
    # The kept per-sample losses are the ones the mean loss is made of.
    assert out.losses.mean().item() == pytest.approx(out.loss, rel=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3, 7, 23])
@pytest.mark.parametrize("weighted", [False, True])
def test_epoch_loss_is_exact_mean_of_per_sample_losses(toy, batch_size, weighted):
    x, y, model = toy
    weights = torch.tensor([0.2, 1.0, 3.0]) if weighted else None
    smoothing = 0.1
    expected = F.cross_entropy(model(x), y, weight=weights, label_smoothing=smoothing, reduction="none")
    expected_loss = expected.sum().item() / len(y)
    expected_acc = (model(x).argmax(1) == y).sum().item() / len(y)

    stats = evaluate(model, batches_of(x, y, batch_size), class_weights=weights, label_smoothing=smoothing)
    assert stats.n == 23
    assert stats.loss == approx_loss(expected_loss)
    assert stats.accuracy == pytest.approx(expected_acc, abs=1e-12)

    # Training with lr=0 leaves the model as it is, so the same reference applies.
    frozen_opt = torch.optim.SGD(model.parameters(), lr=0.0)
    stats = train_one_epoch(model, batches_of(x, y, batch_size), frozen_opt, class_weights=weights,
                            label_smoothing=smoothing)
    assert stats.loss == approx_loss(expected_loss)


def test_tutorial_accounting_is_wrong_with_class_weights(toy):
    """`loss.item() * inputs.size(0)` with a weighted mean loss is not the per-sample mean: why we sum."""
    x, y, model = toy
    weights = torch.tensor([0.2, 1.0, 3.0])
    criterion = nn.CrossEntropyLoss(weight=weights)
    tutorial = sum(criterion(model(xb), yb).item() * xb.size(0) for xb, yb in batches_of(x, y, 7)) / len(y)
    exact = evaluate(model, batches_of(x, y, 7), class_weights=weights).loss
    assert abs(tutorial - exact) > 1e-3


def test_sum_with_lr_over_batch_equals_mean(toy):
    x, y, model = toy
    x, y = x[:21], y[:21]  # 3 full batches of 7
    summed = copy.deepcopy(model)
    train_one_epoch(model, batches_of(x, y, 7), torch.optim.SGD(model.parameters(), lr=0.5), reduction="mean")
    train_one_epoch(summed, batches_of(x, y, 7), torch.optim.SGD(summed.parameters(), lr=0.5 / 7), reduction="sum")
    for p, q in zip(model.parameters(), summed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_frozen_modules_keep_batchnorm_statistics(toy):
    x, y, _ = toy
    torch.manual_seed(0)
    model = BNNet()
    for p in model.body.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.body.state_dict().items()}
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    train_one_epoch(model, batches_of(x, y, 8), opt, frozen=[model.body])
    for k, v in model.body.state_dict().items():
        assert torch.equal(before[k], v), f"frozen {k} changed"


def test_scheduler_steps_after_optimizer_without_warning(toy):
    x, y, model = toy
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_multiplier("cosine", step, 4, 2, 1.0))
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyTorch warns if scheduler.step() comes before optimizer.step()
        for _ in range(2):
            train_one_epoch(model, batches_of(x, y, 6), opt, scheduler=sched)
            seen.append(opt.param_groups[0]["lr"])
    assert sched.last_epoch == 8  # one scheduler step per optimizer step
    assert seen[-1] == pytest.approx(0.0, abs=1e-12)  # cosine ends at zero after 2 epochs


def test_lr_schedules():
    assert lr_multiplier("cosine", 0, 10, 5, 1.0) == pytest.approx(0.1)  # warmup from lr/10
    assert lr_multiplier("cosine", 9, 10, 5, 1.0) == pytest.approx(1.0)
    assert lr_multiplier("cosine", 10, 10, 5, 1.0) == pytest.approx(1.0)
    assert lr_multiplier("cosine", 30, 10, 5, 1.0) == pytest.approx(0.5)
    assert lr_multiplier("step", 69, 10, 25, 0.0) == pytest.approx(1.0)
    assert lr_multiplier("step", 70, 10, 25, 0.0) == pytest.approx(0.1)
    assert lr_multiplier("step", 140, 10, 25, 0.0) == pytest.approx(0.01)


def test_best_epoch_is_highest_accuracy_then_lowest_loss():
    assert is_better(0.9, 0.5, None)
    assert is_better(0.91, 0.9, (0.9, 0.1))
    assert not is_better(0.89, 0.01, (0.9, 0.1))
    assert is_better(0.9, 0.09, (0.9, 0.1))
    assert not is_better(0.9, 0.1, (0.9, 0.1))

