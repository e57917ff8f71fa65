"""Networks with named blocks, so that every per-layer statistic reads `block00 ... blockNN, head`.

Every model's forward takes an optional list; when given, it appends each monitored layer's output
activation to it. The trainer passes a list only on logging steps, so ordinary steps pay nothing
(no forward hooks), and the monitor reads the activations in the order of `monitored_layers()`.

- mlp:    flatten -> depth x (Linear -> [norm] -> act -> [dropout]) -> head.
- resmlp: the course's MLPResNet: flatten -> stem (Linear -> act) -> depth x residual block
          act(x + norm(Linear(dropout(act(norm(Linear(x))))))), inner width width/2 -> head.
- cnn:    VGG-style: stages of `blocks_per_stage` x (3x3 conv -> [norm] -> act -> [dropout]), a 2x2 pool
          after every stage but the last, global average pooling -> head. Blocks are numbered in forward
          order: block i belongs to stage i // blocks_per_stage.
`monitored_layers()` maps each name to the module whose output is recorded; its weights are the
Linear/Conv2d layers inside it (`weight_layers`): one for mlp, cnn, stem and head, two for a residual block.
Normalization (activations and weights alike) lives only inside blocks; stem and head stay plain.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from nrexp.config import validate_input_shape
from nrexp.norms import make_norm, normalize_weights

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


def _name(value) -> str:
    return getattr(value, "value", value)  # Enum member or plain string


def _block_names(count: int) -> list[str]:
    digits = max(2, len(str(count - 1)))
    return [f"block{i:0{digits}d}" for i in range(count)]


class Dropout(nn.Dropout):
    """nn.Dropout computed as F.dropout computes it on the CPU, on every device: a mask drawn with
    `bernoulli_(1 - p)` from the device's default generator, divided by (1 - p), times x.

    On CUDA, F.dropout runs a fused kernel that uses the random stream its own way; a fused sweep
    (nrexp/fused.py) draws each member's masks with bernoulli_ from the member's own generator, and
    could not give a member its solo run's masks. This way both draw the same masks on any device.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = 1.0 - self.p
        return x * torch.empty_like(x).bernoulli_(keep).div_(keep)


def _dropout(p: float, spatial: bool = False) -> nn.Module:
    if p <= 0:
        return nn.Identity()
    return nn.Dropout2d(p) if spatial else Dropout(p)


def weight_layers(module: nn.Module) -> list[nn.Module]:
    """The Linear/Conv2d layers a monitored entry stands for (itself, or those inside a block)."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return [module]
    return [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _record(x: torch.Tensor, activations: list[torch.Tensor] | None) -> torch.Tensor:
    """Append a layer's output to `activations` when the trainer asked for them (logging steps only)."""
    if activations is not None:
        activations.append(x)
    return x


class MLPBlock(nn.Module):
    """Linear -> [norm] -> activation -> [dropout], or Linear -> activation -> [norm] -> [dropout]."""

    def __init__(self, in_features: int, out_features: int, norm_cfg, activation: str, dropout_p: float):
        super().__init__()
        self.linear = normalize_weights(nn.Linear(in_features, out_features), norm_cfg)
        self.norm = make_norm(norm_cfg, out_features)
        self.act = ACTIVATIONS[activation]()
        self.dropout = _dropout(dropout_p)
        self.norm_before_act = _name(norm_cfg.position) == "before_act"
        self.stash_preact = False  # set by the trainer on logging steps only (trainer.preact_percentiles)
        self.preact: torch.Tensor | None = None  # then: the input to the activation, detached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        if self.norm_before_act:
            x = self.norm(x)
        if self.stash_preact:
            self.preact = x.detach()
        x = self.act(x)
        if not self.norm_before_act:
            x = self.norm(x)
        return self.dropout(x)


class MLP(nn.Module):
    """Flatten -> [input dropout] -> `depth` hidden blocks of `width` units -> linear head."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        depth: int,
        width: int,
        activation: str,
        norm_cfg,
        dropout_p: float = 0.0,
        input_dropout_p: float = 0.0,
    ):
        super().__init__()
        self.input_dropout = _dropout(input_dropout_p)
        self.blocks = nn.ModuleDict(
            OrderedDict(
                (name, MLPBlock(in_features if i == 0 else width, width, norm_cfg, activation, dropout_p))
                for i, name in enumerate(_block_names(depth))
            )
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor, activations: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = self.input_dropout(x.flatten(1))
        for block in self.blocks.values():
            x = _record(block(x), activations)
        return _record(self.head(x), activations)

    def monitored_layers(self) -> OrderedDict[str, nn.Module]:
        """Layer name -> the module holding that layer's weight matrix, in forward order."""
        layers = OrderedDict((name, block.linear) for name, block in self.blocks.items())
        layers["head"] = self.head
        return layers


