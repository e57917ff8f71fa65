"""`nrexp evaluate <run dir>`: re-evaluate a trained run, on shifted test data, with BatchNorm's running
statistics or with statistics re-estimated on the test batches (Schneider et al. 2020).

    nrexp evaluate outputs/2026-11-22/00-10-00 --shift noise=0.5 --bn-stats running
    nrexp evaluate outputs/2026-11-22/00-10-00 --shift contrast=0.3 --bn-stats test --batch-size 128

The model is rebuilt from the run's checkpoint (its recorded config, weights and BatchNorm buffers) and
the run's dataset is loaded as it was trained (same source, same normalization). Nothing in the run
directory is changed.

Shifts act on the test images in pixel units ([0, 1]) before the dataset's normalization, in the order
given (each is deterministic: the noise is drawn from a generator seeded with --seed):
- noise=S:      add Gaussian noise of standard deviation S, then clip to [0, 1] (ImageNet-C's Gaussian noise)
- contrast=C:   each image's pixels move towards that image's mean: m + C (x - m); C < 1 lowers contrast
- translate=K:  move the image K pixels right and K pixels down, filling with black (MNIST's background)

--bn-stats:
- running: BatchNorm layers use the running averages stored in training (ordinary eval mode).
- test:    each BatchNorm layer normalizes with the mean and variance of the current test batch (train-mode
           BatchNorm on a copy of the model, so the stored statistics are untouched; dropout stays off).
           Test batches are --batch-size consecutive examples in file order (default: data.eval_batch_size);
           the whole test split at once with --batch-size equal to its size.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from nrexp.errors import ConfigError, error
from nrexp.runs import Run

SHIFTS = ("noise", "contrast", "translate")
BN_STATS = ("running", "test")


class EvaluateError(ConfigError):
    """A bad argument or run directory: reported as one line, exit code 2."""


@dataclass
class Evaluation:
    run_dir: str
    shift: str  # e.g. "noise=0.5" or "none"
    bn_stats: str
    batch_size: int
    loss: float
    acc: float
    n: int
    data_source: str


def parse_shift(text: str) -> tuple[str, float]:
    """'noise=0.5' -> ('noise', 0.5), with the range of each kind checked."""
    kind, sep, value = text.partition("=")
    if not sep or kind not in SHIFTS:
        raise EvaluateError(
            f"--shift {text!r} is invalid: expected KIND=VALUE with KIND one of {', '.join(SHIFTS)}. "
            "Fix: e.g. --shift noise=0.5, --shift contrast=0.3 or --shift translate=2"
        )
    try:
        number = float(value)
    except ValueError:
        raise EvaluateError(
            f"--shift {text!r} is invalid: {value!r} is not a number. Fix: e.g. --shift {kind}=0.5"
        ) from None
    if kind == "noise" and not number >= 0:
        raise EvaluateError(f"--shift {text!r} is invalid: the noise std must be >= 0. Fix: e.g. --shift noise=0.5")
    if kind == "contrast" and not number >= 0:
        raise EvaluateError(
            f"--shift {text!r} is invalid: the contrast factor must be >= 0. Fix: e.g. --shift contrast=0.3"
        )
    if kind == "translate" and not (number == int(number) and 0 <= number < 28):
        raise EvaluateError(
            f"--shift {text!r} is invalid: translate takes whole pixels 0..27. Fix: e.g. --shift translate=2"
        )
    return kind, number


def apply_shifts(x, shifts: Sequence[tuple[str, float]], mean: Sequence[float], std: Sequence[float], seed: int = 0):
    """Shift normalized images x (N, C, H, W): to pixel units, shift, clip to [0, 1], normalize back.
    `mean`, `std`: the dataset's per-channel normalization (nrexp.data.STATS)."""
    import torch

    if not shifts:
        return x
    mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    pixels = x * std + mean
    gen = torch.Generator(device=x.device).manual_seed(seed)
    for kind, value in shifts:
        if kind == "noise":
            pixels = pixels + value * torch.randn(pixels.shape, generator=gen, device=x.device)
        elif kind == "contrast":
            m = pixels.mean(dim=(1, 2, 3), keepdim=True)
            pixels = m + value * (pixels - m)
        elif kind == "translate":
            k = int(value)
            if k:
                moved = torch.zeros_like(pixels)
                moved[:, :, k:, k:] = pixels[:, :, :-k, :-k]
                pixels = moved
        pixels = pixels.clamp(0.0, 1.0)
    return (pixels - mean) / std


def load_run(run_dir: Path, device: str = "cpu"):
    """(config, model with the checkpoint's weights and buffers, dataset) of a finished run."""
    import torch
    from omegaconf import OmegaConf

    from nrexp.checkpoint import CHECKPOINT, read_checkpoint
    from nrexp.config import TrainConfig
    from nrexp.data import load_dataset
    from nrexp.models import build_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvaluateError(
            f"run directory {str(run_dir)!r} does not exist. Fix: pass the directory of a run "
            "(it holds summary.json and checkpoint.pt)"
        )
    run = Run(run_dir)
    if run.status == "diverged":  # no checkpoint at its end; any it has is a periodic one, no result
        saved = ""
        if (run_dir / CHECKPOINT).is_file():
            step = read_checkpoint(run_dir / CHECKPOINT)["state"].get("step")
            saved = f"; its {CHECKPOINT} is a periodic one, saved after {step} steps, not the run's result"
        raise EvaluateError(
            f"{str(run_dir)!r} diverged (its loss was non-finite at step "
            f"{run.summary.get('diverged_at_step')}){saved}. Fix: evaluate a run that completed "
            "(a diverged setting's accuracy is in its summary.json)"
        )
    if not (run_dir / CHECKPOINT).is_file():
        raise EvaluateError(
            f"{str(run_dir)!r} has no {CHECKPOINT}. Fix: pass the directory of a finished run "
            "(runs write a checkpoint at the end)"
        )
    payload = read_checkpoint(run_dir / CHECKPOINT)  # CheckpointError (one line) if corrupt
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), payload["config"])
    dev = torch.device(device)
    data = load_dataset(cfg.data, dev)
    model = build_model(cfg, data.input_shape, data.num_classes).to(dev)
    model.load_state_dict(payload["model"])
    model.eval()
    return cfg, model, data


