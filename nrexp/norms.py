"""Normalization layers by name, and the axes each one normalizes over.

For a 2-D activation matrix of shape (batch N, features D):
- `layer` (LayerNorm) normalizes each *row*: one mean and variance per example, over its D features.
  It treats every example alone, so it behaves the same in training and evaluation.
- `batch` (BatchNorm) normalizes each *column*: one mean and variance per feature, over the N examples
  of the minibatch. This couples the examples of a batch, and at test time it uses running averages
  of those statistics (updated with `momentum`) instead of the test batch's own.
"""
from __future__ import annotations

from torch import nn


def make_norm(cfg, num_features: int) -> nn.Module:
    """The normalization layer `cfg.name` for activations of `num_features` features."""
    if cfg.name == "none":
        return nn.Identity()
    if cfg.name == "layer":
        return nn.LayerNorm(num_features, eps=cfg.eps, elementwise_affine=cfg.affine)
    if cfg.name == "batch":
        return nn.BatchNorm1d(num_features, eps=cfg.eps, momentum=cfg.momentum, affine=cfg.affine)
    raise ValueError(f"unknown norm {cfg.name!r}")  # config.validate() rejects this earlier
