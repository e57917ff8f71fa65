"""Every figure helper: the depth figures a run writes to TensorBoard, and the figures of results.

- Depth figures of a run (nrexp/writers.py): activation and gradient norm against layer depth, drawn by one
  helper process per nrexp process while the run goes on (matplotlib is slow next to a small net's steps),
  or in this process if the helper cannot start or dies: same bytes either way.
- Figures of results (nrexp/report.py, scripts/reproduce.py): a figure, depth lines, curves, and saving
  with the same look everywhere.

Imports neither torch nor anything of nrexp: it is what the helper process imports. matplotlib is imported
when a figure is drawn, and never pyplot (no display, no global state).
"""
from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
import types
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

Stats = Mapping[str, Mapping[str, float]]  # metric -> layer name -> value
Points = Sequence[tuple[float, float]]  # (x, y), e.g. (step, value)

DEPTH_XLABEL = "layer depth (0 = first hidden block, last = head)"
DEPTH_METRICS = {"act_norm": "activation norm", "grad_norm": "gradient norm ||dL/dW||"}


# ------------------------------------------------------------------------------------------------
# Figures of results: report and scripts


def new_figure(ncols: int = 1, title: str = "", width: float = 5.5, height: float = 4.2, dpi: int = 100):
    """A figure of `ncols` panels side by side, each `width` x `height` inches: (figure, list of axes)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=dpi)
    axes = list(fig.subplots(1, ncols, squeeze=False)[0])
    if title:
        fig.suptitle(title)
    return fig, axes


def save(fig, path: Path) -> Path:
    """Give every panel the same look (grid, legend, plain numbers on log axes) and write the figure."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    for ax in fig.axes:
        if ax.get_yscale() == "log":  # plain numbers (0.3, 6) rather than 3x10^-1
            low, high = ax.get_ylim()
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            # within one decade there may be no major tick at all: label the minor ones then
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}") if high / low < 10 else NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def depth_lines(ax, series: Mapping[str, Mapping[str, float]], ylabel: str) -> bool:
    """One line per label of {label: {layer: value}} against layer depth, on a log y axis; layers are named
    on the x axis when few enough to read. Returns whether anything was drawn."""
    drawn = False
    for label, per_layer in series.items():
        if per_layer:
            ax.plot(range(len(per_layer)), list(per_layer.values()), marker="o", markersize=4, label=label)
            if len(per_layer) <= 16:
                ax.set_xticks(range(len(per_layer)), list(per_layer), rotation=45, fontsize="small")
            drawn = True
    ax.set_yscale("log")
    ax.set_xlabel(DEPTH_XLABEL)
    ax.set_ylabel(ylabel + " (log scale)")
    return drawn


def curve_lines(ax, series: Mapping[str, Points], xlabel: str, ylabel: str, logy: bool = False) -> bool:
    """One line per label of {label: [(x, y), ...]}. Returns whether anything was drawn."""
    drawn = False
    for label, points in series.items():
        if points:
            x, y = zip(*points)
            ax.plot(x, y, marker="." if len(x) < 30 else None, label=label)
            drawn = True
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    return drawn


# ------------------------------------------------------------------------------------------------
# Depth figures of a run (TensorBoard images), drawn in a helper process


class DepthFigure:
    """One depth figure, redrawn with new values: axes, ticks and labels are built once and reused
    (across the runs of a sweep too). `render()` draws the static parts (frames, x axes, titles) once and
    then only what changes: the two curves, the y axes and the title (matplotlib's blitting)."""

    METRICS = (("act_norm", "activation norm (mean over batch)"), ("grad_norm", "gradient norm ||dL/dW||"))

    def __init__(self, layer_names: list[str]):
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        self.layer_names = list(layer_names)
        self.fig = Figure(figsize=(8, 3.2), dpi=100)
        self.canvas = FigureCanvasAgg(self.fig)
        self.axes = list(self.fig.subplots(1, 2))
        self.lines = []
        for ax, (_, label) in zip(self.axes, self.METRICS):
            (line,) = ax.plot(range(len(self.layer_names)), [1.0] * len(self.layer_names), marker="o", markersize=3)
            self.lines.append(line)
            ax.set_xlabel(DEPTH_XLABEL)
            ax.set_ylabel(label)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
            ax.minorticks_off()  # each tick is a few artists to draw
            ax.grid(True, which="major", alpha=0.3)
        self.title = self.fig.suptitle("")
        # fixed margins: tight_layout would measure every text again on each draw
        self.fig.subplots_adjust(left=0.09, right=0.98, bottom=0.16, top=0.86, wspace=0.3)
        self._scales: list[str] = ["linear"] * len(self.axes)
        self._background = None  # the static parts, drawn once by render()

    def draw(self, stats: Mapping[str, Mapping[str, float]], title: str):
        """Set the figure to these values (log y scale unless a value is <= 0) and return it."""
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        for i, (ax, line, (metric, _)) in enumerate(zip(self.axes, self.lines, self.METRICS)):
            values = [stats[metric][name] for name in self.layer_names]
            scale = "log" if all(v > 0 for v in values) else "linear"  # never log-scale a zero
            line.set_ydata(values)
            ax.relim()  # before a change of scale: the data limits of a previous draw may hold a zero
            if scale != self._scales[i]:  # a new scale makes new ticks: only when it changes
                ax.set_yscale(scale)
                if scale == "log":
                    # plain-text labels on decades only: matplotlib's default log labels go through
                    # mathtext, which was most of the figure's cost
                    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=6))
                    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                    ax.yaxis.set_minor_formatter(NullFormatter())
                ax.minorticks_off()
                ax.grid(True, which="major", alpha=0.3)
                self._scales[i] = scale
            ax.autoscale_view()
        self.title.set_text(title)
        return self.fig

    def render(self, stats: Mapping[str, Mapping[str, float]], title: str):
        """The figure for these values as an RGB image (H, W, 3 uint8 numpy array)."""
        import numpy as np

        self.draw(stats, title)
        changing = [*self.lines, *(ax.yaxis for ax in self.axes), self.title]
        if self._background is None:
            for artist in changing:  # left out of the full draw below (matplotlib's blitting)
                artist.set_animated(True)
            self.canvas.draw()
            self._background = self.canvas.copy_from_bbox(self.fig.bbox)
        else:
            self.canvas.restore_region(self._background)
        for ax, line in zip(self.axes, self.lines):
            ax.draw_artist(ax.yaxis)  # ticks, tick labels, grid lines and label of the y axis
            ax.draw_artist(line)
        self.fig.draw_artist(self.title)
        return np.asarray(self.canvas.buffer_rgba())[:, :, :3].copy()


