"""The building blocks against the formulas of the course notes, by number."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import compose
from nrexp.init import init_weights
from nrexp.models import build_model
from nrexp.norms import make_norm
from nrexp.optim import build_optimizer


def norm_cfg(name, **kw):
    return OmegaConf.create(
        {"name": name, "eps": 1e-5, "affine": True, "momentum": 0.1, "position": "before_act", **kw}
    )


def test_layernorm_normalizes_each_row():
    x = torch.randn(16, 50) * 3 + 7
    y = make_norm(norm_cfg("layer"), 50)(x)
    assert torch.allclose(y.mean(dim=1), torch.zeros(16), atol=1e-5)
    assert torch.allclose(y.var(dim=1, unbiased=False), torch.ones(16), atol=1e-3)
    # the columns are *not* normalized: that is BatchNorm's job
    assert y.mean(dim=0).abs().max() > 0.1


def test_batchnorm_normalizes_each_column():
    x = torch.randn(64, 20) * torch.linspace(0.5, 5, 20) + torch.linspace(-3, 3, 20)
    y = make_norm(norm_cfg("batch"), 20).train()(x)
    assert torch.allclose(y.mean(dim=0), torch.zeros(20), atol=1e-5)
    assert torch.allclose(y.var(dim=0, unbiased=False), torch.ones(20), atol=1e-3)


def test_batchnorm_worked_example_2x3x4():
    """N=2 examples, C=3 channels, L=4 positions: one mean/variance per channel over N x L = 8 values.

    Channel 0 holds 0,1,2,3 and 12,13,14,15: mean 7.5, biased variance
    2 * (7.5^2 + 6.5^2 + 5.5^2 + 4.5^2) / 8 = 37.25. Channels 1 and 2 are shifted by 4 and 8.
    """
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    bn = nn.BatchNorm1d(3, eps=1e-5, momentum=0.1).train()  # what norm=batch builds, on (N, C, L) input
    y = bn(x)
    expected_mean, expected_var = torch.tensor([7.5, 11.5, 15.5]), 37.25
    # the notes' pseudo-code, written out: loop over channels, gather N x L values
    for c in range(3):
        values = [x[n, c, l].item() for n in range(2) for l in range(4)]
        mu = sum(values) / 8
        var = sum((v - mu) ** 2 for v in values) / 8
        assert mu == pytest.approx(expected_mean[c].item())
        assert var == pytest.approx(expected_var)
        for n in range(2):
            for l in range(4):
                assert y[n, c, l].item() == pytest.approx((x[n, c, l].item() - mu) / math.sqrt(var + 1e-5), abs=1e-5)
    assert y[0, 0, 0].item() == pytest.approx(-7.5 / math.sqrt(37.25 + 1e-5), abs=1e-5)  # -1.2288
    # running statistics after one step with momentum 0.1 (the variance is stored unbiased, /7)
    assert torch.allclose(bn.running_mean, 0.1 * expected_mean)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * torch.full((3,), 37.25 * 8 / 7))


def test_eval_mode_batchnorm_uses_running_statistics():
    bn = make_norm(norm_cfg("batch", momentum=0.5), 4)
    x = torch.randn(32, 4) * 2 + 1
    bn.train()(x)
    bn.eval()
    probe = torch.randn(5, 4)
    expected = (probe - bn.running_mean) / torch.sqrt(bn.running_var + 1e-5) * bn.weight + bn.bias
    assert torch.allclose(bn(probe), expected, atol=1e-6)
    # and one example alone gives the same answer as inside a batch: no coupling at test time
    assert torch.allclose(bn(probe[:1]), bn(probe)[:1], atol=1e-6)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout_keeps_the_expectation_and_is_identity_in_eval(p):
    torch.manual_seed(0)
    cfg = compose(["model.depth=1", "model.width=8", f"dropout.p={p}"])
    model = build_model(cfg, (1, 28, 28), 10)
    dropout = model.blocks["block00"].dropout
    x = torch.full((2000, 500), 3.0)
    y = dropout.train()(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(1 - p, abs=0.01)  # zeroed with probability p
    assert torch.allclose(y[kept], torch.full_like(y[kept], 3.0 / (1 - p)))  # the rest scaled by 1/(1-p)
    assert y.mean().item() == pytest.approx(3.0, rel=0.01)  # so the expectation is unchanged
    assert torch.equal(dropout.eval()(x), x)


def test_dropout_draws_the_masks_f_dropout_draws_on_cpu():
    """nrexp's Dropout is F.dropout's CPU computation on every device (bernoulli_(1 - p), / (1 - p)):
    on the CPU, from the same random state, the very same output; a wrong keep probability, another
    draw or another order of operations would not give torch.equal."""
    import torch.nn.functional as F

    from nrexp.models import Dropout

    x = torch.randn(64, 300)
    for p in (0.1, 0.5):
        torch.manual_seed(7)
        ours = Dropout(p).train()(x)
        torch.manual_seed(7)
        assert torch.equal(ours, F.dropout(x, p, training=True)), p
        assert torch.equal(Dropout(p).eval()(x), x)


def test_sgd_weight_decay_shrinks_by_one_minus_lr_lambda():
    torch.manual_seed(0)
    cfg = compose(["optim=sgd", "optim.momentum=0", "optim.lr=0.1", "optim.weight_decay=0.01", "model.depth=1"])
    model = build_model(cfg, (1, 28, 28), 10)
    opt = build_optimizer(model, cfg.optim)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = model(torch.randn(8, 1, 28, 28)).square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        if p.ndim >= 2:  # weights: (1 - lr*lambda) W - lr * grad
            assert torch.allclose(p, (1 - 0.1 * 0.01) * w0[n] - 0.1 * grads[n], atol=1e-7), n
        else:  # biases are not decayed by default
            assert torch.allclose(p, w0[n] - 0.1 * grads[n], atol=1e-7), n


def test_adamw_decay_is_decoupled_and_adam_decay_is_coupled():
    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28)
    for name, coupled in (("adamw", False), ("adam", True)):
        cfg = compose([f"optim={name}", "optim.lr=0.01", "optim.weight_decay=0.5", "model.depth=1"])
        torch.manual_seed(1)
        model = build_model(cfg, (1, 28, 28), 10)
        w0 = model.head.weight.detach().clone()
        opt = build_optimizer(model, cfg.optim)
        model(x).square().mean().backward()
        g = model.head.weight.grad.clone()
        opt.step()
        eps = 1e-8
        if coupled:  # first Adam step on g + lambda*W: m_hat / (sqrt(v_hat) + eps) with m_hat = that gradient
            g_total = g + 0.5 * w0
            expected = w0 - 0.01 * g_total / (g_total.abs() + eps)
        else:  # shrink first, then the Adam step of g alone
            expected = w0 * (1 - 0.01 * 0.5) - 0.01 * g / (g.abs() + eps)
        assert torch.allclose(model.head.weight, expected, atol=1e-6), name


def test_decay_norm_and_bias_switch():
    cfg = compose(["norm=batch", "optim.weight_decay=0.1"])
    model = build_model(cfg, (1, 28, 28), 10)
    groups = build_optimizer(model, cfg.optim).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and all(p.ndim == 1 for p in groups[1]["params"])
    cfg = compose(["norm=batch", "optim.weight_decay=0.1", "optim.decay_norm_and_bias=true"])
    assert [g["weight_decay"] for g in build_optimizer(build_model(cfg, (1, 28, 28), 10), cfg.optim).param_groups] == [
        0.1,
        0.1,
    ]


@pytest.mark.parametrize(
    "scheme,scale,expected_var",
    [
        ("normal", 1.0, lambda n_in, n_out: 1.0 / n_in),
        ("normal", 2.0, lambda n_in, n_out: 2.0 / n_in),
        ("normal", 3.0, lambda n_in, n_out: 3.0 / n_in),
        ("uniform", 2.0, lambda n_in, n_out: 2.0 / n_in),
        ("kaiming", 1.0, lambda n_in, n_out: 2.0 / n_in),  # ReLU gain^2 = 2
        ("xavier", 1.0, lambda n_in, n_out: 2.0 * 2.0 / (n_in + n_out)),
        ("orthogonal", 1.0, lambda n_in, n_out: 2.0 / max(n_in, n_out)),  # rows or columns of norm gain
    ],
)
def test_init_variance(scheme, scale, expected_var):
    torch.manual_seed(0)
    cfg = compose([f"init={scheme}", f"init.scale={scale}", "model.depth=2", "model.width=600"])
    model = build_model(cfg, (1, 28, 28), 10)
    init_weights(model, scheme, scale, "relu")
    for name, layer in model.monitored_layers().items():
        n_out, n_in = layer.weight.shape
        if n_out < 100:
            continue  # the 10-unit head is too small for a tight variance estimate
        assert layer.weight.var().item() == pytest.approx(expected_var(n_in, n_out), rel=0.03), name
        assert torch.count_nonzero(layer.bias) == 0


def test_default_init_is_pytorch_own():
    torch.manual_seed(0)
    cfg = compose(["init=default", "model.depth=1"])
    model = build_model(cfg, (1, 28, 28), 10)
    before = model.head.bias.detach().clone()
    init_weights(model, "default", 1.0, "relu")
    assert torch.equal(model.head.bias, before) and before.abs().sum() > 0


def test_blocks_are_named_for_the_logs():
    model = build_model(compose(["model.depth=12"]), (1, 28, 28), 10)
    assert list(model.monitored_layers()) == [f"block{i:02d}" for i in range(12)] + ["head"]


@pytest.mark.parametrize("position", ["before_act", "after_act"])
def test_norm_position(position):
    cfg = compose(
        [
            "norm=layer",
            f"norm.position={position}",
            "model.depth=1",
            "model.width=16",
            "model.activation=relu",
            "norm.affine=false",
        ]
    )
    block = build_model(cfg, (1, 28, 28), 10).blocks["block00"]
    out = block(torch.randn(4, 784))
    if position == "before_act":  # normalized, then ReLU: no negatives
        assert (out >= 0).all()
    else:  # ReLU, then normalized: each row has mean 0, so some negatives
        assert torch.allclose(out.mean(dim=1), torch.zeros(4), atol=1e-5) and (out < 0).any()
