"""The training loop: build -> step -> statistics -> eval -> checkpoint -> summary.

`run_loop` is the one step loop. It drives a `Trainee`: M >= 1 members trained together, each a run
with its own run dir. A solo run (`SoloRun`, below) is one member; a fused group (nrexp/fused.py) is
many members computed as one stacked model. The loop owns the schedule (named predicates: `Every`),
the running sums and clocks (one `LoopState`), logging, divergence, signals and the end of each run;
a trainee owns only how a step is computed and how a member's state is read out.

`step` counts optimizer updates done. Each iteration first does the work due at this step boundary
(checkpoint, then evaluation: both see the weights after `step` updates), then one training step,
whose logged statistics are tagged `step` too: step 0 is the network at init. A logging step's
statistics are finished while the next step's forward and backward run, and written before its
update changes the weights they read.
"""

from __future__ import annotations

import logging
import math
import platform
import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import nrexp
from nrexp import preact
from nrexp.checkpoint import CHECKPOINT, load_for_resume, save_checkpoint
from nrexp.config import validate
from nrexp.console import TrainProgress, print_summary
from nrexp.data import Dataset, TrainBatches, load_dataset
from nrexp.errors import ConfigError
from nrexp.evaluate import evaluate
from nrexp.init import init_weights
from nrexp.models import build_model
from nrexp.monitor import LayerMonitor, keeping_denormal_mode, set_flush_denormal
from nrexp.optim import build_optimizer
from nrexp.signals import GracefulStop
from nrexp.sweep import run_text
from nrexp.writers import TensorBoardWriter, finite_or_none, write_summary

log = logging.getLogger("nrexp")


class Diverged(RuntimeError):
    """Raised instead of stopping quietly when trainer.on_nonfinite=raise."""


def train(cfg, run_dir: Path, resume: bool = False) -> dict:
    """Train one network as `cfg` says, writing events, checkpoint and summary.json into `run_dir`.

    With `resume=True`, continue from `run_dir`/checkpoint.pt (same config, same run dir).
    SIGINT/SIGTERM from here on stop the run cleanly at the next step boundary.
    """
    with GracefulStop() as stop, keeping_denormal_mode():
        validate(cfg)
        (summary,) = run_loop(SoloRun(cfg, Path(run_dir), resume), stop)
    if summary["status"] == "diverged" and cfg.trainer.on_nonfinite == "raise":
        raise Diverged(f"non-finite training loss at step {summary['diverged_at_step']} (trainer.on_nonfinite=raise)")
    return summary


# ------------------------------------------------------------------------------------------------
# the loop


def run_loop(trainee: Trainee, stop: GracefulStop) -> list[dict]:
    """Train every member of `trainee` until the schedule ends, it diverges or a signal stops the run;
    write each member's summary. Returns the summaries, in member order."""
    sched, t = trainee.schedule, trainee.trainer
    with_layer_stats, each_step = t.layer_stats, checks_every_step(trainee.device)
    try:
        s = trainee.start()
        s.stop, alive = stop, list(trainee.members)
        with TrainProgress(sched.total_steps, sched.steps_per_epoch, enabled=t.progress) as progress:
            progress.advance_to(s.step)
            while alive and sched.until(s.step) and not stop.requested:
                alive = boundary_work(trainee, s, alive, progress)  # checkpoint, evaluation
                if not alive:
                    break
                # -- one training step of every member
                logging = sched.log(s.step)
                out = trainee.forward_backward(s.step, logging and with_layer_stats, logging)
                alive = write_pending_log(trainee, s, alive, progress)  # before the update changes W
                if not alive:
                    break
                trainee.update(out, s.step, logging)
                s.add(out)
                if logging:
                    s.take_log(out.stats, trainee.batch_size)
                s.step += 1
                progress.advance_to(s.step)
                if each_step:  # see checks_every_step
                    alive = stop_nonfinite(trainee, s, alive, out.losses, s.step - 1)

            alive = write_pending_log(trainee, s, alive, progress)
            if alive and not each_step and s.steps_since_log:  # the steps after the last log: checked once
                alive = stop_nonfinite(trainee, s, alive, s.loss_sum, s.step - 1)
            s.loop_end = time.perf_counter()
            trainee.sync()
            for m in alive:
                finish(trainee, s, m, "interrupted" if stop.requested else "completed", signal=stop.signum)
            progress.advance_to(s.step)
    finally:
        trainee.close()
    if stop.requested:
        where = trainee.members[0].run_dir if len(trainee.members) == 1 else "<its run dir>"
        log.warning(
            "stopped by signal %d at step %d; checkpoint written. Continue with: nrexp train resume=%s",
            stop.signum,
            s.step,
            where,
        )
    return [m.summary for m in trainee.members]


