"""Train several sweep members at once, as one vectorized model (`hydra/launcher=fused`).

Members of a group share everything that decides the shapes of the computation and may differ in
`FREE_KEYS` (seed, optim.lr, optim.weight_decay, dropout.p, dropout.input_p, init.scale). The launcher
(hydra_plugins/nrexp_fused_launcher) forms groups with `plan`; `train_group` trains one through
train.py's loop (`run_loop`), as a `FusedGroup` trainee. Only what is truly fused lives here:
- `StackedMLP`: every member's parameters as one leaf per parameter with a leading member axis, so one
  `torch.baddbmm` computes a layer of every member; members built exactly as their solo runs (same
  init, same random stream); dropout masks drawn from each member's own generator, as its solo run
  draws them on CPU; BatchNorm statistics per member.
- `StepInputs`: each member's minibatch (its own data order) and masks, made a step ahead on a spare core.
- `StackedMonitor`: monitor.py's per-layer statistics computed on the stacks for all members at once.
Whenever a member's state is read (evaluation, checkpoints, the end), the stacks are copied back into
its own modules and the solo run's functions do the work, so a member's run dir is a solo run's dir
(its checkpoint resumes as a solo run). What differs from a solo run is only the float rounding of
batched matmuls. Why not torch.func's vmap: per-member dropout p and random streams, and BatchNorm's
in-place running statistics, do not fit it.
"""
from __future__ import annotations

import ctypes
import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from nrexp.config import FUSED_FREE_KEYS, validate
from nrexp.data import load_dataset
from nrexp.monitor import keeping_denormal_mode, set_flush_denormal, spare_core
from nrexp.optim import make_optimizer, param_groups
from nrexp.signals import GracefulStop
from nrexp.train import LoopState, Member, StepOutput, Trainee, make_schedule, resolve_device, run_loop

log = logging.getLogger("nrexp")

FREE_KEYS = FUSED_FREE_KEYS  # what members of one group may differ in: no tensor shape depends on them


def unfusable_reason(cfg) -> Optional[str]:
    """Why this job must run alone (None: it can join a fused group)."""
    if cfg.model.name != "mlp":
        return f"model={cfg.model.name}: only mlp is fused"
    if cfg.norm.name == "weight":
        return "norm=weight: its weights are reparametrized per unit, which is not fused"
    if cfg.resume:
        return "resume= continues one run"
    if cfg.trainer.preact_percentiles:
        return "trainer.preact_percentiles=true is not fused"
    if cfg.data.augment:
        return "data.augment=true is not fused"
    if cfg.trainer.get("compile", False):
        return "trainer.compile=true: the stacked forward is not compiled"
    return None


# ------------------------------------------------------------------------------------------------
# grouping the sweep's jobs


@dataclass
class Group:
    """Jobs (indices into the sweep's job list) trained together, or one job that runs alone, and why."""
    jobs: List[int]
    fused: bool
    label: str


def plan(cfgs: Sequence, max_members: int) -> List[Group]:
    """Group the sweep's job configs: equal but for FREE_KEYS -> one fused group (split into chunks of
    at most `max_members`); unfusable or single jobs -> alone. In the order of each group's first job."""
    keyed: Dict[str, List[int]] = {}
    order: List[object] = []  # a shape key (a fused group) or a Group (one job alone)
    for i, cfg in enumerate(cfgs):
        reason = unfusable_reason(cfg)
        if reason:
            order.append(Group([i], False, reason))
            continue
        key = shape_key(cfg)
        if key not in keyed:
            keyed[key] = []
            order.append(key)
        keyed[key].append(i)
    groups = []
    for entry in order:
        if isinstance(entry, Group):
            groups.append(entry)
        elif len(keyed[entry]) == 1:
            groups.append(Group(keyed[entry], False, "no other job shares its shapes"))
        else:
            jobs, m = keyed[entry], cfgs[keyed[entry][0]]
            label = f"mlp {m.model.depth}x{m.model.width} norm={m.norm.name} batch {m.data.batch_size}"
            groups += [Group(jobs[i:i + max_members], True, label) for i in range(0, len(jobs), max_members)]
    return groups


