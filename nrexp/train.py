"""The training loop: build -> step -> statistics -> eval -> checkpoint -> summary.

Read top-down. `train(cfg, run_dir)` is everything one run does; the helpers below it are small.

Per-layer statistics are gathered every `trainer.log_every` steps and at step 0 (the network at init):
on those steps the forward pass also returns each layer's activation, and after the backward pass the
monitor captures W, dL/dW and the activations and computes all norms on the device (on CPU on a
worker thread, while the next step runs: see monitor.py), copied to the host once. The logging step is
written when they are in, at the latest before the next optimizer step. Other steps run bare.

`step` counts optimizer updates done. Each loop iteration first does the work due at this step
boundary (checkpoint, then evaluation: both describe the weights after `step` updates), then one
training step whose logged statistics are tagged with `step` too. A resumed run therefore restarts at a
boundary and re-logs from there, and TensorBoard drops anything the old run logged at or after it.
"""
from __future__ import annotations

import logging
import math
import platform
import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import nrexp
from nrexp import preact
from nrexp.checkpoint import CHECKPOINT, load_for_resume, save_checkpoint
from nrexp.config import ConfigError, validate
from nrexp.console import TrainProgress, print_summary
from nrexp.data import Dataset, TrainBatches, eval_batches, load_dataset
from nrexp.init import init_weights
from nrexp.models import build_model
from nrexp.monitor import LayerMonitor, keeping_denormal_mode, set_flush_denormal
from nrexp.optim import build_optimizer
from nrexp.signals import GracefulStop
from nrexp.writers import TensorBoardWriter, finite_or_none, write_summary

log = logging.getLogger("nrexp")


class Diverged(RuntimeError):
    """Raised instead of stopping quietly when trainer.on_nonfinite=raise."""


@dataclass
class PendingLog:
    """A logging step not written yet: its per-layer statistics may still be computed (see write_log)."""
    step: int
    stats: Optional[Future]  # monitor.Capture.statistics(), or None without per-layer statistics
    scalars: Dict[str, torch.Tensor]  # train/loss and train/acc since the last log, on the device
    samples: int
    seconds: float  # training time since the last log: throughput
    lr: float


def train(cfg, run_dir: Path, resume: bool = False) -> Dict:
    """Train one network as `cfg` says, writing events, checkpoint and summary.json into `run_dir`.

    With `resume=True`, continue from `run_dir`/checkpoint.pt (same config, same run dir).
    SIGINT/SIGTERM from here on stop the run cleanly at the next step boundary.
    """
    with GracefulStop() as stop, keeping_denormal_mode():
        return _train(cfg, Path(run_dir), resume, stop)


