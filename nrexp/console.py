"""What a person watching the terminal sees: where a run (or sweep) writes, a live rich progress bar and a
final summary table; in a sweep one line per finished job instead of each job's table.

On a terminal the bar updates in place; when stdout is not a terminal (CI, a log file, a cluster job)
it degrades to one plain log line per logging step, so logs stay readable and grep-able.
`RunConsole` is a Hydra callback (configs/train.yaml, hydra.callbacks): it prints the run dir or sweep dir
at the start and the sweep's per-job lines; the sweep's table at the end is nrexp.sweep.SweepStatusTable's.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

log = logging.getLogger("nrexp")
console = Console(stderr=False)
# False in a sweep's job (RunConsole.on_job_start): the job's one line replaces its summary table
per_run_table = True
STATUS_STYLE = {"completed": "green", "failed": "red", "diverged": "yellow"}


def console_handler() -> logging.Handler:
    """Log handler for the console: rich on a terminal, plain unwrapped lines elsewhere (CI, files)."""
    if console.is_terminal:
        from rich.logging import RichHandler

        return RichHandler(console=console, show_path=False, markup=False)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s", "%H:%M:%S"))
    return handler


class TrainProgress:
    def __init__(self, total_steps: int, steps_per_epoch: int, enabled: bool = True):
        self.total, self.steps_per_epoch = total_steps, steps_per_epoch
        self.live = enabled and console.is_terminal
        self.bar = None
        if self.live:
            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self.task = self.bar.add_task("train", total=total_steps, info="")

    def __enter__(self) -> TrainProgress:  # noqa: PYI034 - typing.Self needs Python 3.11
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, step: int, values: Mapping[str, float]) -> None:
        """Called at logging steps only (values are already on the host)."""
        epoch = step / max(self.steps_per_epoch, 1)
        parts = [f"epoch {epoch:.2f}"]
        for tag, fmt in (
            ("train/loss", "loss {:.4f}"),
            ("train/acc", "acc {:.3f}"),
            ("test/acc", "test acc {:.3f}"),
            ("throughput/samples_per_s", "{:,.0f} samples/s"),
        ):
            if tag in values:
                parts.append(fmt.format(values[tag]))
        info = "  ".join(parts)
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        else:
            log.info("step %d/%d  %s", step, self.total, info)

    def advance_to(self, step: int) -> None:
        if self.live:
            self.bar.update(self.task, completed=step)


def summary_table(summary: dict) -> Table:
    table = Table(title=f"nrexp run: {summary['status']}", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for tag, value in summary["metrics"].items():
        table.add_row(tag, f"{value:.4f}" if isinstance(value, float) else str(value))
    for key in ("steps", "epochs", "wall_time_s", "device", "data_source", "run_dir"):
        value = summary.get(key)
        table.add_row(key, f"{value:.1f}" if isinstance(value, float) else str(value))
    return table


def print_summary(summary: dict) -> None:
    if per_run_table:
        console.print(summary_table(summary))


def job_line(name: str, summary: Mapping, num: int | None = None) -> str:
    """One finished sweep job, as its line: `#3 norm=batch,init.scale=2  completed  test acc 0.9120  12.3 s`
    (a failed job: its error instead of the accuracy)."""
    status = str(summary.get("status", "no summary")) if summary else "no summary"
    acc = (summary.get("metrics") or {}).get("test/acc") if summary else None
    parts = [f"#{num} {name}" if num is not None else name, status]
    if status == "failed":
        parts.append(str(summary.get("error", "")))
    else:
        parts.append("test acc " + ("-" if acc is None else f"{acc:.4f}"))
    if summary and summary.get("wall_time_s") is not None:
        parts.append(f"{summary['wall_time_s']:.1f} s")
    return "  ".join(parts)


def print_job_line(name: str, summary: Mapping, num: int | None = None) -> None:
    from rich.text import Text

    line = Text(job_line(name, summary, num))
    status = str(summary.get("status", "")) if summary else ""
    start = line.plain.find("  " + status) + 2 if status else -1
    if start >= 2:
        line.stylize(STATUS_STYLE.get(status, "magenta"), start, start + len(status))
    console.print(line, soft_wrap=True)


class RunConsole(Callback):
    """A Hydra callback: the run dir (or sweep dir) when a command starts, and in a sweep one line per
    finished job (its swept keys, status, test accuracy, time) instead of the job's full table."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        console.print(f"sweep dir: {config.hydra.sweep.dir}", soft_wrap=True, markup=False, highlight=False)

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        global per_run_table
        per_run_table = not _in_sweep(config)
        if per_run_table:
            console.print(
                f"run dir: {_shown(config.hydra.runtime.output_dir)}", soft_wrap=True, markup=False, highlight=False
            )

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        if not _in_sweep(config):
            return
        from nrexp.runs import read_summary

        run_dir = Path(str(config.hydra.runtime.output_dir))
        print_job_line(run_dir.name, read_summary(run_dir), config.hydra.job.num)


def _in_sweep(config: Any) -> bool:
    from hydra.types import RunMode

    return config.hydra.mode == RunMode.MULTIRUN


def _shown(path: str) -> str:
    """A path relative to the working dir when it is below it (outputs/...), else as it is."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)
