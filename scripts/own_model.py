"""Monitor your own model with nrexp: torchvision's resnet18 at 32x32 on generated data, on CPU.

    python scripts/own_model.py --log-dir runs/resnet18 --steps 20
    tensorboard --logdir runs

Every Conv2d and the final Linear (named by their path: conv1, layer1.0.conv1, ..., fc) get nrexp's
per-layer statistics (act_norm/<layer>, act_cos/<layer>, grad_norm/<layer>, ...), the depth profile at init
(depth_init/<metric>, x = layer index) and, with --histograms, hist_act/hist_grad/hist_weight: the same
tags and layout as `nrexp train` writes (docs/tensorboard.md).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def generated_data(n: int, classes: int = 10, seed: int = 0):
    """n 3x32x32 images: one fixed random pattern per class plus noise (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(classes, 3, 32, 32, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return patterns[y] + 0.5 * torch.randn(n, 3, 32, 32, generator=g), y


def main(
    log_dir: str | None = "runs/resnet18",
    steps: int = 20,
    batch_size: int = 32,
    log_every: int = 5,
    lr: float = 0.05,
    histograms: bool = False,
    seed: int = 0,
):
    """Train; returns (model, watcher, {step: {metric: {layer: value}}} of the logged steps)."""
    import torchvision

    import nrexp.monitor

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x_all, y_all = generated_data(steps * batch_size, seed=seed)
    w = nrexp.monitor.watch(model, log_dir=log_dir, histograms=histograms)
    logged = {}
    for step in range(steps):
        x, y = x_all[step * batch_size : (step + 1) * batch_size], y_all[step * batch_size : (step + 1) * batch_size]
        with w.record(step % log_every == 0):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        w.before_step()
        opt.step()
        acc = (logits.argmax(1) == y).float().mean().item()
        stats = w.after_step(step, {"train/loss": loss.item(), "train/acc": acc})
        if stats is not None:
            logged[step] = stats
            print(
                f"step {step:3d}  loss {loss.item():.3f}  acc {acc:.2f}"
                f"  act_norm conv1 {stats['act_norm']['conv1']:.2f}"
                f"  fc {stats['act_norm']['fc']:.2f}  grad_norm conv1 {stats['grad_norm']['conv1']:.3g}"
            )
    w.close()
    return model, w, logged


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-dir", default="runs/resnet18")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--histograms", action="store_true")
    args = parser.parse_args()
    main(args.log_dir, args.steps, args.batch_size, args.log_every, histograms=args.histograms)
