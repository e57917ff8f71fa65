"""The training loop: build -> step -> statistics -> eval -> checkpoint -> summary.

Read top-down. `train(cfg, run_dir)` is everything one run does; the helpers below it are small.
Per-layer statistics are gathered every `trainer.log_every` steps and at step 0 (the network at init):
on those steps the forward pass also returns each layer's activation, and after the backward pass the
monitor computes all norms on the device and copies them to the host once. Other steps run bare.
"""
from __future__ import annotations

import logging
import math
import platform
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import nrexp
from nrexp.checkpoint import save_checkpoint
from nrexp.config import ConfigError, validate
from nrexp.console import TrainProgress, print_summary
from nrexp.data import Dataset, TrainBatches, eval_batches, load_dataset
from nrexp.init import init_weights
from nrexp.models import build_model
from nrexp.monitor import LayerMonitor
from nrexp.optim import build_optimizer
from nrexp.writers import TensorBoardWriter, write_summary

log = logging.getLogger("nrexp")


def train(cfg, run_dir: Path) -> Dict:
    """Train one network as `cfg` says, writing events, checkpoint and summary.json into `run_dir`."""
    validate(cfg)
    run_dir = Path(run_dir)
    t = cfg.trainer
    device = resolve_device(str(getattr(t.device, "value", t.device)))
    torch.manual_seed(cfg.seed)

    # ---- build: data on the device, model, optimizer, monitor, writers
    data = load_dataset(cfg.data, device)
    log.info("device %s | data %s (%s): %d train / %d test examples", device, data.name, data.source,
             len(data.train_x), len(data.test_x))
    model = build_model(cfg, data.input_shape, data.num_classes).to(device)
    init_weights(model, cfg.init.name, cfg.init.scale, str(getattr(cfg.model.activation, "value", cfg.model.activation)))
    optimizer = build_optimizer(model, cfg.optim)
    batches = TrainBatches(data.train_x, data.train_y, cfg.data.batch_size, cfg.seed)
    total_steps = t.max_steps or t.epochs * batches.steps_per_epoch
    eval_every = t.eval_every or batches.steps_per_epoch
    monitor = LayerMonitor(model.monitored_layers())
    writer = TensorBoardWriter(run_dir, monitor.names)
    writer.text("run/config", "```\n" + OmegaConf.to_yaml(cfg, resolve=True) + "```")
    writer.text("run/data_source", f"{data.name} from {data.source} on {device}")

    # ---- the loop
    started = time.perf_counter()
    step, status = 0, "completed"
    loss_sum = torch.zeros((), device=device)  # summed on the device between logging steps: no sync
    correct_sum = torch.zeros((), device=device)
    steps_since_log, clock, eval_seconds = 0, time.perf_counter(), 0.0
    last_stats: Dict = {}
    init_stats: Dict = {}
    metrics: Dict[str, float] = {}
    with TrainProgress(total_steps, batches.steps_per_epoch, enabled=t.progress) as progress:
        while step < total_steps:
            epoch = step // batches.steps_per_epoch
            for x, y in batches.epoch(epoch, start_step=step % batches.steps_per_epoch):
                logging_step = step % t.log_every == 0
                with_stats = logging_step and t.layer_stats
                activations = [] if with_stats else None
                logits = model(x, activations)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if with_stats:
                    stats = monitor.before_step(activations)
                optimizer.step()

                loss_sum += loss.detach()
                correct_sum += (logits.detach().argmax(1) == y).sum()
                steps_since_log += 1
                if logging_step:
                    stats = monitor.after_step(stats) if with_stats else {}
                    scalars = {"train/loss": loss_sum / steps_since_log,
                               "train/acc": correct_sum / (steps_since_log * len(y))}
                    last_stats, values = monitor.to_host(stats, scalars)  # the one host transfer
                    now = time.perf_counter()
                    values["throughput/samples_per_s"] = steps_since_log * len(y) / max(now - clock, 1e-9)
                    values["lr"] = optimizer.param_groups[0]["lr"]
                    writer.layer_stats(step, last_stats)
                    writer.scalars(step, values)
                    progress.update(step, values)
                    if step == 0 and with_stats:
                        init_stats = last_stats
                        writer.depth_plot(0, last_stats, "init")
                    if not math.isfinite(values["train/loss"]):
                        status = "diverged"
                    loss_sum.zero_(), correct_sum.zero_()
                    steps_since_log, clock = 0, time.perf_counter()
                step += 1
                if status == "diverged":
                    break
                if step % eval_every == 0 or step == total_steps:
                    paused = time.perf_counter()
                    metrics.update(evaluate(model, data.test_x, data.test_y, cfg.data.eval_batch_size, "test"))
                    writer.scalars(step, {k: metrics[k] for k in ("test/loss", "test/acc")})
                    progress.update(step, metrics)
                    if last_stats:
                        writer.depth_plot(step, last_stats, "latest")
                    clock += time.perf_counter() - paused  # throughput counts training time only
                    eval_seconds += time.perf_counter() - paused
                if step >= total_steps:
                    break
            if status == "diverged":
                log.warning("non-finite training loss by step %d: stopping (status diverged)", step)
                break

        # ---- the end: statistics of the trained net, final evaluation, checkpoint, summary
        loop_seconds = time.perf_counter() - started - eval_seconds
        final_stats = probe(model, monitor, data, cfg.data.batch_size) if t.layer_stats else {}
        if final_stats:
            writer.layer_stats(step, final_stats)
            writer.depth_plot(step, final_stats, "final")
        metrics.update(evaluate(model, data.test_x, data.test_y, cfg.data.eval_batch_size, "test"))
        metrics.update(evaluate(model, data.train_x, data.train_y, cfg.data.eval_batch_size, "train"))
        writer.scalars(step, {k: metrics[k] for k in ("test/loss", "test/acc")})
        progress.advance_to(step)

    save_checkpoint(run_dir / "checkpoint.pt", {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
    })
    summary = {
        "status": status,
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "metrics": {k: metrics[k] for k in ("train/loss", "train/acc", "test/loss", "test/acc")},
        "layers": {"init": init_stats, "final": final_stats},
        "steps": step,
        "epochs": step / batches.steps_per_epoch,
        "wall_time_s": time.perf_counter() - started,
        "train_time_s": loop_seconds,  # the step loop alone: no periodic evaluation, no final probe
        "samples_per_s": step * cfg.data.batch_size / max(loop_seconds, 1e-9),
        "device": str(device),
        "data_source": data.source,
        "run_dir": str(run_dir),
        "versions": versions(),
    }
    write_summary(run_dir, summary)
    writer.hparams(step, summary["config"], summary["metrics"])  # the run's row in TensorBoard's HParams tab
    writer.close()
    print_summary(summary)
    return summary


