"""Normalization layers by name, and the axes each one normalizes over.

Every hidden block of every model normalizes through `make_norm` (activations) and `normalize_weights`
(the block's Linear/Conv2d). The stem of `resmlp` and the head of every model are left plain.

For a 2-D activation matrix of shape (batch N, features D), as in mlp and resmlp:
- `none`:     nothing.
- `layer`:    LayerNorm normalizes each *row*: one mean and variance per example, over its D features.
              It treats every example alone, so it behaves the same in training and evaluation.
- `batch`:    BatchNorm normalizes each *column*: one mean and variance per feature, over the N examples
              of the minibatch. This couples the examples of a batch, and at test time it uses running
              averages of those statistics (updated with `momentum`) instead of the test batch's own.
- `group`:    GroupNorm splits the D features of each example into `groups` groups of D/G and normalizes
              each group alone (G=1 gives LayerNorm's statistics; G=D would normalize single numbers).
- `instance`: rejected for MLPs by config.validate(): with no spatial axes each "instance" is one
              number, which normalizes to 0 (and features-as-one-channel would be `layer` again).
- `rms`:      RMSNorm (Zhang & Sennrich 2019) divides each row by its root mean square over the D
              features, sqrt(mean(x^2) + eps), without subtracting the mean; a gain, no shift.
- `weight`:   weight normalization (Salimans & Kingma 2016) touches no activation. Each output unit's
              weight row is reparametrized as w = g * v / ||v||: the direction v and the length g are
              learned separately (torch.nn.utils.parametrizations.weight_norm, dim 0). It does not
              depend on the batch at all.

For conv feature maps of shape (N, C, H, W), as in cnn (the course notes' picture):
- `batch`:    BatchNorm2d: one mean/variance per *channel*, over N x H x W values; running averages at test.
- `layer`:    one mean/variance per *example*, over C x H x W (GroupNorm with one group), with a gain and
              shift per channel, so the layer does not depend on the image size.
- `group`:    one mean/variance per example and group of C/G channels, over (C/G) x H x W (Wu & He 2018).
- `instance`: one mean/variance per example and channel, over H x W (Ulyanov et al. 2016); per-channel
              affine, no running statistics, so training and evaluation agree.
- `rms`:      each example divided by its root mean square over C x H x W (the `layer` axes, no mean
              subtracted), then a per-channel gain.
- `weight`:   each output channel's filter (C_in x k x k) is w = g * v / ||v||.
All of them except `batch` normalize each example on its own: train and eval mode give the same output.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

# Under trainer.precision=bf16, autocast hands nn.RMSNorm bf16 activations while its gain stays float32.
# torch then takes its unfused kernel (which computes in float32 and rounds the output, as precise as the
# fused one) and says so once per process, in a UserWarning that points into its own C++ source. It is
# about torch's choice of kernel, not about the user's run, so a `norm=rms` bf16 run does not print it.
warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight", category=UserWarning)


def make_norm(cfg, num_features: int, conv: bool = False) -> nn.Module:
    """The activation normalization `cfg.name` for `num_features` features (conv: channels of (N, C, H, W))."""
    name, eps, affine = cfg.name, cfg.eps, cfg.affine
    if name in ("none", "weight"):  # weight norm acts on the weights: see normalize_weights
        return nn.Identity()
    if name == "batch":
        bn = nn.BatchNorm2d if conv else nn.BatchNorm1d
        return bn(num_features, eps=eps, momentum=cfg.momentum, affine=affine)
    if name == "group":
        return nn.GroupNorm(cfg.groups, num_features, eps=eps, affine=affine)
    if name == "layer":
        if conv:  # over (C, H, W) per example: a single group
            return nn.GroupNorm(1, num_features, eps=eps, affine=affine)
        return nn.LayerNorm(num_features, eps=eps, elementwise_affine=affine)
    if name == "instance" and conv:
        return nn.InstanceNorm2d(num_features, eps=eps, affine=affine, track_running_stats=False)
    if name == "rms":
        if conv:
            return ChannelRMSNorm(num_features, eps=eps, affine=affine)
        return nn.RMSNorm(num_features, eps=eps, elementwise_affine=affine)
    raise ValueError(f"norm {name!r} is not available here")  # config.validate() rejects this earlier


def normalize_weights(layer: nn.Module, cfg) -> nn.Module:
    """`layer` with weight normalization when `cfg.name == "weight"`, else `layer` unchanged.

    After this, `layer.weight` is recomputed from `parametrizations.weight.original0` (g, one per
    output unit) and `original1` (v) on every access; the monitor and init know this.
    """
    if cfg.name == "weight":
        return weight_norm(layer, name="weight", dim=0)
    return layer


class ChannelRMSNorm(nn.Module):
    """RMSNorm of conv feature maps: x / sqrt(mean over (C, H, W) of x^2 + eps), times a per-channel gain.

    nn.RMSNorm over (C, H, W) would learn one gain per position and tie the layer to one image size;
    this keeps the statistic of `layer` and the per-channel affine of the other conv norms.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(dim=(1, 2, 3), keepdim=True) + self.eps)
        return y if self.weight is None else y * self.weight.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{0 if self.weight is None else len(self.weight)}, eps={self.eps}, affine={self.weight is not None}"
