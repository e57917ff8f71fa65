"""Train several sweep members at once, as one vectorized model (`hydra/launcher=fused`).

Members of a group differ only in `FREE_KEYS` (seed, lr, weight decay, dropout, init scale: no shape);
`nrexp.grouping.plan` forms the groups and `train_group` trains one through train.py's `run_loop`, as a
`FusedGroup` trainee. Only what is truly fused lives here: `StackedMLP` (every member's parameters as one
leaf with a leading member axis, so one `torch.baddbmm` computes a layer of every member; each member
built, and its dropout masks drawn, exactly as its solo run's) and `StepInputs` (each member's minibatch
and masks, made a step ahead on a spare core). Whenever a member's state is read (evaluation, checkpoints,
the end), the stacks are copied back into its own modules and the solo run's functions do the work: its
run dir is a solo run's dir, and only the float rounding of batched matmuls differs. Not torch.func's vmap:
per-member dropout p and random streams, and BatchNorm's in-place running statistics, do not fit it.
"""

from __future__ import annotations

import ctypes
import json
import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from nrexp.config import validate
from nrexp.monitor import Histograms, StackedMonitor, keeping_denormal_mode, spare_core
from nrexp.optim import make_optimizer, param_groups
from nrexp.signals import GracefulStop
from nrexp.train import LoopState, Member, StepOutput, Trainee, make_schedule, run_loop

log = logging.getLogger("nrexp")

# ------------------------------------------------------------------------------------------------
# the members and their stacked model


class FusedMember(Member):
    """A member of a fused group: a solo run's objects, plus its own dropout stream."""

    def __init__(self, cfg, run_dir: Path, data, device: torch.device):
        super().__init__(cfg, run_dir, data, device)
        # the member's own random stream for dropout, continuing where its solo run's would be now
        self.rng = torch.Generator(device=device)
        self.rng.set_state(torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device))
        self.keep = 1.0 - cfg.dropout.p  # keep probabilities (1 = no dropout module, no random draws)
        self.input_keep = 1.0 - cfg.dropout.input_p


