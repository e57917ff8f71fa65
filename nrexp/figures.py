"""Depth figures (activation and gradient norm against layer depth), drawn in a helper process.

A run records a depth figure at init, at each evaluation and at the end; a sweep of 16 tiny runs draws
~50 of them. matplotlib takes ~0.15 s a figure (text rendering and PNG encoding, all Python and Agg on
one core), which on a 2-core CPU is as long as hundreds of training steps of a small net, and in a
fused sweep it was a fifth of the whole wall time. So figures are drawn by one helper process (spawned
once per nrexp process, reused by every run in it, matplotlib only: no torch) on the core the training
loop does not use, while the run goes on. `TensorBoardWriter` submits a figure when it is recorded and
collects the PNG when the run's events are flushed or closed. If the helper can't be started or dies,
figures are drawn in this process instead, as before: slower, same bytes.

This module imports neither torch nor anything of nrexp that does: it is what the helper imports.
"""
from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
import types
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

Stats = Mapping[str, Mapping[str, float]]  # metric -> layer name -> value


class DepthFigure:
    """One depth figure, redrawn with new values: axes, ticks and labels are built once, which is most
    of matplotlib's cost (a sweep of tiny runs in one process reuses it across runs).

    `render()` (what runs use) also draws the parts that never change only once: the frames, the x axes
    with their tick labels and titles. It keeps that picture and, per figure, pastes it back and draws
    over it only what changes: the two curves, the y axes (their range and ticks follow the data) and
    the title. Text is most of matplotlib's drawing time, and half of the figure's text is static.
    """

    METRICS = (("act_norm", "activation norm (mean over batch)"), ("grad_norm", "gradient norm ||dL/dW||"))

    def __init__(self, layer_names: List[str]):
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
            ax.set_xlabel("layer depth (0 = first hidden block, last = head)")
            ax.set_ylabel(label)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
            ax.minorticks_off()  # each tick is a few artists: minor ticks on a log axis were half the drawing
            ax.grid(True, which="major", alpha=0.3)
        self.title = self.fig.suptitle("")
        self.fig.subplots_adjust(left=0.09, right=0.98, bottom=0.16, top=0.86, wspace=0.3)  # fixed: tight_layout is slow
        self._scales: List[str] = ["linear"] * len(self.axes)
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


_FIGURES: Dict[tuple, DepthFigure] = {}  # the last layer list's figure, reused by the next run drawn in this process


def render_png(layer_names: Sequence[str], stats: Stats, title: str) -> Tuple[int, int, bytes]:
    """The depth figure for these values as (height, width, PNG bytes), drawn in the calling process.

    PNG at compression level 1 instead of PIL's 6: 2x faster to encode, ~7% larger for these flat plots."""
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
      threads that feed the training (the fused group's inputs made ahead, the statistics thread) on
      the other core can't. At nice 0, while it drew a round of 16 figures, a fused group's steps took
      ~18 instead of ~13 ms (batch 128, one torch thread, 2-core CPU); whole sweeps got 0.1-0.5 s faster
      under both launchers (interleaved runs, `nrexp bench --fused`'s sweep)."""
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


_helper: Optional[ProcessPoolExecutor] = None
_helper_failed = False  # it could not start or died: draw in this process from then on


def submit(layer_names: Sequence[str], stats: Stats, title: str) -> Future:
    """Start drawing a depth figure; the Future's result is render_png's (height, width, PNG bytes)."""
    global _helper, _helper_failed
    if not _helper_failed:
        try:
            if _helper is None:
                _helper = _start_helper()
            return _helper.submit(render_png, list(layer_names), _plain(stats), title)
        except Exception:  # BrokenProcessPool, no semaphores, no fork/exec...: draw here instead
            _helper_failed = True
    return _done(render_png, layer_names, stats, title)


def result(future: Future, layer_names: Sequence[str], stats: Stats, title: str) -> Tuple[int, int, bytes]:
    """The figure a submit() returned; drawn here if the helper died before drawing it."""
    global _helper_failed
    try:
        return future.result()
    except Exception:  # the helper was killed (OOM killer, a signal): same figure, drawn here
        _helper_failed = True
        return render_png(layer_names, stats, title)


def shutdown() -> None:
    """Stop the helper (after it drew what was submitted). Python's exit does this too, through
    threading's exit hooks, and so does nrexp's fast exit (cli.entry); tests call it to start afresh."""
    global _helper
    if _helper is not None:
        _helper.shutdown(wait=True)
        _helper = None


def _plain(stats: Stats) -> Dict[str, Dict[str, float]]:
    """Plain dicts of floats: cheap to pickle to the helper."""
    return {metric: {layer: float(v) for layer, v in per_layer.items()} for metric, per_layer in stats.items()}


def _done(fn, *args) -> Future:
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as error:
        future.set_exception(error)
    return future
