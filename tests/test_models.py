"""cnn and resmlp: their block structure, init, the monitor on them, and the config rules they bring."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import compose
from nrexp.config import NORMS, ConfigError, validate
from nrexp.init import init_weights
from nrexp.models import Dropout, build_model, weight_layers
from nrexp.monitor import LayerMonitor
from nrexp.optim import build_optimizer

CNN = ["model=cnn", "model.channels=[4,8,16]", "model.blocks_per_stage=2", "norm.groups=2"]
RESMLP = ["model=resmlp", "model.depth=3", "model.width=16", "norm.groups=2"]


def build(overrides, input_shape=(1, 28, 28)):
    cfg = compose(overrides)
    validate(cfg)
    model = build_model(cfg, input_shape, 10)
    init_weights(model, cfg.init.name, cfg.init.scale, "relu")
    return cfg, model


def test_cnn_blocks_stages_and_pooling():
    _, model = build(CNN)
    assert list(model.monitored_layers()) == [f"block{i:02d}" for i in range(6)] + ["head"]
    activations = []
    out = model(torch.randn(2, 1, 28, 28), activations)
    # a 2x2 max pool ends every stage but the last: 28 -> 14 -> 7
    assert [tuple(a.shape[1:]) for a in activations] == [
        (4, 28, 28),
        (4, 14, 14),
        (8, 14, 14),
        (8, 7, 7),
        (16, 7, 7),
        (16, 7, 7),
        (10,),
    ]
    assert out.shape == (2, 10)
    assert all(isinstance(m, nn.Conv2d) for name, m in model.monitored_layers().items() if name != "head")
    # global average pooling: any image size goes through, e.g. CIFAR-10's 3 x 32 x 32
    _, colour = build(CNN, (3, 32, 32))
    assert colour(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("spatial,kind", [(False, Dropout), (True, nn.Dropout2d)])
def test_cnn_dropout_kind(spatial, kind):
    _, model = build(CNN + ["dropout.p=0.3", f"dropout.spatial={spatial}"])
    assert type(model.blocks["block00"].dropout) is kind
    if spatial:  # whole feature maps are dropped: each (example, channel) map is all zero or all kept
        y = model.blocks["block00"].dropout.train()(torch.ones(64, 4, 5, 5))
        per_map = y.flatten(2)
        assert ((per_map == 0).all(-1) | (per_map != 0).all(-1)).all()


def test_resmlp_blocks_and_skip():
    cfg, model = build(RESMLP)
    assert list(model.monitored_layers()) == ["stem", "block00", "block01", "block02", "head"]
    block = model.blocks["block00"]
    assert [tuple(m.weight.shape) for m in weight_layers(block)] == [(8, 16), (16, 8)]  # width/2 inside
    # with its second layer zeroed, a block returns act(x + 0) = x for a post-ReLU input: the skip path
    with torch.no_grad():
        block.fc2.weight.zero_(), block.fc2.bias.zero_()
    x = torch.relu(torch.randn(4, 16))
    assert torch.equal(block(x), x)
    activations = []
    assert model(torch.randn(4, 1, 28, 28), activations).shape == (4, 10)
    assert [tuple(a.shape) for a in activations] == [(4, 16)] * 4 + [(4, 10)]


@pytest.mark.parametrize("model_args", [CNN, RESMLP, ["model=mlp", "model.width=16", "norm.groups=2"]])
@pytest.mark.parametrize("norm", NORMS)
def test_every_model_trains_with_every_norm(model_args, norm):
    if norm == "instance" and "model=cnn" not in model_args:
        with pytest.raises(ConfigError, match="norm='instance' is invalid"):
            validate(compose(model_args + [f"norm={norm}"]))
        return
    torch.manual_seed(0)
    cfg, model = build(model_args + [f"norm={norm}"])
    opt = build_optimizer(model, cfg.optim)
    monitor = LayerMonitor(model.monitored_layers())
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    activations = []
    loss = F.cross_entropy(model(x, activations), y)
    loss.backward()
    stats = monitor.before_step(activations)
    opt.step()
    host, _ = monitor.to_host(monitor.after_step(stats), {})
    assert set(host) == {"act_norm", "act_cos", "grad_norm", "weight_norm", "weight_change", "update_ratio"}
    for metric, per_layer in host.items():
        assert list(per_layer) == list(model.monitored_layers()), metric
        assert all(math.isfinite(v) for v in per_layer.values()), (metric, per_layer)
    assert all(v > 0 for v in host["update_ratio"].values())
    model.eval()
    assert model(x).shape == (8, 10)


def test_init_reaches_every_conv_and_both_layers_of_residual_blocks():
    torch.manual_seed(0)
    _, model = build(["model=cnn", "model.channels=[64,64]", "model.blocks_per_stage=1", "init=normal", "init.scale=2"])
    conv = model.blocks["block01"].conv  # fan_in = 64 x 3 x 3
    assert conv.weight.var().item() == pytest.approx(2.0 / (64 * 9), rel=0.05)
    assert torch.count_nonzero(conv.bias) == 0
    _, model = build(["model=resmlp", "model.width=512", "init=normal", "init.scale=2"])
    for layer in weight_layers(model.blocks["block01"]):
        assert layer.weight.var().item() == pytest.approx(2.0 / layer.weight.shape[1], rel=0.05)
        assert torch.count_nonzero(layer.bias) == 0


def test_init_under_weight_norm_sets_the_effective_weight():
    torch.manual_seed(0)
    _, plain = build(["model.width=300", "model.depth=1", "init=normal", "init.scale=2"])
    torch.manual_seed(0)
    _, normed = build(["model.width=300", "model.depth=1", "init=normal", "init.scale=2", "norm=weight"])
    layer = normed.blocks["block00"].linear
    # the same draw as without weight norm, and g holds each row's length
    assert torch.allclose(layer.weight, plain.blocks["block00"].linear.weight, atol=1e-6)
    g = layer.parametrizations.weight.original0
    assert torch.allclose(g.flatten(), layer.weight.norm(dim=1), rtol=1e-5)
    # g is a gain (not decayed by default); v is a weight (decayed)
    cfg = compose(["norm=weight", "optim.weight_decay=0.1", "model.depth=1"])
    model = build_model(cfg, (1, 28, 28), 10)
    groups = build_optimizer(model, cfg.optim).param_groups
    decayed = {id(p) for p in groups[0]["params"]}
    wn = model.blocks["block00"].linear.parametrizations.weight
    assert id(wn.original1) in decayed and id(wn.original0) not in decayed


def test_monitor_follows_weight_norm_and_residual_blocks():
    """Effective weights are read afresh (not stale after a step); a residual block counts both its layers."""
    torch.manual_seed(0)
    cfg, model = build(RESMLP + ["norm=weight", "optim.momentum=0"])
    opt = build_optimizer(model, cfg.optim)
    monitor = LayerMonitor(model.monitored_layers())
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def block_weights(name):
        return [m.weight.detach().clone() for m in weight_layers(model.monitored_layers()[name])]

    def joint_norm(tensors):
        return math.sqrt(sum(t.norm().item() ** 2 for t in tensors))

    # an independent dL/dW of the effective weights: a plain copy of the net with those weights as leaves
    names = list(model.monitored_layers())
    before = {n: block_weights(n) for n in names}
    leaves = {n: [w.clone().requires_grad_(True) for w in before[n]] for n in names}
    params = dict(model.named_parameters())
    blocks = model.blocks
    h = torch.relu(F.linear(x.flatten(1), leaves["stem"][0], params["stem.bias"]))
    for n, block in blocks.items():
        w1, w2 = leaves[n]
        inner = torch.relu(F.linear(h, w1, block.fc1.bias))
        h = torch.relu(h + F.linear(inner, w2, block.fc2.bias))
    F.cross_entropy(F.linear(h, leaves["head"][0], model.head.bias), y).backward()

    opt.zero_grad()
    activations = []
    F.cross_entropy(model(x, activations), y).backward()
    stats = monitor.before_step(activations)
    opt.step()
    host, _ = monitor.to_host(monitor.after_step(stats), {})
    for n in names:
        after = block_weights(n)
        assert host["weight_norm"][n] == pytest.approx(joint_norm(before[n]), rel=1e-5), n
        assert host["grad_norm"][n] == pytest.approx(joint_norm([w.grad for w in leaves[n]]), rel=1e-3), n
        delta = joint_norm([a - b for a, b in zip(after, before[n])])
        assert delta > 0
        assert host["update_ratio"][n] == pytest.approx(delta / joint_norm(before[n]), rel=1e-3), n
    # a second call sees the new weights, not the ones of construction time
    stats = monitor.before_step(activations)
    assert stats["weight_norm"][1].item() == pytest.approx(joint_norm(block_weights("block00")), rel=1e-5)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["norm=instance"], "norm='instance' is invalid: needs conv feature maps"),
        (["norm=group", "norm.groups=3"], "norm.groups=3 is invalid: must divide the channels/width"),
        (["norm=group", "norm.groups=256"], "leaves groups of one feature"),
        (
            CNN + ["norm=group", "norm.groups=3"],
            "norm.groups=3 is invalid: must divide the channels/width of every normalized layer (4, 8, 16)",
        ),
        (["data=cifar10", "data.source=bundled"], "data.source='bundled' is invalid: only mnist has a sample bundled"),
        (["data=fashion_mnist", "data.source=bundled"], "Fix: put the fashion_mnist files under data.root"),
        (["model=cnn", "model.channels=[]"], "model.channels=[] is invalid"),
        (["model=cnn", "model.blocks_per_stage=0"], "model.blocks_per_stage=0 is invalid"),
        (["model=resmlp", "model.width=1"], "model.width=1 is invalid"),
        (["norm.groups=0"], "norm.groups=0 is invalid"),
    ],
)
def test_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides))
    assert message in str(err.value) and "Fix:" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides,suggested",
    [
        (["norm.groups=7"], 32),
        (["norm.groups=256"], 32),  # 256 units: 32 groups of 8
        (["model.width=6", "norm.groups=4"], 3),
        (["model.width=6", "norm.groups=6"], 3),
        (CNN + ["norm.groups=3"], 4),  # channels 4, 8, 16: a conv group of one channel is fine (spatial positions)
        (["model.width=6", "norm.groups=0"], 3),  # not the generic 8, which 6 units reject
    ],
)
def test_the_groups_a_norm_groups_error_suggests_are_accepted(overrides, suggested):
    with pytest.raises(ConfigError, match=rf"e\.g\. norm\.groups={suggested}$"):
        validate(compose(["norm=group", *overrides]))
    validate(compose(["norm=group", *overrides, f"norm.groups={suggested}"]))
    with pytest.raises(ConfigError, match=r"widen the layers \(model\.width\) or use another norm$"):
        validate(compose(["norm=group", "model.width=1", "norm.groups=1"]))


def test_cnn_input_shape_errors_are_one_line():
    cfg = compose(["model=cnn", "model.channels=[2,2,2,2,2,2]"])
    validate(cfg)  # the shape rule needs the data: checked when the model is built
    with pytest.raises(ConfigError, match=r"6 stages halve a 28x28 input 5 times, below 1x1\. Fix: use at most 5"):
        build_model(cfg, (1, 28, 28), 10)
    build_model(cfg, (3, 32, 32), 10)  # 32 -> 1x1 after 5 halvings: fine
    with pytest.raises(ConfigError, match="needs image input"):
        build_model(cfg, (784,), 10)
    cfg = compose(["model=cnn", "model.channels=[2,2,2,2,2]", "norm=instance"])
    with pytest.raises(ConfigError, match="the last cnn stage is 1x1"):
        build_model(cfg, (1, 28, 28), 10)