class StackedMLP:
    """All members' MLPs (models.MLP) as stacked leaf tensors; members in `stacks` of equal optim settings.

    `params[name]` is one leaf for the whole group, shaped (M, ...), members in stack order; each
    member's slice has the layout of its own parameter. Forward and autograd see only these. The
    optimizer steps `parts[name]`: per stack, a view of its rows of the leaf, whose gradient is set to
    the same rows of the leaf's gradient before each step. So a layer is one batched matmul for every
    member, and each stack's param groups carry its own lr and weight decay in one optimizer."""

    def __init__(self, members: Sequence[FusedMember]):
        by_setting: dict[str, list[Member]] = {}
        for m in members:
            by_setting.setdefault(
                json.dumps(OmegaConf.to_container(m.cfg.optim, resolve=True), sort_keys=True), []
            ).append(m)
        self.stacks = list(by_setting.values())
        self.members = [m for stack in self.stacks for m in stack]
        first = self.members[0].model
        self.blocks = list(first.blocks.items())  # (name, block of member 0): layer types and flags
        self.names = [name for name, _ in first.named_parameters()]
        sizes = [len(stack) for stack in self.stacks]
        self.rows = [slice(sum(sizes[:k]), sum(sizes[: k + 1])) for k in range(len(self.stacks))]
        with torch.no_grad():
            self.params = {name: self._stack(name).requires_grad_() for name in self.names}
            self.parts = {
                name: [self.params[name].detach()[rows].requires_grad_() for rows in self.rows] for name in self.names
            }
            self.buffers = {
                name: torch.stack([dict(m.model.named_buffers())[name] for m in self.members])
                for name, _ in first.named_buffers()
            }  # BatchNorm running statistics
        self.optimizer = make_optimizer(
            [g for k in range(len(self.stacks)) for g in self._param_groups(k)], self.members[0].cfg.optim
        )
        # dropout, per kind: (rows that draw masks: (row, its generator, keep), keep of every row as (M, 1, 1))
        device = self.params[self.names[0]].device
        self.dropout = {
            kind: (
                [(j, m.rng, getattr(m, kind)) for j, m in enumerate(self.members) if getattr(m, kind) < 1.0],
                torch.tensor([getattr(m, kind) for m in self.members], device=device).view(-1, 1, 1),
            )
            for kind in ("input_keep", "keep")
        }
        # where forward applies dropout, in order: (kind, features): the input, then each block's output
        self.dropout_sites = [("input_keep", self.blocks[0][1].linear.in_features)] + [
            ("keep", block.linear.out_features) for _, block in self.blocks
        ]
        self.mask_layouts: dict[int, tuple] = {}  # site -> (stride, dtype) of its activation, seen by forward
        self.mask_generators = list(
            {id(m.rng): m.rng for m in self.members if min(m.keep, m.input_keep) < 1.0}.values()
        )
        # the members' own tensors, in stack order, for write_back
        self.member_params = {name: [m.model.get_parameter(name) for m in self.members] for name in self.names}
        self.member_buffers = {
            name: [dict(m.model.named_buffers())[name] for m in self.members] for name in self.buffers
        }

    def _stack(self, name: str) -> torch.Tensor:
        tensors = [m.model.get_parameter(name).detach() for m in self.members]
        return torch.stack(tensors)

    def _param_groups(self, k: int) -> list[dict]:
        """Stack k's param groups: its members' own (decayed weights, the rest) with its lr, stacked."""
        cfg = self.stacks[k][0].cfg.optim
        model = self.stacks[k][0].model
        name_of = {p: name for name, p in model.named_parameters()}
        return [
            {**g, "lr": cfg.lr, "params": [self.parts[name_of[p]][k] for p in g["params"]]}
            for g in param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias)
        ]

    def _linear(self, h: torch.Tensor, prefix: str) -> torch.Tensor:
        """h (M, B, in) -> (M, B, out): every member's layer in one batched matmul, computed feature-major
        (W h^T, returned as its transposed view), so that the weight's gradient is one bmm straight
        into W's (M, out, in) layout, the faster order for CPU's batched gemm."""
        out_t = torch.baddbmm(
            self.params[prefix + "bias"].unsqueeze(2), self.params[prefix + "weight"], h.transpose(1, 2)
        )
        return out_t.transpose(1, 2)

    # -- the forward pass: models.MLP.forward and MLPBlock.forward, for every member at once
    def forward(
        self, x: torch.Tensor, masks: Sequence[torch.Tensor | None], activations: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x (M, B, ...) -> logits (M, B, classes), with `draw_masks`' masks; `activations` gets each
        block's output, as MLP records."""
        h = self._dropout(x.flatten(2), masks, 0)
        for site, (name, block) in enumerate(self.blocks, start=1):
            prefix = f"blocks.{name}."
            h = self._linear(h, prefix + "linear.")
            if block.norm_before_act:
                h = self._norm(h, block.norm, prefix + "norm.")
            h = block.act(h)  # elementwise: member 0's module serves all
            if not block.norm_before_act:
                h = self._norm(h, block.norm, prefix + "norm.")
            h = self._dropout(h, masks, site)
            if activations is not None:
                activations.append(h)
        logits = self._linear(h, "head.")
        if activations is not None:
            activations.append(logits)
        return logits

    def _norm(self, h: torch.Tensor, norm: nn.Module, prefix: str) -> torch.Tensor:
        """Member 0's norm layer `norm` tells the kind; each member's slice of h (M, B, D) is its own.
        Computed in float32 whatever h's dtype and rounded back once, as PyTorch's CPU norm kernels do
        under bf16 autocast (in bf16 the gradients drifted from the solo run's by a few percent)."""
        if isinstance(norm, nn.Identity):
            return h
        dtype, h = h.dtype, h.float()  # no-ops in float32
        features = h.shape[-1]
        if isinstance(norm, nn.BatchNorm1d):
            var, mean = torch.var_mean(h, dim=1, keepdim=True, correction=0)  # per member and feature, over B
            if norm.track_running_stats:
                self._update_running_stats(
                    prefix, mean.detach().squeeze(1), var.detach().squeeze(1), h.shape[1], norm.momentum
                )
            h = (h - mean) * torch.rsqrt(var + norm.eps)
        elif isinstance(norm, nn.LayerNorm):
            h = F.layer_norm(h, (features,), eps=norm.eps)  # over each example's D features
        elif isinstance(norm, nn.RMSNorm):
            h = F.rms_norm(h, (features,), eps=norm.eps)
        elif isinstance(norm, nn.GroupNorm):
            m, b = h.shape[:2]
            h = F.group_norm(h.reshape(m * b, features), norm.num_groups, eps=norm.eps).view(m, b, features)
        else:  # unfusable_reason() admits only the norms above
            raise TypeError(f"no stacked form for {type(norm).__name__}")
        if prefix + "weight" in self.params:  # affine: a gain (and, but for RMSNorm, a shift) per member
            h = h * self.params[prefix + "weight"].unsqueeze(1)
        if prefix + "bias" in self.params:
            h = h + self.params[prefix + "bias"].unsqueeze(1)
        return h.to(dtype)

    @torch.no_grad()
    def _update_running_stats(
        self, prefix: str, mean: torch.Tensor, var: torch.Tensor, n: int, momentum: float
    ) -> None:
        """nn.BatchNorm1d's update: r <- (1 - momentum) r + momentum * batch statistic, the variance unbiased."""
        self.buffers[prefix + "running_mean"].mul_(1.0 - momentum).add_(mean, alpha=momentum)
        self.buffers[prefix + "running_var"].mul_(1.0 - momentum).add_(var * (n / (n - 1)), alpha=momentum)
        self.buffers[prefix + "num_batches_tracked"].add_(1)

    def draw_masks(self, batch_size: int) -> list[torch.Tensor | None]:
        """Every member's dropout masks for one forward pass, one per dropout site (None: nobody drops there).

        A site's masks are (M, B, features), 0 or 1/keep (F.dropout's `bernoulli_(keep)` then `div_(keep)`),
        each member's drawn from its own generator, as alone; rows of members without dropout are 1.
        They are laid out (and typed) as forward's activation at that site once forward has seen it,
        so the product and its backward run in one layout; the draws are the same either way."""
        masks: list[torch.Tensor | None] = []
        for site, (kind, features) in enumerate(self.dropout_sites):
            draws, keeps = self.dropout[kind]
            if not draws:
                masks.append(None)
                continue
            layout = self.mask_layouts.get(site)
            mask = torch.ones(
                len(self.members),
                batch_size,
                features,
                device=keeps.device,
                dtype=layout[1] if layout else torch.float32,
            )
            for j, rng, keep in draws:
                mask[j].bernoulli_(keep, generator=rng)
            mask.div_(keeps)
            if layout is not None and mask.stride() != layout[0]:
                mask = torch.empty_strided(mask.shape, layout[0], dtype=layout[1], device=mask.device).copy_(mask)
            masks.append(mask)
        return masks

    def _dropout(self, h: torch.Tensor, masks: Sequence[torch.Tensor | None], site: int) -> torch.Tensor:
        """h times the site's masks (see draw_masks); remembers h's layout for the next draws."""
        mask = masks[site]
        if mask is None:
            return h
        if (mask.stride(), mask.dtype) != (h.stride(), h.dtype):  # h feature-major (see _linear), or bf16
            self.mask_layouts[site] = (h.stride(), h.dtype)
            mask = torch.empty_like(h).copy_(mask)
        return h * mask

    # -- the members' own modules, brought up to date when something reads them
    @torch.no_grad()
    def write_back(self) -> None:
        """Copy every member's slice of the stacks into its own model."""
        own, rows = [], []
        for name in self.names:
            own += self.member_params[name]
            rows += list(self.params[name].unbind())
        for name, stacked in self.buffers.items():
            own += self.member_buffers[name]
            rows += list(stacked.unbind())
        torch._foreach_copy_(own, rows)

    @torch.no_grad()
    def write_back_optimizer_state(self, member: Member) -> None:
        """The member's slice of its stack's optimizer state, into its own optimizer (the solo format)."""
        k = next(i for i, stack in enumerate(self.stacks) if member in stack)
        row = self.stacks[k].index(member)
        for name in self.names:
            stacked = self.parts[name][k]
            state = self.optimizer.state.get(stacked)
            if not state:
                continue
            own = {}
            for key, value in state.items():  # momentum buffers, Adam moments: sliced; Adam's step: shared
                if torch.is_tensor(value) and value.shape == stacked.shape:
                    value = value[row]
                own[key] = value.clone(memory_format=torch.contiguous_format) if torch.is_tensor(value) else value
            member.optimizer.state[member.model.get_parameter(name)] = own

    def zero_grad(self) -> None:
        for name in self.names:  # the parts' gradients are views of the leaf's: dropped with it
            self.params[name].grad = None
            for part in self.parts[name]:
                part.grad = None

    def step(self) -> None:
        """One optimizer step of every stack, on the gradients of the group's leaves (see the class doc)."""
        for name in self.names:
            grad = self.params[name].grad.contiguous()  # the fused kernels want contiguous tensors
            for part, rows in zip(self.parts[name], self.rows):
                part.grad = grad[rows]
        self.optimizer.step()


class StepInputs:
    """Each step's inputs besides the weights: every member's minibatch (its own data order) and
    its dropout masks (its own stream), made one step ahead on a spare core when there is one (CPU
    with fewer intra-op threads than cores), else when taken.

    Made ahead, a member's generator has drawn step s + 1's masks while step s trains. Whatever reads
    a generator (checkpoints, the final probe) calls `rewind` first: it puts each generator back to
    its state before the step made ahead and drops it; `take` makes it again, with the same draws."""

    def __init__(self, net: StackedMLP, data, batch_size: int, steps_per_epoch: int, total_steps: int, ahead: bool):
        self.net, self.data, self.batch_size = net, data, batch_size
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        members = len(net.members)
        # the group's batch is gathered into reused buffers (fresh ones cost page faults); two when made ahead
        self.buffers = [
            torch.empty(
                members * batch_size, *data.train_x.shape[1:], dtype=data.train_x.dtype, device=data.train_x.device
            )
            for _ in range(2 if ahead else 1)
        ]
        self.pool = (
            ThreadPoolExecutor(
                1,
                thread_name_prefix="nrexp-inputs",
                initializer=torch.set_num_threads,
                initargs=(torch.get_num_threads(),),
            )
            if ahead
            else None
        )
        self.pending: tuple | None = None  # (step, Future of _make(step))
        self._epoch_orders: tuple = (None, None)  # (epoch, (M, N) example indices: each member's order)

    def take(self, step: int):
        """(x (M, B, ...), y (M, B), masks) of training step `step`; then starts on the next one."""
        if self.pending is not None and self.pending[0] == step:
            inputs = self.pending[1].result()
            self.pending = None
        else:
            self.rewind()
            inputs = self._make(step)
        if self.pool is not None and step + 1 < self.total_steps:
            self.pending = (step + 1, self.pool.submit(self._make, step + 1))
        return inputs[:3]

    def rewind(self) -> None:
        """Drop the step made ahead, if any, with its draws (see the class doc)."""
        if self.pending is None:
            return
        _, future = self.pending
        self.pending = None
        for rng, state in future.result()[3]:
            rng.set_state(state)

    def close(self) -> None:
        self.rewind()
        if self.pool is not None:
            self.pool.shutdown()

    @torch.no_grad()
    def _make(self, step: int):
        states = [(rng, rng.get_state()) for rng in self.net.mask_generators] if self.pool is not None else []
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._epoch_orders[0] != epoch:
            self._epoch_orders = (epoch, torch.stack([m.batches.permutation(epoch) for m in self.net.members]))
        idx = self._epoch_orders[1][:, i * self.batch_size : (i + 1) * self.batch_size].reshape(-1)  # member by member
        members = len(self.net.members)
        x = torch.index_select(self.data.train_x, 0, idx, out=self.buffers[step % len(self.buffers)])
        x = x.view(members, self.batch_size, *self.data.train_x.shape[1:])
        y = self.data.train_y[idx].view(members, self.batch_size)
        return x, y, self.net.draw_masks(self.batch_size), states


# ------------------------------------------------------------------------------------------------
# the group as train.py's loop sees it


def train_group(cfgs: Sequence, run_dirs: Sequence[Path]) -> list[dict]:
    """Train the members `cfgs` (one fusable group) together; return their summaries, in order."""
    keep_freed_memory()
    with GracefulStop() as stop, keeping_denormal_mode():
        for cfg in cfgs:
            validate(cfg)
        group = FusedGroup(list(cfgs), [Path(d) for d in run_dirs])
        run_loop(group, stop)
    return [m.summary for m in group.given]


class FusedGroup(Trainee):
    """A Trainee of M members computed as one StackedMLP (members in stack order: row j is members[j])."""

    def __init__(self, cfgs: list, run_dirs: list[Path]):
        super().__init__(cfgs[0], f"fused group of {len(cfgs)} members")  # trainer.* is in shape_key: shared
        self.given = [FusedMember(cfg, d, self.data, self.device) for cfg, d in zip(cfgs, run_dirs)]
        self.net = StackedMLP(self.given)
        self.members = self.net.members
        self.monitor = StackedMonitor(self.net, self.given[0])
        self.schedule = make_schedule(self.trainer, self.given[0].batches.steps_per_epoch, self.batch_size)
        self.inputs = StepInputs(
            self.net,
            self.data,
            self.batch_size,
            self.schedule.steps_per_epoch,
            self.schedule.total_steps,
            ahead=spare_core(self.device),
        )
        self.activations: list[torch.Tensor] | None = None

    def start(self) -> LoopState:
        for m in self.members:
            m.open_writer(self.data, self.device, note=f" (fused group of {len(self.members)})")
        return LoopState.fresh(len(self.members), self.device)

    def forward_backward(self, step: int, with_stats: bool, logging: bool) -> StepOutput:
        x, y, masks = self.inputs.take(step)
        self.activations = [] if with_stats else None
        with self.autocast:
            logits = self.net.forward(x, masks, self.activations)
            # classes on dim 1: the head's own (feature-major) layout, see StackedMLP._linear
            losses = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)
        self.net.zero_grad()
        losses.sum().backward()  # member j's parameters get d loss_j: no other loss involves them
        return StepOutput(losses.detach(), (logits.detach().argmax(-1) == y).sum(1))

    def update(self, out: StepOutput, step: int, logging: bool) -> None:
        stats = self.monitor.before_step(self.activations) if self.activations is not None else None
        if logging and self.trainer.histograms and self.activations is not None:
            self.queue_histograms(step)
        self.net.step()
        if stats is not None:
            out.stats = Future()
            out.stats.set_result(self.monitor.after_step(stats))
        self.activations = None

    def stats_to_host(self, stats: dict, scalars: dict) -> list[tuple]:
        return self.monitor.to_host(stats, scalars)

    @torch.no_grad()
    def queue_histograms(self, step: int) -> None:
        """trainer.histograms: each member's histograms, from its slices of the stacks (as its solo run's)."""
        params, names = self.net.params, self.monitor.weight_names
        for j, m in enumerate(self.members):
            grads, weights = [[params[n].grad[j]] for n in names], [[params[n][j]] for n in names]
            activations = [a[j] for a in self.activations]
            m.writer.queue_histograms(step, Histograms(self.monitor.layer_names, activations, grads, weights))

    def sync(self) -> None:
        self.inputs.rewind()  # each member's generator as after the steps trained
        self.net.write_back()

    def save(self, member: Member, state: dict) -> None:
        self.net.write_back_optimizer_state(member)
        super().save(member, state)

    def summary_extra(self) -> dict:
        return {"fused_group_size": len(self.members)}

    def close(self) -> None:
        self.inputs.close()


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for the next allocations (heap trimming only beyond 1 GiB;
    blocks up to 32 MiB from the heap rather than mapped anew): a group's steps free and allocate
    megabytes each, which glibc's defaults otherwise hand back to the kernel and fault in again, zeroed.
    The cost: the process keeps its peak memory. Not glibc: nothing happens (docs/speed.md)."""
    try:
        libc = ctypes.CDLL(None)
        if libc.gnu_get_libc_version:  # glibc only: musl has a mallopt that ignores these
            libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
            libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