def boundary_work(trainee: Trainee, s: LoopState, alive: list[Member], progress: TrainProgress) -> list[Member]:
    """The checkpoint, then the test evaluation, when due at this step boundary. Neither counts as
    training time. Returns the members still training."""
    checkpoint_due = s.step > s.start_step and trainee.schedule.checkpoint(s.step)
    evaluation_due = s.step > 0 and trainee.schedule.evaluate(s.step)
    if not (checkpoint_due or evaluation_due):
        return alive
    alive = write_pending_log(trainee, s, alive, progress)
    trainee.sync()
    if checkpoint_due:
        paused = time.perf_counter()
        for m in alive:
            trainee.save(m, s.checkpoint_state(trainee.members.index(m), m, paused))
        s.paused(paused, evaluating=False)
    if evaluation_due and alive:
        paused = time.perf_counter()
        for m in alive:
            m.metrics.update(
                evaluate(m.model, trainee.data.test_x, trainee.data.test_y, m.cfg.data.eval_batch_size, "test")
            )
            m.writer.scalars(s.step, {k: m.metrics[k] for k in ("test/loss", "test/acc")})
            if m.last_stats:
                m.writer.depth_plot(s.step, m.last_stats, "latest")
        progress.update(s.step, mean_of([m.metrics for m in alive]))
        s.paused(paused, evaluating=True)
    return alive


def write_pending_log(trainee: Trainee, s: LoopState, alive: list[Member], progress: TrainProgress) -> list[Member]:
    """Write the pending logging step for every member still training, from one host copy. That copy is
    where a run without a per-step check finds a non-finite loss (the mean since the previous log):
    such a member has diverged and is finished here. Returns the members still training."""
    p, s.pending = s.pending, None
    if p is None:
        return alive
    stats = p.stats.result() if p.stats is not None else {}
    rows = trainee.stats_to_host(stats, {"train/loss": p.loss, "train/acc": p.acc})
    shown, diverged = [], []
    for m, (layer_stats, values) in zip(trainee.members, rows):
        if m not in alive:
            continue
        m.last_stats, values = write_log(
            m.writer,
            p.step,
            layer_stats,
            values,
            samples=p.samples,
            seconds=p.seconds,
            lr=m.optimizer.param_groups[0]["lr"],
        )
        if p.step == 0 and p.stats is not None:
            m.init_stats = m.last_stats
        shown.append(values)
        if not math.isfinite(values["train/loss"]):
            diverged.append(m)
    progress.update(p.step, mean_of(shown))
    return stop_diverged(trainee, s, alive, diverged, p.step)


def stop_nonfinite(
    trainee: Trainee, s: LoopState, alive: list[Member], losses: torch.Tensor, step: int
) -> list[Member]:
    """Finish the members whose entry of `losses` (M,) is not finite (one host copy); the others go on."""
    finite = [math.isfinite(v) for v in losses.tolist()]
    return stop_diverged(trainee, s, alive, [m for j, m in enumerate(trainee.members) if not finite[j]], step)


def stop_diverged(
    trainee: Trainee, s: LoopState, alive: list[Member], diverged: list[Member], step: int
) -> list[Member]:
    diverged = [m for m in diverged if m in alive]
    if not diverged:
        return alive
    trainee.sync()
    for m in diverged:
        log.warning("%s: non-finite training loss at step %d: stopping (status diverged)", m.run_dir.name, step)
        finish(trainee, s, m, "diverged", nonfinite_step=step)
    return [m for m in alive if m not in diverged]