def shape_key(cfg) -> str:
    """The job's whole config but FREE_KEYS, as text: jobs with the same key can be fused."""
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for key in FREE_KEYS:
        parent, _, leaf = key.rpartition(".")
        (plain[parent] if parent else plain).pop(leaf, None)
    return json.dumps(plain, sort_keys=True)


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

    `self.params[name]` is one leaf for the whole group, shaped (M, ...), members in stack order (stack
    by stack); each member's slice has the layout of its own parameter (a Linear weight (out, in)). The
    forward pass and autograd see only these. The optimizer steps `self.parts[name]`: one leaf per
    stack that is a view of that stack's rows of the group's leaf (same memory), whose gradient is set
    to the same rows of the group's gradient before each step. So a layer is one batched matmul for
    every member whatever their optim settings, and each stack's param groups carry its own lr and
    weight decay in one optimizer. (Stacks used to be separate leaves whose outputs were concatenated
    in every layer: at batch 32 that join and the second optimizer call were ~8% of the group's time.)
    """

    def __init__(self, members: Sequence[FusedMember]):
        by_setting: Dict[str, List[Member]] = {}
        for m in members:
            by_setting.setdefault(json.dumps(OmegaConf.to_container(m.cfg.optim, resolve=True), sort_keys=True), []).append(m)
        self.stacks = list(by_setting.values())
        self.members = [m for stack in self.stacks for m in stack]
        first = self.members[0].model
        self.blocks = list(first.blocks.items())  # (name, block of member 0): layer types and flags
        self.names = [name for name, _ in first.named_parameters()]
        sizes = [len(stack) for stack in self.stacks]
        self.rows = [slice(sum(sizes[:k]), sum(sizes[:k + 1])) for k in range(len(self.stacks))]
        with torch.no_grad():
            self.params = {name: self._stack(name).requires_grad_() for name in self.names}
            self.parts = {name: [self.params[name].detach()[rows].requires_grad_() for rows in self.rows]
                          for name in self.names}
            self.buffers = {name: torch.stack([dict(m.model.named_buffers())[name] for m in self.members])
                            for name, _ in first.named_buffers()}  # BatchNorm running statistics
        self.optimizer = make_optimizer([g for k in range(len(self.stacks)) for g in self._param_groups(k)],
                                        self.members[0].cfg.optim)
        # dropout, per kind: (rows that draw masks: (row, its generator, keep), keep of every row as (M, 1, 1))
        device = self.params[self.names[0]].device
        self.dropout = {kind: ([(j, m.rng, getattr(m, kind)) for j, m in enumerate(self.members) if getattr(m, kind) < 1.0],
                               torch.tensor([getattr(m, kind) for m in self.members], device=device).view(-1, 1, 1))
                        for kind in ("input_keep", "keep")}
        # where forward applies dropout, in order: (kind, features): the input, then each block's output
        self.dropout_sites = [("input_keep", self.blocks[0][1].linear.in_features)] + \
                             [("keep", block.linear.out_features) for _, block in self.blocks]
        self.mask_layouts: Dict[int, tuple] = {}  # site -> (stride, dtype) of its activation, seen by forward
        self.mask_generators = list({id(m.rng): m.rng for m in self.members if min(m.keep, m.input_keep) < 1.0}.values())
        # the members' own tensors, in stack order, for write_back
        self.member_params = {name: [m.model.get_parameter(name) for m in self.members] for name in self.names}
        self.member_buffers = {name: [dict(m.model.named_buffers())[name] for m in self.members] for name in self.buffers}

    def _stack(self, name: str) -> torch.Tensor:
        tensors = [m.model.get_parameter(name).detach() for m in self.members]
        return torch.stack(tensors)

    def _param_groups(self, k: int) -> List[Dict]:
        """Stack k's param groups: its members' own (decayed weights, the rest) with its lr, stacked."""
        cfg = self.stacks[k][0].cfg.optim
        model = self.stacks[k][0].model
        name_of = {p: name for name, p in model.named_parameters()}
        return [{**g, "lr": cfg.lr, "params": [self.parts[name_of[p]][k] for p in g["params"]]}
                for g in param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias)]

    def _linear(self, h: torch.Tensor, prefix: str) -> torch.Tensor:
        """h (M, B, in) -> (M, B, out): every member's layer in one batched matmul, computed feature-major.

        As W h^T (M, out, B), returned as its transposed view, so that the weight's gradient is one bmm
        dY^T h straight into W's (M, out, in) layout. The other order, h W with W stored (M, in, out),
        makes it h^T dY, which MKL's batched gemm runs slower on CPU: the whole step loop of 16 members
        of a 3 x 100 MLP took 5% longer at batch 128 and at batch 32 (this project's 2-core CPU, one
        thread, interleaved runs). The activations stay feature-major views; every later op takes them."""
        out_t = torch.baddbmm(self.params[prefix + "bias"].unsqueeze(2), self.params[prefix + "weight"], h.transpose(1, 2))
        return out_t.transpose(1, 2)

    # -- the forward pass: models.MLP.forward and MLPBlock.forward, for every member at once
    def forward(self, x: torch.Tensor, masks: Sequence[Optional[torch.Tensor]],
                activations: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
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

        In float32 whatever h's dtype, rounded back to it once at the end: what the solo run's norm layer
        does with a bf16 input under CPU autocast (PyTorch's CPU norm kernels compute in float32 and return
        the input's dtype). Computed in bf16 (batch statistics, running statistics, affine), one step's
        weight gradients were 2-13% off the solo run's (tests/test_fused.py). CUDA autocast runs LayerNorm
        and GroupNorm in float32 and keeps their float32 output; here that output is rounded to bf16,
        which the next Linear does anyway (not measured on a GPU)."""
        if isinstance(norm, nn.Identity):
            return h
        dtype, h = h.dtype, h.float()  # no-ops in float32
        features = h.shape[-1]
        if isinstance(norm, nn.BatchNorm1d):
            var, mean = torch.var_mean(h, dim=1, keepdim=True, correction=0)  # per member and feature, over B
            if norm.track_running_stats:
                self._update_running_stats(prefix, mean.detach().squeeze(1), var.detach().squeeze(1), h.shape[1], norm.momentum)
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
    def _update_running_stats(self, prefix: str, mean: torch.Tensor, var: torch.Tensor, n: int, momentum: float) -> None:
        """nn.BatchNorm1d's update: r <- (1 - momentum) r + momentum * batch statistic, the variance unbiased."""
        self.buffers[prefix + "running_mean"].mul_(1.0 - momentum).add_(mean, alpha=momentum)
        self.buffers[prefix + "running_var"].mul_(1.0 - momentum).add_(var * (n / (n - 1)), alpha=momentum)
        self.buffers[prefix + "num_batches_tracked"].add_(1)

    def draw_masks(self, batch_size: int) -> List[Optional[torch.Tensor]]:
        """Every member's dropout masks for one forward pass, one per dropout site (None: nobody drops there).

        A site's masks are (M, B, features), 0 or 1/keep (F.dropout's `bernoulli_(keep)` then `div_(keep)`),
        each member's (B, features) drawn from its own generator in memory order, as alone; rows of
        members without dropout are 1. They are laid out as forward's activation there (`mask_layouts`,
        once forward has seen it), so that the product and its backward run in one layout, and drawn in
        its dtype as the solo run's Dropout draws (bf16 under trainer.precision=bf16). Before forward
        has seen a site (the first step or two), drawn in float32 and copied: the draws and the values
        0 and 1/keep are those of a mask drawn in bf16 (torch.equal, tested on CPU)."""
        masks: List[Optional[torch.Tensor]] = []
        for site, (kind, features) in enumerate(self.dropout_sites):
            draws, keeps = self.dropout[kind]
            if not draws:
                masks.append(None)
                continue
            layout = self.mask_layouts.get(site)
            mask = torch.ones(len(self.members), batch_size, features, device=keeps.device,
                              dtype=layout[1] if layout else torch.float32)
            for j, rng, keep in draws:
                mask[j].bernoulli_(keep, generator=rng)
            mask.div_(keeps)
            if layout is not None and mask.stride() != layout[0]:
                mask = torch.empty_strided(mask.shape, layout[0], dtype=layout[1], device=mask.device).copy_(mask)
            masks.append(mask)
        return masks

    def _dropout(self, h: torch.Tensor, masks: Sequence[Optional[torch.Tensor]], site: int) -> torch.Tensor:
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
    """What each step of the group takes besides the weights: every member's minibatch (from its own
    data order) and its dropout masks (from its own stream), made one step ahead on a spare core.

    Why ahead: on CPU, gathering the members' minibatches and drawing their masks (a `bernoulli_` per
    member and layer, then each mask's layout) is about a quarter of a group's step. Measured: 16
    members of a 3 x 100 MLP, half with dropout, one intra-op thread, this project's 2-core CPU, a
    bare step loop: 21 -> 15 ms per step at batch 128, 8.6 -> 6.5 ms at batch 32 with that work on the
    other core. In `nrexp bench --fused`'s sweep the group's loop went 3.4 -> 2.9 s at batch 128 and
    changed little at batch 32, where the worker's Python competes with the step's for the GIL and
    the depth figures' helper process for the core.
    So with fewer intra-op threads than cores (as the monitor's statistics thread), a worker thread
    makes step s + 1's inputs while step s computes (torch ops release the GIL); otherwise (CUDA,
    where the kernels run asynchronously anyway, or no spare core) `take` makes them there and then.

    Made ahead, a member's generator has drawn step s + 1's masks while step s is trained. Whatever
    reads a generator (checkpoints, the final probe, a member that stops) calls `rewind` first: it
    waits for the step made ahead, puts each generator back to its state before that step's draws and
    drops it; `take` makes it again, with the same draws.
    """

    def __init__(self, net: StackedMLP, data, batch_size: int, steps_per_epoch: int, total_steps: int, ahead: bool):
        self.net, self.data, self.batch_size = net, data, batch_size
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        members = len(net.members)
        # the group's batch is gathered into reused buffers (a fresh (M, B, 784) tensor per step, 6.4 MB
        # at 16 x 128, cost the kernel's page faults, ~4x the copy itself); two when one is made ahead
        self.buffers = [torch.empty(members * batch_size, *data.train_x.shape[1:], dtype=data.train_x.dtype,
                                    device=data.train_x.device) for _ in range(2 if ahead else 1)]
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="nrexp-inputs", initializer=torch.set_num_threads,
                                       initargs=(torch.get_num_threads(),)) if ahead else None
        self.pending: Optional[tuple] = None  # (step, Future of _make(step))
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
        idx = self._epoch_orders[1][:, i * self.batch_size:(i + 1) * self.batch_size].reshape(-1)  # member by member
        members = len(self.net.members)
        x = torch.index_select(self.data.train_x, 0, idx, out=self.buffers[step % len(self.buffers)])
        x = x.view(members, self.batch_size, *self.data.train_x.shape[1:])
        y = self.data.train_y[idx].view(members, self.batch_size)
        return x, y, self.net.draw_masks(self.batch_size), states


