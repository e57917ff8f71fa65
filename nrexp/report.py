"""`nrexp report <dir>`: compare the settings of a sweep, reading its runs through nrexp/runs.py.

A setting is one combination of the swept keys (config keys whose values differ across the runs, seed
excluded); its seeds are aggregated over its completed runs: the table and report.md show mean ± the
half-width of the 95% t-interval of the mean (nrexp/stats.py; one seed: the mean alone), report.csv each
metric's mean, sample std and that half-width (`_ci95`), and the figures mean ± std. The activation ratio
(last hidden block over the first) leaves the head out: its norm is that of the logits, which grows as the
net gets confident, not with depth. No torch import: `nrexp report` stays fast.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nrexp import figures
from nrexp.errors import ConfigError
from nrexp.runs import BOOKKEEPING_KEYS, Run, read_run, read_runs, run_dirs
from nrexp.stats import mean_interval

# Keys that never define a setting: seed (aggregated over) and where things were read from/written to.
NOT_SETTING_KEYS = {"seed"} | BOOKKEEPING_KEYS  # resume, output and progress knobs: never a setting
# The per-setting numbers: column name -> what it is (in the CSV/JSON each gets _mean, _std and _ci95).
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


class ReportError(ConfigError):
    """Bad input (no runs, unknown key, bad option): one line, exit code 2."""


# ------------------------------------------------------------------------------------------------
# Runs and their numbers


def find_job_dirs(root: Path) -> list[Path]:
    """Kept for nrexp/sweep.py: runs.run_dirs."""
    return run_dirs(root)


def read_job(run_dir: Path, root: Path | None = None) -> dict:
    """Kept for nrexp/sweep.py: the run's summary.json as a dict, with its `name`, `dir` and `status`."""
    run = read_run(run_dir, root)
    return {
        **run.summary,
        "metrics": run.metrics,
        "config": run.config,
        "status": run.status,
        "name": run.name,
        "dir": str(run.dir),
    }


def activation_ratio(act: Mapping[str, float]) -> float:
    """act_norm of the last hidden block / the first (the head excluded: see the module doc)."""
    hidden = [layer for layer in act if layer != "head"]
    if not hidden or not act[hidden[0]]:
        return math.nan
    return act[hidden[-1]] / act[hidden[0]]


def run_numbers(run: Run) -> dict[str, float]:
    """The METRICS of one run (NaN where unknown)."""
    return {
        "train_loss": run.metric("train/loss"),
        "train_acc": run.metric("train/acc"),
        "test_acc": run.metric("test/acc"),
        "gen_gap": run.metric("train/acc") - run.metric("test/acc"),
        "act_ratio_init": activation_ratio(run.layers("init", "act_norm")),
        "act_ratio_final": activation_ratio(run.layers("final", "act_norm")),
    }


def load_runs(root: Path) -> list[Run]:
    skipped: list = []
    runs = read_runs(root, skipped)
    for run_dir, why in skipped:  # a truncated or foreign summary: said, and the other runs reported
        print(f"nrexp: warning: skipped {run_dir}: {why}", file=sys.stderr)
    if not runs:
        raise ReportError(
            f"no runs in {root} (no summary.json or .hydra/ below it). "
            "Fix: pass a run dir or a sweep dir, e.g. outputs/multirun/<date>/<time>"
        )
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


def apply_filters(runs: list[Run], filters: Sequence[str]) -> list[Run]:
    for spec in filters:
        key, sep, wanted = spec.partition("=")
        if not sep:
            raise ReportError(f"--filter {spec!r} is invalid: expected key=value. Fix: e.g. --filter norm=batch")
        known = set().union(*(r.flat_config for r in runs))
        if key not in known:
            raise ReportError(
                f"--filter key {key!r} is not a config key of these runs. "
                f"Fix: use one of {', '.join(sorted(known)) or '(none)'}"
            )
        runs = [r for r in runs if matches(r.flat_config.get(key), wanted)]
    return runs