# ------------------------------------------------------------------------------------------------


def resolve_device(requested: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; `cuda` without a GPU is a user error, said clearly."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device='cuda' is invalid: no CUDA GPU is visible to PyTorch on this "
                          "machine. Fix: use trainer.device=auto (CUDA when present, else CPU) or trainer.device=cpu")
    return torch.device(requested)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, prefix: str) -> Dict[str, float]:
    """Loss and accuracy over a whole split in eval mode (BatchNorm uses its running statistics)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    for xb, yb in eval_batches(x, y, batch_size):
        logits = model(xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    loss, acc = (torch.stack([loss_sum, correct.float()]) / len(x)).tolist()
    return {f"{prefix}/loss": loss, f"{prefix}/acc": acc}


def probe(model, monitor: LayerMonitor, data: Dataset, batch_size: int) -> Dict[str, Dict[str, float]]:
    """Per-layer statistics of the network as it is now, on the first training batch, without updating it."""
    x, y = data.train_x[:batch_size], data.train_y[:batch_size]
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # BatchNorm running stats stay as they were
    activations = []
    loss = F.cross_entropy(model(x, activations), y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    stats = monitor.before_step(activations)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    layer_stats, _ = monitor.to_host(stats, {})
    return layer_stats


def versions() -> Dict[str, str]:
    import hydra

    return {"nrexp": nrexp.__version__, "torch": torch.__version__, "hydra": hydra.__version__,
            "python": platform.python_version(), "platform": sys.platform}
