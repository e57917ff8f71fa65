"""`nrexp report <dir>`: read runs back (summary.json + TensorBoard events), compare settings.

A *setting* is one combination of the swept keys: the config keys whose values differ across the runs
found, seed excluded, so the seeds of one setting are aggregated (mean ± sample std over its completed
runs) in the table, the CSV/Markdown files and every figure.

Per setting: status counts, final train loss, test accuracy, generalization gap (train acc - test acc,
both full-split evaluations from summary.json) and the ratio of the activation norm of the LAST HIDDEN
BLOCK to that of the first hidden block, at init and at the end. The head is left out of the ratio on
purpose: its output is the logits, whose norm grows as training makes the net confident, which would
mix that up with how the signal grows or shrinks through depth (what the ratio is meant to show).

Reads files only: no torch import (events through tensorboard's EventAccumulator).
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

# Keys that never define a setting: seed (aggregated over) and where things were read from/written to.
NOT_SETTING_KEYS = {"seed", "data.root", "trainer.progress", "data.eval_batch_size"}
# The per-setting numbers: column name -> what it is (in the CSV/JSON each gets _mean and _std).
METRICS = {
    "train_loss": "final train loss (full training set)",
    "train_acc": "final train accuracy (full training set)",
    "test_acc": "final test accuracy",
    "gen_gap": "generalization gap: train acc - test acc",
    "act_ratio_init": "activation norm, last hidden block / first, at init",
    "act_ratio_final": "activation norm, last hidden block / first, at the end",
}
TABLE_METRICS = ("train_loss", "test_acc", "gen_gap", "act_ratio_init", "act_ratio_final")
CURVE_TAGS = ("train/loss", "test/acc")


class ReportError(ValueError):
    """Bad input (no such dir, no runs, unknown key): one line, exit code 2."""


# ------------------------------------------------------------------------------------------------
# Reading runs back


def find_job_dirs(root: Path) -> List[Path]:
    """Every run dir under `root` (or `root` itself): one with summary.json, or a Hydra job dir
    (.hydra/config.yaml) whose job never wrote one (killed, crashed, still running)."""
    root = Path(root)
    dirs = {p.parent for p in root.rglob("summary.json")}
    dirs |= {p.parent.parent for p in root.rglob("config.yaml") if p.parent.name == ".hydra"}
    return sorted(dirs, key=lambda d: str(d.relative_to(root)))


def read_job(run_dir: Path, root: Optional[Path] = None) -> Dict:
    """summary.json of a run dir (with its `name`: the dir relative to root, as TensorBoard names it)."""
    run_dir = Path(run_dir)
    name = str(run_dir.relative_to(root)) if root and run_dir != Path(root) else run_dir.name
    path = run_dir / "summary.json"
    if not path.is_file():  # its composed config still says which setting it belongs to
        import yaml

        config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text()) or {}
        return {"name": name, "dir": str(run_dir), "status": "no summary", "metrics": {}, "config": config}
    summary = json.loads(path.read_text())
    summary.setdefault("metrics", {})
    return {**summary, "name": name, "dir": str(run_dir)}


def flatten(config: Mapping, prefix: str = "") -> Dict[str, Any]:
    """Nested config -> {dotted key: value}. A group's `name` is shown as the group itself
    (`norm: batch`, as typed on the command line: norm=batch); lists become their text."""
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        path = prefix + str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "."))
        else:
            flat[prefix[:-1] if key == "name" and prefix else path] = (
                str(value) if isinstance(value, (list, tuple)) else value)
    return flat


@dataclass
class Run:
    name: str
    dir: Path
    status: str
    config: Dict[str, Any]  # flattened
    numbers: Dict[str, float]  # METRICS of this run (nan where unknown)
    layers: Dict[str, Dict[str, Dict[str, float]]]  # init|final -> metric -> layer -> value
    error: str = ""


def activation_ratio(stats: Mapping[str, Mapping[str, float]]) -> float:
    """act_norm of the last hidden block / the first (the head excluded: see the module doc)."""
    act = stats.get("act_norm") or {}
    hidden = [layer for layer in act if layer != "head"]
    if not hidden or not act[hidden[0]]:
        return math.nan
    return act[hidden[-1]] / act[hidden[0]]


def run_numbers(summary: Mapping) -> Dict[str, float]:
    m = summary.get("metrics", {})
    get = lambda key: float(m[key]) if m.get(key) is not None else math.nan  # noqa: E731
    layers = summary.get("layers") or {}
    return {
        "train_loss": get("train/loss"),
        "train_acc": get("train/acc"),
        "test_acc": get("test/acc"),
        "gen_gap": get("train/acc") - get("test/acc"),
        "act_ratio_init": activation_ratio(layers.get("init") or {}),
        "act_ratio_final": activation_ratio(layers.get("final") or {}),
    }


def nan_for_null(value):
    """Nested dicts of numbers with None (JSON null) read back as NaN, so that arithmetic propagates it."""
    if isinstance(value, dict):
        return {k: nan_for_null(v) for k, v in value.items()}
    return math.nan if value is None else value


def load_runs(root: Path) -> List[Run]:
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"no such directory: {root}")
    runs = []
    for run_dir in find_job_dirs(root):
        job = read_job(run_dir, root)
        layers = nan_for_null(job.get("layers") or {})  # summary.json stores a diverged run's NaN/inf as null
        runs.append(Run(name=job["name"], dir=run_dir, status=job["status"], config=flatten(job["config"]),
                        numbers=run_numbers({**job, "layers": layers}), layers=layers, error=job.get("error", "")))
    if not runs:
        raise ReportError(f"no runs in {root} (no summary.json or .hydra/ below it). "
                          "Fix: pass a run dir or a sweep dir, e.g. outputs/multirun/<date>/<time>")
    return runs


# ------------------------------------------------------------------------------------------------
# Settings: group runs that differ only by seed


def matches(value: Any, wanted: str) -> bool:
    """Config value vs a --filter value typed on the command line (0.2 == '0.2', True == 'true')."""
    if isinstance(value, bool) or wanted.lower() in ("true", "false"):
        return str(value).lower() == wanted.lower()
    try:
        return float(value) == float(wanted)
    except (TypeError, ValueError):
        return str(value) == wanted


def apply_filters(runs: List[Run], filters: Sequence[str]) -> List[Run]:
    for spec in filters:
        key, sep, wanted = spec.partition("=")
        if not sep:
            raise ReportError(f"--filter {spec!r} is invalid: expected key=value. Fix: e.g. --filter norm=batch")
        known = set().union(*(r.config for r in runs))
        if key not in known:
            raise ReportError(f"--filter key {key!r} is not a config key of these runs. "
                              f"Fix: use one of {', '.join(sorted(known)) or '(none)'}")
        runs = [r for r in runs if matches(r.config.get(key), wanted)]
    return runs


def swept_keys(runs: Sequence[Run]) -> List[str]:
    """Config keys whose values differ across the runs (seed and bookkeeping keys excluded).
    Failed-before-start jobs count too: their config is as much the sweep's as the others'."""
    keys = sorted(set().union(*(r.config for r in runs)) - NOT_SETTING_KEYS)
    return [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]


def _order(value: Any) -> Tuple:
    """Sort numbers numerically, then strings; None last."""
    if value is None:
        return (2, 0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, str(value))


@dataclass
class Setting:
    values: Dict[str, Any]  # swept key -> value
    runs: List[Run] = field(default_factory=list)

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values.items()) or "all runs"

    @property
    def completed(self) -> List[Run]:
        return [r for r in self.runs if r.status == "completed"]

    def status(self) -> str:
        counts: Dict[str, int] = {}
        for r in self.runs:
            counts[r.status] = counts.get(r.status, 0) + 1
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))

    def stat(self, metric: str) -> Tuple[float, float]:
        """Mean and sample std over the completed runs with a finite value (std 0 for one run)."""
        values = [r.numbers[metric] for r in self.completed if math.isfinite(r.numbers[metric])]
        if not values:
            return math.nan, math.nan
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    def layer_means(self, when: str, metric: str) -> Dict[str, float]:
        """Per-layer mean over the completed runs of `layers[when][metric]` (layer order kept)."""
        per_run = [r.layers.get(when, {}).get(metric, {}) for r in self.completed]
        per_run = [p for p in per_run if p]
        if not per_run:
            return {}
        return {layer: statistics.fmean(p[layer] for p in per_run if layer in p) for layer in per_run[0]}


def group_settings(runs: Sequence[Run], keys: Sequence[str]) -> List[Setting]:
    settings: Dict[Tuple, Setting] = {}
    for run in runs:
        values = {k: run.config.get(k) for k in keys}
        settings.setdefault(tuple(json.dumps(v) for v in values.values()), Setting(values)).runs.append(run)
    return sorted(settings.values(), key=lambda s: [_order(v) for v in s.values.values()])


def rows_of(settings: Sequence[Setting]) -> List[Dict[str, Any]]:
    """One flat dict per setting: swept keys, n, status, <metric>_mean, <metric>_std."""
    rows = []
    for s in settings:
        row: Dict[str, Any] = {**s.values, "n": len(s.runs), "status": s.status()}
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = s.stat(metric)
        rows.append(row)
    return rows


def sort_settings(settings: List[Setting], keys: Sequence[str], spec: Optional[str]) -> List[Setting]:
    """--sort KEY (ascending) or -KEY (descending); KEY is a swept key, runs (n), status or a metric."""
    if not spec:
        return settings
    descending, key = spec.startswith("-"), spec.lstrip("-")
    key = "n" if key == "runs" else key  # the table's "runs" is the CSV's "n"
    choices = [*keys, "runs", "n", "status", *METRICS]
    if key not in choices:
        raise ReportError(f"--sort {spec!r} is invalid: not a column. Fix: use one of {', '.join(choices)} "
                          "(prefix - for descending, e.g. --sort=-test_acc)")

    def value(s: Setting) -> Any:
        if key in METRICS:
            return s.stat(key)[0]
        return {"n": len(s.runs), "status": s.status()}.get(key, s.values.get(key))

    present = [s for s in settings if not _missing(value(s))]
    missing = [s for s in settings if _missing(value(s))]  # unknown values last, either direction
    return sorted(present, key=lambda s: _order(value(s)), reverse=descending) + missing


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# ------------------------------------------------------------------------------------------------
# Output: table, CSV, Markdown, JSON


def fmt(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "—"
    digits = 4 if abs(mean) < 100 else 1
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")


def _short(value: Any) -> str:
    """Swept values as people read them: 0.32692990979813813 (an Optuna trial) -> 0.3269; CSV keeps all."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table_cells(settings: Sequence[Setting], keys: Sequence[str]) -> Tuple[List[str], List[List[str]]]:
    header = [*keys, "runs", "status", *TABLE_METRICS]
    body = []
    for s in settings:
        n = len(s.completed)
        body.append([_short(s.values[k]) for k in keys] + [str(len(s.runs)), s.status()]
                    + [fmt(*s.stat(m), n) for m in TABLE_METRICS])
    return header, body