def _train(cfg, run_dir: Path, resume: bool, stop: GracefulStop) -> Dict:
    validate(cfg)
    t = OmegaConf.to_object(cfg.trainer)  # a plain TrainerConfig: the loop reads it every step (~8 us per DictConfig read)
    device = resolve_device(str(getattr(t.device, "value", t.device)))
    set_flush_denormal(t.flush_denormal, device)  # before any thread starts: they inherit it
    torch.manual_seed(cfg.seed)

    # ---- build: data on the device, model, optimizer, monitor
    data = load_dataset(cfg.data, device)
    log.info("device %s | data %s (%s): %d train / %d test examples", device, data.name, data.source,
             len(data.train_x), len(data.test_x))
    model, optimizer, monitor = build(cfg, data, device)
    batches = TrainBatches(data.train_x, data.train_y, cfg.data.batch_size, cfg.seed, augment=cfg.data.augment)
    total_steps = t.max_steps or t.epochs * batches.steps_per_epoch
    eval_every = t.eval_every or batches.steps_per_epoch
    forward = CompiledForward(model, device) if t.compile else model  # trainer.compile: see CompiledForward

    # Everything a resumed run needs to continue exactly where it stopped (see checkpoint.py).
    state = {"step": 0, "loss_sum": 0.0, "correct_sum": 0.0, "steps_since_log": 0, "seconds_since_log": 0.0,
             "init_stats": {}, "metrics": {}, "elapsed_s": 0.0}
    if resume:
        state = load_for_resume(run_dir / CHECKPOINT, model, optimizer, monitor, device)
        log.info("resuming %s at step %d of %d", run_dir, state["step"], total_steps)
    step = start_step = state["step"]
    writer = TensorBoardWriter(run_dir, monitor.names, purge_step=step if resume else None)
    if not resume:
        writer.text("run/config", "```\n" + OmegaConf.to_yaml(cfg, resolve=True) + "```")
        writer.text("run/data_source", f"{data.name} from {data.source} on {device}")

    def checkpoint() -> None:
        save_checkpoint(run_dir / CHECKPOINT, model, optimizer, monitor, cfg, {
            **state, "step": step, "loss_sum": loss_sum, "correct_sum": correct_sum,  # to floats in there
            "steps_since_log": steps_since_log, "seconds_since_log": (loop_end or time.perf_counter()) - clock,
            "elapsed_s": state["elapsed_s"] + time.perf_counter() - started})

    # ---- the loop
    started, loop_end = time.perf_counter(), None  # loop_end: set when the step loop is over
    status, stop_signal, nonfinite_step = "completed", None, None
    loss_sum = torch.tensor(state["loss_sum"], device=device)  # summed on the device between logs: no sync
    correct_sum = torch.tensor(state["correct_sum"], device=device)
    # The throughput logged next covers the steps since the last log, some of them maybe taken before the
    # checkpoint this run resumes from: its clock starts as far back as those steps took. (Checkpoints
    # written before 2026-12-01 hold no seconds_since_log: that one window's figure is then too high.)
    steps_since_log, eval_seconds = state["steps_since_log"], 0.0
    clock = time.perf_counter() - state.get("seconds_since_log", 0.0)
    metrics, last_stats = state["metrics"], {}
    pending_log: Optional[PendingLog] = None
    each_step = checks_every_step(device)  # else the logging steps' host copies check the loss
    # bf16 autocast of the training forward only; weights, optimizer state and statistics stay fp32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")
    with TrainProgress(total_steps, batches.steps_per_epoch, enabled=t.progress) as progress:

        def write_pending_log() -> bool:
            """Write the last logging step: wait for its statistics (usually in by now), one host copy.
            That copy is where CUDA runs see a non-finite loss: the mean since the previous log is one.
            Returns whether the run has diverged (then no further step is taken)."""
            nonlocal pending_log, last_stats, nonfinite_step
            if pending_log is None:
                return nonfinite_step is not None
            entry, pending_log = pending_log, None
            layer_stats, values = monitor.to_host(entry.stats.result() if entry.stats is not None else {}, entry.scalars)
            last_stats, values = write_log(writer, entry.step, layer_stats, values, samples=entry.samples,
                                           seconds=entry.seconds, lr=entry.lr)
            progress.update(entry.step, values)
            if nonfinite_step is None and not math.isfinite(values["train/loss"]):
                nonfinite_step = entry.step
            if entry.step == 0 and entry.stats is not None:
                state["init_stats"] = last_stats
            return nonfinite_step is not None

        progress.advance_to(step)
        while step < total_steps:
            epoch = step // batches.steps_per_epoch
            for x, y in batches.epoch(epoch, start_step=step % batches.steps_per_epoch):
                if stop.requested:  # SIGINT/SIGTERM: stop at this boundary (checkpointed below)
                    break
                # -- work due at this boundary, on the weights after `step` updates
                if step > start_step and t.checkpoint_every and step % t.checkpoint_every == 0:
                    if write_pending_log():
                        break
                    checkpoint()
                if step > 0 and step % eval_every == 0:
                    if write_pending_log():
                        break
                    paused = time.perf_counter()
                    metrics.update(evaluate(model, data.test_x, data.test_y, cfg.data.eval_batch_size, "test"))
                    writer.scalars(step, {k: metrics[k] for k in ("test/loss", "test/acc")})
                    progress.update(step, metrics)
                    if last_stats:
                        writer.depth_plot(step, last_stats, "latest")
                    clock += time.perf_counter() - paused  # throughput counts training time only
                    eval_seconds += time.perf_counter() - paused

                # -- one training step
                logging_step = step % t.log_every == 0
                with_stats = logging_step and t.layer_stats
                activations = [] if with_stats else None
                armed = preact.arm(model, logging_step and t.preact_percentiles)  # preact/ percentiles
                with autocast:
                    # steps that record activations or pre-activations run eagerly (same weights)
                    logits = model(x, activations) if with_stats or armed else forward(x)
                    loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if write_pending_log():  # before W changes (its statistics read W); diverged: no step taken
                    break
                if with_stats:
                    captured = monitor.capture(activations)  # W, dL/dW, activations as this step found them
                optimizer.step()
                loss_sum += loss.detach()
                correct_sum += (logits.detach().argmax(1) == y).sum()
                steps_since_log += 1

                if logging_step:  # written by write_pending_log, at the latest after the next backward
                    pending_log = PendingLog(step, captured.statistics() if with_stats else None, {
                        "train/loss": loss_sum / steps_since_log, "train/acc": correct_sum / (steps_since_log * len(y))},
                        samples=steps_since_log * len(y), seconds=time.perf_counter() - clock,
                        lr=optimizer.param_groups[0]["lr"])
                    writer.scalars(step, preact.collect(armed))
                    loss_sum.zero_(), correct_sum.zero_()
                    steps_since_log, clock = 0, time.perf_counter()
                step += 1
                progress.advance_to(step)  # a no-op unless a live bar is shown

                # -- a non-finite loss ends the run here (see checks_every_step)
                if each_step and not math.isfinite(loss.item()):
                    nonfinite_step = step - 1
                    break
                if step >= total_steps:
                    break
            if nonfinite_step is not None or stop.requested:
                break
        write_pending_log()
        if nonfinite_step is None and not each_step and steps_since_log:
            # the steps after the last logging step, which no log has checked: one host copy at the end
            _, tail = monitor.to_host({}, {"loss_sum": loss_sum})
            if not math.isfinite(tail["loss_sum"]):
                nonfinite_step = step - 1
        stop_signal = stop.signum
        loop_end = time.perf_counter()

        if nonfinite_step is not None:
            status = "diverged"
            log.warning("non-finite training loss at step %d: stopping (status diverged)", nonfinite_step)
        elif stop_signal is not None:
            status = "interrupted"
            checkpoint()  # at a step boundary, so that `resume=` continues exactly from here
            log.warning("stopped by signal %d at step %d; checkpoint written. Continue with: nrexp train resume=%s",
                        stop_signal, step, run_dir)

        # ---- the end: statistics of the trained net, final evaluation, summary
        loop_seconds = loop_end - started - eval_seconds
        final_stats = {}
        if status != "interrupted":
            final_stats = final_evaluation(model, monitor, writer, data, cfg, step, metrics)
            progress.advance_to(step)
            if status == "completed":
                checkpoint()

    summary = finish_run(cfg, run_dir, writer, status=status, step=step, start_step=start_step, metrics=metrics,
                         init_stats=state["init_stats"], final_stats=final_stats,
                         steps_per_epoch=batches.steps_per_epoch,
                         wall_time_s=state["elapsed_s"] + time.perf_counter() - started, loop_seconds=loop_seconds,
                         device=device, data_source=data.source, nonfinite_step=nonfinite_step, signal=stop_signal,
                         extra={"compile": forward.status} if t.compile else None)  # whether compiling really ran
    if status == "diverged" and t.on_nonfinite == "raise":
        raise Diverged(f"non-finite training loss at step {nonfinite_step} (trainer.on_nonfinite=raise)")
    return summary