def finish(
    trainee: Trainee,
    s: LoopState,
    m: Member,
    status: str,
    nonfinite_step: int | None = None,
    signal: int | None = None,
) -> None:
    """End member m's run (its modules up to date) and write its summary.json. A run that did not
    diverge first writes the checkpoint to resume from, at this step boundary; a run not interrupted is
    then evaluated (test and training sets, final per-layer statistics). Every status is true: a
    non-finite final evaluation is `diverged`, a signal during it `interrupted` (the checkpoint stands)."""
    ended = s.loop_end or time.perf_counter()
    if status != "diverged":
        trainee.save(m, s.checkpoint_state(trainee.members.index(m), m, ended))
    final_stats: dict = {}
    if status != "interrupted":
        final_stats = final_evaluation_of(trainee, m, s.step)
        if s.stop is not None and s.stop.requested and status == "completed":
            status, signal = "interrupted", s.stop.signum
        elif status == "completed" and not all(math.isfinite(v) for v in m.metrics.values()):
            status, nonfinite_step = "diverged", s.step - 1
            log.warning("%s: non-finite loss in the final evaluation: status diverged", m.run_dir.name)
    m.summary = finish_run(
        m.cfg,
        m.run_dir,
        m.writer,
        status=status,
        step=s.step,
        start_step=s.start_step,
        metrics=m.metrics,
        init_stats=m.init_stats,
        final_stats=final_stats,
        steps_per_epoch=trainee.schedule.steps_per_epoch,
        wall_time_s=s.elapsed_before + time.perf_counter() - s.started,
        loop_seconds=ended - s.started - s.eval_seconds,
        device=trainee.device,
        data_source=trainee.data.source,
        nonfinite_step=nonfinite_step,
        signal=signal,
        extra=trainee.summary_extra(),
        print_table=len(trainee.members) == 1,
    )
    if len(trainee.members) > 1:
        acc = m.summary["metrics"]["test/acc"]
        log.info(
            "%s: %s after %d steps, test acc %s", m.run_dir.name, status, s.step, "n/a" if acc is None else f"{acc:.4f}"
        )


def final_evaluation_of(trainee: Trainee, m: Member, step: int) -> dict:
    """final_evaluation for member m; the probe's dropout draws from the member's own stream, as alone."""
    with torch.random.fork_rng(devices=[trainee.device] if trainee.device.type == "cuda" else []):
        if m.rng is not None:
            set_global_rng_state(m.rng.get_state(), trainee.device)
        return final_evaluation(m.model, m.monitor, m.writer, trainee.data, m.cfg, step, m.metrics)


def set_global_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def mean_of(values: list[dict[str, float]]) -> dict[str, float]:
    """The members' mean of each finite value, for the one progress line of a group."""
    keys = {k for v in values for k in v if isinstance(v.get(k), (int, float)) and math.isfinite(v[k])}
    return {k: sum(v[k] for v in values if k in v) / sum(1 for v in values if k in v) for k in keys}


# ------------------------------------------------------------------------------------------------
# the schedule and the loop's state


@dataclass(frozen=True)
class Every:
    """True every `n` steps, from step 0 (never when n is 0)."""

    n: int

    def __call__(self, step: int) -> bool:
        return self.n > 0 and step % self.n == 0


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    steps_per_epoch: int
    log: Every  # per-layer statistics and the training scalars
    evaluate: Every  # test loss and accuracy
    checkpoint: Every

    def until(self, step: int) -> bool:
        return step < self.total_steps


@dataclass
class StepOutput:
    """One training step of every member: losses and correct counts (M,) on the device, and the
    per-layer statistics when asked for (a Future: finished at the latest by the next update)."""

    losses: torch.Tensor
    correct: torch.Tensor
    stats: Future | None = None


@dataclass
class PendingLog:
    """A logging step not written yet (see run_loop)."""

    step: int
    stats: Future | None
    loss: torch.Tensor  # (M,) mean training loss since the previous log, on the device
    acc: torch.Tensor
    samples: int
    seconds: float  # training time since the previous log: throughput