def rich_table(root: Path, settings: Sequence[Setting], keys: Sequence[str], n_runs: int):
    from rich.table import Table

    header, body = table_cells(settings, keys)
    table = Table(title=f"nrexp report: {root} ({n_runs} runs, {len(settings)} settings; mean ± std over seeds)",
                  header_style="bold")
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i < len(keys) + 2 else "right")
    for cells in body:
        table.add_row(*cells)
    return table


def wide_console():
    """rich Console for tables: the terminal's width, or 160 columns in a pipe or a log (rich's 80
    would fold every number of a wide table over three lines)."""
    from rich.console import Console

    from nrexp.console import console

    return console if console.is_terminal else Console(width=160)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_markdown(path: Path, root: Path, settings: Sequence[Setting], keys: Sequence[str],
                   n_runs: int, figures: Sequence[Path], filters: Sequence[str] = ()) -> None:
    header, body = table_cells(settings, keys)
    kept = f" (the runs with {', '.join(filters)})" if filters else ""
    lines = [f"# nrexp report: {root}", "",
             f"{n_runs} runs{kept}, {len(settings)} settings; numbers are mean ± sample std over the completed runs "
             "(seeds) of a setting.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    lines += ["", "Columns: " + "; ".join(f"`{m}` {METRICS[m]}" for m in TABLE_METRICS) + ".", ""]
    lines += [f"![{p.stem}]({p.relative_to(path.parent)})" for p in figures]
    path.write_text("\n".join(lines) + "\n")


def json_report(root: Path, keys: Sequence[str], settings: Sequence[Setting]) -> str:
    def clean(value: Any) -> Any:  # NaN is not JSON
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return json.dumps({
        "dir": str(root),
        "swept_keys": list(keys),
        "settings": [{k: clean(v) for k, v in row.items()} for row in rows_of(settings)],
        "runs": [{"name": r.name, "status": r.status, "error": r.error, "setting": s.values,
                  "seed": r.config.get("seed"), **{k: clean(v) for k, v in r.numbers.items()}}
                 for s in settings for r in s.runs],
    }, indent=2)


# ------------------------------------------------------------------------------------------------
# Figures (matplotlib, no display)


def read_curves(run_dir: Path, tags: Iterable[str] = CURVE_TAGS) -> Dict[str, Dict[int, float]]:
    """tag -> {step: value} from the run's TensorBoard events (a repeated step keeps its last value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 1, "tensors": 1}).Reload()
    present = set(events.Tags().get("scalars", []))
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in tags if tag in present}


def mean_curve(curves: Sequence[Mapping[int, float]]) -> Tuple[List[int], List[float]]:
    """Mean over seeds at the steps every seed logged."""
    curves = [c for c in curves if c]
    if not curves:
        return [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return steps, [statistics.fmean(c[s] for c in curves) for s in steps]


def _figure(ncols: int, title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * ncols, 4.2), dpi=100)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    fig.suptitle(title)
    return fig, axes


def _save(fig, path: Path, axes) -> Path:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    for ax in axes:
        if ax.get_yscale() == "log":  # plain numbers (0.3, 6) rather than 3x10^-1
            low, high = ax.get_ylim()
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            # within one decade there may be no major tick at all: label the minor ones then
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}") if high / low < 10 else NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    return path


def depth_figure(settings: Sequence[Setting], metric: str, ylabel: str, path: Path) -> Optional[Path]:
    fig, axes = _figure(2, f"{ylabel} vs layer depth (mean over seeds)")
    plotted = False
    for ax, when in zip(axes, ("init", "final")):
        for s in settings:
            per_layer = s.layer_means(when, metric)
            if per_layer:
                ax.plot(range(len(per_layer)), list(per_layer.values()), marker="o", label=s.label)
                ax.set_xticks(range(len(per_layer)), list(per_layer), rotation=45, fontsize="small")
                plotted = True
        ax.set_yscale("log")
        ax.set_title("at init (step 0)" if when == "init" else "at the end of training")
        ax.set_xlabel("layer (depth order; head = output layer)")
        ax.set_ylabel(ylabel + " (log scale)")
    return _save(fig, path, axes) if plotted else None


def curves_figure(settings: Sequence[Setting], path: Path) -> Optional[Path]:
    fig, axes = _figure(2, "training curves (mean over seeds)")
    plotted = False
    curves = {r.dir: read_curves(r.dir) for s in settings for r in s.completed}
    for ax, tag, ylabel in zip(axes, CURVE_TAGS, ("train loss (running mean between logs)", "test accuracy")):
        for s in settings:
            steps, values = mean_curve([curves[r.dir].get(tag, {}) for r in s.completed])
            if steps:
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=s.label)
                plotted = True
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        if tag == "train/loss":
            ax.set_yscale("log")
    return _save(fig, path, axes) if plotted else None


def metric_vs_key_figure(settings: Sequence[Setting], keys: Sequence[str], key: str, path: Path) -> Optional[Path]:
    """Final test accuracy and generalization gap against one numeric swept key, one line per
    combination of the other swept keys; error bars are the std over seeds."""
    others = [k for k in keys if k != key]
    lines: Dict[str, List[Setting]] = {}
    for s in settings:
        lines.setdefault(", ".join(f"{k}={s.values[k]}" for k in others) or "all", []).append(s)
    scatter = all(len(group) == 1 for group in lines.values()) and len(lines) > 1
    if scatter:  # a random/Optuna search: no two settings share the other keys, so no lines to draw
        lines = {"each point: one setting": list(settings)}
    fig, axes = _figure(2, f"final metrics vs {key} (mean ± std over seeds)")
    plotted = False
    for ax, metric, ylabel in zip(axes, ("test_acc", "gen_gap"), ("final test accuracy",
                                                                  "generalization gap (train acc - test acc)")):
        for label, group in lines.items():
            points = sorted((s.values[key], *s.stat(metric)) for s in group
                            if isinstance(s.values[key], (int, float)) and math.isfinite(s.stat(metric)[0]))
            if points:
                x, y, err = zip(*points)
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label, linestyle="none" if scatter else "-")
                plotted = True
        values = [s.values[key] for s in settings]
        if min(values) > 0 and max(values) / min(values) > 100:  # e.g. weight decay 1e-6 .. 1e-2
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(ylabel)
    return _save(fig, path, axes) if plotted else None


def numeric_keys(settings: Sequence[Setting], keys: Sequence[str]) -> List[str]:
    return [k for k in keys if all(isinstance(s.values[k], (int, float)) and not isinstance(s.values[k], bool)
                                   for s in settings)]


def write_figures(settings: Sequence[Setting], keys: Sequence[str], out: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    made = [
        depth_figure(settings, "act_norm", "activation norm", out / "act_norm_vs_depth.png"),
        depth_figure(settings, "grad_norm", "gradient norm ||dL/dW||", out / "grad_norm_vs_depth.png"),
        curves_figure(settings, out / "curves.png"),
        *(metric_vs_key_figure(settings, keys, k, out / f"final_vs_{k}.png") for k in numeric_keys(settings, keys)),
    ]
    return [p for p in made if p is not None]


# ------------------------------------------------------------------------------------------------


def report(root: Path, sort: Optional[str] = None, filters: Sequence[str] = (), as_json: bool = False,
           out: Optional[Path] = None) -> int:
    """`nrexp report`: print the table (or JSON), write report.csv, report.md and figures/ into `out`."""
    root, out_given = Path(root), out is not None
    runs = load_runs(root)
    runs = apply_filters(runs, filters)
    if not runs:
        raise ReportError(f"no runs in {root} match {' '.join(filters)}. Fix: check the --filter values")
    keys = swept_keys(runs)
    settings = sort_settings(group_settings(runs, keys), keys, sort)

    out = Path(out) if out else (root if root.is_dir() else root.parent)
    if filters and not out_given:  # the sweep's own full report stays; this one goes beside it, named
        out = out / ("report-" + ",".join(filters).replace("/", "-"))
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(settings, keys, out / "figures")
    write_csv(out / "report.csv", rows_of(settings))
    write_markdown(out / "report.md", root, settings, keys, len(runs), figures, filters)
    if as_json:
        print(json_report(root, keys, settings))
    else:
        console = wide_console()
        console.print(rich_table(root, settings, keys, len(runs)))
        console.print(f"wrote {out / 'report.csv'}, {out / 'report.md'} and {len(figures)} figures in {out / 'figures'}")
    return 0