# ------------------------------------------------------------------------------------------------
# the pieces of a run, shared with nrexp/fused.py (which trains many runs at once)


def build(cfg, data: Dataset, device: torch.device):
    """The initialized model, its optimizer and its monitor. Call right after torch.manual_seed(cfg.seed):
    the default init of the layers and `init_weights` both draw from the global random stream."""
    model = build_model(cfg, data.input_shape, data.num_classes).to(device)
    init_weights(model, cfg.init.name, cfg.init.scale, str(getattr(cfg.model.activation, "value", cfg.model.activation)))
    return model, build_optimizer(model, cfg.optim), LayerMonitor(model.monitored_layers())


def write_log(writer: TensorBoardWriter, step: int, layer_stats: Dict, values: Dict, *, samples: int, seconds: float,
              lr: float):
    """Write one logging step, its numbers on the host: per-layer statistics, the scalars `values`
    (mean training loss and accuracy since the last log), throughput (`samples` in `seconds`) and
    the learning rate, which are added to `values`. Returns (layer_stats, values)."""
    values["throughput/samples_per_s"] = samples / max(seconds, 1e-9)
    values["lr"] = lr
    writer.layer_stats(step, layer_stats)
    writer.scalars(step, values)
    if step == 0 and layer_stats:
        writer.depth_plot(0, layer_stats, "init")
    return layer_stats, values


def final_evaluation(model, monitor: LayerMonitor, writer: TensorBoardWriter, data: Dataset, cfg, step: int,
                     metrics: Dict) -> Dict:
    """The trained net's per-layer statistics (the final probe) and its loss and accuracy on the test
    and training sets (into `metrics`), written at `step`. Returns the per-layer statistics."""
    final_stats = probe(model, monitor, data, cfg.data.batch_size) if cfg.trainer.layer_stats else {}
    if final_stats:
        writer.layer_stats(step, final_stats)
        writer.depth_plot(step, final_stats, "final")
    metrics.update(evaluate(model, data.test_x, data.test_y, cfg.data.eval_batch_size, "test"))
    metrics.update(evaluate(model, data.train_x, data.train_y, cfg.data.eval_batch_size, "train"))
    writer.scalars(step, {k: metrics[k] for k in ("test/loss", "test/acc")})
    return final_stats