def swept_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose values differ across the runs (seed and bookkeeping keys excluded).
    Failed-before-start jobs count too: their config is as much the sweep's as the others'."""
    keys = sorted(set().union(*(r.flat_config for r in runs)) - NOT_SETTING_KEYS)
    return [k for k in keys if len({json.dumps(r.flat_config.get(k), sort_keys=True) for r in runs}) > 1]


def _order(value: Any) -> tuple:
    """Sort numbers numerically, then strings; None last."""
    if value is None:
        return (2, 0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, str(value))


@dataclass
class Setting:
    values: dict[str, Any]  # swept key -> value
    runs: list[Run] = field(default_factory=list)

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values.items()) or "all runs"

    @property
    def completed(self) -> list[Run]:
        return [r for r in self.runs if r.status == "completed"]

    def status(self) -> str:
        counts: dict[str, int] = {}
        for r in self.runs:
            counts[r.status] = counts.get(r.status, 0) + 1
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))

    def stat(self, metric: str) -> tuple[float, float]:
        """Mean and sample std over the completed runs with a finite value (std 0 for one run)."""
        values = [v for v in (run_numbers(r)[metric] for r in self.completed) if math.isfinite(v)]
        if not values:
            return math.nan, math.nan
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    def interval(self, metric: str) -> tuple[float, float, int]:
        """Mean, half-width of its 95% t-interval (NaN for fewer than 2 values) and the number of completed
        runs with a finite value."""
        iv = mean_interval(run_numbers(r)[metric] for r in self.completed)
        return iv.mean, iv.half, iv.n

    def layer_means(self, when: str, metric: str) -> dict[str, float]:
        """Per-layer mean over the completed runs of `layers[when][metric]` (layer order kept)."""
        per_run = [r.layers(when, metric) for r in self.completed]
        per_run = [p for p in per_run if p]
        if not per_run:
            return {}
        return {layer: statistics.fmean(p[layer] for p in per_run if layer in p) for layer in per_run[0]}


def group_settings(runs: Sequence[Run], keys: Sequence[str]) -> list[Setting]:
    settings: dict[tuple, Setting] = {}
    for run in runs:
        values = {k: run.flat_config.get(k) for k in keys}
        settings.setdefault(tuple(json.dumps(v) for v in values.values()), Setting(values)).runs.append(run)
    return sorted(settings.values(), key=lambda s: [_order(v) for v in s.values.values()])


def rows_of(settings: Sequence[Setting]) -> list[dict[str, Any]]:
    """One flat dict per setting: swept keys, n, status, <metric>_mean, <metric>_std, <metric>_ci95 (the half-width
    of the 95% t-interval of the mean over seeds)."""
    rows = []
    for s in settings:
        row: dict[str, Any] = {**s.values, "n": len(s.runs), "status": s.status()}
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = s.stat(metric)
            row[f"{metric}_ci95"] = s.interval(metric)[1]
        rows.append(row)
    return rows


def sort_settings(settings: list[Setting], keys: Sequence[str], spec: str | None) -> list[Setting]:
    """--sort KEY (ascending) or -KEY (descending); KEY is a swept key, runs (n), status or a metric."""
    if not spec:
        return settings
    descending, key = spec.startswith("-"), spec.lstrip("-")
    key = "n" if key == "runs" else key  # the table's "runs" is the CSV's "n"
    choices = [*keys, "runs", "n", "status", *METRICS]
    if key not in choices:
        raise ReportError(
            f"--sort {spec!r} is invalid: not a column. Fix: use one of {', '.join(choices)} "
            "(prefix - for descending, e.g. --sort=-test_acc)"
        )

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


def fmt(mean: float, half: float, n: int) -> str:
    """`mean ± half` (half: the 95% interval's half-width), the mean alone for one seed."""
    if math.isnan(mean):
        return "—"
    digits = 4 if abs(mean) < 100 else 1
    return f"{mean:.{digits}f}" + (f" ± {half:.{digits}f}" if n > 1 and math.isfinite(half) else "")


def _short(value: Any) -> str:
    """Swept values as people read them: 0.32692990979813813 (an Optuna trial) -> 0.3269; CSV keeps all."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table_cells(settings: Sequence[Setting], keys: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    header = [*keys, "runs", "status", *TABLE_METRICS]
    body = []
    for s in settings:
        body.append(
            [_short(s.values[k]) for k in keys]
            + [str(len(s.runs)), s.status()]
            + [fmt(*s.interval(m)) for m in TABLE_METRICS]
        )
    return header, body


def rich_table(root: Path, settings: Sequence[Setting], keys: Sequence[str], n_runs: int):
    from rich.table import Table

    header, body = table_cells(settings, keys)
    table = Table(
        title=f"nrexp report: {root} ({n_runs} runs, {len(settings)} settings; mean ± 95% interval over seeds)",
        header_style="bold",
    )
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


def write_markdown(
    path: Path,
    root: Path,
    settings: Sequence[Setting],
    keys: Sequence[str],
    n_runs: int,
    figures: Sequence[Path],
    filters: Sequence[str] = (),
) -> None:
    header, body = table_cells(settings, keys)
    kept = f" (the runs with {', '.join(filters)})" if filters else ""
    lines = [
        f"# nrexp report: {root}",
        "",
        (
            f"{n_runs} runs{kept}, {len(settings)} settings; numbers are mean ± the half-width of the 95% "
            "t-interval of the mean over the completed runs (seeds) of a setting (one seed: the mean alone)."
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    lines += ["", "Columns: " + "; ".join(f"`{m}` {METRICS[m]}" for m in TABLE_METRICS) + ".", ""]
    lines += [f"![{p.stem}]({p.relative_to(path.parent)})" for p in figures]
    path.write_text("\n".join(lines) + "\n")


def json_report(root: Path, keys: Sequence[str], settings: Sequence[Setting]) -> str:
    def clean(value: Any) -> Any:  # NaN is not JSON
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return json.dumps(
        {
            "dir": str(root),
            "swept_keys": list(keys),
            "settings": [{k: clean(v) for k, v in row.items()} for row in rows_of(settings)],
            "runs": [
                {
                    "name": r.name,
                    "status": r.status,
                    "error": r.error,
                    "setting": s.values,
                    "seed": r.flat_config.get("seed"),
                    **{k: clean(v) for k, v in run_numbers(r).items()},
                }
                for s in settings
                for r in s.runs
            ],
        },
        indent=2,
    )


# ------------------------------------------------------------------------------------------------
# Figures (matplotlib, no display)


def mean_curve(curves: Sequence[Mapping[int, float]]) -> tuple[list[int], list[float]]:
    """Mean over seeds at the steps every seed logged."""
    curves = [c for c in curves if c]
    if not curves:
        return [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return steps, [statistics.fmean(c[s] for c in curves) for s in steps]


def depth_figure(settings: Sequence[Setting], metric: str, ylabel: str, path: Path) -> Path | None:
    fig, axes = figures.new_figure(2, f"{ylabel} vs layer depth (mean over seeds)")
    drawn = False
    for ax, when in zip(axes, ("init", "final")):
        drawn |= figures.depth_lines(ax, {s.label: s.layer_means(when, metric) for s in settings}, ylabel)
        ax.set_title("at init (step 0)" if when == "init" else "at the end of training")
    return figures.save(fig, path) if drawn else None


def curves_figure(settings: Sequence[Setting], path: Path) -> Path | None:
    fig, axes = figures.new_figure(2, "training curves (mean over seeds)")
    drawn = False
    for ax, tag, ylabel in zip(axes, CURVE_TAGS, ("train loss (running mean between logs)", "test accuracy")):
        series = {s.label: list(zip(*mean_curve([dict(r.scalars(tag)) for r in s.completed]))) for s in settings}
        drawn |= figures.curve_lines(ax, series, "optimizer step", ylabel, logy=tag == "train/loss")
    return figures.save(fig, path) if drawn else None


def metric_vs_key_figure(settings: Sequence[Setting], keys: Sequence[str], key: str, path: Path) -> Path | None:
    """Final test accuracy and generalization gap against one numeric swept key, one line per
    combination of the other swept keys; error bars are the std over seeds."""
    others = [k for k in keys if k != key]
    lines: dict[str, list[Setting]] = {}
    for s in settings:
        lines.setdefault(", ".join(f"{k}={s.values[k]}" for k in others) or "all", []).append(s)
    scatter = all(len(group) == 1 for group in lines.values()) and len(lines) > 1
    if scatter:  # a random/Optuna search: no two settings share the other keys, so no lines to draw
        lines = {"each point: one setting": list(settings)}
    fig, axes = figures.new_figure(2, f"final metrics vs {key} (mean ± std over seeds)")
    plotted = False
    for ax, metric, ylabel in zip(
        axes, ("test_acc", "gen_gap"), ("final test accuracy", "generalization gap (train acc - test acc)")
    ):
        for label, group in lines.items():
            points = sorted(
                (s.values[key], *s.stat(metric))
                for s in group
                if isinstance(s.values[key], (int, float)) and math.isfinite(s.stat(metric)[0])
            )
            if points:
                x, y, err = zip(*points)
                style = {"linestyle": "none"} if scatter else {}  # else the axes' cycle: 40 lines look different
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label, **style)
                plotted = True
        values = [s.values[key] for s in settings]
        if min(values) > 0 and max(values) / min(values) > 100:  # e.g. weight decay 1e-6 .. 1e-2
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(ylabel)
    return figures.save(fig, path) if plotted else None


# Keys a final_vs_<key> figure is drawn for (themselves or their group): what a run computes, not how it is
# logged, checkpointed or where its data comes from (trainer.log_every, data.source, seed, ...).
SCIENCE_KEYS = (
    "norm",
    "dropout",
    "optim",
    "init",
    "model",
    "data.batch_size",
    "data.train_size",
    "data.augment",
    "trainer.epochs",
    "trainer.max_steps",
    "trainer.precision",
)


def is_science_key(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in SCIENCE_KEYS)


def numeric_keys(settings: Sequence[Setting], keys: Sequence[str]) -> list[str]:
    """The swept science keys with numeric values, taking two values or more: those worth a final_vs_<key> figure."""
    return [
        k
        for k in keys
        if is_science_key(k)
        and len({s.values[k] for s in settings}) > 1
        and all(isinstance(s.values[k], (int, float)) and not isinstance(s.values[k], bool) for s in settings)
    ]


def write_figures(settings: Sequence[Setting], keys: Sequence[str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    made = [
        depth_figure(settings, "act_norm", "activation norm", out / "act_norm_vs_depth.png"),
        depth_figure(settings, "grad_norm", "gradient norm ||dL/dW||", out / "grad_norm_vs_depth.png"),
        curves_figure(settings, out / "curves.png"),
        *(metric_vs_key_figure(settings, keys, k, out / f"final_vs_{k}.png") for k in numeric_keys(settings, keys)),
    ]
    return [p for p in made if p is not None]


# ------------------------------------------------------------------------------------------------


def write_curves(runs: Sequence[Run], path: Path, tags: Sequence[str] | None = None) -> int:
    """curves.csv: every logged scalar of these runs, one row per point (run, step, tag, layer, value), as
    nrexp.runs.curves returns them. Returns the number of rows."""
    from nrexp.runs import curve_rows

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "step", "tag", "layer", "value"])
        count = 0
        for run in runs:
            rows = curve_rows(run, tags)
            writer.writerows(rows)
            count += len(rows)
    return count


def report(
    root: Path,
    sort: str | None = None,
    filters: Sequence[str] = (),
    as_json: bool = False,
    out: Path | None = None,
    curves: bool = False,
) -> int:
    """`nrexp report`: print the table (or JSON), write report.csv, report.md and figures/ into `out`, and with
    `curves` also curves.csv (write_curves)."""
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
    made = write_figures(settings, keys, out / "figures")
    write_csv(out / "report.csv", rows_of(settings))
    write_markdown(out / "report.md", root, settings, keys, len(runs), made, filters)
    if curves:
        write_curves(runs, out / "curves.csv")
    if as_json:
        print(json_report(root, keys, settings))
    else:
        console = wide_console()
        console.print(rich_table(root, settings, keys, len(runs)))
        also = f", {out / 'curves.csv'}" if curves else ""
        console.print(
            f"wrote {out / 'report.csv'}, {out / 'report.md'}{also} and {len(made)} figures in {out / 'figures'}"
        )
    return 0