@dataclass
class LoopState:
    """Everything the loop counts: the step, the sums since the last log (per member, on the device:
    no host sync per step) and the clocks. A checkpoint stores it; a resumed run starts from it."""

    step: int
    loss_sum: torch.Tensor
    correct_sum: torch.Tensor
    steps_since_log: int
    clock: float  # start of the current log window's training time (pauses for evaluation excluded)
    elapsed_before: float = 0.0  # wall time of the processes before this one (resume)
    start_step: int = 0
    started: float = field(default_factory=time.perf_counter)
    eval_seconds: float = 0.0
    loop_end: float | None = None
    pending: PendingLog | None = None
    stop: GracefulStop | None = None  # the signals that end the run (a signal during the end too)

    @classmethod
    def fresh(cls, members: int, device: torch.device, saved: dict | None = None) -> LoopState:
        saved = saved or {}
        now = time.perf_counter()
        return cls(
            step=saved.get("step", 0),
            start_step=saved.get("step", 0),
            loss_sum=torch.full((members,), float(saved.get("loss_sum", 0.0)), device=device),
            correct_sum=torch.full((members,), float(saved.get("correct_sum", 0.0)), device=device),
            steps_since_log=saved.get("steps_since_log", 0),
            elapsed_before=saved.get("elapsed_s", 0.0),
            # a log window may have begun before the checkpoint this run resumes from: its clock too
            clock=now - saved.get("seconds_since_log", 0.0),
            started=now,
        )

    def add(self, out: StepOutput) -> None:
        self.loss_sum += out.losses  # in place, in the sums' float32 (a count is promoted as it is added)
        self.correct_sum += out.correct
        self.steps_since_log += 1

    def take_log(self, stats: Future | None, batch_size: int) -> None:
        """Close the log window at this step: the means since the last log become a PendingLog."""
        now = time.perf_counter()
        self.pending = PendingLog(
            self.step,
            stats,
            self.loss_sum / self.steps_since_log,
            self.correct_sum / (self.steps_since_log * batch_size),
            samples=self.steps_since_log * batch_size,
            seconds=now - self.clock,
        )
        self.loss_sum, self.correct_sum = torch.zeros_like(self.loss_sum), torch.zeros_like(self.correct_sum)
        self.steps_since_log, self.clock = 0, now

    def paused(self, since: float, evaluating: bool) -> None:
        """Training paused from `since` until now: not counted as training time."""
        pause = time.perf_counter() - since
        self.clock += pause
        self.eval_seconds += pause if evaluating else 0.0

    def checkpoint_state(self, row: int, member: Member, now: float) -> dict:
        return {
            "step": self.step,
            "loss_sum": self.loss_sum[row],
            "correct_sum": self.correct_sum[row],
            "steps_since_log": self.steps_since_log,
            "seconds_since_log": now - self.clock,
            "init_stats": member.init_stats,
            "metrics": member.metrics,
            "elapsed_s": self.elapsed_before + time.perf_counter() - self.started,
        }


# ------------------------------------------------------------------------------------------------
# what the loop trains


class Member:
    """One run: its model, optimizer, monitor and data order, its writer, and what it has measured."""

    def __init__(self, cfg, run_dir: Path, data: Dataset, device: torch.device):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        torch.manual_seed(cfg.seed)  # init draws from the global stream; so does dropout afterwards
        self.model, self.optimizer, self.monitor = build(cfg, data, device)
        self.batches = TrainBatches(data.train_x, data.train_y, cfg.data.batch_size, cfg.seed, augment=cfg.data.augment)
        self.rng: torch.Generator | None = None  # a fused member's own dropout stream (None: the global one)
        self.writer: TensorBoardWriter | None = None
        self.metrics: dict[str, float] = {}
        self.init_stats: dict = {}
        self.last_stats: dict = {}
        self.summary: dict | None = None

    def open_writer(self, data: Dataset, device: torch.device, purge_step: int | None = None, note: str = "") -> None:
        """The run's TensorBoard writer; a new run also records its config and data source."""
        self.writer = TensorBoardWriter(self.run_dir, self.monitor.names, purge_step=purge_step)
        if purge_step is None:
            self.writer.text("run/config", "```\n" + OmegaConf.to_yaml(self.cfg, resolve=True) + "```")
            self.writer.text("run/data_source", f"{data.name} from {data.source} on {device}{note}")
            self.writer.text("run/name", run_text(self.run_dir))  # what differs, what its sweep holds constant


