"""nrexp.evaluate.evaluate: the one evaluation of a model on a split (training's and `nrexp evaluate`'s)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nrexp.evaluate import evaluate


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))


def data(n=13):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def test_running_stats_by_hand_and_the_mode_is_restored():
    model, (x, y) = net(), data()
    model.train()
    result = evaluate(model, x, y, 5, "test")
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert set(result) == {"test/loss", "test/acc"}
    assert result["test/loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert result["test/acc"] == int((logits.argmax(1) == y).sum()) / len(y)  # exact: a count over n


def test_test_batch_stats_leave_the_stored_statistics_alone():
    model, (x, y) = net(), data(12)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = evaluate(model, x, y, 12, "test", bn_stats="test")
    assert not model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    twin = net()
    twin.eval()
    twin[1].train()  # BatchNorm with the batch's own statistics, dropout off
    with torch.no_grad():
        logits = twin(x)
    assert result["test/acc"] == int((logits.argmax(1) == y).sum()) / len(y)


def test_test_batch_stats_with_a_last_batch_of_one():
    """BatchNorm cannot normalize one example: the last one is evaluated beside its predecessor."""
    model, (x, y) = net(), data(11)
    result = evaluate(model, x, y, 5, "train", bn_stats="test")
    assert set(result) == {"train/loss", "train/acc"} and 0 <= result["train/acc"] <= 1