class ResidualBlock(nn.Module):
    """act(x + norm(Linear(dropout(act(norm(Linear(x))))))): the course's MLPResNet block.

    The skip adds the block's input unchanged, so gradients reach early blocks through the identity
    path whatever the weights do. Layout fixed as in the course (norm.position does not apply).
    """

    def __init__(self, width: int, inner: int, norm_cfg, activation: str, dropout_p: float):
        super().__init__()
        self.fc1 = normalize_weights(nn.Linear(width, inner), norm_cfg)
        self.norm1 = make_norm(norm_cfg, inner)
        self.act = ACTIVATIONS[activation]()
        self.dropout = _dropout(dropout_p)
        self.fc2 = normalize_weights(nn.Linear(inner, width), norm_cfg)
        self.norm2 = make_norm(norm_cfg, width)
        self.out_act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.act(self.norm1(self.fc1(x))))
        return self.out_act(x + self.norm2(self.fc2(h)))


class ResMLP(nn.Module):
    """Flatten -> [input dropout] -> stem (Linear -> act) -> `depth` residual blocks -> linear head."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        depth: int,
        width: int,
        activation: str,
        norm_cfg,
        dropout_p: float = 0.0,
        input_dropout_p: float = 0.0,
    ):
        super().__init__()
        self.input_dropout = _dropout(input_dropout_p)
        self.stem = nn.Linear(in_features, width)  # the skip needs equal widths: project the input once
        self.stem_act = ACTIVATIONS[activation]()
        self.blocks = nn.ModuleDict(
            OrderedDict(
                (name, ResidualBlock(width, width // 2, norm_cfg, activation, dropout_p))
                for name in _block_names(depth)
            )
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor, activations: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = _record(self.stem_act(self.stem(self.input_dropout(x.flatten(1)))), activations)
        for block in self.blocks.values():
            x = _record(block(x), activations)
        return _record(self.head(x), activations)

    def monitored_layers(self) -> OrderedDict[str, nn.Module]:
        """stem, each residual block (its two Linear layers together), head, in forward order."""
        layers = OrderedDict(stem=self.stem)
        layers.update(self.blocks.items())
        layers["head"] = self.head
        return layers


class ConvBlock(nn.Module):
    """3x3 conv -> [norm] -> activation -> [dropout or dropout2d] -> [2x2 pool, at the end of a stage]."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm_cfg,
        activation: str,
        dropout_p: float,
        spatial_dropout: bool,
        pool: str,
    ):
        super().__init__()
        self.conv = normalize_weights(nn.Conv2d(in_channels, out_channels, 3, padding=1), norm_cfg)
        self.norm = make_norm(norm_cfg, out_channels, conv=True)
        self.act = ACTIVATIONS[activation]()
        self.dropout = _dropout(dropout_p, spatial_dropout)
        self.pool = {"max": nn.MaxPool2d(2), "avg": nn.AvgPool2d(2)}.get(pool, nn.Identity())
        self.norm_before_act = _name(norm_cfg.position) == "before_act"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = self.act(self.norm(x)) if self.norm_before_act else self.norm(self.act(x))
        return self.pool(self.dropout(x))


class CNN(nn.Module):
    """[input dropout] -> stages of conv blocks (pool between stages) -> global average pool -> linear head."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: list[int],
        blocks_per_stage: int,
        pool: str,
        activation: str,
        norm_cfg,
        dropout_p: float = 0.0,
        spatial_dropout: bool = False,
        input_dropout_p: float = 0.0,
    ):
        super().__init__()
        self.input_dropout = _dropout(input_dropout_p)
        blocks, c_in = [], in_channels
        for stage, c_out in enumerate(channels):
            for b in range(blocks_per_stage):
                ends_stage = b == blocks_per_stage - 1 and stage < len(channels) - 1
                blocks.append(
                    ConvBlock(
                        c_in, c_out, norm_cfg, activation, dropout_p, spatial_dropout, pool if ends_stage else "none"
                    )
                )
                c_in = c_out
        self.blocks = nn.ModuleDict(OrderedDict(zip(_block_names(len(blocks)), blocks)))
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor, activations: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = self.input_dropout(x)
        for block in self.blocks.values():
            x = _record(block(x), activations)
        return _record(self.head(x.mean(dim=(2, 3))), activations)  # global average pooling: any input size

    def monitored_layers(self) -> OrderedDict[str, nn.Module]:
        layers = OrderedDict((name, block.conv) for name, block in self.blocks.items())
        layers["head"] = self.head
        return layers


def build_model(cfg, input_shape, num_classes: int) -> nn.Module:
    """The model named by `cfg.model.name`, built from the whole config (model, norm, dropout)."""
    validate_input_shape(cfg, input_shape)
    m, d, act = cfg.model, cfg.dropout, _name(cfg.model.activation)
    if m.name == "mlp":
        return MLP(math.prod(input_shape), num_classes, m.depth, m.width, act, cfg.norm, d.p, d.input_p)
    if m.name == "resmlp":
        return ResMLP(math.prod(input_shape), num_classes, m.depth, m.width, act, cfg.norm, d.p, d.input_p)
    if m.name == "cnn":
        return CNN(
            input_shape[0],
            num_classes,
            list(m.channels),
            m.blocks_per_stage,
            _name(m.pool),
            act,
            cfg.norm,
            d.p,
            d.spatial,
            d.input_p,
        )
    raise ValueError(f"unknown model {m.name!r}")  # config.validate() rejects this earlier
