"""Reading run dirs back: a run's summary.json, its config and its TensorBoard scalars, and the runs of a sweep.

The one reader of what a run writes (nrexp/writers.py), used by `nrexp report`, the claim checks and
`nrexp evaluate`. The summary is read when a run is; the scalars only when asked for. Reads files only:
no torch (events through TensorBoard's own reader).

The Python API (docs/tensorboard.md):
    runs.load(path)               -> pandas DataFrame, one row per run: swept keys, seed, status, final metrics
    runs.curves(path, tags=...)   -> long pandas DataFrame (run, step, tag, layer, value) from the events
`swept_overrides(run_dir)` says which keys a run's sweep varies (the writer's HParams take it from here).
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from nrexp.errors import ConfigError

SUMMARY = "summary.json"
HYDRA_CONFIG = Path(".hydra") / "config.yaml"
HYDRA_RECORD = Path(".hydra") / "hydra.yaml"  # the job's Hydra config: its mode, its overrides, the sweeper's
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"  # the job's own overrides (one value per key)
MULTIRUN = "multirun.yaml"  # written by Hydra's basic sweeper in the sweep dir: the command line's overrides
# Keys that never say what a run computes: where it reads and writes, how it shows progress, how it is resumed.
BOOKKEEPING_KEYS = {"trainer.progress", "data.root", "data.eval_batch_size", "resume", "trainer.checkpoint_every"}

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
                str(value) if isinstance(value, (list, tuple)) else _plus_zero(value)
            )
    return flat


def _plus_zero(value: Any) -> Any:
    """-0.0 as 0.0 (`dropout.p=-0.0` and `dropout.p=0` are one setting); anything else as it is."""
    return 0.0 if isinstance(value, float) and value == 0.0 else value


def summary_problem(run_dir: Path) -> str | None:
    """Why the run's summary.json cannot be reported (None: it can, or the run has none yet): a file
    that is not JSON (truncated, binary), or JSON that is not an nrexp summary (another tool's)."""
    path = Path(run_dir) / SUMMARY
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return f"unreadable {SUMMARY} ({type(err).__name__}: {str(err).splitlines()[0][:80]})"
    if not isinstance(summary, dict):
        return f"{SUMMARY} is not an nrexp summary (a JSON {type(summary).__name__}, not an object)"
    expected = {"status": str, "config": dict, "metrics": dict}
    wrong = [k for k, kind in expected.items() if not isinstance(summary.get(k), kind)]
    if wrong or not all(isinstance(v, (int, float, type(None))) for v in summary["metrics"].values()):
        what = f"no {', '.join(wrong)} of the right type" if wrong else "metrics that are not numbers"
        return f"{SUMMARY} is not an nrexp summary ({what})"
    return None


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

    if not Path(run_dir).is_dir():  # a run given by its summary alone (or a dir since removed): no events
        return {}
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 1, "tensors": 1}).Reload()
    return {
        tag: sorted({e.step: e.value for e in events.Scalars(tag)}.items())  # a repeated step: its last value
        for tag in events.Tags().get("scalars", [])
    }


def read_run(run_dir: Path, root: Path | None = None) -> Run:
    """The run in `run_dir`, named by its dir relative to `root` (as `tensorboard --logdir root` names it)."""
    run_dir = Path(run_dir)
    name = str(run_dir.relative_to(root)) if root and run_dir != Path(root) else run_dir.name
    return Run(run_dir, name=name)


def read_runs(root: Path, skipped: list[tuple[Path, str]] | None = None) -> list[Run]:
    """Every run under `root` (a sweep dir, or one run's dir), in dir order; [] if there are none. A run whose
    summary.json cannot be read or is not nrexp's is left out, and added to `skipped` as (dir, why)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(
            f"no such directory: {root}. Fix: pass a run dir or a sweep dir, e.g. outputs/multirun/<date>/<time>"
        )
    runs = []
    for d in run_dirs(root):
        problem = summary_problem(d)
        if problem is None:
            runs.append(read_run(d, root))
        elif skipped is not None:
            skipped.append((d, problem))
    return runs


# ------------------------------------------------------------------------------------------------
# What a run's sweep varies (from Hydra's own record of the command line)


def _load_yaml(path: Path) -> Any:
    """A YAML file's data (None if it cannot be read), parsed in C where PyYAML has it (a job's hydra.yaml is
    a few hundred lines, read once per run)."""
    import yaml

    try:
        return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _yaml(path: Path) -> dict:
    data = _load_yaml(path)
    return data if isinstance(data, dict) else {}


def _select(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _parsed_overrides(overrides: Sequence[str]) -> list[tuple[str, bool]]:
    """(key, is a sweep) of each override as typed: `norm=none,batch` -> ("norm", True), `+experiment=x` ->
    ("experiment", False); hydra.* keys left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = []
    for text in overrides:
        try:
            (override,) = OverridesParser.create().parse_overrides([str(text)])
            key, sweep = override.key_or_group, override.is_sweep_override()
        except Exception:  # noqa: BLE001 - an override Hydra can no longer parse: judge it by its text
            key, _, value = str(text).lstrip("+~").partition("=")
            sweep = "," in value or value.startswith(("choice(", "range(", "glob(", "interval("))
        key = key.split("@")[0]
        if not key.startswith("hydra."):
            parsed.append((key, sweep))
    return parsed


