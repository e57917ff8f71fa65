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
import math
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

DEPTH_XLABEL = "layer (first hidden block ... head)"
DEPTH_METRICS = {
    "act_norm": "activation norm",
    "grad_norm": "gradient norm ||dL/dW||",
    "act_cos": "act_cos (mean pairwise cosine)",
}


# ------------------------------------------------------------------------------------------------
# Figures of results: report and scripts


def new_figure(ncols: int = 1, title: str = "", width: float = 5.5, height: float = 4.2, dpi: int = 100):
    """A figure of `ncols` panels side by side, each `width` x `height` inches: (figure, list of axes)."""
    import matplotlib

    matplotlib.use("Agg")
    from cycler import cycler
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=dpi, layout="constrained")
    axes = list(fig.subplots(1, ncols, squeeze=False)[0])
    for ax in axes:  # 40 lines that look different: 10 colours solid, then dashed, dotted, dash-dotted
        ax.set_prop_cycle(cycler(linestyle=["-", "--", ":", "-."]) * cycler(color=colormaps["tab10"].colors))
    if title:
        fig.suptitle(title)
    return fig, axes


def log_ticks(ax, axis: str = "y", minor: bool = True) -> None:
    """Labelled ticks on a log axis, in plain numbers (0.3, 6, 1e+04): a few evenly spaced values when the axis
    spans less than a decade (it may hold no decade to label at all), 1-2-5 steps up to three decades, and
    decades beyond."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator

    scaled = ax.yaxis if axis == "y" else ax.xaxis
    low, high = ax.get_ylim() if axis == "y" else ax.get_xlim()
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    decades = math.log10(high / low) if 0 < low < high else math.inf
    if decades < 0.9:
        scaled.set_major_locator(MaxNLocator(nbins=4))
        scaled.set_minor_locator(NullLocator())
    else:
        scaled.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 3 else (1.0,), numticks=8))
        scaled.set_minor_locator(
            LogLocator(base=10, subs=(2.0, 5.0), numticks=8) if minor and decades > 3 else NullLocator()
        )
    scaled.set_major_formatter(plain)
    scaled.set_minor_formatter(NullFormatter())


LEGEND_ROWS = 30  # entries per legend column: beyond, a second column
LEGEND_ROW_INCHES = 0.2  # one entry at fontsize "small"


def save(fig, path: Path) -> Path:
    """Give every panel the same look (grid, labelled log ticks) and write the figure. Panels that show the
    same lines share one legend, outside the panels on the right: the figure grows to hold it (wider, and
    taller for many entries), so 20 or more runs never cover the data or squeeze the panels. Panels with
    lines of their own keep their own legend."""
    for ax in fig.axes:
        for axis in ("x", "y"):
            if (ax.get_yscale() if axis == "y" else ax.get_xscale()) == "log":
                log_ticks(ax, axis)
        ax.grid(True, which="both", alpha=0.3)
    labelled = [ax for ax in fig.axes if ax.get_legend_handles_labels()[0]]
    label_sets = {tuple(ax.get_legend_handles_labels()[1]) for ax in labelled}
    if len(label_sets) == 1:
        handles, labels = labelled[0].get_legend_handles_labels()
        ncols = -(-len(labels) // LEGEND_ROWS)
        width, height = fig.get_size_inches()
        height = max(height, -(-len(labels) // ncols) * LEGEND_ROW_INCHES + 0.8)
        legend = fig.legend(handles, labels, loc="outside right upper", fontsize="small", ncols=ncols)
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        extra = legend.get_window_extent(FigureCanvasAgg(fig).get_renderer()).width / fig.dpi
        fig.set_size_inches(width + extra + 0.2, height)
    else:
        for ax in labelled:
            ax.legend(fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def depth_positions(layer_lists: Sequence[Sequence[str]]) -> dict[str, int]:
    """x of each layer over runs of different depths: a block by its place among the blocks, the head one
    past the deepest block (its own x: never a block's, whatever the depth)."""
    blocks: list[str] = []
    for names in layer_lists:
        for name in names:
            if name != "head" and name not in blocks:
                blocks.append(name)
    positions = {name: i for i, name in enumerate(blocks)}
    if any("head" in names for names in layer_lists):
        positions["head"] = len(blocks)
    return positions


def thinned(names: Sequence[str], most: int = 12) -> list[int]:
    """Indices of the tick labels to show among `names`: every k-th, the last always (not so close to
    the one before as to overprint it)."""
    n = len(names)
    if n <= most:
        return list(range(n))
    step = -(-n // most)
    keep = list(range(0, n, step))
    if n - 1 - keep[-1] < step / 2:
        keep[-1] = n - 1
    else:
        keep.append(n - 1)
    return keep


def depth_axis(ax, positions: Mapping[str, int]) -> None:
    """The x axis of a depth plot: layer names as ticks (thinned), a dotted line between the blocks and the head."""
    names = list(positions)
    shown = thinned(names)
    ax.set_xticks(
        [positions[names[i]] for i in shown], [names[i] for i in shown], rotation=45, ha="right", fontsize="small"
    )
    if "head" in positions and len(positions) > 1:
        ax.axvline(positions["head"] - 0.5, color="0.6", linestyle=":", linewidth=1)
    ax.set_xlabel(DEPTH_XLABEL)


def depth_lines(ax, series: Mapping[str, Mapping[str, float]], ylabel: str) -> bool:
    """One line per label of {label: {layer: value}} against layer depth, on a log y axis; runs of different
    depths line up block by block, the head at its own x (depth_positions). Returns whether anything was drawn."""
    positions = depth_positions([list(per_layer) for per_layer in series.values()])
    drawn = False
    for label, per_layer in series.items():
        if per_layer:
            blocks = [(positions[k], v) for k, v in per_layer.items() if k != "head"]
            (line,) = ax.plot(*zip(*blocks), marker="o", markersize=4, label=label) if blocks else (None,)
            if "head" in per_layer:  # the head: same colour, its own marker, not joined to the blocks
                color = line.get_color() if line is not None else None
                ax.plot(
                    [positions["head"]],
                    [per_layer["head"]],
                    marker="s",
                    markersize=5,
                    linestyle="none",
                    color=color,
                    label=None if line is not None else label,
                )
            drawn = True
    if positions:
        depth_axis(ax, positions)
    ax.set_yscale("log")
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

        self.layer_names = list(layer_names)
        self.fig = Figure(figsize=(8, 3.6), dpi=100)
        self.canvas = FigureCanvasAgg(self.fig)
        self.axes = list(self.fig.subplots(1, 2))
        self.lines = []
        for ax, (_, label) in zip(self.axes, self.METRICS):
            (line,) = ax.plot(range(len(self.layer_names)), [1.0] * len(self.layer_names), marker="o", markersize=3)
            self.lines.append(line)
            depth_axis(ax, {name: i for i, name in enumerate(self.layer_names)})  # the head at its own x
            ax.set_ylabel(label)
            ax.grid(True, which="major", alpha=0.3)
        self.title = self.fig.suptitle("", fontsize="medium")
        # fixed margins: tight_layout would measure every text again on each draw; the top leaves room
        # for a title of three lines (the run's name, wrapped, and what the figure shows)
        self.fig.subplots_adjust(left=0.09, right=0.98, bottom=0.25, top=0.8, wspace=0.3)
        self._scales: list[str] = ["linear"] * len(self.axes)
        self._background = None  # the static parts, drawn once by render()

    def draw(self, stats: Mapping[str, Mapping[str, float]], title: str):
        """Set the figure to these values (log y scale unless a value is <= 0) and return it."""
        for i, (ax, line, (metric, _)) in enumerate(zip(self.axes, self.lines, self.METRICS)):
            values = [stats[metric][name] for name in self.layer_names]
            scale = "log" if all(v > 0 for v in values) else "linear"  # never log-scale a zero
            line.set_ydata(values)
            ax.relim()  # before a change of scale: the data limits of a previous draw may hold a zero
            if scale != self._scales[i]:  # a new scale makes new ticks: only when it changes
                ax.set_yscale(scale)
                ax.minorticks_off()  # each tick is a few artists to draw
                ax.grid(True, which="major", alpha=0.3)
                self._scales[i] = scale
            ax.autoscale_view()
            if scale == "log":  # labelled ticks for this range, in plain text: matplotlib's default log
                log_ticks(ax, "y", minor=False)  # labels go through mathtext, which was most of the cost
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
    # started ahead of the run (start_helper), it imports matplotlib and loads fonts while the run
    # imports torch, so the run's first figure does not wait for them
    values = {"first": 1.0, "head": 2.0}
    try:
        render_png(list(values), {"act_norm": values, "grad_norm": values}, "warm-up")
    except Exception:  # noqa: BLE001 - a figure that fails here fails again when a run asks for it, with its error
        pass


def _start_helper() -> ProcessPoolExecutor:
    import multiprocessing

    # spawn, not fork: a forked copy of a process that runs torch's thread pools can deadlock
    helper = ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_helper_init,
        initargs=(os.getpid(),),
    )
    # A spawned process first re-runs the parent's main script, unless that script guards itself with
    # `if __name__ == "__main__":` (multiprocessing's rule). The helper needs nothing of it, and a
    # user's unguarded script that trains in-process must not run twice. With a bare __main__ in place
    # while the worker starts (a submit starts it, in the calling thread), it starts as under `python -c`.
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        _helper_pid[0] = helper.submit(os.getpid)  # starts the worker now, without waiting for it
    finally:
        sys.modules["__main__"] = main
    return helper


_helper_pid: list[Future | None] = [None]  # the helper process's pid, once it has started


def helper_drawing() -> bool:
    """Whether the helper process is on a CPU or waiting for one now (Linux: its /proc state is R). It
    runs at the lowest priority: the statistics thread (nrexp/monitor.py) need not leave it a core."""
    pid = _helper_pid[0]
    if pid is None or not pid.done() or pid.exception() is not None:
        return False
    try:
        with open(f"/proc/{pid.result()}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "R"
    except (OSError, IndexError):
        return False


_helper: ProcessPoolExecutor | None = None
_helper_failed = False  # it could not start or died: draw in this process from then on


def start_helper() -> None:
    """Start the helper process now, if it is not running (nrexp/cli.py does, before a run imports torch)."""
    global _helper, _helper_failed
    if _helper is None and not _helper_failed:
        try:
            _helper = _start_helper()
        except Exception:  # noqa: BLE001 - no semaphores, no fork/exec...: draw in this process instead
            _helper_failed = True


def submit(layer_names: Sequence[str], stats: Stats, title: str) -> Future:
    """Start drawing a depth figure; the Future's result is render_png's (height, width, PNG bytes)."""
    global _helper_failed
    start_helper()
    if _helper is not None and not _helper_failed:
        try:
            return _helper.submit(render_png, list(layer_names), _plain(stats), title)
        except Exception:  # noqa: BLE001 - BrokenProcessPool: draw here instead
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
    threading's exit hooks; tests call it to start afresh."""
    global _helper
    if _helper is not None:
        _helper.shutdown(wait=True)
        _helper = None
        _helper_pid[0] = None


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
