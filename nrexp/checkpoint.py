"""Checkpoints written atomically: a kill at any moment leaves the previous one intact and loadable."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict

import torch

from nrexp.writers import atomic_write


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path: Path, map_location="cpu") -> Dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=False)
