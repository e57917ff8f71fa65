"""nrexp.monitor.watch on a model nrexp did not build (torchvision's resnet18 at 32x32): its numbers against an
independent computation, and scripts/own_model.py end to end through TensorBoard's own reader."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import load_script

torchvision = pytest.importorskip("torchvision")


def test_watch_gives_resnet18s_numbers_as_computed_plainly(tmp_path):
    """act_norm, act_cos, grad_norm, weight_norm and update_ratio of a few layers of resnet18 (the first conv,
    a conv inside a residual block, the final Linear) after one SGD step, against a plain forward through a
    copy of the net with the same weights and autograd.grad; and the events hold what was returned."""
    import nrexp.monitor

    own = load_script("own_model")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    reference = copy.deepcopy(model)  # same weights, same train-mode BatchNorm (batch statistics)
    x, y = own.generated_data(8)
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)  # no momentum: the update is -lr * dL/dW

    w = nrexp.monitor.watch(model, log_dir=tmp_path)
    assert w.names[0] == "conv1" and w.names[-1] == "fc" and "layer1.0.conv1" in w.names
    assert len(w.names) == 21  # 20 Conv2d (17 3x3 or 7x7, 3 downsample 1x1) and fc
    with w.record(True):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    w.before_step()
    opt.step()
    got = w.after_step(0, {"train/loss": loss.item()})
    w.close()

    # independent: the layers' outputs by calling them in order, the gradients by autograd.grad
    r = reference
    conv1 = r.conv1(x)
    block_input = r.maxpool(r.relu(r.bn1(conv1)))
    inner = r.layer1[0].conv1(block_input)
    logits = r(x)
    params = {"conv1": r.conv1.weight, "layer1.0.conv1": r.layer1[0].conv1.weight, "fc": r.fc.weight}
    grads = dict(zip(params, torch.autograd.grad(F.cross_entropy(logits, y), list(params.values()))))
    outputs = {"conv1": conv1, "layer1.0.conv1": inner, "fc": logits}
    for name, out in outputs.items():
        flat = out.detach().flatten(1)
        unit = F.normalize(flat, dim=1)
        gram = unit @ unit.T
        n = len(flat)
        assert got["act_norm"][name] == pytest.approx(flat.norm(dim=1).mean().item(), rel=1e-5), name
        assert got["act_cos"][name] == pytest.approx(
            ((gram.sum() - gram.trace()) / (n * (n - 1))).item(), rel=1e-4, abs=1e-6
        ), name
        assert got["grad_norm"][name] == pytest.approx(grads[name].norm().item(), rel=1e-4), name
        weight = params[name].detach()
        assert got["weight_norm"][name] == pytest.approx(weight.norm().item(), rel=1e-6), name
        assert got["update_ratio"][name] == pytest.approx(
            lr * grads[name].norm().item() / weight.norm().item(), rel=1e-4
        ), name
        assert got["weight_change"][name] == 0.0  # step 0: the weights are still those at init
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("act_norm/layer1.0.conv1")] == [
        (0, pytest.approx(got["act_norm"]["layer1.0.conv1"]))
    ]
    depth = events.Scalars("depth_init/grad_norm")
    assert [e.step for e in depth] == list(range(21))
    assert [e.value for e in depth] == pytest.approx([got["grad_norm"][n] for n in w.names])
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([loss.item()])


def test_own_model_script_trains_and_logs_the_same_tags(tmp_path):
    """scripts/own_model.py: every step's loss is written, logging steps hold every per-layer tag and
    the histograms, and the events hold the numbers main() returned."""
    own = load_script("own_model")
    model, w, logged = own.main(str(tmp_path), steps=6, batch_size=8, log_every=3, histograms=True)
    assert sorted(logged) == [0, 3]
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    tags = set(events.Tags()["scalars"])
    for metric in nrexp_metrics():
        assert {f"{metric}/{name}" for name in w.names} <= tags, metric
    for step in (0, 3):
        for name in ("conv1", "layer4.1.conv2", "fc"):
            values = {e.step: e.value for e in events.Scalars(f"grad_norm/{name}")}
            assert values[step] == pytest.approx(logged[step]["grad_norm"][name])
    hist = events.Histograms("hist_act/fc")
    assert [e.step for e in hist] == [0, 3] and sum(hist[0].histogram_value.bucket) == 8 * 10
    loss = [e.value for e in events.Scalars("train/loss")]
    assert len(loss) == 6 and all(v == v and abs(v) < float("inf") for v in loss)


def nrexp_metrics():
    from nrexp.monitor import LAYER_METRICS

    return LAYER_METRICS
