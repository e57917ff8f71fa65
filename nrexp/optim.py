"""Optimizers, with weight decay applied only where it means something.

Weight decay lambda regularizes weight *matrices* (parameters with 2 or more dimensions). Biases and the
gains/shifts of normalization layers (and the gains g of weight norm) are left undecayed unless `optim.decay_norm_and_bias=true`:
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
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    decay = [p for name, p in params if p.ndim >= 2 and not _is_weight_norm_gain(name)]
    other = [p for name, p in params if p.ndim < 2 or _is_weight_norm_gain(name)]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": other, "weight_decay": weight_decay if decay_norm_and_bias else 0.0},
    ]


def _is_weight_norm_gain(name: str) -> bool:
    # weight_norm's g (`parametrizations.weight.original0`) has shape (out, 1, ...), so ndim >= 2, but it
    # is a per-unit gain like a norm layer's: it is treated as one. v (original1) is decayed as a weight.
    return name.endswith("parametrizations.weight.original0")


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    return make_optimizer(param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias), cfg)


def make_optimizer(groups: List[Dict], cfg) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` over these param groups (nrexp/fused.py passes stacked tensors).

    `fused=True`: one kernel per param group that reads and writes each tensor once, on CPU as on
    CUDA, where the foreach implementation makes a pass over memory per elementwise op (momentum,
    decay, update...). Measured on this project's 2-core CPU, one thread, 16 x (784x100, 100x100,
    100x100, 100x10) tensors: SGD with momentum 4.6 -> 1.5 ms per step with identical results, AdamW
    10.1 -> 2.6 ms per step, results within 1.5e-8.
    """
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=True)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)
    raise ValueError(f"unknown optimizer {cfg.name!r}")  # config.validate() rejects this earlier
