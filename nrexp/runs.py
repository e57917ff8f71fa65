"""Reading run dirs back: a run's summary.json, its config and its TensorBoard scalars, and the runs of a sweep.

The one reader of what a run writes (nrexp/writers.py), used by `nrexp report`, the claim checks and
`nrexp evaluate`. The summary is read when a run is; the scalars only when asked for. Reads files only:
no torch (events through TensorBoard's own reader).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from nrexp.errors import ConfigError

SUMMARY = "summary.json"
HYDRA_CONFIG = Path(".hydra") / "config.yaml"

Points = list[tuple[int, float]]  # (step, value) in step order


def run_dirs(root: Path) -> list[Path]:
    """Every run dir under `root` (or `root` itself): one with summary.json, or a Hydra job dir
    (.hydra/config.yaml) whose job never wrote one (killed, crashed, still running)."""
    root = Path(root)
    dirs = {p.parent for p in root.rglob(SUMMARY)}
    dirs |= {p.parent.parent for p in root.rglob("config.yaml") if p.parent.name == ".hydra"}
    return sorted(dirs, key=lambda d: str(d.relative_to(root)))


def read_summary(run_dir: Path) -> dict:
    """The run's summary.json ({} if it has none yet or it cannot be read: a run still going, or killed)."""
    try:
        summary = json.loads((Path(run_dir) / SUMMARY).read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def flatten(config: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {dotted key: value}. A group's `name` is shown as the group itself
    (`norm: batch`, as typed on the command line: norm=batch); lists become their text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        path = prefix + str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "."))
        else:
            flat[prefix[:-1] if key == "name" and prefix else path] = (
                str(value) if isinstance(value, (list, tuple)) else value)
    return flat


def _number(value: Any) -> float:
    """A number of summary.json as a float: null (a diverged run's NaN/inf, or unknown) reads as NaN."""
    return math.nan if value is None else float(value)


class Run:
    """One run dir read back: summary.json at once; the Hydra config (of a run without a summary) and the
    TensorBoard scalars when first asked for. `name` is the dir as TensorBoard names the run."""

    def __init__(self, dir: Path, summary: dict | None = None, name: str | None = None):
        self.dir = Path(dir)
        self.summary: dict = read_summary(self.dir) if summary is None else summary
        self.name = name or self.dir.name
        self._config: dict | None = None
        self._scalars: dict[str, Points] | None = None

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r}, status={self.status!r})"

    @property
    def status(self) -> str:
        """completed, diverged, failed, ... from summary.json; "no summary" for a run that has none."""
        return str(self.summary.get("status", "unknown")) if self.summary else "no summary"

    @property
    def error(self) -> str:
        return self.summary.get("error") or ""

    @property
    def config(self) -> dict:
        """The resolved config: summary.json's, or the composed .hydra/config.yaml of a job without one."""
        if self._config is None:
            self._config = self.summary.get("config")
            if self._config is None:
                path = self.dir / HYDRA_CONFIG
                if path.is_file():
                    import yaml

                    self._config = yaml.safe_load(path.read_text()) or {}
                else:
                    self._config = {}
        return self._config

    def get(self, dotted: str) -> Any:
        """A config value by its dotted key (`norm.name`), None if absent."""
        node: Any = self.config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        return node

    @cached_property
    def flat_config(self) -> dict[str, Any]:
        """The config as {dotted key: value}, groups by their name (see flatten)."""
        return flatten(self.config)

    @property
    def metrics(self) -> dict[str, float | None]:
        """summary.json's final metrics (train/loss, test/acc, ...; null where non-finite)."""
        return self.summary.get("metrics") or {}

    def metric(self, name: str) -> float:
        """One final metric as a float, NaN where unknown or non-finite."""
        return _number(self.metrics.get(name))

    def layers(self, when: str, metric: str) -> dict[str, float]:
        """{layer: value} of one per-layer statistic at `when` (init | final), in layer order; NaN for null."""
        per_layer = ((self.summary.get("layers") or {}).get(when) or {}).get(metric) or {}
        return {layer: _number(v) for layer, v in per_layer.items()}

    def scalars(self, tag: str) -> Points:
        """(step, value) of a TensorBoard scalar tag, in step order ([] if absent). All events are read on
        the first call, as TensorBoard reads the dir (a resumed run's purged steps dropped)."""
        if self._scalars is None:
            self._scalars = _read_scalars(self.dir)
        return self._scalars.get(tag, [])

    def tags(self) -> list[str]:
        """The scalar tags of the run's events."""
        self.scalars("")
        return sorted(self._scalars or {})


def _read_scalars(run_dir: Path) -> dict[str, Points]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 1, "tensors": 1}).Reload()
    return {tag: sorted({e.step: e.value for e in events.Scalars(tag)}.items())  # a repeated step: its last value
            for tag in events.Tags().get("scalars", [])}


def read_run(run_dir: Path, root: Path | None = None) -> Run:
    """The run in `run_dir`, named by its dir relative to `root` (as `tensorboard --logdir root` names it)."""
    run_dir = Path(run_dir)
    name = str(run_dir.relative_to(root)) if root and run_dir != Path(root) else run_dir.name
    return Run(run_dir, name=name)


def read_runs(root: Path) -> list[Run]:
    """Every run under `root` (a sweep dir, or one run's dir), in dir order; [] if there are none."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"no such directory: {root}. Fix: pass a run dir or a sweep dir, "
                          "e.g. outputs/multirun/<date>/<time>")
    return [read_run(d, root) for d in run_dirs(root)]
