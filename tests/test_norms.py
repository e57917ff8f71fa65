"""Every normalization against its formula, by number, on conv feature maps and on activation matrices.

For a conv feature map of shape (N, C, H, W) the course notes say: BatchNorm keeps one mean/variance per
channel over N x H x W; LayerNorm one per example over C x H x W. Group, instance and RMS norm are
checked over their own axes the same way, in training and in evaluation mode.
"""

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from nrexp.monitor import weight_grad
from nrexp.norms import make_norm, normalize_weights

EPS = 1e-5


def norm_cfg(name, **kw):
    return OmegaConf.create(
        {"name": name, "eps": EPS, "affine": True, "momentum": 0.1, "groups": 2, "position": "before_act", **kw}
    )


def with_random_affine(layer: nn.Module, seed: int = 1) -> nn.Module:
    """Gains and shifts away from 1 and 0, so that the test sees they are applied per channel."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.rand(p.shape, generator=gen) + (0.5 if name == "weight" else -0.5))
    return layer


def feature_map(seed: int = 0) -> torch.Tensor:
    """(N=3, C=4, H=2, W=3) with a different scale and offset per channel and per example."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 2, 3, generator=gen, dtype=torch.float64)
    return (
        x * torch.tensor([0.5, 1.0, 2.0, 4.0]).view(1, 4, 1, 1)
        + torch.tensor([-2.0, 0.0, 1.0, 3.0]).view(1, 4, 1, 1)
        + torch.tensor([0.0, 5.0, -5.0]).view(3, 1, 1, 1)
    ).float()


def test_conv_batchnorm_one_mean_and_variance_per_channel_over_n_h_w():
    """The notes' pseudo-code, written out: for each channel, gather its N x H x W values."""
    x = feature_map()
    n_, c_, h_, w_ = x.shape
    bn = with_random_affine(make_norm(norm_cfg("batch"), 4, conv=True)).train()
    assert isinstance(bn, nn.BatchNorm2d)
    y = bn(x)
    for c in range(c_):
        values = [x[n, c, i, j].item() for n in range(n_) for i in range(h_) for j in range(w_)]
        mu = sum(values) / len(values)
        var = sum((v - mu) ** 2 for v in values) / len(values)  # biased, as in the normalization
        gamma, beta = bn.weight[c].item(), bn.bias[c].item()
        for n in range(n_):
            for i in range(h_):
                for j in range(w_):
                    expected = gamma * (x[n, c, i, j].item() - mu) / math.sqrt(var + EPS) + beta
                    assert y[n, c, i, j].item() == pytest.approx(expected, abs=1e-4)
        # running statistics after one step with momentum 0.1 (variance stored unbiased)
        assert bn.running_mean[c].item() == pytest.approx(0.1 * mu, abs=1e-5)
        assert bn.running_var[c].item() == pytest.approx(0.9 + 0.1 * var * len(values) / (len(values) - 1), rel=1e-5)
    # evaluation uses the running statistics, per channel, and no longer couples the examples
    bn.eval()
    probe = feature_map(seed=3)
    rm, rv = bn.running_mean.view(1, 4, 1, 1), bn.running_var.view(1, 4, 1, 1)
    expected = (probe - rm) / torch.sqrt(rv + EPS) * bn.weight.view(1, 4, 1, 1) + bn.bias.view(1, 4, 1, 1)
    assert torch.allclose(bn(probe), expected, atol=1e-5)
    assert torch.allclose(bn(probe[:1]), bn(probe)[:1], atol=1e-6)


def _standardize(x: torch.Tensor, dims) -> torch.Tensor:
    mu = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + EPS)


# name -> the formula on (N, C, H, W) before the per-channel gain/shift
CONV_FORMULAS = {
    "layer": lambda x: _standardize(x, (1, 2, 3)),  # per example over C x H x W
    "group": lambda x: _standardize(x.reshape(3, 2, 2, 2, 3), (2, 3, 4)).reshape(x.shape),  # G=2: 2 channels x H x W
    "instance": lambda x: _standardize(x, (2, 3)),  # per example and channel over H x W
    "rms": lambda x: x / torch.sqrt(x.pow(2).mean(dim=(1, 2, 3), keepdim=True) + EPS),  # no mean removed
}