def swept_overrides(run_dir: Path) -> list[str] | None:
    """The config keys a run's sweep varies, in the order given on the command line, as typed (`norm`,
    `init.scale`); read from what Hydra recorded, so every job of a sweep gets the same list:
    - a sweep job of Hydra's basic sweeper: the keys given several values (`norm=none,batch`, `range(..)`)
      in the sweep dir's multirun.yaml, then those of `hydra.sweeper.params`;
    - a job of another sweeper (Optuna: no multirun.yaml): `hydra.sweeper.params` of its .hydra/hydra.yaml;
    - a single run: the keys set on its command line (.hydra/overrides.yaml);
    - None where there is no Hydra record (a run started from Python): callers use a default set.
    Bookkeeping keys (BOOKKEEPING_KEYS: trainer.progress, data.root, ...) are left out; `seed` is kept (callers
    that group seeds drop it)."""
    run_dir = Path(run_dir)
    record = _yaml(run_dir / HYDRA_RECORD).get("hydra") or {}
    multirun = next((d / MULTIRUN for d in (run_dir.parent, run_dir.parent.parent) if (d / MULTIRUN).is_file()), None)
    keys: list[str] | None = None
    if record.get("mode") == "RUN" or (not record and multirun is None):
        overrides = _yaml_list(run_dir / HYDRA_OVERRIDES) if (run_dir / HYDRA_OVERRIDES).is_file() else None
        if overrides is None:
            overrides = (record.get("overrides") or {}).get("task") if record else None
        if overrides is None:
            return None
        keys = [key for key, _ in _parsed_overrides(overrides)]
    else:
        sweep = (_yaml(multirun).get("hydra") or {}) if multirun else record
        task = (sweep.get("overrides") or {}).get("task") or [] if multirun else []
        params = _select(sweep, "sweeper.params") or {}
        keys = [key for key, swept in _parsed_overrides(task) if swept]
        keys += [str(k) for k in (params if isinstance(params, Mapping) else {})]
    return [k for k in dict.fromkeys(keys) if k not in BOOKKEEPING_KEYS]


def job_override_values(run_dir: Path) -> dict[str, str]:
    """{key: value as typed} of a job's own overrides (.hydra/overrides.yaml), e.g. `experiment` of
    `+experiment=x`, a key the resolved config does not hold."""
    values = {}
    for text in _yaml_list(Path(run_dir) / HYDRA_OVERRIDES):
        key, sep, value = str(text).partition("=")
        if sep:
            values[key.lstrip("+~").split("@")[0]] = value
    return values


def _yaml_list(path: Path) -> list:
    data = _load_yaml(path)
    return data if isinstance(data, list) else []


def config_value(config: Mapping, key: str) -> Any:
    """A config value by the key as typed on the command line: `norm` is the norm group's name (norm.name),
    `init.scale` a plain value; None if absent."""
    value = _select(config, key)
    if isinstance(value, Mapping):
        value = value.get("name")
    return value


# ------------------------------------------------------------------------------------------------
# Numbers of a run and the Python API (pandas)


def activation_ratio(act: Mapping[str, float]) -> float:
    """act_norm of the last hidden block / the first: the head is left out, its norm is that of the logits,
    which grows as the net gets confident, not with depth. NaN where unknown."""
    hidden = [layer for layer in act if layer != "head"]
    if not hidden or not act[hidden[0]] or not math.isfinite(act[hidden[0]]):
        return math.nan
    return act[hidden[-1]] / act[hidden[0]]


def log10_or_nan(value: float) -> float:
    return math.log10(value) if math.isfinite(value) and value > 0 else math.nan


def layer_names(run: Run) -> list[str]:
    """The run's monitored layers in depth order (block00 ... head), from its summary or else its tags."""
    for when in ("init", "final"):
        names = list(run.layers(when, "act_norm"))
        if names:
            return names
    return [tag.split("/", 1)[1] for tag in run.tags() if tag.startswith("act_norm/")]