_FIGURES: dict[tuple, DepthFigure] = {}  # the last layer list's figure, reused by the next run drawn in this process


def render_png(layer_names: Sequence[str], stats: Stats, title: str) -> tuple[int, int, bytes]:
    """The depth figure for these values as (height, width, PNG bytes), drawn in the calling process.
    PNG compression level 1: much faster to encode than PIL's default, and these flat plots stay small."""
    from PIL import Image

    key = tuple(layer_names)
    if key not in _FIGURES:
        _FIGURES.clear()
        _FIGURES[key] = DepthFigure(list(layer_names))
    rgb = _FIGURES[key].render(stats, title)
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG", compress_level=1)
    return rgb.shape[0], rgb.shape[1], png.getvalue()


def _helper_init(parent: int) -> None:
    """The helper's initializer.
    - Ctrl-C in a terminal signals the whole process group: the run it interrupts still writes its
      figures (train.py stops cleanly), so the helper must not die of it.
    - If nrexp itself is killed (kill -9, the OOM killer), nothing tells the helper, which would wait
      for work forever (it holds both ends of its own queue): it leaves once its parent is gone.
    - It draws at the lowest priority (nice 19), on time the training leaves: figures can wait, the
      threads that feed the training (the fused group's inputs made ahead, the statistics thread) can't."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.nice(19)
    except (AttributeError, OSError):  # no os.nice (Windows), or not allowed: draw at the usual priority
        pass

    def leave_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=leave_with_parent, name="nrexp-figures-watchdog", daemon=True).start()


def _start_helper() -> ProcessPoolExecutor:
    import multiprocessing

    # spawn, not fork: a forked copy of a process that runs torch's thread pools can deadlock
    helper = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_helper_init, initargs=(os.getpid(),))
    # A spawned process first re-runs the parent's main script, unless that script guards itself with
    # `if __name__ == "__main__":` (multiprocessing's rule). The helper needs nothing of it, and a
    # user's unguarded script that trains in-process must not run twice. With a bare __main__ in place
    # while the worker starts (a submit starts it, in the calling thread), it starts as under `python -c`.
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        helper.submit(int)  # a no-op job: starts the worker now, without waiting for it
    finally:
        sys.modules["__main__"] = main
    return helper


_helper: ProcessPoolExecutor | None = None
_helper_failed = False  # it could not start or died: draw in this process from then on


def submit(layer_names: Sequence[str], stats: Stats, title: str) -> Future:
    """Start drawing a depth figure; the Future's result is render_png's (height, width, PNG bytes)."""
    global _helper, _helper_failed
    if not _helper_failed:
        try:
            if _helper is None:
                _helper = _start_helper()
            return _helper.submit(render_png, list(layer_names), _plain(stats), title)
        except Exception:  # noqa: BLE001 - BrokenProcessPool, no semaphores, no fork/exec...: draw here instead
            _helper_failed = True
    return _done(render_png, layer_names, stats, title)


def result(future: Future, layer_names: Sequence[str], stats: Stats, title: str) -> tuple[int, int, bytes]:
    """The figure a submit() returned; drawn here if the helper died before drawing it."""
    global _helper_failed
    try:
        return future.result()
    except Exception:  # noqa: BLE001 - the helper was killed (OOM killer, a signal): same figure, drawn here
        _helper_failed = True
        return render_png(layer_names, stats, title)


def shutdown() -> None:
    """Stop the helper (after it drew what was submitted). Python's exit does this too, through
    threading's exit hooks, and so does nrexp's fast exit (cli.entry); tests call it to start afresh."""
    global _helper
    if _helper is not None:
        _helper.shutdown(wait=True)
        _helper = None


def _plain(stats: Stats) -> dict[str, dict[str, float]]:
    """Plain dicts of floats: cheap to pickle to the helper."""
    return {metric: {layer: float(v) for layer, v in per_layer.items()} for metric, per_layer in stats.items()}


def _done(fn, *args) -> Future:
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as error:  # noqa: BLE001 - the Future carries it to result()
        future.set_exception(error)
    return future