class StackedMonitor:
    """monitor.LayerMonitor's per-layer statistics, for every member at once, computed on the stacks.

    Each member's own monitor reads the member's own modules: on a logging step that meant copying the
    stacks and their gradients back into M modules and running M monitors of a few dozen small ops
    each, which on CPU cost as much as ten training steps of the group. Here each statistic of a layer
    is one reduction over the member axis of a stacked tensor, and every member's numbers reach the
    host in one transfer. The definitions are monitor.py's; only the order in which the floats of a
    norm are summed differs.
    """

    def __init__(self, net: StackedMLP, member: Member):
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


# ------------------------------------------------------------------------------------------------
# the group as train.py's loop sees it


def train_group(cfgs: Sequence, run_dirs: Sequence[Path]) -> List[Dict]:
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

    def __init__(self, cfgs: List, run_dirs: List[Path]):
        t = OmegaConf.to_object(cfgs[0].trainer)  # trainer.* is part of shape_key: shared by the group
        self.device = resolve_device(str(getattr(t.device, "value", t.device)))
        set_flush_denormal(t.flush_denormal, self.device)
        self.data = load_dataset(cfgs[0].data, self.device)
        log.info("fused group of %d members | device %s | data %s (%s): %d train / %d test examples", len(cfgs),
                 self.device, self.data.name, self.data.source, len(self.data.train_x), len(self.data.test_x))
        self.given = [FusedMember(cfg, d, self.data, self.device) for cfg, d in zip(cfgs, run_dirs)]
        self.net = StackedMLP(self.given)
        self.members = self.net.members
        self.monitor = StackedMonitor(self.net, self.given[0])
        self.batch_size = cfgs[0].data.batch_size
        self.schedule = make_schedule(t, self.given[0].batches.steps_per_epoch)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")
        self.inputs = StepInputs(self.net, self.data, self.batch_size, self.schedule.steps_per_epoch,
                                 self.schedule.total_steps, ahead=spare_core(self.device))
        self.activations: Optional[List[torch.Tensor]] = None

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
        self.net.step()
        if stats is not None:
            out.stats = Future()
            out.stats.set_result(self.monitor.after_step(stats))
        self.activations = None

    def stats_to_host(self, stats: Dict, scalars: Dict) -> List[tuple]:
        return self.monitor.to_host(stats, scalars)

    def sync(self) -> None:
        self.inputs.rewind()  # each member's generator as after the steps trained
        self.net.write_back()

    def save(self, member: Member, state: Dict) -> None:
        self.net.write_back_optimizer_state(member)
        super().save(member, state)

    def summary_extra(self) -> Dict:
        return {"fused_group_size": len(self.members)}

    def close(self) -> None:
        self.inputs.close()


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for the next allocations instead of handing it back to the
    kernel: heap trimming only beyond 1 GiB free (M_TRIM_THRESHOLD), and blocks up to 32 MiB (glibc's
    documented maximum for M_MMAP_THRESHOLD on 64-bit) from the heap rather than each mapped anew.

    Why: each step of a group frees and allocates tensors of megabytes (the first layer's weight gradient
    of 16 members of a 3 x 100 MLP is 5 MB). With glibc's defaults that memory went back to the kernel,
    and the next step faulted it in again, page by page, zeroed. Measured on `nrexp bench --fused`'s
    16-job sweep (3 x 100 MLP), one thread, this project's 2-core CPU, without and with this call
    alternating: at batch 32 the whole fused sweep 8.9 -> 8.6 s (median of 3; each of 6 pairs faster),
    at batch 128 no measurable change; the same settings through the environment left the basic
    launcher's loops (tensors 16 times smaller) unchanged. The cost: the process keeps its peak memory
    until it ends. Not glibc (macOS, musl): nothing happens."""
    try:
        libc = ctypes.CDLL(None)
        if libc.gnu_get_libc_version:  # glibc only: musl has a mallopt that ignores these
            libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
            libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