def varying_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys (flattened, as typed on the command line) whose values differ across the runs, seed and
    bookkeeping keys left out; in the command line's order where the sweep recorded it, then by name."""
    flat = [r.flat_config for r in runs]
    keys = set().union(*flat) - BOOKKEEPING_KEYS - {"seed"}
    varying = {k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1}
    order = next((o for o in (swept_overrides(r.dir) for r in runs[:1]) if o), [])
    return [k for k in order if k in varying] + sorted(varying - set(order))


RUN_COLUMNS = (
    "status",
    "steps",
    "test_acc",
    "train_acc",
    "gen_gap",
    "test_loss",
    "train_loss",
    "act_ratio_init",
    "act_ratio_final",
    "wall_time_s",
)


def run_row(run: Run, keys: Sequence[str]) -> dict[str, Any]:
    """One run as a flat dict: its name, the given config keys, seed, then RUN_COLUMNS and its dir."""
    steps = run.summary.get("steps")
    return {
        "run": run.name,
        **{k: run.flat_config.get(k) for k in keys},
        "seed": run.flat_config.get("seed"),
        "status": run.status,
        "steps": math.nan if steps is None else int(steps),
        "test_acc": run.metric("test/acc"),
        "train_acc": run.metric("train/acc"),
        "gen_gap": run.metric("train/acc") - run.metric("test/acc"),
        "test_loss": run.metric("test/loss"),
        "train_loss": run.metric("train/loss"),
        "act_ratio_init": activation_ratio(run.layers("init", "act_norm")),
        "act_ratio_final": activation_ratio(run.layers("final", "act_norm")),
        "wall_time_s": _number(run.summary.get("wall_time_s")),
        "dir": str(run.dir),
    }


def load(path: Path | str, keys: Sequence[str] | None = None):
    """The runs under `path` (a sweep dir or one run dir) as a pandas DataFrame, one row per run:
    `run` (its TensorBoard name), the swept keys (those whose values differ across the runs; or `keys`),
    `seed`, then RUN_COLUMNS (status, steps, final test/train accuracy and loss, gen_gap = train acc - test
    acc, act_ratio_init/final = activation norm of the last hidden block over the first) and `dir`.
    Unknown numbers (a failed or diverged run) are NaN."""
    import pandas as pd

    runs = read_runs(Path(path))
    keys = varying_keys(runs) if keys is None else list(keys)
    columns = ["run", *keys, "seed", *RUN_COLUMNS, "dir"]
    return pd.DataFrame([run_row(r, keys) for r in runs], columns=list(dict.fromkeys(columns)))


def _wanted(tag: str, patterns: Sequence[str] | None) -> bool:
    """Whether a tag is asked for: every tag without patterns; else one matching a pattern exactly, as a
    shell-style glob (`act_norm/*`, `*/head`), or by its first part (`act_norm` for act_norm/<layer>)."""
    if patterns is None:
        return True
    return any(fnmatch.fnmatchcase(tag, p) or fnmatch.fnmatchcase(tag, p + "/*") for p in patterns)


def curve_rows(run: Run, tags: str | Sequence[str] | None = None) -> list[tuple[str, int, str, str, float]]:
    """(run, step, tag, layer, value) of every point of one run's scalars that `tags` asks for (see curves)."""
    patterns = [tags] if isinstance(tags, str) else (None if tags is None else list(tags))
    names = layer_names(run)
    rows = []
    for tag in run.tags():
        if not _wanted(tag, patterns):
            continue
        first, _, rest = tag.partition("/")
        for step, value in run.scalars(tag):
            if first.startswith("depth_"):
                layer = names[step] if 0 <= step < len(names) else str(step)
            else:
                layer = rest if rest in names else ""
            rows.append((run.name, step, tag, layer, value))
    return rows


def curves(path: Path | str, tags: str | Sequence[str] | None = None):
    """The TensorBoard scalars of the runs under `path` as a long pandas DataFrame with columns
    run, step, tag, layer, value: one row per logged point. `tags`: a pattern or a list of them (see
    _wanted); None for every tag. `layer` is the layer of a per-layer tag (`act_norm/block03` -> block03),
    for a depth tag (`depth_init/act_norm`, whose step is the layer index) the layer at that index, and
    empty for the others (train/loss). A step logged twice (the last logging step and the final probe)
    keeps its last value, as TensorBoard's own reader does."""
    import pandas as pd

    rows = [row for run in read_runs(Path(path)) for row in curve_rows(run, tags)]
    return pd.DataFrame(rows, columns=["run", "step", "tag", "layer", "value"])
