"""Per-layer statistics, computed on the device and brought to the host in one transfer.

For each monitored layer (a block's weights and its output activation):
- act_norm:      mean over the batch of each example's L2 norm of the layer's output activation
- grad_norm:     Frobenius norm of dLoss/dW
- weight_norm:   ||W||_F
- weight_change: ||W - W_init|| / ||W_init||  (how far training moved the weights from their init)
- update_ratio:  ||dW|| / ||W|| of the optimizer step just taken

W is the weight the layer computes with. A residual block holds two Linear layers; its W is both
taken together (the Frobenius norm of all its weight entries), so every model reports one number per
block. When any weight is parametrized, the monitor reads `.weight` through the layer modules on every
call: under weight normalization `.weight` is recomputed from g and v on each access, and a tensor
stored once would go stale. Plain weights are Parameters that the optimizer updates in place (as do
resuming and the fused launcher's write-back), so those are kept.

Weight normalization (w = g v/||v|| per output unit) leaves no gradient on W itself: autograd fills
dL/dg and dL/dv. The chain rule gives them back exactly, per output unit, with u = v/||v||:
    dL/dv = (g/||v||) (I - u u^T) dL/dW   and   dL/dg = u . dL/dW,
so  dL/dW = (dL/dg) u + (||v||/g) dL/dv.
grad_norm is therefore ||dL/dW|| of the effective weight for every norm, comparable across them.

All norms of a kind are computed with one fused `torch._foreach_norm` over the layers, and everything
is stacked into one tensor so that a logging step costs a single device-to-host copy (never one
`.item()` per layer, which would sync the GPU dozens of times).

The trainer uses `capture`: at a logging step it copies W before the optimizer step and keeps dL/dW
and the activations; the statistics are then computed from those, on CPU on a worker thread while
the main thread goes on to the next step (the trainer writes them before the next optimizer step).
That worker runs only where the training leaves a core idle (`torch.get_num_threads()` below the
machine's CPUs, e.g. one thread on a 2-core machine). It hides part of the statistics' cost, not all:
its many small ops hold the GIL the main thread needs between its own. `trainer.log_every=1` at batch
128, one thread, old and new trainer alternating in one process on this project's 2-core CPU: speed
relative to no statistics 0.63 -> 0.66 (3 x 256 MLP) and 0.70 -> 0.75 (50 x 100). The numbers are the
same either way: the same ops on the same tensors (tests/test_monitor.py).

Cost (measured by `nrexp bench`): a logging step reads the weights about ten times (norms of W, dL/dW,
W - W_init, W - W_before, and the copy of W_before). `_foreach_*` ops are fused kernels on CUDA, but
on CPU PyTorch runs them as a loop over the tensors, so a 51-layer net pays for a few hundred small
ops per logging step: with trainer.log_every=1 at batch 128 that is ~0.3 of a training step on CPU;
at the default log_every it is noise. On the main thread, what is left is mostly Python per layer:
timers around each part of the 51-layer net's step (log_every=1, batch 128, one thread) found the
capture at 0.9 ms and writing the log at 0.6 ms, most of it reading `.weight` and `.grad` through the
modules, allocating the copy of W, and building 255 tagged TensorBoard values. Keeping the plain
weights' Parameters, copying into reused buffers and filling one reused Summary (writers.py) brought
them to 0.5 and 0.35 ms, and d/c from 0.69-0.73 to 0.77 (3 x 256: 0.74-0.75 to 0.78-0.80).
"""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from nrexp.models import weight_layers

LAYER_METRICS = ("act_norm", "grad_norm", "weight_norm", "weight_change", "update_ratio")