class Trainee:
    """What run_loop trains: `members` (row j of every per-member tensor is members[j]) computed together.

    A step is split where the loop must act in between: `forward_backward` computes every member's loss
    and gradients, `update` applies them. Reading a member's state (checkpoint, evaluation, the end)
    goes through `sync` first, which brings each member's own modules up to date."""

    members: list[Member]
    schedule: Schedule

    def __init__(self, cfg, what: str):
        """The device, the data on it and the step's precision, as `cfg` (shared by the members) says."""
        self.trainer = OmegaConf.to_object(cfg.trainer)  # plain TrainerConfig: DictConfig reads are slow
        self.device = resolve_device(str(getattr(self.trainer.device, "value", self.trainer.device)))
        set_flush_denormal(self.trainer.flush_denormal, self.device)  # before any thread starts: inherited
        self.data = load_dataset(cfg.data, self.device)
        log.info(
            "%s | device %s | data %s (%s): %d train / %d test examples",
            what,
            self.device,
            self.data.name,
            self.data.source,
            len(self.data.train_x),
            len(self.data.test_x),
        )
        self.batch_size = cfg.data.batch_size
        bf16 = self.trainer.precision == "bf16"  # autocast of the training forward; weights stay float32
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def start(self) -> LoopState:
        return LoopState.fresh(len(self.members), self.device)

    def forward_backward(self, step: int, with_stats: bool, logging: bool) -> StepOutput:
        raise NotImplementedError

    def update(self, out: StepOutput, step: int, logging: bool) -> None:
        raise NotImplementedError

    def stats_to_host(self, stats: dict, scalars: dict) -> list[tuple]:
        """Per member, ({metric: {layer: value}}, {tag: value}) from one device->host copy."""
        raise NotImplementedError

    def sync(self) -> None:
        """Bring each member's own model (and random stream) up to date with the training state."""

    def save(self, member: Member, state: dict) -> None:
        save_checkpoint(
            member.run_dir / CHECKPOINT,
            member.model,
            member.optimizer,
            member.monitor,
            member.cfg,
            state,
            rng=member_rng_state(member),
        )

    def summary_extra(self) -> dict:
        """What summary.json adds for this kind of trainee."""
        return {}

    def close(self) -> None:
        pass


class SoloRun(Trainee):
    """One run: a single member, trained through its own modules (what `nrexp train` does)."""

    def __init__(self, cfg, run_dir: Path, resume: bool = False):
        super().__init__(cfg, "one run")
        self.member = Member(cfg, run_dir, self.data, self.device)
        self.members, self.resume = [self.member], resume
        self.schedule = make_schedule(self.trainer, self.member.batches.steps_per_epoch, self.batch_size)
        compiled = self.trainer.compile  # trainer.compile: see CompiledForward
        self.forward = CompiledForward(self.member.model, self.device) if compiled else self.member.model
        self.inflight: Future | None = None  # the last logging step's statistics, maybe still computing
        self.batches = None  # the stream of minibatches, from the step the run starts at

    def start(self) -> LoopState:
        m = self.member
        saved = None
        if self.resume:
            saved = load_for_resume(m.run_dir / CHECKPOINT, m.model, m.optimizer, m.monitor, self.device)
            m.init_stats, m.metrics = saved["init_stats"], saved["metrics"]
            log.info("resuming %s at step %d of %d", m.run_dir, saved["step"], self.schedule.total_steps)
        step = saved["step"] if saved else 0
        m.open_writer(self.data, self.device, purge_step=step if self.resume else None)
        self.batches = minibatches(m.batches, step)
        return LoopState.fresh(1, self.device, saved)  # the clocks start here: the writer's set-up is not training

    def forward_backward(self, step: int, with_stats: bool, logging: bool) -> StepOutput:
        model = self.member.model
        x, y = next(self.batches)
        self.activations = [] if with_stats else None
        self.armed = preact.arm(model, logging and self.trainer.preact_percentiles)  # preact/ percentiles
        with self.autocast:  # steps that record activations or pre-activations run eagerly (same weights)
            logits = model(x, self.activations) if with_stats or self.armed else self.forward(x)
            loss = F.cross_entropy(logits, y)
        self.member.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return StepOutput(loss.detach().reshape(1), (logits.detach().argmax(1) == y).sum().reshape(1))

    def update(self, out: StepOutput, step: int, logging: bool) -> None:
        m = self.member
        if self.inflight is not None:  # the previous statistics read W, which this update changes
            self.inflight.result()
        if logging and self.trainer.histograms and self.activations is not None:  # before capture lets go of them
            m.writer.queue_histograms(step, m.monitor.histograms(self.activations))
        captured = m.monitor.capture(self.activations) if self.activations is not None else None
        m.optimizer.step()
        if captured is not None:  # computed on a spare core while the next step runs (monitor.py)
            out.stats = self.inflight = captured.statistics()
        if logging:
            m.writer.scalars(step, preact.collect(self.armed))

    def stats_to_host(self, stats: dict, scalars: dict) -> list[tuple]:
        return [self.member.monitor.to_host(stats, scalars)]

    def summary_extra(self) -> dict:
        return {"compile": self.forward.status} if isinstance(self.forward, CompiledForward) else {}