def finish_run(cfg, run_dir: Path, writer: TensorBoardWriter, *, status: str, step: int, start_step: int,
               metrics: Dict, init_stats: Dict, final_stats: Dict, steps_per_epoch: int, wall_time_s: float,
               loop_seconds: float, device: torch.device, data_source: str, nonfinite_step=None, signal=None,
               extra: Dict | None = None, print_table: bool = True) -> Dict:
    """Write summary.json (atomically) and the run's HParams row, close TensorBoard; return the summary."""
    summary = {
        "status": status,
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "metrics": {k: metrics.get(k) for k in ("train/loss", "train/acc", "test/loss", "test/acc")},
        "layers": {"init": init_stats, "final": final_stats},
        "steps": step,
        "epochs": step / steps_per_epoch,
        "wall_time_s": wall_time_s,
        "train_time_s": loop_seconds,  # this process's step loop alone: no evaluation, no final probe
        "samples_per_s": (step - start_step) * cfg.data.batch_size / max(loop_seconds, 1e-9),
        "device": str(device),
        "data_source": data_source,
        "run_dir": str(run_dir),
        "versions": versions(),
        **(extra or {}),
    }
    if nonfinite_step is not None:
        summary["diverged_at_step"] = nonfinite_step
    if signal is not None:
        summary["signal"] = signal
    summary = finite_or_none(summary)
    write_summary(run_dir, summary)
    writer.hparams(step, summary["config"], summary["metrics"])  # the run's row in TensorBoard's HParams tab
    writer.close()
    if print_table:
        print_summary(summary)
    return summary


def checks_every_step(device: torch.device) -> bool:
    """Whether the loop reads every step's loss to stop at the first NaN/inf: on CPU, where `.item()`
    costs nothing. On CUDA it would make the host wait for the GPU each step; there the host copy of
    each logging step checks the mean loss since the previous log instead, and a run stops right
    after the first logging step whose window holds a non-finite loss."""
    return device.type == "cpu"


def resolve_device(requested: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; `cuda` without a GPU is a user error, said clearly."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device='cuda' is invalid: no CUDA GPU is visible to PyTorch on this "
                          "machine. Fix: use trainer.device=auto (CUDA when present, else CPU) or trainer.device=cpu")
    return torch.device(requested)


class CompiledForward:
    """trainer.compile=true: the model's forward through torch.compile, for the steps that record
    nothing. Logging steps call the model itself: they pass a list to collect each layer's activation
    and may arm a block to keep its pre-activation (models.py, preact.py); run eagerly, that costs no
    graph variants or recompilations, and the compiled and eager paths share the same parameters.

    Whether this machine can compile is checked before anything is written (one ConfigError line).
    Should compilation still fail (an unusual toolchain), the run warns once and goes on eagerly, with
    the reason in summary.json's "compile": a speed knob should not cost the run its results.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device):
        check_compile_available(device)
        self.model, self.compiled = model, torch.compile(model)
        self.status = "not used"  # until the first compiled step: "compiled", or "failed, eager: <reason>"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                logits = self.compiled(x)
                self.status = "compiled"
                return logits
            except Exception as err:  # noqa: BLE001 - compilation failed: fall back (an eager error re-raises below)
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
                log.warning("trainer.compile: torch.compile failed (%s); continuing without it", reason)
                self.compiled, self.status = None, f"failed, eager: {reason}"
        return self.model(x)


def check_compile_available(device: torch.device) -> None:
    """torch.compile's default backend builds C++ kernels on CPU and triton kernels on CUDA."""
    import os
    import shutil

    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError("trainer.compile=true is invalid here: torch.compile on CUDA needs triton, which is "
                              "not installed. Fix: pip install triton, or use trainer.compile=false")
    elif device.type == "cpu":
        cxx = os.environ.get("CXX", "g++")
        if shutil.which(cxx) is None:
            raise ConfigError(f"trainer.compile=true is invalid here: torch.compile on CPU builds C++ kernels with "
                              f"{cxx!r} ($CXX, default g++), which is not on PATH. Fix: install g++ (apt-get install "
                              "g++) or set CXX, or use trainer.compile=false")


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
    # dropout here must not shift the random stream (CPU's, and the GPU's when it runs there)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        activations = []
        loss = F.cross_entropy(model(x, activations), y)
        model.zero_grad(set_to_none=True)
        loss.backward()
        stats = monitor.current_statistics(activations)
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
