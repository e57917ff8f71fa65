"""Optimizers, with weight decay applied only where it means something.

Weight decay lambda regularizes weight *matrices* (parameters with 2 or more dimensions). Biases and the
gains/shifts of normalization layers are left undecayed unless `optim.decay_norm_and_bias=true`:
decaying a norm's gain fights the normalization itself (the usual practice, as in nanoGPT).

Semantics are PyTorch's own:
- sgd, adam: coupled L2. The gradient becomes g + lambda*W, so plain SGD (no momentum) takes
  W <- (1 - lr*lambda) W - lr*g, the lecture's shrink-by-(1 - alpha*lambda) rule. For adam the decay
  term is then rescaled by the adaptive denominator like the rest of the gradient.
- adamw: decoupled (Loshchilov & Hutter). W <- (1 - lr*lambda) W, then the Adam update of g alone.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> List[Dict]:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": other, "weight_decay": weight_decay if decay_norm_and_bias else 0.0},
    ]


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=True)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), foreach=True)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), foreach=True)
    raise ValueError(f"unknown optimizer {cfg.name!r}")  # config.validate() rejects this earlier
