"""Networks with named blocks, so that every per-layer statistic reads `block00 ... blockNN, head`.

Every model's forward takes an optional list; when given, it appends each monitored layer's output
activation to it. The trainer passes a list only on logging steps, so ordinary steps pay nothing
(no forward hooks), and the monitor reads the activations in the order of `monitored_layers()`.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import List, Optional

import torch
from torch import nn

from nrexp.norms import make_norm

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


def _name(value) -> str:
    return getattr(value, "value", value)  # Enum member or plain string


class MLPBlock(nn.Module):
    """Linear -> [norm] -> activation -> [dropout], or Linear -> activation -> [norm] -> [dropout]."""

    def __init__(self, in_features: int, out_features: int, norm_cfg, activation: str, dropout_p: float):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.norm = make_norm(norm_cfg, out_features)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout_p) if dropout_p > 0 else nn.Identity()
        self.norm_before_act = _name(norm_cfg.position) == "before_act"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        x = self.act(self.norm(x)) if self.norm_before_act else self.norm(self.act(x))
        return self.dropout(x)


class MLP(nn.Module):
    """Flatten -> [input dropout] -> `depth` hidden blocks of `width` units -> linear head."""

    def __init__(self, in_features: int, num_classes: int, depth: int, width: int, activation: str,
                 norm_cfg, dropout_p: float = 0.0, input_dropout_p: float = 0.0):
        super().__init__()
        digits = max(2, len(str(depth - 1)))
        self.input_dropout = nn.Dropout(input_dropout_p) if input_dropout_p > 0 else nn.Identity()
        self.blocks = nn.ModuleDict(OrderedDict(
            (f"block{i:0{digits}d}", MLPBlock(in_features if i == 0 else width, width, norm_cfg, activation, dropout_p))
            for i in range(depth)
        ))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor, activations: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        x = self.input_dropout(x.flatten(1))
        for block in self.blocks.values():
            x = block(x)
            if activations is not None:
                activations.append(x)
        x = self.head(x)
        if activations is not None:
            activations.append(x)
        return x

    def monitored_layers(self) -> "OrderedDict[str, nn.Module]":
        """Layer name -> the module holding that layer's weight matrix, in forward order."""
        layers = OrderedDict((name, block.linear) for name, block in self.blocks.items())
        layers["head"] = self.head
        return layers


def build_model(cfg, input_shape, num_classes: int) -> nn.Module:
    """The model named by `cfg.model.name`, built from the whole config (model, norm, dropout)."""
    m = cfg.model
    if m.name == "mlp":
        return MLP(math.prod(input_shape), num_classes, m.depth, m.width, _name(m.activation), cfg.norm,
                   cfg.dropout.p, cfg.dropout.input_p)
    raise ValueError(f"unknown model {m.name!r}")  # config.validate() rejects this earlier
