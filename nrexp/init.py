"""Weight initialization schemes, all parameterized by the variance they give each weight.

With fan_in n (inputs per unit) and `init.scale` s:
- normal:     W ~ N(0, s / n)                     (s = 2 is He/Kaiming for ReLU, the lecture's 2/n)
- uniform:    W ~ U(-a, a) with a = sqrt(3 s / n)  (same variance s / n)
- kaiming:    W ~ N(0, s * g^2 / n), g the gain of the activation (ReLU: g^2 = 2; GELU uses ReLU's)
- xavier:     W ~ N(0, s * g^2 * 2 / (n + fan_out))
- orthogonal: W = sqrt(s) * g * (a random orthogonal matrix)
- default:    PyTorch's own init, untouched (and `scale` ignored)
Biases start at zero (except for `default`). Every monitored layer, the head included, uses the scheme,
so that a 50-layer net initialized with N(0, s/n) is exactly the lecture's experiment; that includes
both Linear layers of a residual block and every conv (fan_in = C_in x k x k).
Under weight normalization the scheme sets the effective weight W: assigning it to `layer.weight`
makes the parametrization store g = ||W row|| and v = W (its right_inverse), so W = g v/||v|| starts
exactly as drawn.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from nrexp.models import weight_layers


def activation_gain(activation: str) -> float:
    return nn.init.calculate_gain("relu" if activation == "gelu" else activation)


@torch.no_grad()
def init_weights(model: nn.Module, name: str, scale: float, activation: str) -> None:
    if name == "default":
        return
    gain = activation_gain(activation)
    layers = [layer for entry in model.monitored_layers().values() for layer in weight_layers(entry)]
    for layer in layers:
        reparametrized = parametrize.is_parametrized(layer, "weight")
        # drawn in place, so the random stream is the same with and without weight norm
        w = torch.empty_like(layer.weight) if reparametrized else layer.weight
        fan_out, fan_in = w.shape[0], w[0].numel()
        if name == "normal":
            w.normal_(0.0, math.sqrt(scale / fan_in))
        elif name == "uniform":
            bound = math.sqrt(3.0 * scale / fan_in)
            w.uniform_(-bound, bound)
        elif name == "kaiming":
            w.normal_(0.0, gain * math.sqrt(scale / fan_in))
        elif name == "xavier":
            w.normal_(0.0, gain * math.sqrt(scale * 2.0 / (fan_in + fan_out)))
        elif name == "orthogonal":
            nn.init.orthogonal_(w, gain=gain * math.sqrt(scale))
        else:
            raise ValueError(f"unknown init {name!r}")  # config.validate() rejects this earlier
        if reparametrized:
            layer.weight = w  # through right_inverse: g and v such that the effective weight is w
        if layer.bias is not None:
            layer.bias.zero_()
