"""Per-layer statistics as device tensors: act_norm, act_cos, grad_norm, weight_norm, weight_change, update_ratio.

act_norm is the batch mean of each example's L2 norm of the layer's output; act_cos the mean pairwise
cosine similarity of the examples' outputs (each flattened, over the B(B-1) pairs i != j: 1 when every
example is mapped to one direction, the collapse of deep LayerNorm nets); grad_norm ||dL/dW||;
weight_norm ||W||; weight_change ||W - W_init|| / ||W_init||, all at the logged forward/backward;
update_ratio ||W_{t+1} - W_t|| / ||W_t||, where W_t is the weight of the logged forward/backward at step
t and W_{t+1} the weight after the optimizer step taken right after it (so step 0's is the first update's,
from the weights at init). W is the weight the layer computes with (a residual block's two Linear layers together;
under weight normalization, g v/||v||, whose dL/dW `weight_grad` rebuilds from dL/dg and dL/dv).
Why this shape: the statistics cost memory traffic, not arithmetic. The weights' norms are a few
multi-tensor kernels over all layers (`torch._foreach_*`) on flat buffers allocated once, each
activation's row norms one kernel that reads it once, and everything reaches the host in one copy; on
CPU, when a core is idle, they run on a second thread while training goes on (docs/speed.md).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn
from torch.nn.utils import parametrize

from nrexp import figures
from nrexp.metrics import LAYER_METRICS  # noqa: F401 (re-exported: the statistics, in order)
from nrexp.models import weight_layers


def weight_grad(layer: nn.Module) -> torch.Tensor:
    """dLoss/dW of the weight `layer` computes with (zeros before any backward pass).

    Under weight normalization (w = g v/||v|| per output unit) autograd fills dL/dg and dL/dv only; with
    u = v/||v||, dL/dv = (g/||v||)(I - u u^T) dL/dW and dL/dg = u . dL/dW, so dL/dW = (dL/dg) u +
    (||v||/g) dL/dv: grad_norm is ||dL/dW|| of the effective weight for every norm, comparable across them.
    """
    if not parametrize.is_parametrized(layer, "weight"):
        w = layer.weight
        return w.grad if w.grad is not None else torch.zeros_like(w)
    wn = layer.parametrizations.weight  # weight_norm: original0 = g (one per output unit), original1 = v
    g, v = wn.original0, wn.original1
    g_grad = g.grad if g.grad is not None else torch.zeros_like(g)
    v_grad = v.grad if v.grad is not None else torch.zeros_like(v)
    v_norm = torch.linalg.vector_norm(v, dim=tuple(range(1, v.ndim)), keepdim=True)
    # g = 0 exactly (a unit switched off) would make this undefined; init sets g = ||row|| > 0
    return g_grad * v / v_norm + (v_norm / g) * v_grad


class LayerMonitor:
    """The statistics of the layers `layers` (name -> module, in forward order; see models.py)."""

    def __init__(self, layers: Mapping[str, nn.Module]):
        self.names: list[str] = list(layers)
        groups = [weight_layers(entry) for entry in layers.values()]
        self.modules: list[nn.Module] = [m for group in groups for m in group]
        device = self.modules[0].weight.device
        # which named layer each weight belongs to; None when it is one weight per name (mlp, cnn)
        owner = [i for i, group in enumerate(groups) for _ in group]
        self._owner = torch.tensor(owner, device=device) if len(owner) != len(self.names) else None
        # Plain weights are Parameters the optimizer updates in place (as do resuming and the fused
        # launcher's write-back): kept. A parametrized weight (weight normalization) is recomputed on
        # each access, so then every read goes through the modules.
        plain = not any(parametrize.is_parametrized(m, "weight") for m in self.modules)
        self._params: list[torch.Tensor] | None = [m.weight for m in self.modules] if plain else None
        weights = self.weights()
        # W_init, W as captured before the optimizer step, and W - W_init: one flat buffer each,
        # allocated once (a fresh buffer per logging step costs its page faults on CPU), seen per layer
        # through views shaped like the weights
        self._init_flat, self.init_weights = _flat_views(weights)
        self._before_flat, self._before = _flat_views(weights)
        self._change_flat, self._change = _flat_views(weights)
        self.reset_init(weights)
        self._pending: Capture | None = None  # before_step's, for after_step
        # Statistics every step: W after one logging step's optimizer step is W before the next one's,
        # so the statistics thread copies it into the buffer then (while the main thread runs the next
        # forward and backward), and the next capture skips its copy if nothing changed W since: no
        # optimizer step (a process-wide count) and no in-place write (each tensor's version counter;
        # torch's fused optimizer steps do not bump it, hence the count). Plain weights only.
        self._snapshot: tuple | None = None  # (optimizer steps, weight versions) when copied; None: stale
        self._last_capture = -2  # the optimizer step count at the last capture
        _count_optimizer_steps()

    def weights(self) -> list[torch.Tensor]:
        """The current effective weights, read afresh. Plain weights come as their Parameters, not
        detached: every caller reads them under torch.no_grad()."""
        if self._params is not None:
            return list(self._params)
        return [m.weight.detach() for m in self.modules]

    def grads(self) -> list[torch.Tensor]:
        """dLoss/dW of each weight (`weight_grad`)."""
        if self._params is not None:
            return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        return [weight_grad(m) for m in self.modules]

    @torch.no_grad()
    def reset_init(self, init_weights: list[torch.Tensor]) -> None:
        """Use these as W_init (when resuming, the run's true init comes from the checkpoint)."""
        torch._foreach_copy_(self.init_weights, [w.detach() for w in init_weights])
        (self.init_norms,) = self._norms(self.init_weights)

    def _norms(self, *groups: list[torch.Tensor]) -> torch.Tensor:
        """One Frobenius norm per named layer for each group of per-weight tensors: (groups, layers)."""
        return self._per_layer(torch._foreach_norm([t for group in groups for t in group]), len(groups))

    def _per_layer(self, norms: list[torch.Tensor], groups: int) -> torch.Tensor:
        """Per-weight norms, `groups` runs of one per weight -> (groups, layers): the weights of one layer
        (a residual block's two) make one Frobenius norm, over all of their entries together."""
        stacked = torch.stack(norms).view(groups, -1)
        if self._owner is None:
            return stacked
        squares = torch.zeros(groups, len(self.names), device=stacked.device, dtype=stacked.dtype)
        return squares.index_add_(1, self._owner, stacked.square()).sqrt()

    @torch.no_grad()
    def capture(self, activations: list[torch.Tensor]) -> Capture:
        """Call after backward, before the optimizer step: copies W into a buffer (reused by every
        capture) and starts on the statistics of W, dL/dW and the activations. Call `.statistics()` on
        the result after the optimizer step, and have its result before the next capture or step."""
        return Capture(self, activations)

    @torch.no_grad()
    def before_step(self, activations: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """`capture`'s statistics in two calls, computed here: this one after backward (all but the
        update ratio)..."""
        self._pending = Capture(self, activations, worker=False)
        return dict(self._pending.first.result())

    @torch.no_grad()
    def after_step(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """...and this one after the optimizer step: adds the update ratio ||W_after - W_before|| / ||W_before||
        (W_before: the weights before_step saw; W_after: after the step taken in between)."""
        pending, self._pending = self._pending, None
        return {**stats, "update_ratio": pending.statistics().result()["update_ratio"]}

    @torch.no_grad()
    def current_statistics(self, activations: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Statistics of the current weights, activations and gradients, without the update ratio (no
        step follows: the final probe). Leaves the buffers of a capture in progress alone."""
        weights = self.weights()
        norms = self._norms(weights, self.grads(), torch._foreach_sub(weights, self.init_weights))
        return self._stats(norms, activations)

    def _stats(self, norms: torch.Tensor, activations: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The statistics from the norms of W, dL/dW and W - W_init (3 x layers) and the activations."""
        act_norm, act_cos = activation_norms_and_cosines(activations)
        return {
            "act_norm": act_norm,
            "act_cos": act_cos,
            "grad_norm": norms[1],
            "weight_norm": norms[0],
            "weight_change": norms[2] / self.init_norms,
        }

    def _copy_before(self) -> bool:
        """Copy W into the buffer of W before the step, unless the statistics thread did already (see
        __init__); return whether the next logging step follows right after this one (then the
        statistics thread copies W after this step for it)."""
        steps = _optimizer_steps[0]
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is None or self._params is None or snapshot != (steps, [p._version for p in self._params]):
            torch._foreach_copy_(self._before, self.weights())
        consecutive = steps == self._last_capture + 1
        self._last_capture = steps
        return consecutive and self._params is not None

    def _keep_after(self, after: list[torch.Tensor]) -> None:
        """Copy W after the step into the buffer for the next capture (see __init__)."""
        self._snapshot = (_optimizer_steps[0], [p._version for p in after])
        torch._foreach_copy_(self._before, after)

    @torch.no_grad()
    def histograms(self, activations: list[torch.Tensor]) -> Histograms:
        """trainer.histograms: per named layer, histograms of its activation, dL/dW and W (a layer of several
        weights: all their entries together) as they are now. Call after backward, before the optimizer
        step, on a logging step. Counted on the device, read back by `.to_host()` in one copy."""
        weights, grads = self.weights(), self.grads()
        owner = self._owner.tolist() if self._owner is not None else list(range(len(self.names)))
        per_layer = [[i for i, o in enumerate(owner) if o == layer] for layer in range(len(self.names))]
        return Histograms(
            self.names,
            activations,
            [[grads[i] for i in idx] for idx in per_layer],
            [[weights[i] for i in idx] for idx in per_layer],
        )

    def host_copy(self, stats: Future | None, scalars: dict[str, torch.Tensor]) -> HostCopy:
        """to_host(stats.result(), scalars), started now and finished by the result's `.result()`.

        For the trainer to call as soon as a logging step's scalars exist, and `.result()` when it
        writes the step. On CUDA the floats leave the device by an asynchronous copy into pinned memory
        queued now, right behind the kernels that compute them: `.result()` then waits for those alone,
        where a copy made at write time (to_host) waits for every step queued since. Elsewhere it is
        to_host, at `.result()`."""
        return HostCopy(self, stats, scalars)

    def to_host(self, layer_stats: dict[str, torch.Tensor], scalars: dict[str, torch.Tensor]):
        """One device->host copy of all that is logged this step.

        Returns ({metric: {layer: value}}, {tag: value}) as Python floats.
        """
        if isinstance(layer_stats, HostStats):  # already read on the statistics thread (CPU)
            return layer_stats.host, {k: v.item() for k, v in scalars.items()}
        tensors = [layer_stats[k].float() for k in layer_stats] + [
            v.detach().float().reshape(1) for v in scalars.values()
        ]
        flat = torch.cat(tensors).cpu().tolist() if tensors else []
        n = len(self.names)
        layers = {k: dict(zip(self.names, flat[i * n : (i + 1) * n])) for i, k in enumerate(layer_stats)}
        return layers, dict(zip(scalars, flat[len(layer_stats) * n :]))


HISTOGRAM_BINS = 64
HISTOGRAM_KINDS = ("hist_act", "hist_grad", "hist_weight")  # tag prefixes: activations, dL/dW, W


class Histograms:
    """Histograms of tensors counted on the device: for each (kind, layer), HISTOGRAM_BINS equal bins between
    the tensor's min and max (its last bin closed), and its min, max, sum and sum of squares, as
    TensorBoard's histogram summary holds them. Nothing is read back until `to_host`, one copy in all.

    `activations[l]` is layer l's output (examples on dim 0: flattened whole), `grads[l]` and `weights[l]`
    lists of the tensors whose entries together make layer l's histogram."""

    @torch.no_grad()
    def __init__(
        self,
        names: Sequence[str],
        activations: Sequence[torch.Tensor],
        grads: Sequence[Sequence[torch.Tensor]],
        weights: Sequence[Sequence[torch.Tensor]],
    ):
        self.tags, self.numels, rows = [], [], []
        for kind, groups in zip(HISTOGRAM_KINDS, ([[a] for a in activations], grads, weights)):
            for name, group in zip(names, groups):
                flat = (
                    torch.cat([t.detach().reshape(-1).float() for t in group])
                    if len(group) > 1
                    else group[0].detach().reshape(-1).float()
                )
                self.tags.append(f"{kind}/{name}")
                self.numels.append(flat.numel())
                rows.append(_histogram_row(flat, HISTOGRAM_BINS))
        self.rows = torch.stack(rows) if rows else None  # (tensors, 4 + bins): min, max, sum, sum of squares, counts

    def to_host(self) -> dict[str, dict]:
        """{tag: add_histogram_raw's keyword arguments}: one device->host copy. A tensor holding NaN or inf (a
        diverged run) has no histogram."""
        if self.rows is None:
            return {}
        out = {}
        for tag, numel, row in zip(self.tags, self.numels, self.rows.cpu().tolist()):
            lo, hi, total, squares, counts = row[0], row[1], row[2], row[3], row[4:]
            if not all(math.isfinite(v) for v in (lo, hi, total, squares)):
                continue
            span = (hi - lo) or max(abs(lo), 1.0) * 1e-6  # a constant tensor: one thin bin holds it all
            out[tag] = dict(
                min=lo,
                max=hi,
                num=numel,
                sum=total,
                sum_squares=squares,
                bucket_limits=[lo + span * (k + 1) / len(counts) for k in range(len(counts))],
                bucket_counts=counts,
            )
        return out


def _histogram_row(flat: torch.Tensor, bins: int) -> torch.Tensor:
    """(min, max, sum, sum of squares, counts of `bins` equal bins over [min, max], the last closed) of a flat
    float tensor, without a host sync on CUDA (torch.histc reads its range on the host)."""
    lo, hi = torch.aminmax(flat)
    if flat.device.type == "cpu":  # reading min and max costs no sync here: torch.histc's one pass
        finite = math.isfinite(lo.item()) and math.isfinite(hi.item())
        counts = torch.histc(flat, bins, 0, 0).double() if finite else torch.zeros(bins, dtype=torch.float64)
    else:  # the bin of each entry from min and max on the device, counted by bincount: no host sync
        scale = bins / (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
        index = ((flat - lo) * scale).nan_to_num_(0.0).clamp_(0, bins - 1).long()
        counts = torch.bincount(index, minlength=bins)[:bins].double()  # exact beyond float32's 2^24
    return torch.cat([torch.stack([lo, hi, flat.sum(), flat.square().sum()]).double(), counts])


class HostCopy:
    """LayerMonitor.host_copy's result."""

    def __init__(self, monitor: LayerMonitor, stats: Future | None, scalars: dict[str, torch.Tensor]):
        self.monitor, self.stats, self.scalars = monitor, stats, scalars
        self.pinned = self.event = None
        device = monitor._before_flat.device
        if device.type == "cuda":  # stats computed where they were asked for (no statistics thread): done
            layer_stats = stats.result() if stats is not None else {}
            self.keys = list(layer_stats)
            flat = torch.cat(
                [layer_stats[k].float() for k in self.keys] + [v.detach().float().reshape(1) for v in scalars.values()]
            )
            self.pinned = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self.pinned.copy_(flat, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def result(self):
        """({metric: {layer: value}}, {tag: value}) as Python floats, as to_host gives them."""
        if self.event is None:
            return self.monitor.to_host(self.stats.result() if self.stats is not None else {}, self.scalars)
        self.event.synchronize()
        flat, names = self.pinned.tolist(), self.monitor.names
        n = len(names)
        layers = {k: dict(zip(names, flat[i * n : (i + 1) * n])) for i, k in enumerate(self.keys)}
        return layers, dict(zip(self.scalars, flat[len(self.keys) * n :]))


def _flat_views(like: list[torch.Tensor]):
    """A flat buffer with room for every tensor of `like`, and views of it shaped like each of them."""
    flat = torch.empty(sum(t.numel() for t in like), dtype=like[0].dtype, device=like[0].device)
    views, offset = [], 0
    for t in like:
        views.append(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    return flat, views


class Capture:
    """One logging step's statistics, in two halves: what W before the optimizer step (copied by
    LayerMonitor.capture), dL/dW and the activations give, started at once; and the update ratio, from
    W after the step (`statistics`). Each half runs on the statistics thread where the training leaves
    a core idle (CPU, see spare_core), the two in order, else where it is called. The first only reads
    what the optimizer step leaves alone (the copy of W, dL/dW), so it may run during the step."""

    @torch.no_grad()
    def __init__(self, monitor: LayerMonitor, activations: list[torch.Tensor], worker: bool = True):
        self.keep_after = monitor._copy_before()
        self.monitor, self.grads, self.activations = monitor, monitor.grads(), activations
        self.worker = _worker_thread(monitor._before_flat.device) if worker else None
        self.first = self._run(self._before_step)

    def statistics(self) -> Future[dict[str, torch.Tensor]]:
        """Call after the optimizer step: every statistic of the step, as a Future (see the class)."""
        return self._run(self._after_step, self.monitor.weights())

    def _run(self, fn, *args) -> Future:
        if self.worker is not None:
            _last_job[0] = self.worker.submit(_in_mode, fn, _flush_denormal, *args)
            return _last_job[0]
        done: Future = Future()
        done.set_result(fn(*args))
        return done

    @torch.no_grad()
    def _before_step(self) -> dict[str, torch.Tensor]:
        """act_norm, grad_norm, weight_norm and weight_change: W_before - W_init into its buffer, then the
        norms of W_before, dL/dW and that in one call."""
        m = self.monitor
        torch.sub(m._before_flat, m._init_flat, out=m._change_flat)
        norms = m._per_layer(torch._foreach_norm(m._before + self.grads + m._change), 3)
        stats = m._stats(norms, self.activations)
        # let go of this step's gradients and activations now: held through the steps up to the next
        # logging step, they kept memory in use that slowed every step in between
        self.grads = self.activations = []
        return stats

    @torch.no_grad()
    def _after_step(self, after: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """All statistics: the first half's and the update ratio, from W_before - W_after computed in place
        (the negation of W_after - W_before, exactly: the same norm)."""
        m = self.monitor
        stats = dict(self.first.result())  # done: the same thread ran it first
        torch._foreach_sub_(m._before, after)
        stats["update_ratio"] = m._per_layer(torch._foreach_norm(m._before), 1)[0] / stats["weight_norm"]
        if self.keep_after:
            m._keep_after(after)
        if self.worker is None:
            return stats
        # on the statistics thread (CPU): the floats for to_host too
        flat = torch.cat([v.float() for v in stats.values()]).tolist()
        n = len(m.names)
        return HostStats(stats, {k: dict(zip(m.names, flat[i * n : (i + 1) * n])) for i, k in enumerate(stats)})


class HostStats(dict):
    """A step's statistics (metric -> tensor) with their floats already read: `host` (to_host's first half)."""

    def __init__(self, stats: dict[str, torch.Tensor], host: dict[str, dict[str, float]]):
        super().__init__(stats)
        self.host = host


_optimizer_steps = [0]  # optimizer steps taken in this process (counted once _count_optimizer_steps ran)
_counting: list[object] = []  # the hook's handle, once registered


def _count_optimizer_steps() -> None:
    """Count every torch.optim optimizer step of the process in _optimizer_steps (see LayerMonitor.__init__)."""
    if not _counting:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def count(optimizer, args, kwargs) -> None:
            _optimizer_steps[0] += 1

        _counting.append(register_optimizer_step_post_hook(count))


def _in_mode(fn, flush_denormal: bool | None, *args):
    """fn(*args) on the statistics thread, in the run's denormal mode (a per-thread CPU setting: the
    thread outlives the run that started it, see set_flush_denormal)."""
    if flush_denormal is not None:
        torch.set_flush_denormal(flush_denormal)
    return fn(*args)


_worker: ThreadPoolExecutor | None = None
_flush_denormal: bool | None = None  # the mode the run in progress set (None: nrexp set none)


def set_flush_denormal(on: bool, device: torch.device) -> None:
    """trainer.flush_denormal, for a run on `device`: on CPU, denormal floats (nonzero, |x| < 1.2e-38) are
    read and written as zero (x86 DAZ/FTZ, ARM FZ) or, with `on=False`, computed as IEEE says.

    Why: CPUs compute with denormals 10-100x slower than with other floats, and a run that fits its
    data makes many (momentum buffers without weight decay, above all); values that small weigh nothing
    next to the others (docs/speed.md).

    The mode is a per-thread CPU setting. This sets it for the calling thread, for the run
    (`keeping_denormal_mode` puts it back after); threads started later (torch's intra-op threads, the
    fused launcher's inputs thread) inherit it, and the statistics thread, which outlives a run, sets it
    before each task. torch's intra-op threads already started keep theirs (with several threads, in a
    process that has trained before: a sweep under the basic launcher that varies this knob)."""
    global _flush_denormal
    if device.type != "cpu":
        return
    torch.set_flush_denormal(on)  # False where the CPU cannot (then nothing changes)
    _flush_denormal = on


def denormals_flushed() -> bool:
    """Whether the calling thread's CPU reads and writes denormal floats as zero (torch has no getter)."""
    return torch.tensor([1e-39]).mul(1.0).item() == 0.0


@contextlib.contextmanager
def keeping_denormal_mode():
    """Puts the calling thread's denormal mode back on the way out, so that a run's trainer.flush_denormal
    does not outlive it in a process that goes on (tests, notebooks, the bench: hypothesis, for one,
    refuses to generate floats with denormals flushed). Threads the run started and left running keep
    it (torch's intra-op threads); nrexp's statistics thread sets each run's mode itself."""
    global _flush_denormal
    flushed, recorded = denormals_flushed(), _flush_denormal
    try:
        yield
    finally:
        torch.set_flush_denormal(flushed)
        _flush_denormal = recorded


def spare_core(device: torch.device) -> bool:
    """Whether work on a second Python thread can use a core the training leaves idle: on CPU, with
    fewer intra-op threads than CPUs. (On CUDA the kernels run asynchronously already.)"""
    return device.type == "cpu" and torch.get_num_threads() < _CPUS


def idle_core() -> bool:
    """Whether a core is idle now for a second thread of ours: the tasks the kernel counts as runnable
    this instant (/proc/loadavg: this thread among them, but neither our statistics thread nor the
    figures' helper process, which runs at the lowest priority), plus torch's other intra-op threads and
    the statistics thread, fit the CPUs. On a machine busy with other work a second thread gains no
    core: it takes turns with the main thread, which waits for the GIL whenever the OS stops that thread
    holding it. Where there is no such count, the 1-minute load average stands in. Read at most every
    50 ms (a read costs ~30 us: 1% of a small net's step, were it read every logging step)."""
    now = time.monotonic()
    if now - _idle[0] < 0.05:
        return _idle[1]
    _idle[:] = [now, _idle_core_now(statistics_thread_busy() + figures.helper_drawing())]
    return _idle[1]


_idle = [float("-inf"), True]  # (when idle_core last looked, what it saw)
_CPUS = os.cpu_count() or 1  # read once: a system call, and spare_core asks on every logging step
_last_job: list[Future | None] = [None]  # the statistics thread's latest job: it runs its jobs in order


def statistics_thread_busy() -> bool:
    """Whether the statistics thread is running (or has queued) a job: then the kernel counts it as
    runnable, and idle_core must not take our own thread for other work."""
    return _last_job[0] is not None and not _last_job[0].done()


def _idle_core_now(ours_runnable: int = 0) -> bool:
    cpus, threads = _CPUS, torch.get_num_threads()
    try:
        with open("/proc/loadavg") as f:
            runnable = int(f.read().split()[3].split("/")[0]) - ours_runnable
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0] < cpus - threads + 1
        except OSError:
            return True
    return runnable + threads <= cpus


def _worker_thread(device: torch.device) -> ThreadPoolExecutor | None:
    """The process's statistics thread, when there is a spare core for it, idle now."""
    global _worker
    if not (spare_core(device) and idle_core()):
        return None
    if _worker is None:
        threads = torch.get_num_threads()
        # a new thread takes torch's process-wide thread count, not the one set in this thread
        _worker = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="nrexp-stats", initializer=torch.set_num_threads, initargs=(threads,)
        )
    return _worker


@torch.no_grad()
def activation_norms(activations: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the batch of each example's L2 norm (in float32), for each activation, in order.

    One row-norm kernel per activation, reading it once: stacking same-shaped activations first to
    reduce them in one call copies them, which costs more memory traffic than the calls cost.
    """
    rows = [torch.linalg.vector_norm(a.flatten(1), dim=1, dtype=torch.float32) for a in activations]
    return torch.stack(rows).mean(dim=1)


@torch.no_grad()
def activation_norms_and_cosines(activations: list[torch.Tensor]):
    """(act_norm, act_cos), one value each per activation, in order, in float32.

    act_norm: activation_norms. act_cos: the mean pairwise cosine similarity of the examples' activation
    vectors (a[i] flattened) over the B(B-1) ordered pairs i != j. With unit rows u_i = a_i / ||a_i||,
    sum_{i != j} u_i . u_j = ||sum_i u_i||^2 - sum_i ||u_i||^2, and sum_i u_i = a^T (1 / ||a_i||): one
    matrix-vector product over the activation besides the row norms, no B x B matrix. An all-zero row
    (a dead ReLU layer) counts as cosine 0 with every other. NaN for a batch of one (no pairs)."""
    flats = [a.detach().flatten(1) for a in activations]
    if len({f.shape[0] for f in flats}) > 1:  # batches of different sizes (not the trainer's): one at a time
        per = [
            (r.mean(), _mean_pairwise_cosine(f, r))
            for f in flats
            for r in [torch.linalg.vector_norm(f, dim=1, dtype=torch.float32)]
        ]
        return torch.stack([n for n, _ in per]), torch.stack([c for _, c in per])
    rows = torch.stack([torch.linalg.vector_norm(f, dim=1, dtype=torch.float32) for f in flats])  # (layers, B)
    # the per-layer work is the row norms and one matrix-vector product each; the rest is a few kernels over all
    # layers at once (a 50-layer net: per-layer small kernels would cost more than the reading)
    inverse = rows.reciprocal().nan_to_num_(nan=0.0, posinf=0.0)  # an all-zero row: 0
    unit_sums = [inverse[i] @ (f if f.dtype == torch.float32 else f.float()) for i, f in enumerate(flats)]
    squares = torch.stack([torch.dot(u, u) for u in unit_sums])  # ||sum of unit rows||^2 per layer
    batch = rows.shape[1]
    pairs = squares - (rows > 0).sum(1)
    cosines = pairs / (batch * (batch - 1)) if batch > 1 else torch.full_like(squares, float("nan"))
    return rows.mean(1), cosines


def _mean_pairwise_cosine(flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """flat (..., B, D) with its row norms rows (..., B), float32 -> the mean pairwise cosine (...)."""
    batch = flat.shape[-2]
    nonzero = rows > 0
    inverse = torch.where(nonzero, 1.0 / rows, torch.zeros_like(rows))
    unit_sum = (inverse.unsqueeze(-2) @ flat.float()).squeeze(-2)  # (..., D): the sum of the unit rows
    pairs = unit_sum.square().sum(-1) - nonzero.sum(-1).float()
    return pairs / (batch * (batch - 1)) if batch > 1 else torch.full_like(pairs, float("nan"))


@torch.no_grad()
def stacked_activation_cosines(activations: list[torch.Tensor]) -> torch.Tensor:
    """act_cos of stacked activations (M, B, ...), one row per layer: (layers, M)."""
    cosines = []
    for a in activations:
        flat = a.detach().flatten(2)
        cosines.append(_mean_pairwise_cosine(flat, torch.linalg.vector_norm(flat, dim=2, dtype=torch.float32)))
    return torch.stack(cosines)


class StackedMonitor:
    """LayerMonitor's statistics for every member of a fused group (nrexp/fused.py), computed on its stacks:
    each statistic of a layer is one reduction over the member axis, and every member's numbers reach
    the host in one transfer. Only the order in which a norm's floats are summed differs from a solo run."""

    def __init__(self, net, member):
        module_name = {module: name for name, module in member.model.named_modules()}
        self.net = net
        self.layer_names = member.monitor.names
        self.weight_names = [f"{module_name[module]}.weight" for module in member.monitor.modules]
        assert len(self.weight_names) == len(self.layer_names)  # one Linear per named layer: the MLP's blocks
        with torch.no_grad():
            self.init = [net.params[name].clone() for name in self.weight_names]
        self.init_norms = self._norms(self.init)
        self._before_step: list[torch.Tensor] | None = None

    @staticmethod
    def _norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """(layers, M): the Frobenius norm of each member's slice of each stacked tensor."""
        return torch.stack([torch.linalg.vector_norm(t.flatten(1), dim=1) for t in tensors])

    @torch.no_grad()
    def before_step(self, activations: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """LayerMonitor.before_step for all members: each statistic (layers, M). Call after backward."""
        weights = [self.net.params[name] for name in self.weight_names]
        weight_norm = self._norms(weights)
        stats = {
            "act_norm": torch.stack(
                [torch.linalg.vector_norm(a.detach().flatten(2).float(), dim=2).mean(1) for a in activations]
            ),
            "act_cos": stacked_activation_cosines(activations),
            "grad_norm": self._norms([self.net.params[name].grad for name in self.weight_names]),
            "weight_norm": weight_norm,
            "weight_change": self._norms(torch._foreach_sub(weights, self.init)) / self.init_norms,
        }
        self._before_step = [w.clone() for w in weights]
        return stats

    @torch.no_grad()
    def after_step(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add each member's update ratio ||W_after - W_before|| / ||W_before||: W_before the weights of the
        logged forward/backward (before_step), W_after those after the optimizer step taken right after it."""
        after = [self.net.params[name] for name in self.weight_names]
        stats["update_ratio"] = self._norms(torch._foreach_sub(after, self._before_step)) / stats["weight_norm"]
        self._before_step = None
        return stats

    def to_host(self, stats: dict[str, torch.Tensor], scalars: dict[str, torch.Tensor]) -> list[tuple]:
        """For each member in stack order, LayerMonitor.to_host's ({metric: {layer: value}}, {tag: value});
        `scalars` hold one value per member. One device->host copy for the whole group."""
        n = len(self.layer_names)
        rows = [stats[k].float() for k in stats] + [v.detach().float().reshape(1, -1) for v in scalars.values()]
        per_member = torch.cat(rows).T.tolist()
        return [
            (
                {k: dict(zip(self.layer_names, flat[i * n : (i + 1) * n])) for i, k in enumerate(stats)},
                dict(zip(scalars, flat[len(stats) * n :])),
            )
            for flat in per_member
        ]


# ------------------------------------------------------------------------------------------------
# your own model: the same statistics and tags for any nn.Module


def watch(
    model: nn.Module, layers: Mapping[str, nn.Module] | None = None, log_dir=None, histograms: bool = False
) -> Watcher:
    """Monitor any nn.Module as nrexp monitors its own nets: the per-layer statistics of LayerMonitor
    (act_norm, act_cos, grad_norm, weight_norm, weight_change, update_ratio) and, with `log_dir`, the same
    TensorBoard tags through the same TensorBoardWriter (`act_norm/<layer>`, depth profile at step 0,
    custom layout; with `histograms=True` hist_act/hist_grad/hist_weight).

    `layers`: {name: module}, in forward order; a module that is not itself a Linear/Conv2d (a residual
    block, say) stands for all the Linear/Conv2d layers inside it, its output being the activation.
    Default: every nn.Linear and nn.Conv2d of `model`, named by their path (`layer1.0.conv1`), in
    registration order. Activations are recorded by forward hooks, only inside `Watcher.record`.

        w = nrexp.monitor.watch(model, log_dir="runs/mine")
        for step, (x, y) in enumerate(batches):
            with w.record(step % 10 == 0):      # a logging step: keep each layer's output
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward()
            w.before_step()                     # after backward, before the update
            opt.step()
            w.after_step(step, {"train/loss": loss.item()})   # statistics of step `step`, written
        w.close()
    """
    return Watcher(model, layers, log_dir, histograms)


class Watcher:
    """`watch`'s result: forward hooks on the layers, a LayerMonitor, and optionally a TensorBoardWriter."""

    def __init__(
        self, model: nn.Module, layers: Mapping[str, nn.Module] | None = None, log_dir=None, histograms: bool = False
    ):
        if layers is None:
            layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        layers = dict(layers)
        if not layers:
            raise ValueError("watch: no layers to monitor (the model has no nn.Linear or nn.Conv2d; pass layers=)")
        empty = [name for name, m in layers.items() if not weight_layers(m)]
        if empty:
            raise ValueError(
                f"watch: {empty} hold no nn.Linear or nn.Conv2d weight to monitor; pass modules "
                "that are (or contain) one"
            )
        self.model, self.layers = model, layers
        self.monitor = LayerMonitor(layers)
        self.names = self.monitor.names
        self.histograms = histograms
        self.writer = None
        if log_dir is not None:
            from nrexp.writers import TensorBoardWriter

            os.makedirs(log_dir, exist_ok=True)
            self.writer = TensorBoardWriter(log_dir, self.names)
        self._recording = False
        self._outputs: dict[str, tuple] = {}  # name -> (activation, its version when recorded)
        self._stats: dict[str, torch.Tensor] | None = None
        self._hist: Histograms | None = None
        self.last: dict[str, dict[str, float]] | None = None  # the last logged step's {metric: {layer: value}}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in layers.items()]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if self._recording:
                out = output[0] if isinstance(output, (tuple, list)) else output
                out = out.detach()
                self._outputs[name] = (out, out._version)

        return hook

    @contextlib.contextmanager
    def record(self, logging: bool = True):
        """Inside, a forward pass keeps each monitored layer's output (when `logging`), for this step's statistics."""
        self._outputs = {}
        self._recording = logging
        try:
            yield self
        finally:
            self._recording = False

    def activations(self) -> list[torch.Tensor]:
        missing = [n for n in self.names if n not in self._outputs]
        if missing:
            raise RuntimeError(f"watch: no output recorded for {missing}: run the forward pass inside record(True)")
        changed = [n for n in self.names if self._outputs[n][0]._version != self._outputs[n][1]]
        if changed:
            raise RuntimeError(
                f"watch: the outputs of {changed} were changed in place after the layer (an inplace "
                "op): monitor the module whose output is kept, e.g. the block around it"
            )
        return [self._outputs[n][0] for n in self.names]

    @torch.no_grad()
    def before_step(self) -> None:
        """After backward, before the optimizer step: starts this step's statistics (nothing unless recorded)."""
        if not self._outputs:
            self._stats = None
            return
        activations = self.activations()
        self._stats = self.monitor.before_step(activations)
        self._hist = self.monitor.histograms(activations) if self.histograms else None
        self._outputs = {}

    @torch.no_grad()
    def after_step(self, step: int, scalars: Mapping[str, float] | None = None):
        """After the optimizer step: finishes the statistics of step `step` (update_ratio: this update), writes
        them with `scalars` and returns {metric: {layer: value}} (None on a step not recorded)."""
        if self._stats is None:
            if self.writer is not None and scalars:
                self.writer.scalars(step, {k: float(v) for k, v in scalars.items()})
            return None
        stats, self._stats = self.monitor.after_step(self._stats), None
        layer_stats, _ = self.monitor.to_host(stats, {})
        self.last = layer_stats
        if self.writer is not None:
            self.writer.layer_stats(step, layer_stats)
            if scalars:
                self.writer.scalars(step, {k: float(v) for k, v in scalars.items()})
            if self._hist is not None:
                self.writer.queue_histograms(step, self._hist)
                self.writer.write_histograms()
            if step == 0:
                self.writer.depth_plot(0, layer_stats, "init")
        self._hist = None
        return layer_stats

    def close(self) -> None:
        """Remove the hooks and close the writer (its depth figures written)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.writer is not None:
            self.writer.close()