@pytest.mark.parametrize("name", sorted(CONV_FORMULAS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_conv_norms_match_their_formula(name, mode):
    x = feature_map()
    layer = with_random_affine(make_norm(norm_cfg(name), 4, conv=True))
    layer.train(mode == "train")
    gamma = layer.weight.view(1, 4, 1, 1)
    beta = layer.bias.view(1, 4, 1, 1) if getattr(layer, "bias", None) is not None else 0.0
    expected = CONV_FORMULAS[name](x) * gamma + beta
    assert torch.allclose(layer(x), expected, atol=1e-5), name
    # one gain per channel: the layer does not depend on the image size
    assert layer.weight.shape == (4,)
    # each example is normalized alone: a batch of one gives the same numbers
    assert torch.allclose(layer(x[1:2]), layer(x)[1:2], atol=1e-6)


def test_hand_worked_instance_and_rms_numbers():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # N = C = 1, H = W = 2
    cfg = norm_cfg("instance", affine=False)
    y = make_norm(cfg, 1, conv=True)(x)
    s = math.sqrt(1.25 + EPS)  # mean 2.5, variance (1.5^2 + 0.5^2) * 2 / 4 = 1.25
    assert y.flatten().tolist() == pytest.approx([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s], abs=1e-6)
    y = make_norm(norm_cfg("rms", affine=False), 1, conv=True)(x)
    rms = math.sqrt((1 + 4 + 9 + 16) / 4 + EPS)  # 2.7386
    assert y.flatten().tolist() == pytest.approx([1 / rms, 2 / rms, 3 / rms, 4 / rms], abs=1e-6)


# the same family on a 2-D activation matrix (N, D), as in mlp and resmlp
MATRIX_FORMULAS = {
    "layer": lambda x: _standardize(x, 1),
    "batch": lambda x: _standardize(x, 0),
    "group": lambda x: _standardize(x.reshape(8, 2, 3), 2).reshape(8, 6),  # G=2 groups of 3 features
    "rms": lambda x: x / torch.sqrt(x.pow(2).mean(dim=1, keepdim=True) + EPS),
}


@pytest.mark.parametrize("name", sorted(MATRIX_FORMULAS))
def test_matrix_norms_match_their_formula_in_training(name):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, generator=gen) * torch.linspace(0.5, 3, 6) + torch.linspace(-2, 2, 6)
    layer = with_random_affine(make_norm(norm_cfg(name), 6)).train()
    beta = layer.bias if getattr(layer, "bias", None) is not None else 0.0
    assert torch.allclose(layer(x), MATRIX_FORMULAS[name](x) * layer.weight + beta, atol=1e-5), name
    if name != "batch":  # per-example norms: evaluation mode computes exactly the same
        assert torch.allclose(layer.eval()(x), layer.train()(x))


def test_instance_norm_has_no_matrix_form():
    with pytest.raises(ValueError):
        make_norm(norm_cfg("instance"), 6)  # config.validate() gives users the one-line reason


@pytest.mark.parametrize("conv", [False, True])
def test_weight_norm_reparametrizes_each_output_unit(conv):
    torch.manual_seed(0)
    base = nn.Conv2d(3, 4, 3, padding=1) if conv else nn.Linear(5, 4)
    layer = normalize_weights(base, norm_cfg("weight"))
    assert make_norm(norm_cfg("weight"), 4, conv=conv).__class__ is nn.Identity  # activations untouched
    wn = layer.parametrizations.weight
    g, v = wn.original0, wn.original1
    with torch.no_grad():
        g.copy_(torch.tensor([0.5, 1.0, 2.0, -3.0]).view_as(g))
        v.mul_(torch.linspace(0.1, 4, v.numel()).view_as(v))
    # w = g v / ||v||, per output unit (row; for conv the C_in x k x k filter)
    for i in range(4):
        expected = g.flatten()[i] * v[i] / v[i].norm()
        assert torch.allclose(layer.weight[i], expected, atol=1e-6)
        assert layer.weight[i].norm().item() == pytest.approx(abs(g.flatten()[i].item()), rel=1e-5)
    # the layer computes with that weight, in training and evaluation alike
    x = torch.randn(2, 3, 5, 5) if conv else torch.randn(2, 5)
    w_eff = layer.weight.detach().clone().requires_grad_(True)
    f = nn.functional.conv2d if conv else nn.functional.linear
    kwargs = {"padding": 1} if conv else {}
    reference = f(x, w_eff, layer.bias.detach(), **kwargs)
    assert torch.allclose(layer.train()(x), reference, atol=1e-5)
    assert torch.allclose(layer.eval()(x), reference, atol=1e-5)
    # the monitor's dL/dW, rebuilt from dL/dg and dL/dv by the chain rule, equals autograd's dL/dW
    target = torch.randn_like(reference)
    ((layer(x) - target) ** 2).sum().backward()
    ((reference - target) ** 2).sum().backward()
    assert torch.allclose(weight_grad(layer), w_eff.grad, atol=1e-4, rtol=1e-4)
