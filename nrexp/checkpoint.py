"""Checkpoints: written atomically, and holding everything needed to resume a run exactly.

A checkpoint is taken at a step boundary (after `step` optimizer updates) and holds the model (with
BatchNorm running statistics), the optimizer (momentum / Adam moments), the RNG streams (CPU and CUDA:
dropout), the monitor's W_init (for weight_change), the loss accumulated since the last log, and the
run's bookkeeping. Data order needs no state: each epoch's permutation is a function of (seed, epoch).

Written to a temp file and renamed over `checkpoint.pt`, so a kill -9 at any moment leaves the
previous complete checkpoint in place and loadable.
"""

from __future__ import annotations

import errno
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

import nrexp
from nrexp.config import ConfigError
from nrexp.writers import atomic_write

CHECKPOINT = "checkpoint.pt"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from: one clear line, exit code 2, nothing overwritten."""


def save_checkpoint(
    path: Path, model, optimizer, monitor, cfg, state: dict[str, Any], rng: dict[str, Any] | None = None
) -> None:
    """`rng` replaces entries of the random state stored (default: this process's CPU and CUDA streams);
    a member of a fused group stores its own dropout stream in the slot its solo run would use. Tensors
    in `state` (the trainer's running sums, on the device) are stored as floats: read here, where the
    host waits for the device anyway, not in the step loop."""
    state = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    random_state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    payload = {
        "nrexp_version": nrexp.__version__,
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "init_weights": [w.detach().cpu() for w in monitor.init_weights],
        "rng": {**random_state, **(rng or {})},
        "state": state,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    try:
        atomic_write(path, data)
    except OSError as err:  # a full disk: the one-line error names the file and the space it needs
        if err.errno == errno.ENOSPC:
            err.nrexp_path, err.nrexp_bytes = str(path), len(data)
        raise


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint file, turning every way it can be broken into one CheckpointError line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}. Fix: pass resume=<run dir> of a run that wrote "
            f"{CHECKPOINT} (runs write one every trainer.checkpoint_every steps)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is corrupt or not an nrexp checkpoint ({type(err).__name__}). "
            "Fix: start a new run; nothing was changed"
        ) from None
    if not isinstance(payload, dict) or not {"model", "optimizer", "state", "rng"} <= set(payload):
        raise CheckpointError(
            f"{path} is not an nrexp checkpoint (missing model/optimizer/state). "
            "Fix: start a new run; nothing was changed"
        )
    return payload


def load_for_resume(path: Path, model, optimizer, monitor, device: torch.device) -> dict[str, Any]:
    """Restore model, optimizer, RNG and monitor from `path`; return the saved run state."""
    payload = read_checkpoint(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in payload["model"].items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))[:1]
        raise CheckpointError(
            f"{path} holds a different architecture than this config builds (first "
            f"difference: {diff[0][0]} {diff[0][1]}). Fix: resume with the run's own config; "
            "nothing was changed"
        )
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    monitor.reset_init([w.to(device) for w in payload["init_weights"]])
    torch.set_rng_state(payload["rng"]["torch"])
    if payload["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    return payload["state"]
