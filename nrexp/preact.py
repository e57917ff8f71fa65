"""Percentiles of one unit's input to its nonlinearity: the BatchNorm paper's Figure 1(b, c).

Ioffe & Szegedy (2015, §4.1) plot the 15th, 50th and 85th percentiles, over each batch, of the input to
"a typical sigmoid" of the last hidden layer, as training goes on: without BatchNorm they drift, with it
they stay put. With `trainer.preact_percentiles=true` the trainer asks the last hidden block of an mlp
to keep its activation input on logging steps only (a flag on the block: no hooks, ordinary steps pay
nothing), and logs `preact/<block>/p15|p50|p85` of unit 0 over the training batch. With norm=batch and
norm.position=before_act (the paper's layout) that input is the BatchNorm output; without a norm it is
the Linear output.
"""

from __future__ import annotations

import torch

PERCENTILES = (15, 50, 85)
UNIT = 0  # which unit: any fixed one is "a typical sigmoid"


def arm(model, enabled: bool) -> tuple[str, torch.nn.Module] | None:
    """Ask the last hidden block to keep its activation input this step; (name, block) or None."""
    if not enabled or not hasattr(model, "blocks"):
        return None
    name, block = list(model.blocks.items())[-1]
    if not hasattr(block, "stash_preact"):
        return None
    block.stash_preact = True
    return name, block


def collect(armed: tuple[str, torch.nn.Module] | None) -> dict[str, float]:
    """{preact/<block>/p15: ..., p50, p85} from the stashed input (one host transfer); disarms the block."""
    if armed is None:
        return {}
    name, block = armed
    preact, block.preact, block.stash_preact = block.preact, None, False
    if preact is None:
        return {}
    q = torch.tensor([p / 100 for p in PERCENTILES], device=preact.device)
    values = torch.quantile(preact[:, UNIT].float(), q).tolist()
    return {f"preact/{name}/p{p}": v for p, v in zip(PERCENTILES, values)}