def make_schedule(t, steps_per_epoch: int, batch_size: int) -> Schedule:
    """The schedule trainer config `t` asks for; an epoch is `steps_per_epoch` steps of `batch_size` examples.
    Its length: t.max_steps, else ceil(t.max_examples / batch_size) (a budget in examples seen), else
    t.epochs epochs."""
    total = t.max_steps or t.epochs * steps_per_epoch
    if t.max_examples:
        total = math.ceil(t.max_examples / batch_size)
    return Schedule(
        total_steps=total,
        steps_per_epoch=steps_per_epoch,
        log=Every(t.log_every),
        evaluate=Every(t.eval_every or steps_per_epoch),
        checkpoint=Every(t.checkpoint_every),
    )


def minibatches(batches: TrainBatches, step: int):
    """Every minibatch from training step `step` on, epoch after epoch."""
    epoch, start = divmod(step, batches.steps_per_epoch)
    while True:
        yield from batches.epoch(epoch, start_step=start)
        epoch, start = epoch + 1, 0


def member_rng_state(member: Member) -> dict | None:
    """The random state a checkpoint stores: a fused member's own stream, in the slot its solo run uses."""
    if member.rng is None:
        return None
    return {"torch": member.rng.get_state()} if member.rng.device.type == "cpu" else {"cuda": [member.rng.get_state()]}


# ------------------------------------------------------------------------------------------------
# the pieces of a run


def build(cfg, data: Dataset, device: torch.device):
    """The initialized model, its optimizer and its monitor. Call right after torch.manual_seed(cfg.seed):
    the default init of the layers and `init_weights` both draw from the global random stream."""
    model = build_model(cfg, data.input_shape, data.num_classes).to(device)
    init_weights(
        model, cfg.init.name, cfg.init.scale, str(getattr(cfg.model.activation, "value", cfg.model.activation))
    )
    return model, build_optimizer(model, cfg.optim), LayerMonitor(model.monitored_layers())


def write_log(
    writer: TensorBoardWriter, step: int, layer_stats: dict, values: dict, *, samples: int, seconds: float, lr: float
):
    """Write one logging step, its numbers on the host: per-layer statistics, the scalars `values`
    (mean training loss and accuracy since the last log), throughput (`samples` in `seconds`) and
    the learning rate, which are added to `values`. Returns (layer_stats, values)."""
    values["throughput/samples_per_s"] = samples / max(seconds, 1e-9)
    values["lr"] = lr
    writer.layer_stats(step, layer_stats)
    writer.scalars(step, values)
    writer.write_histograms()  # trainer.histograms: those of this step, queued by the trainee's update
    if step == 0 and layer_stats:
        writer.depth_plot(0, layer_stats, "init")
    return layer_stats, values


def final_evaluation(
    model, monitor: LayerMonitor, writer: TensorBoardWriter, data: Dataset, cfg, step: int, metrics: dict
) -> dict:
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


def finish_run(
    cfg,
    run_dir: Path,
    writer: TensorBoardWriter,
    *,
    status: str,
    step: int,
    start_step: int,
    metrics: dict,
    init_stats: dict,
    final_stats: dict,
    steps_per_epoch: int,
    wall_time_s: float,
    loop_seconds: float,
    device: torch.device,
    data_source: str,
    nonfinite_step=None,
    signal=None,
    extra: dict | None = None,
    print_table: bool = True,
) -> dict:
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
    writer.hparams(
        step, summary["config"], summary["metrics"], summary=summary
    )  # the run's row in TensorBoard's HParams tab
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
        raise ConfigError(
            "trainer.device='cuda' is invalid: no CUDA GPU is visible to PyTorch on this "
            "machine. Fix: use trainer.device=auto (CUDA when present, else CPU) or trainer.device=cpu"
        )
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
            raise ConfigError(
                "trainer.compile=true is invalid here: torch.compile on CUDA needs triton, which is "
                "not installed. Fix: pip install triton, or use trainer.compile=false"
            )
    elif device.type == "cpu":
        cxx = os.environ.get("CXX", "g++")
        if shutil.which(cxx) is None:
            raise ConfigError(
                f"trainer.compile=true is invalid here: torch.compile on CPU builds C++ kernels with "
                f"{cxx!r} ($CXX, default g++), which is not on PATH. Fix: install g++ (apt-get install "
                "g++) or set CXX, or use trainer.compile=false"
            )


def probe(model, monitor: LayerMonitor, data: Dataset, batch_size: int) -> dict[str, dict[str, float]]:
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


def versions() -> dict[str, str]:
    import hydra

    return {
        "nrexp": nrexp.__version__,
        "torch": torch.__version__,
        "hydra": hydra.__version__,
        "python": platform.python_version(),
        "platform": sys.platform,
    }
