"""The typed schema of every knob nrexp has, its documentation, and whole-config validation.

The dataclasses below are the single source of truth: Hydra validates every override against them
(unknown keys and wrong types are rejected by OmegaConf), `validate()` checks ranges and cross-field
rules before any work starts, and `help_text()` turns the same field docs into `nrexp train --help`.

This module knows nothing of torch, so `nrexp --help` and `nrexp train --cfg job` start fast.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore

from nrexp.errors import ConfigError  # noqa: F401 - re-exported: config.ConfigError is used widely

# Names selected by config groups (configs/<group>/<name>.yaml). Kept here so that validation,
# the model factory and the help text agree on one list.
NORMS = ("none", "layer", "batch", "group", "instance", "rms", "weight")
OPTIMIZERS = ("sgd", "adam", "adamw")
INITS = ("kaiming", "xavier", "normal", "uniform", "orthogonal", "default")
MODELS = ("mlp", "resmlp", "cnn")
DATASETS = ("mnist", "fashion_mnist", "cifar10")
# What members of one fused group (hydra/launcher=fused, nrexp/fused.py) may differ in: no tensor shape depends on them.
FUSED_FREE_KEYS = ("seed", "optim.lr", "optim.weight_decay", "dropout.p", "dropout.input_p", "init.scale")
MAX_SEED = 2**40  # seed * 100_003 + epoch + (stream << 40) stays within the 64 bits torch seeds with
LR_SCALINGS = ("none", "linear", "sqrt")  # optim.lr_scaling (nrexp/optim.py: scaled_lr)
BUNDLED_DATASETS = ("mnist",)  # the only dataset with a sample shipped inside the package


class Activation(str, Enum):
    relu = "relu"
    tanh = "tanh"
    sigmoid = "sigmoid"
    gelu = "gelu"


class NormPosition(str, Enum):
    before_act = "before_act"  # Linear -> norm -> activation (Ioffe & Szegedy 2015)
    after_act = "after_act"  # Linear -> activation -> norm


class Pool(str, Enum):
    max = "max"  # 2x2 max pooling after each cnn stage but the last (VGG)
    avg = "avg"  # 2x2 average pooling
    none = "none"  # keep the full resolution in every stage


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DataSource(str, Enum):
    auto = "auto"
    local = "local"
    download = "download"
    bundled = "bundled"


def knob(default: Any, doc: str) -> Any:
    """A schema field with its documentation (shown by `nrexp train --help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class NormConfig:
    name: str = knob(
        "none",
        "normalization in every hidden block: " + "|".join(NORMS) + " (axes: see README or nrexp/norms.py)",
    )
    eps: float = knob(1e-5, "added to the variance before the square root; > 0")
    affine: bool = knob(
        True,
        "learn a per-feature (cnn: per-channel) gain and shift after normalizing; rms: "
        "gain only; weight: no effect (its g is the gain)",
    )
    momentum: float = knob(0.1, "batch only: running-statistics update rate, in (0, 1]")
    groups: int = knob(
        8,
        "group only: channel (or feature) groups G, each example normalized over C/G channels x H x W; "
        ">= 1, must divide every normalized width / channel count",
    )
    position: NormPosition = knob(
        NormPosition.before_act,
        "before_act (Linear/conv -> norm -> act, as in the BatchNorm paper) | after_act; mlp and cnn "
        "(resmlp keeps the course's block layout)",
    )


@dataclass
class DropoutConfig:
    p: float = knob(0.0, "drop probability of hidden activations, in [0, 1); kept ones scale by 1/(1-p)")
    input_p: float = knob(0.0, "drop probability of input pixels, in [0, 1)")
    spatial: bool = knob(False, "cnn only: drop whole feature maps (Dropout2d) instead of single activations")


@dataclass
class OptimConfig:
    name: str = knob("sgd", "optimizer: " + "|".join(OPTIMIZERS))
    lr: float = knob(0.05, "learning rate alpha; finite, > 0")
    momentum: float = knob(0.9, "sgd only: heavy-ball momentum, in [0, 1)")
    betas: List[float] = knob([0.9, 0.999], "adam/adamw only: moment decay rates, each in [0, 1)")
    weight_decay: float = knob(
        0.0,
        "lambda >= 0. sgd/adam add lambda*W to the gradient (coupled L2); adamw shrinks W by "
        "(1 - lr*lambda) each step, apart from the adaptive update (decoupled)",
    )
    decay_norm_and_bias: bool = knob(False, "also decay biases and norm gains/shifts (default: only weights)")
    lr_scaling: str = knob(
        "none",
        "scale optim.lr with the batch size B relative to optim.ref_batch_size: none | linear "
        "(lr * B/ref, Goyal et al. 2017; Wu & He's GroupNorm setting) | sqrt (lr * sqrt(B/ref)); the lr used is "
        "logged as `lr`",
    )
    ref_batch_size: int = knob(32, "the batch size at which optim.lr is the lr used (optim.lr_scaling); >= 1")


@dataclass
class InitConfig:
    name: str = knob(
        "kaiming",
        "weight init: " + "|".join(INITS) + " (default keeps PyTorch's own init; biases are zeroed otherwise)",
    )
    scale: float = knob(
        1.0,
        "multiplies the scheme's weight variance; > 0. normal/uniform: Var(W) = scale/fan_in, so "
        "init=normal init.scale=2 is the 2/n (Kaiming) rule, and the default of init=normal|uniform; "
        "kaiming/xavier/orthogonal: scale x that rule",
    )


@dataclass
class DataConfig:
    name: str = knob("mnist", "dataset: " + "|".join(DATASETS))
    root: str = knob(
        "${oc.env:NREXP_DATA_ROOT,'~/.cache/nrexp'}",
        "where datasets are read from / downloaded to (env NREXP_DATA_ROOT, else ~/.cache/nrexp)",
    )
    source: DataSource = knob(
        DataSource.auto,
        "auto (local files, else download, else for mnist only the bundled 5k-digit sample, with a "
        "warning) | local | download | bundled (mnist only)",
    )
    batch_size: int = knob(128, "training minibatch size; 1 <= batch_size <= training-set size")
    train_size: Optional[int] = knob(None, "use only the first N training examples (null = all)")
    eval_batch_size: int = knob(1000, "batch size for evaluation passes (no effect on results); >= 1")
    augment: bool = knob(
        False,
        "training batches only: random crop (reflect-pad 4 px) + horizontal flip, batched on the device; "
        "data=cifar10 sets true. Meant for natural images (a mirrored digit is another symbol)",
    )


@dataclass
class ModelConfig:
    name: str = knob("mlp", "architecture: " + "|".join(MODELS))
    depth: int = knob(
        3,
        "mlp: hidden blocks (Linear -> [norm] -> act -> [dropout]); resmlp: residual blocks; >= 1. "
        "cnn: ignored (its depth is len(channels) x blocks_per_stage)",
    )
    width: int = knob(256, "mlp/resmlp: units per hidden layer (resmlp blocks use width/2 inside); >= 1 (resmlp: >= 2)")
    channels: List[int] = knob([32, 64, 128], "cnn only: conv channels of each stage, e.g. [32,64,128]; each >= 1")
    blocks_per_stage: int = knob(2, "cnn only: 3x3 conv blocks per stage (conv -> [norm] -> act -> [dropout]); >= 1")
    pool: Pool = knob(Pool.max, "cnn only: 2x2 downsampling after every stage but the last: max | avg | none")
    activation: Activation = knob(Activation.relu, "relu | tanh | sigmoid | gelu")


@dataclass
class TrainerConfig:
    epochs: int = knob(5, "passes over the training set; >= 1 (ignored when max_steps or max_examples is set)")
    max_steps: Optional[int] = knob(None, "stop after this many optimizer steps (null = use epochs)")
    max_examples: Optional[int] = knob(
        None,
        "a budget in training examples seen: ceil(max_examples / data.batch_size) optimizer steps, so runs "
        "at different batch sizes see as many examples (null = max_steps, else epochs); >= 1, not with max_steps",
    )
    device: Device = knob(Device.auto, "auto (CUDA when available, else CPU) | cpu | cuda")
    log_every: int = knob(20, "steps between per-layer statistics (also logged at step 0 and the end); >= 1")
    layer_stats: bool = knob(True, "gather per-layer statistics (false: only loss/accuracy are logged)")
    precision: str = knob(
        "fp32",
        "fp32 | bf16: bf16 autocasts the training forward pass (weights, optimizer and "
        "statistics stay fp32); pays off on GPUs with bf16 tensor cores",
    )
    compile: bool = knob(
        False,
        "torch.compile the training forward of steps without per-layer statistics (those "
        "run the same weights eagerly); needs a C++ compiler on CPU, triton on CUDA; the first "
        "steps pay the compilation (tens of seconds)",
    )
    flush_denormal: bool = knob(
        True,
        "CPU: treat denormal floats (nonzero, |x| < 1.2e-38) as zero (torch.set_flush_denormal), as CPUs "
        "compute with them 10-100x slower; a run that fits its data fills momentum buffers with them. No "
        "effect on CUDA; false: IEEE arithmetic, bit for bit a plain PyTorch loop's",
    )
    eval_every: int = knob(0, "steps between test-set evaluations; 0 = at the end of every epoch")
    checkpoint_every: int = knob(500, "steps between checkpoints (atomic; one file, overwritten); 0 = only at the end")
    on_nonfinite: str = knob(
        "stop", "when the training loss is NaN/inf: stop (status diverged, exit 0) | raise (exit 1)"
    )
    progress: bool = knob(True, "live rich progress bar on a terminal (plain log lines otherwise)")
    histograms: bool = knob(
        False,
        "on logging steps, also write per-layer histograms of the activations, the weight gradients and the "
        "weights as hist_act/<layer>, hist_grad/<layer>, hist_weight/<layer> (64 equal bins between each tensor's "
        "min and max, counted on the device; one host copy per logging step; cost: docs/speed.md)",
    )
    preact_percentiles: bool = knob(
        False,
        "mlp: on logging steps, log the 15th/50th/85th percentiles over the batch of unit 0's input to the "
        "activation of the last hidden block as preact/<block>/p15|p50|p85 (the BatchNorm paper's Fig. 1)",
    )


@dataclass
class TrainConfig:
    seed: int = knob(0, "seeds init, dropout and data order; same seed and config on CPU = same numbers")
    resume: Optional[str] = knob(None, "a run dir to continue from its checkpoint (only trainer.* may change)")
    experiment: Optional[str] = knob(
        None,
        "name of the preset this run belongs to (set by +experiment=<name>; recorded in summary.json "
        "so that `python -m nrexp.claims <sweep dir>` knows which claims to check)",
    )
    norm: NormConfig = field(default_factory=NormConfig)
    dropout: DropoutConfig = field(default_factory=DropoutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# --------------------------------------------------------------------------------------------
# Validation: ranges and cross-field rules that types alone cannot express.


def _check(ok: bool, key: str, value: Any, allowed: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}. Fix: {fix}")


def unknown_keys(cfg: Any, schema: Any, prefix: str = "") -> List[str]:
    """Keys in `cfg` that the schema does not have (Hydra lets `+key=value` add them)."""
    found = []
    known = {f.name for f in dataclasses.fields(schema)} | ({"hydra"} if not prefix else set())  # Hydra's own node
    for key in cfg:
        if key not in known:
            found.append(prefix + str(key))
        elif dataclasses.is_dataclass(getattr(schema, key, None)) and hasattr(cfg[key], "keys"):
            found += unknown_keys(cfg[key], getattr(schema, key), f"{prefix}{key}.")
    return found


def validate(cfg: Any) -> None:
    """Raise ConfigError with one line (key, value, allowed range, fix) for the first bad knob.

    `cfg` is the composed DictConfig (or anything with the same attributes).
    """
    extra = unknown_keys(cfg, TrainConfig()) if hasattr(cfg, "keys") else []
    if extra:
        raise ConfigError(
            f"unknown key '{extra[0]}'. Fix: check its spelling; `nrexp train --help` lists every key with its meaning"
        )
    n, o, i, data, m = cfg.norm, cfg.optim, cfg.init, cfg.data, cfg.model
    # torch seeds generators with 64-bit integers; data.epoch_generator seeds with seed * 100_003 + epoch
    _check(
        0 <= cfg.seed < MAX_SEED,
        "seed",
        cfg.seed,
        f"must be an integer in [0, 2**40) = [0, {MAX_SEED})",
        "e.g. seed=0 (a sweep: seed=0,1,2)",
    )
    _check(n.name in NORMS, "norm", n.name, "one of " + ", ".join(NORMS), "choose e.g. norm=batch")
    _check(o.name in OPTIMIZERS, "optim", o.name, "one of " + ", ".join(OPTIMIZERS), "choose e.g. optim=adamw")
    _check(i.name in INITS, "init", i.name, "one of " + ", ".join(INITS), "choose e.g. init=kaiming")
    _check(m.name in MODELS, "model", m.name, "one of " + ", ".join(MODELS), "choose e.g. model=cnn")
    _check(data.name in DATASETS, "data", data.name, "one of " + ", ".join(DATASETS), "choose e.g. data=cifar10")

    _validate_values(cfg)
    _validate_trainer(cfg)


def _validate_values(cfg: Any) -> None:
    """Ranges of the norm, dropout, optim, init, model and data knobs."""
    n, d, o, i, data, m = cfg.norm, cfg.dropout, cfg.optim, cfg.init, cfg.data, cfg.model
    _check(math.isfinite(n.eps) and n.eps > 0, "norm.eps", n.eps, "must be a finite number > 0", "e.g. norm.eps=1e-5")
    _check(0 < n.momentum <= 1, "norm.momentum", n.momentum, "must be in (0, 1]", "e.g. norm.momentum=0.1")
    for key, p in (("dropout.p", d.p), ("dropout.input_p", d.input_p)):
        _check(math.isfinite(p) and 0 <= p < 1, key, p, "must be in [0, 1)", f"e.g. {key}=0.2")
    _check(math.isfinite(o.lr) and o.lr > 0, "optim.lr", o.lr, "must be a finite number > 0", "e.g. optim.lr=0.05")
    _check(
        math.isfinite(o.weight_decay) and o.weight_decay >= 0,
        "optim.weight_decay",
        o.weight_decay,
        "must be a finite number >= 0",
        "e.g. optim.weight_decay=5e-4",
    )
    _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)", "e.g. optim.momentum=0.9")
    _check(
        o.lr_scaling in LR_SCALINGS,
        "optim.lr_scaling",
        o.lr_scaling,
        "one of " + ", ".join(LR_SCALINGS),
        "e.g. optim.lr_scaling=linear optim.ref_batch_size=32",
    )
    _check(
        o.ref_batch_size >= 1, "optim.ref_batch_size", o.ref_batch_size, "must be >= 1", "e.g. optim.ref_batch_size=32"
    )
    _check(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        "optim.betas",
        list(o.betas),
        "must be two numbers in [0, 1)",
        "e.g. optim.betas=[0.9,0.999]",
    )
    _check(
        math.isfinite(i.scale) and i.scale > 0,
        "init.scale",
        i.scale,
        "must be a finite number > 0",
        "e.g. init.scale=2",
    )
    _check(m.depth >= 1, "model.depth", m.depth, "must be >= 1", "e.g. model.depth=3")
    _check(m.width >= 1, "model.width", m.width, "must be >= 1", "e.g. model.width=256")
    _check(data.batch_size >= 1, "data.batch_size", data.batch_size, "must be >= 1", "e.g. data.batch_size=128")
    _check(
        data.eval_batch_size >= 1,
        "data.eval_batch_size",
        data.eval_batch_size,
        "must be >= 1",
        "e.g. data.eval_batch_size=1000",
    )
    _check(
        data.train_size is None or data.train_size >= 1,
        "data.train_size",
        data.train_size,
        "must be >= 1 or null (all)",
        "e.g. data.train_size=1000",
    )
    _check(
        n.name != "batch" or data.batch_size > 1,
        "data.batch_size",
        data.batch_size,
        "BatchNorm needs more than one example per batch in training (it normalizes each feature over the batch)",
        "use data.batch_size>=2, or norm=layer, which normalizes each example alone",
    )
    _validate_models_and_norms(cfg)
    _check(
        data.source != "bundled" or data.name in BUNDLED_DATASETS,
        "data.source",
        "bundled",
        f"only {', '.join(BUNDLED_DATASETS)} has a sample bundled with nrexp, not data={data.name}",
        f"put the {data.name} files under data.root and use data.source=local, or use data=mnist",
    )


def _validate_trainer(cfg: Any) -> None:
    """Ranges of the trainer knobs, and which combinations work."""
    t, m = cfg.trainer, cfg.model
    _check(t.epochs >= 1, "trainer.epochs", t.epochs, "must be >= 1", "e.g. trainer.epochs=5")
    _check(
        t.max_steps is None or t.max_steps >= 1,
        "trainer.max_steps",
        t.max_steps,
        "must be >= 1 or null",
        "e.g. trainer.max_steps=500",
    )
    _check(
        t.max_examples is None or t.max_examples >= 1,
        "trainer.max_examples",
        t.max_examples,
        "must be >= 1 or null",
        "e.g. trainer.max_examples=10000",
    )
    _check(
        t.max_examples is None or t.max_steps is None,
        "trainer.max_examples",
        t.max_examples,
        f"and trainer.max_steps={t.max_steps} both set the length of the run",
        "drop one of them (max_steps=null)",
    )
    _check(
        not t.preact_percentiles or m.name == "mlp",
        "trainer.preact_percentiles",
        True,
        f"is implemented for model=mlp only, not model={m.name}",
        "use model=mlp or trainer.preact_percentiles=false",
    )
    _check(t.log_every >= 1, "trainer.log_every", t.log_every, "must be >= 1", "e.g. trainer.log_every=20")
    _check(
        t.precision in ("fp32", "bf16"),
        "trainer.precision",
        t.precision,
        "must be fp32 or bf16",
        "trainer.precision=bf16 (autocast) or fp32",
    )
    _check(
        t.on_nonfinite in ("stop", "raise"),
        "trainer.on_nonfinite",
        t.on_nonfinite,
        "must be stop or raise",
        "trainer.on_nonfinite=stop (a diverged run is a result) or raise (an error)",
    )
    _check(
        t.checkpoint_every >= 0,
        "trainer.checkpoint_every",
        t.checkpoint_every,
        "must be >= 0 (0 = only at the end)",
        "e.g. trainer.checkpoint_every=500",
    )
    _check(
        t.eval_every >= 0,
        "trainer.eval_every",
        t.eval_every,
        "must be >= 0 (0 = every epoch)",
        "e.g. trainer.eval_every=0",
    )


def _validate_models_and_norms(cfg: Any) -> None:
    """Shapes of the architectures, and which normalizations fit them."""
    n, m = cfg.norm, cfg.model
    if m.name == "cnn":
        channels = list(m.channels)
        _check(
            len(channels) >= 1 and all(c >= 1 for c in channels),
            "model.channels",
            channels,
            "must list at least one stage, each with >= 1 channels",
            "e.g. model.channels=[32,64,128]",
        )
        _check(
            m.blocks_per_stage >= 1,
            "model.blocks_per_stage",
            m.blocks_per_stage,
            "must be >= 1",
            "e.g. model.blocks_per_stage=2",
        )
    if m.name == "resmlp":  # the course's MLPResNet: each block's inner layer has width // 2 units
        _check(
            m.width >= 2,
            "model.width",
            m.width,
            "resmlp needs >= 2 (its blocks use width/2 inside)",
            "e.g. model.width=256",
        )
    example = "e.g. norm.groups=8"  # offered by every norm.groups error: a value the checks below accept
    if n.name == "group":
        widths = normalized_widths(m)
        # a common divisor that the width checks accept too, at most 32 (the GroupNorm paper's
        # default), the largest such
        fits = [
            d
            for d in range(1, min(math.gcd(*widths), 32) + 1)
            if math.gcd(*widths) % d == 0 and (m.name == "cnn" or min(widths) // d >= 2)
        ]
        example = f"e.g. norm.groups={fits[-1]}" if fits else "widen the layers (model.width) or use another norm"
    _check(n.groups >= 1, "norm.groups", n.groups, "must be >= 1", example)
    if n.name == "group":
        _check(
            all(w % n.groups == 0 for w in widths),
            "norm.groups",
            n.groups,
            f"must divide the channels/width of every normalized layer ({', '.join(map(str, widths))})",
            f"choose a common divisor, {example}",
        )
        _check(
            m.name == "cnn" or min(widths) // n.groups >= 2,
            "norm.groups",
            n.groups,
            f"leaves groups of one feature in a {min(widths)}-unit layer, which normalize to 0",
            f"use fewer groups than units, {example}",
        )
    # InstanceNorm normalizes each channel of each example over its spatial positions. An MLP's
    # activation (N, D) has none: the mean of one number is itself, so every output would be 0.
    # Treating the D features as one channel would just be LayerNorm again under another name.
    _check(
        n.name != "instance" or m.name == "cnn",
        "norm",
        "instance",
        f"needs conv feature maps (normalizes each channel over H x W); model={m.name} has none",
        "use model=cnn, or norm=layer (the MLP analogue: each example over its features)",
    )


def normalized_widths(model: Any) -> List[int]:
    """Feature/channel counts of the layers the block norms act on."""
    if model.name == "cnn":
        return sorted(set(model.channels))
    if model.name == "resmlp":
        return sorted({model.width, model.width // 2})
    return [model.width]


# Knobs that only some settings use: (the key that decides, its values where the knob has an effect).
# Set on the command line where no job uses it, a knob gets a warning (nrexp/cli.py: preflight):
# `optim=adam optim.momentum=0.5` runs, but the momentum does nothing, which the user should know.
APPLIES_WITH = {
    "norm.momentum": ("norm.name", ("batch",)),
    "norm.groups": ("norm.name", ("group",)),
    "optim.momentum": ("optim.name", ("sgd",)),
    "optim.betas": ("optim.name", ("adam", "adamw")),
    "dropout.spatial": ("model.name", ("cnn",)),
    "model.channels": ("model.name", ("cnn",)),
    "model.blocks_per_stage": ("model.name", ("cnn",)),
    "model.pool": ("model.name", ("cnn",)),
    "model.depth": ("model.name", ("mlp", "resmlp")),
    "model.width": ("model.name", ("mlp", "resmlp")),
    "norm.position": ("model.name", ("mlp", "cnn")),
}


def unused_knobs(keys: Any, base: Any, variants: List[Any]) -> List[str]:
    """One warning line for each of `keys` (set on the command line) that has no effect in any job: a knob
    of another optimizer, norm or model (APPLIES_WITH), or trainer.epochs beside trainer.max_steps.
    `base` is the config of the fixed overrides; `variants` are (swept key, config with one of its values)
    of a sweep: where the deciding key is swept, its values decide, else base's."""
    from omegaconf import OmegaConf

    def values(decider: str) -> List[str]:
        swept = [cfg for key, cfg in variants if key in (decider, decider.split(".")[0])]
        return sorted({str(getattr(v, "value", v)) for v in (OmegaConf.select(c, decider) for c in swept or [base])})

    lines = []
    for key in dict.fromkeys(keys):
        if key == "trainer.epochs" and "None" not in values("trainer.max_steps"):
            lines.append(
                "trainer.epochs has no effect: trainer.max_steps is set, and it decides how long the run "
                "trains. Fix: drop one of them"
            )
        elif key == "trainer.epochs" and "None" not in values("trainer.max_examples"):
            lines.append(
                "trainer.epochs has no effect: trainer.max_examples is set, and it decides how long the run "
                "trains. Fix: drop one of them"
            )
        if key in APPLIES_WITH:
            decider, used_with = APPLIES_WITH[key]
            found, group = values(decider), decider.split(".")[0]
            if not set(found) & set(used_with):
                lines.append(
                    f"{key} has no effect with {group}={','.join(found)}: it is used by "
                    f"{group}={'|'.join(used_with)} only. Fix: drop it, or pick one of those"
                )
    return lines


def validate_input_shape(cfg: Any, input_shape: Any) -> None:
    """Checks that need the data's shape (C, H, W), known once the dataset is loaded."""
    m = cfg.model
    if m.name != "cnn":
        return
    _check(
        len(input_shape) == 3,
        "model",
        "cnn",
        f"needs image input (C, H, W), got shape {tuple(input_shape)}",
        "use an image dataset, or model=mlp",
    )
    side = min(input_shape[1:])
    pool = getattr(m.pool, "value", m.pool)
    halvings = len(m.channels) - 1 if pool != "none" else 0
    last = side // 2**halvings
    _check(
        last >= 1,
        "model.channels",
        list(m.channels),
        f"{len(m.channels)} stages halve a {side}x{side} input {halvings} times, below 1x1",
        f"use at most {side.bit_length()} stages, or model.pool=none",
    )
    _check(
        cfg.norm.name != "instance" or last >= 2,
        "norm",
        "instance",
        f"the last cnn stage is {last}x{last}: one position per channel normalizes to 0",
        "use fewer stages, model.pool=none, or another norm",
    )


def validate_data_size(data: Any, n_train_available: int) -> None:
    """Checks of the `data` node that need the dataset's size (known only once it is located)."""
    _check(
        data.train_size is None or data.train_size <= n_train_available,
        "data.train_size",
        data.train_size,
        f"this training set has {n_train_available} examples",
        f"use data.train_size<={n_train_available}",
    )
    n_train = data.train_size or n_train_available
    _check(
        data.batch_size <= n_train,
        "data.batch_size",
        data.batch_size,
        f"larger than the {n_train} training examples",
        f"use data.batch_size<={n_train}",
    )


# --------------------------------------------------------------------------------------------
# Help text generated from the schema, for `nrexp train --help`.


def _knob_lines(schema: type, prefix: str = "") -> List[str]:
    lines = []
    for f in dataclasses.fields(schema):
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            lines.append("")
            lines += _knob_lines(type(default), prefix + f.name + ".")
            continue
        if isinstance(default, Enum):
            default = default.value
        shown = "null" if default is None else default
        if "${" in str(shown):  # an interpolation: its meaning says what it resolves to
            shown = "(env)"
        lines.append(f"  {prefix + f.name:<28} {str(shown):<10} {f.metadata.get('doc', '')}")
    return lines


def help_text() -> str:
    """Body of `nrexp train --help`: groups, then every knob with its default and meaning."""
    knobs = "\n".join(_knob_lines(TrainConfig))
    return "\n".join(
        [
            "nrexp train: train one network (or a sweep with -m) and log per-layer statistics to TensorBoard.",
            "",
            "  nrexp train norm=batch dropout.p=0.2",
            "  nrexp train -m norm=none,layer,batch init.scale=1,2,3",
            "  tensorboard --logdir outputs",
            "",
            "== Config groups (group=option) ==",
            "$APP_CONFIG_GROUPS",
            "",
            "== Sweep launchers (nrexp train -m ... hydra/launcher=<name>) ==",
            "basic (default: one job after another) | fused (nrexp: jobs that differ only in "
            + ", ".join(FUSED_FREE_KEYS),
            "  train together as one vectorized model; hydra.launcher.max_members, default 64)",
            "  | joblib (hydra.launcher.n_jobs) | submitit_local | submitit_slurm | slurm_gpu (a SLURM preset).",
            "  Sweeper: hydra/sweeper=optuna_wd_dropout",
            "  A killed sweep: the same command + hydra.sweep.dir=<its dir> sweep.resume=true (completed jobs skipped,",
            "  the others resumed from their checkpoint or run again; docs/faults.md)",
            "",
            "== Knobs (key  default  meaning) ==",
            knobs,
            "",
            "== Resolved config of this command ==",
            "$CONFIG",
            "Hydra's own flags (-m, --cfg job, --info, shell completion): nrexp train --hydra-help",
        ]
    )


def fresh_dir(path: str, suffix: str = "") -> str:
    """`path` + `suffix`, or `path_1` + `suffix`, `path_2` + `suffix`... whichever is new, created now so no
    other run can take it (`outputs/<day>/12-00-00_1_norm=batch`: the count follows the time, so that it
    never reads as part of a value).

    Registered as the `nrexp.fresh_dir` resolver for hydra.run.dir: two runs started in the same second
    (or a clock that repeats) never share or overwrite a run directory. OmegaConf caches the result per
    config, so one run resolves to one directory however often Hydra reads it.
    """
    candidate, n = Path(path + suffix), 0
    candidate.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            candidate.mkdir()
            return str(candidate)
        except FileExistsError:
            n += 1
            candidate = Path(f"{path}_{n}{suffix}")


def register() -> None:
    """Make the schema, the help page and our resolver known to Hydra (before the Hydra app starts)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("nrexp.fresh_dir", fresh_dir, use_cache=True, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(
        group="hydra/help",
        name="nrexp",
        node={"app_name": "nrexp train", "header": "", "footer": "", "template": help_text()},
    )