def weight_grad(layer: nn.Module) -> torch.Tensor:
    """dLoss/dW of the weight `layer` computes with (zeros before any backward pass)."""
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
    def __init__(self, layers: Mapping[str, nn.Module]):
        self.names: List[str] = list(layers)
        groups = [weight_layers(entry) for entry in layers.values()]
        self.modules: List[nn.Module] = [m for group in groups for m in group]
        device = self.modules[0].weight.device
        # which named layer each weight belongs to; None when it is one weight per name (mlp, cnn)
        owner = [i for i, group in enumerate(groups) for _ in group]
        self._owner = torch.tensor(owner, device=device) if len(owner) != len(self.names) else None
        # Plain weights are Parameters updated in place: kept, not looked up through 51 modules' __getattr__
        # twice a logging step (~0.3 ms of the 51-layer net's statistics step on CPU). A parametrized
        # weight (weight normalization) is recomputed on each access, so then every read goes through
        # the modules (see the module docstring).
        plain = not any(parametrize.is_parametrized(m, "weight") for m in self.modules)
        self._params: Optional[List[torch.Tensor]] = [m.weight for m in self.modules] if plain else None
        self._copies: Optional[List[torch.Tensor]] = None  # capture's copy of W, reused (see capture)
        self.reset_init(self.weights())
        self._before_step: Optional[List[torch.Tensor]] = None

    def weights(self) -> List[torch.Tensor]:
        """The current effective weights, read afresh (see the module docstring). Plain weights come as
        their Parameters, not detached: every caller reads them under torch.no_grad(), and 51 `.detach()`
        calls are 51 releases of the GIL, each a chance for the statistics thread to take it (see
        activation_norms)."""
        if self._params is not None:
            return list(self._params)
        return [m.weight.detach() for m in self.modules]

    def grads(self) -> List[torch.Tensor]:
        """dLoss/dW of each weight (`weight_grad`)."""
        if self._params is not None:
            return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        return [weight_grad(m) for m in self.modules]

    def reset_init(self, init_weights: List[torch.Tensor]) -> None:
        """Use these as W_init (when resuming, the run's true init comes from the checkpoint)."""
        self.init_weights = [w.detach().clone() for w in init_weights]
        (self.init_norms,) = self._norms(self.init_weights)

    def _norms(self, *groups: List[torch.Tensor]) -> torch.Tensor:
        """One Frobenius norm per named layer, over all of that layer's weight tensors together, for
        each group of per-weight tensors: shape (groups, layers). All groups go through one
        `_foreach_norm` and one stack: on CPU each such call has a fixed cost on top of its per-tensor work."""
        tensors = [t for group in groups for t in group]
        norms = torch.stack(torch._foreach_norm(tensors)).view(len(groups), -1)
        if self._owner is None:
            return norms
        squares = torch.zeros(len(groups), len(self.names), device=norms.device, dtype=norms.dtype)
        return squares.index_add_(1, self._owner, norms.square()).sqrt()

    @torch.no_grad()
    def before_step(self, activations: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Statistics of the current weights, activations and gradients (call after backward), and a copy
        of W for after_step's update ratio."""
        self._before_step = torch._foreach_mul(self.weights(), 1.0)  # copies of W in one fused call, not one per layer
        return self.current_statistics(activations)

    @torch.no_grad()
    def current_statistics(self, activations: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Statistics of the current weights, activations and gradients, without the update ratio
        (no step follows: the final probe)."""
        return self._statistics(self.weights(), self.grads(), activations)

    @torch.no_grad()
    def after_step(self, stats: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Add the update ratio ||W_after - W_before|| / ||W_before|| of the step just taken."""
        stats = self._with_update_ratio(stats, self._before_step, self.weights())
        self._before_step = None
        return stats

    @torch.no_grad()
    def capture(self, activations: List[torch.Tensor]) -> "Capture":
        """before_step and after_step in two halves (see the module docstring): call after backward,
        then `.statistics()` on the result after the optimizer step, and wait for that before the next
        optimizer step changes the weights it reads, and before the next capture, which copies W
        into the same buffers (allocating them anew each logging step cost more than the copy)."""
        weights = self.weights()
        if self._copies is None:
            self._copies = torch._foreach_mul(weights, 1.0)
        else:
            torch._foreach_copy_(self._copies, weights)
        return Capture(self, self._copies, self.grads(), activations)

    def _statistics(self, weights: List[torch.Tensor], grads: List[torch.Tensor], activations: List[torch.Tensor],
                    after: Optional[List[torch.Tensor]] = None):
        """The statistics of `weights` (W before the step), their gradients and the activations; with `after`
        (W after the step) also the update ratio, in the same calls: W - W_init and W_after - W in one
        `_foreach_sub`, all four norms in one `_foreach_norm` (each call is a GIL release that the
        statistics thread makes the main thread pay for, see activation_norms). The same numbers as
        _with_update_ratio's (tests/test_monitor.py compares them bit for bit)."""
        minuends, subtrahends = [*weights], [*self.init_weights]  # W - W_init
        if after:
            minuends, subtrahends = minuends + [*after], subtrahends + [*weights]  # and W_after - W
        differences = torch._foreach_sub(minuends, subtrahends)
        n = len(weights)
        norms = self._norms(weights, grads, *(differences[i:i + n] for i in range(0, len(differences), n))).unbind()
        stats = {
            "act_norm": activation_norms(activations),
            "grad_norm": norms[1],
            "weight_norm": norms[0],
            "weight_change": norms[2] / self.init_norms,
        }
        if after:
            stats["update_ratio"] = norms[3] / norms[0]
        return stats

    def _with_update_ratio(self, stats: Dict[str, torch.Tensor], before: List[torch.Tensor], after: List[torch.Tensor]):
        (delta,) = self._norms(torch._foreach_sub(after, before))
        stats["update_ratio"] = delta / stats["weight_norm"]
        return stats

    def to_host(self, layer_stats: Dict[str, torch.Tensor], scalars: Dict[str, torch.Tensor]):
        """One device->host copy of all that is logged this step.

        Returns ({metric: {layer: value}}, {tag: value}) as Python floats.
        """
        tensors = [layer_stats[k].float() for k in layer_stats] + [v.detach().float().reshape(1) for v in scalars.values()]
        flat = torch.cat(tensors).cpu().tolist() if tensors else []
        n = len(self.names)
        layers = {k: dict(zip(self.names, flat[i * n:(i + 1) * n])) for i, k in enumerate(layer_stats)}
        return layers, dict(zip(scalars, flat[len(layer_stats) * n:]))


class Capture:
    """A logging step's W (copied before the optimizer step), dL/dW and activations (see LayerMonitor.capture)."""

    def __init__(self, monitor: LayerMonitor, weights: List[torch.Tensor], grads: List[torch.Tensor],
                 activations: List[torch.Tensor]):
        self.monitor, self.weights, self.grads, self.activations = monitor, weights, grads, activations

    def statistics(self) -> "Future[Dict[str, torch.Tensor]]":
        """Call after the optimizer step: before_step's and after_step's statistics, on the worker thread
        when there is a spare core (CPU), else computed here. W after the step is read now: the next
        optimizer step must wait for the result."""
        after = self.monitor.weights()
        worker = _worker_thread(self.weights[0].device)
        if worker is not None:
            return worker.submit(self._compute_in_mode, after, _flush_denormal)
        done: Future = Future()
        done.set_result(self._compute(after))
        return done

    def _compute_in_mode(self, after: List[torch.Tensor], flush_denormal: Optional[bool]) -> Dict[str, torch.Tensor]:
        """_compute on the worker thread, in the run's denormal mode (a per-thread CPU setting: the thread
        outlives the run that started it, see set_flush_denormal)."""
        if flush_denormal is not None:
            torch.set_flush_denormal(flush_denormal)
        return self._compute(after)

    @torch.no_grad()
    def _compute(self, after: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        m = self.monitor
        stats = m._statistics(self.weights, self.grads, self.activations, after)
        # Let go of this step's gradients and activations now, not when the trainer drops this object at
        # its next logging step: held through the steps between, they kept a few MB more in use, which
        # slowed every step in between (~0.1 ms a step for the 51-layer net at batch 128).
        self.grads = self.activations = []
        return stats


_worker: Optional[ThreadPoolExecutor] = None
_flush_denormal: Optional[bool] = None  # the mode the run in progress set (None: nrexp set none)


def set_flush_denormal(on: bool, device: torch.device) -> None:
    """trainer.flush_denormal, for a run on `device`: on CPU, denormal floats (nonzero, |x| < 1.2e-38) are
    read and written as zero (x86 DAZ/FTZ, ARM FZ) or, with `on=False`, computed as IEEE says.

    Why: CPUs compute with denormals 10-100x slower than with other floats, and a run that fits its
    data makes many. Measured on this project's 2-core CPU, one thread, one epoch of a 60,000-digit
    MNIST at batch 32, 16 runs of a 3 x 100 MLP (`nrexp bench --fused`'s sweep): 5-30% of the momentum
    buffer entries of each run without weight decay ended denormal; flushing took the 16 step loops,
    one by one, from 34.0 and 33.3 s to 30.9 and 31.1 s, and the fused group's loop from 13.3 and 13.2 s
    to 10.4 and 10.7 s (off and on alternating). Values that small weigh nothing next to the others:
    the default `nrexp train` on that data ends with the same loss and accuracy to the last bit either way.

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
    return device.type == "cpu" and torch.get_num_threads() < (os.cpu_count() or 1)


def _worker_thread(device: torch.device) -> Optional[ThreadPoolExecutor]:
    """The process's statistics thread, when there is a spare core for it."""
    global _worker
    if not spare_core(device):
        return None
    if _worker is None:
        threads = torch.get_num_threads()
        # a new thread takes torch's process-wide thread count, not the one set in this thread
        _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nrexp-stats",
                                     initializer=torch.set_num_threads, initargs=(threads,))
    return _worker


@torch.no_grad()
def activation_norms(activations: List[torch.Tensor]) -> torch.Tensor:
    """Mean over the batch of each example's L2 norm, for each activation, in order.

    Activations of the same shape (all hidden blocks of an MLP) are stacked and reduced together: a
    handful of kernels for a 50-layer net instead of four per layer, which matters on small nets
    where each kernel launch costs more than its arithmetic.

    Few calls matter on the statistics thread too: each torch call releases the GIL and takes it back,
    and each time the main thread, running the next step's small ops, may have to wait for it. A
    thread making tiny torch calls nonstop slowed a main loop of small ops 3x; one copying 32 MB per
    call, 3% (this project's 2-core CPU). So no per-layer calls here (no `.detach()`: no_grad instead,
    no split into per-layer tensors and restack), and the groups joined with one cat.
    """
    groups: Dict[tuple, List[int]] = {}
    for i, a in enumerate(activations):
        groups.setdefault((tuple(a.shape), a.dtype), []).append(i)
    parts, order = [], []
    for indices in groups.values():
        stacked = torch.stack([activations[i] for i in indices])  # (L, B, ...)
        if stacked.dim() > 3:  # conv feature maps: each example's values as one vector
            stacked = stacked.flatten(2)
        if stacked.dtype != torch.float32:  # bf16 activations: the norm in float32
            stacked = stacked.float()
        parts.append(torch.linalg.vector_norm(stacked, dim=2).mean(dim=1))
        order += indices
    norms = torch.cat(parts) if len(parts) > 1 else parts[0]
    if order != sorted(order):  # groups interleave (e.g. a CNN's pooled maps between conv blocks): put back
        position = {layer: k for k, layer in enumerate(order)}
        norms = norms[torch.tensor([position[i] for i in range(len(order))], device=norms.device)]
    return norms


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
        self._before_step: Optional[List[torch.Tensor]] = None

    @staticmethod
    def _norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """(layers, M): the Frobenius norm of each member's slice of each stacked tensor."""
        return torch.stack([torch.linalg.vector_norm(t.flatten(1), dim=1) for t in tensors])

    @torch.no_grad()
    def before_step(self, activations: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """LayerMonitor.before_step for all members: each statistic (layers, M). Call after backward."""
        weights = [self.net.params[name] for name in self.weight_names]
        weight_norm = self._norms(weights)
        stats = {
            "act_norm": torch.stack([torch.linalg.vector_norm(a.detach().flatten(2).float(), dim=2).mean(1)
                                     for a in activations]),
            "grad_norm": self._norms([self.net.params[name].grad for name in self.weight_names]),
            "weight_norm": weight_norm,
            "weight_change": self._norms(torch._foreach_sub(weights, self.init)) / self.init_norms,
        }
        self._before_step = [w.clone() for w in weights]
        return stats

    @torch.no_grad()
    def after_step(self, stats: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Add each member's update ratio ||W_after - W_before|| / ||W_before|| of the step just taken."""
        after = [self.net.params[name] for name in self.weight_names]
        stats["update_ratio"] = self._norms(torch._foreach_sub(after, self._before_step)) / stats["weight_norm"]
        self._before_step = None
        return stats

    def to_host(self, stats: Dict[str, torch.Tensor], scalars: Dict[str, torch.Tensor]) -> List[tuple]:
        """For each member in stack order, LayerMonitor.to_host's ({metric: {layer: value}}, {tag: value});
        `scalars` hold one value per member. One device->host copy for the whole group."""
        n = len(self.layer_names)
        rows = [stats[k].float() for k in stats] + [v.detach().float().reshape(1, -1) for v in scalars.values()]
        per_member = torch.cat(rows).T.tolist()
        return [({k: dict(zip(self.layer_names, flat[i * n:(i + 1) * n])) for i, k in enumerate(stats)},
                 dict(zip(scalars, flat[len(stats) * n:]))) for flat in per_member]
