"""What a person watching the terminal sees: a live rich progress bar and a final summary table.

On a terminal the bar updates in place; when stdout is not a terminal (CI, a log file, a cluster job)
it degrades to one plain log line per logging step, so logs stay readable and grep-able.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

log = logging.getLogger("nrexp")
console = Console(stderr=False)


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
    console.print(summary_table(summary))
