"""Which jobs of a sweep can train together as one fused group (`hydra/launcher=fused`, nrexp/fused.py).

Jobs whose configs are equal but for `FREE_KEYS` (nothing that decides a tensor's shape) form a group;
a job that cannot be fused (`unfusable_reason`) or has no partner runs alone. No torch import here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from omegaconf import OmegaConf

from nrexp.config import FUSED_FREE_KEYS

FREE_KEYS = FUSED_FREE_KEYS  # what members of one group may differ in: no tensor shape depends on them


def unfusable_reason(cfg) -> str | None:
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

    jobs: list[int]
    fused: bool
    label: str


def plan(cfgs: Sequence, max_members: int) -> list[Group]:
    """Group the sweep's job configs: equal but for FREE_KEYS -> one fused group (split into chunks of
    at most `max_members`); unfusable or single jobs -> alone. In the order of each group's first job."""
    keyed: dict[str, list[int]] = {}
    order: list[object] = []  # a shape key (a fused group) or a Group (one job alone)
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
            groups += [Group(jobs[i : i + max_members], True, label) for i in range(0, len(jobs), max_members)]
    return groups


def shape_key(cfg) -> str:
    """The job's whole config but FREE_KEYS, as text: jobs with the same key can be fused."""
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for key in FREE_KEYS:
        parent, _, leaf = key.rpartition(".")
        (plain[parent] if parent else plain).pop(leaf, None)
    return json.dumps(plain, sort_keys=True)