def has_batchnorm(model) -> bool:
    from torch import nn

    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def with_test_batch_stats(model):
    """A copy of `model` in eval mode except its BatchNorm layers, which normalize with each batch's own
    statistics (train mode). The copy's running buffers may change; the original's never do."""
    from torch import nn

    twin = copy.deepcopy(model).eval()
    for m in twin.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    return twin


def evaluate(model, x, y, batch_size: int, prefix: str, bn_stats: str = "running") -> dict[str, float]:
    """Mean cross-entropy and accuracy of `model` on (x, y) in batches of `batch_size`, as
    {prefix/loss, prefix/acc}: the one evaluation of nrexp (training's and `nrexp evaluate`'s).

    In eval mode: BatchNorm uses its running statistics, or with bn_stats="test" each batch's own (on a
    copy: the stored statistics stay as they were). The model's train/eval mode is restored after."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    net = with_test_batch_stats(model) if bn_stats == "test" else model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            if bn_stats == "test" and len(xb) < 2:  # BatchNorm cannot normalize a batch of one: pair it
                logits = net(x[i - 1 : i + 1])[-1:]
            else:
                logits = net(xb)
            loss_sum += F.cross_entropy(logits, yb, reduction="sum")
            correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    total_loss, n_correct = torch.stack([loss_sum, correct.float()]).tolist()  # one transfer from the device
    return {f"{prefix}/loss": total_loss / len(x), f"{prefix}/acc": n_correct / len(x)}


def evaluate_run(
    run_dir,
    shifts: Sequence[str] = (),
    bn_stats: str = "running",
    batch_size: int | None = None,
    split: str = "test",
    seed: int = 0,
    loaded=None,
) -> Evaluation:
    """Evaluate one run (see the module docstring). `loaded` reuses load_run()'s result."""
    from nrexp.data import STATS

    if bn_stats not in BN_STATS:
        raise EvaluateError(
            f"--bn-stats {bn_stats!r} is invalid: one of {', '.join(BN_STATS)}. "
            "Fix: --bn-stats running (stored averages) or --bn-stats test "
            "(re-estimated per test batch)"
        )
    parsed = [parse_shift(s) for s in shifts]
    if batch_size is not None and batch_size < 1:
        raise EvaluateError(f"--batch-size {batch_size} is invalid: must be >= 1. Fix: e.g. --batch-size 1000")
    if bn_stats == "test" and batch_size == 1:
        raise EvaluateError(
            "--batch-size 1 with --bn-stats test is invalid: a batch of one example has no "
            "variance to normalize by. Fix: use --batch-size 2 or more"
        )
    cfg, model, data = loaded or load_run(run_dir)
    if bn_stats == "test" and not has_batchnorm(model):
        raise EvaluateError(
            f"--bn-stats test needs a run with BatchNorm; {str(run_dir)!r} has norm={cfg.norm.name}. "
            "Fix: use --bn-stats running, or pass a norm=batch run"
        )
    mean, std = STATS[data.name]  # per channel, in pixel units
    x, y = (data.test_x, data.test_y) if split == "test" else (data.train_x, data.train_y)
    x = apply_shifts(x, parsed, mean, std, seed)
    bs = batch_size or cfg.data.eval_batch_size
    result = evaluate(model, x, y, bs, split, bn_stats)
    loss, acc = result[f"{split}/loss"], result[f"{split}/acc"]
    label = ",".join(f"{k}={v:g}" for k, v in parsed) or "none"
    return Evaluation(str(run_dir), label, bn_stats, bs, loss, acc, len(x), data.source)


def main(argv: list[str]) -> int:
    """Entry of `nrexp evaluate`; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="nrexp evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", help="a run directory (holding checkpoint.pt)")
    parser.add_argument(
        "--shift",
        action="append",
        default=[],
        metavar="KIND=VALUE",
        help="noise=STD | contrast=FACTOR | translate=PIXELS (repeatable; applied in order)",
    )
    parser.add_argument("--bn-stats", default="running", help="running (stored averages) | test (per test batch)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="evaluation batch size (default: data.eval_batch_size)"
    )
    parser.add_argument("--split", default="test", choices=("test", "train"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise shift")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")

    def fail(message: str) -> None:  # argparse's own errors, as our one line
        raise EvaluateError(message + ". Fix: see nrexp evaluate --help")

    parser.error = fail  # type: ignore[assignment]
    try:
        args = parser.parse_args(argv)
        result = evaluate_run(Path(args.run_dir), args.shift, args.bn_stats, args.batch_size, args.split, args.seed)
    except (EvaluateError, ConfigError) as err:
        return error(str(err))
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(
            f"{result.run_dir}: {args.split} shift={result.shift} bn-stats={result.bn_stats} "
            f"batch={result.batch_size}: loss {result.loss:.4f}, acc {result.acc:.4f} "
            f"({result.n} examples, data {result.data_source})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
