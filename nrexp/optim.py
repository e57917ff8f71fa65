"""Optimizers, with weight decay applied only where it means something.

Weight decay lambda regularizes weight *matrices* (parameters with 2 or more dimensions). Biases and the
gains/shifts of normalization layers (and the gains g of weight norm) are left undecayed unless
`optim.decay_norm_and_bias=true`: decaying a norm's gain fights the normalization itself (the usual
practice, as in nanoGPT).

Semantics are PyTorch's own:
- sgd, adam: coupled L2. The gradient becomes g + lambda*W, so plain SGD (no momentum) takes
  W <- (1 - lr*lambda) W - lr*g, the lecture's shrink-by-(1 - alpha*lambda) rule. For adam the decay
  term is then rescaled by the adaptive denominator like the rest of the gradient.
- adamw: decoupled (Loshchilov & Hutter). W <- (1 - lr*lambda) W, then the Adam update of g alone.

The lr is optim.lr, scaled with the batch size when optim.lr_scaling asks (`lr_factor`): linear
(lr x B/ref, the rule of Goyal et al. 2017 that Wu & He's GroupNorm comparisons use) or sqrt.
"""

from __future__ import annotations

import inspect
import math
import sys

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
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


def build_optimizer(model: nn.Module, cfg, batch_size: int | None = None) -> torch.optim.Optimizer:
    return make_optimizer(param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias), cfg, batch_size)


def make_optimizer(groups: list[dict], cfg, batch_size: int | None = None) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` over these param groups (nrexp/fused.py passes stacked tensors).

    The lr is optim.lr scaled by optim.lr_scaling (`lr_factor`), for the optimizer's default and for any
    group that carries its own lr (a fused stack's): the same factor, as the batch size is shared.

    `fused=True`: one kernel per param group that reads and writes each tensor once, on CPU as on
    CUDA, where the foreach implementation makes a pass over memory per elementwise op (momentum,
    decay, update...): about 3x faster steps, the same results (docs/speed.md).
    """
    factor = lr_factor(cfg, batch_size)
    groups = [{**g, "lr": g["lr"] * factor} if "lr" in g else g for g in groups]
    lr = cfg.lr * factor
    if cfg.name == "sgd":
        return without_dynamo_import(torch.optim.SGD)(groups, lr=lr, momentum=cfg.momentum, fused=True)
    if cfg.name == "adam":
        return without_dynamo_import(torch.optim.Adam)(groups, lr=lr, betas=tuple(cfg.betas), fused=True)
    if cfg.name == "adamw":
        return without_dynamo_import(torch.optim.AdamW)(groups, lr=lr, betas=tuple(cfg.betas), fused=True)
    raise ValueError(f"unknown optimizer {cfg.name!r}")  # config.validate() rejects this earlier


def lr_factor(cfg, batch_size: int | None = None) -> float:
    """What optim.lr is multiplied by at batch size B (optim.lr_scaling, relative to optim.ref_batch_size):
    none 1, linear B/ref, sqrt sqrt(B/ref). `cfg` is the optim node; B is `batch_size`, else the composed
    config's data.batch_size, read through the node's parent (so every caller of build_optimizer and
    make_optimizer, solo or fused, scales the same way without passing B)."""
    scaling = str(getattr(cfg, "lr_scaling", "none"))
    if scaling == "none":
        return 1.0
    if batch_size is None:
        batch_size = _composed_batch_size(cfg)
    ratio = batch_size / cfg.ref_batch_size
    if scaling == "linear":
        return ratio
    if scaling == "sqrt":
        return math.sqrt(ratio)
    raise ValueError(f"unknown optim.lr_scaling {scaling!r}")  # config.validate() rejects this earlier


def scaled_lr(cfg, batch_size: int | None = None) -> float:
    """The learning rate used: optim.lr x lr_factor."""
    return cfg.lr * lr_factor(cfg, batch_size)


def _composed_batch_size(cfg) -> int:
    from omegaconf import DictConfig

    root = cfg._get_root() if isinstance(cfg, DictConfig) else None
    if root is None or root is cfg or "data" not in root:
        raise ValueError("optim.lr_scaling needs the batch size: pass batch_size, or the optim node of a whole config")
    return int(root.data.batch_size)


# Methods of torch.optim.Optimizer that import torch._dynamo when first called (torch._disable_dynamo)
_DYNAMO_GUARDED = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")
_classes: dict[type, type] = {}


def without_dynamo_import(cls: type) -> type:
    """`cls` (a torch.optim optimizer), less its import of torch._dynamo while nothing else imported it.

    torch wraps an optimizer's step and a few of its methods so that torch.compile does not trace
    them; the wrappers import torch._dynamo on their first call, which costs about as much as
    importing torch itself (docs/speed.md), in every run, for the sake of a compiler nrexp does not
    point at the optimizer. Until some code imports torch._dynamo (trainer.compile does), nothing
    can be compiling, and the wrappers would only pass the call on: the subclass calls the methods
    themselves then, and torch's wrappers from then on. The arithmetic is torch's own, unchanged.
    Where torch's optimizers are not built as this expects (another torch version), `cls` itself.
    """
    if cls in _classes:
        return _classes[cls]
    try:
        from torch.optim.optimizer import _use_grad_for_differentiable

        raw_step = inspect.unwrap(cls.step)
        guarded = {name: getattr(cls, name) for name in _DYNAMO_GUARDED}
        raw = {name: inspect.unwrap(method) for name, method in guarded.items()}
        if raw_step is cls.step or any(raw[name] is guarded[name] for name in raw):
            raise AttributeError("not wrapped as expected")
    except (ImportError, AttributeError, ValueError):
        _classes[cls] = cls
        return cls
    torch_step = _use_grad_for_differentiable(raw_step)  # torch's wrapper of the step, with its graph breaks

    def step(self, closure=None):
        if "torch._dynamo" in sys.modules:
            return torch_step(self, closure)
        with torch.set_grad_enabled(self.defaults["differentiable"]):  # what torch's wrapper does, less dynamo
            return raw_step(self, closure)

    def passing(name: str):
        def method(self, *args, **kwargs):
            chosen = guarded[name] if "torch._dynamo" in sys.modules else raw[name]
            return chosen(self, *args, **kwargs)

        method.__name__ = method.__qualname__ = name
        method.__doc__ = guarded[name].__doc__
        return method

    namespace = {
        "step": step,
        "__module__": cls.__module__,
        "__doc__": cls.__doc__,
        **{name: passing(name) for name in _DYNAMO_GUARDED},
    }
    _classes[cls] = type(cls.__name__, (cls,), namespace)
    return _classes[cls]
