"""Everything a run writes for people and tools to read back: TensorBoard events and summary.json.

TensorBoard tags (the contract `nrexp report` and users rely on):
  act_norm/<layer>, grad_norm/<layer>, weight_norm/<layer>, weight_change/<layer>, update_ratio/<layer>,
  train/loss, train/acc, test/loss, test/acc, lr, throughput/samples_per_s; step 0 is the net at init.
  A custom-scalars layout puts each per-layer metric's layers in one chart, and `depth/<when>` figures
  plot activation and gradient norm against layer depth (the lecture's plot).
Cost: the scalars of one step go into one event (one protobuf, not one per tag), and depth figures are
only recorded during training and drawn by flush()/close(), outside the step loop (matplotlib takes
tenths of a second per figure, more than hundreds of training steps of a small net).
The events live directly in the run dir, so `tensorboard --logdir <sweep dir>` names runs by dir.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping

from nrexp.monitor import LAYER_METRICS


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same dir + fsync + rename: readers (and a kill -9 at any moment)
    only ever see the previous complete file or the new complete file, never half of one.

    The rename alone is enough against a killed process (the data is in the page cache either way).
    The fsync is for a power loss or kernel crash: without it, the rename may reach the disk before
    the data does (filesystems without ordered data), leaving an empty or partial file in place of the
    previous good one, which for checkpoint.pt is the very thing it exists to prevent. It costs a few
    milliseconds per file here (a run writes two at its end), so it stays.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def use_fast_event_checksums() -> bool:
    """Make TensorBoard's event writer checksum records in C; return whether it now does.

    Every record of an event file carries a masked CRC-32C, which tensorboard computes in pure Python
    (tensorflow_stub.pywrap_tensorflow): ~1 ms for the 7 KB event of one logging step of a 51-layer net,
    run in the writer's background thread while holding the GIL the training loop needs. With statistics
    every step that cost ~2.5 ms per step (`nrexp bench`, d arm). google-crc32c computes the same
    checksum in C, so the files are byte for byte what they were. Without it, nothing changes.
    """
    try:
        import google_crc32c
    except ImportError:
        return False
    if google_crc32c.implementation != "c":  # its own pure-Python fallback would gain nothing
        return False
    from tensorboard.summary.writer import record_writer

    def masked_crc32c(data: bytes) -> int:  # pywrap_tensorflow.masked_crc32c, with the CRC in C
        x = google_crc32c.value(data)
        return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    record_writer.masked_crc32c = masked_crc32c  # RecordWriter.write looks it up on every record
    return True


def finite_or_none(value: Any) -> Any:
    """Replace NaN/inf (a diverged run's metrics) by None, so summary.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def write_summary(run_dir: Path, summary: Dict) -> None:
    atomic_write(Path(run_dir) / "summary.json", (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())


def depth_figure(layer_names: List[str], stats: Mapping[str, Mapping[str, float]], title: str):
    """Activation norm and gradient norm against layer depth, log scale (a new matplotlib Figure)."""
    return DepthFigure(layer_names).draw(stats, title)


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


_DEPTH_FIGURES: Dict[tuple, DepthFigure] = {}  # the last layer list's figure, kept for the next run in this process


# The hyper-parameters every run reports to TensorBoard's HParams tab: (name shown, path in the config).
# Names follow the command line (`norm=batch`, `optim.lr=0.1`). The set is fixed so that every run of
# every sweep has the same columns: the HParams tab takes its column list from one run's summary.
HPARAMS = (
    ("model", "model.name"), ("norm", "norm.name"), ("dropout.p", "dropout.p"),
    ("optim", "optim.name"), ("optim.lr", "optim.lr"), ("optim.weight_decay", "optim.weight_decay"),
    ("init", "init.name"), ("init.scale", "init.scale"), ("data.batch_size", "data.batch_size"),
    ("data.train_size", "data.train_size"),
    ("model.depth", "model.depth"), ("model.width", "model.width"), ("model.activation", "model.activation"),
    ("seed", "seed"),
)
# Final metrics, as their own scalar tags: train/acc in the curves is the running minibatch accuracy,
# while these are the full-split evaluations of summary.json.
HPARAM_METRICS = {"final/test_acc": "test/acc", "final/test_loss": "test/loss",
                  "final/train_acc": "train/acc", "final/train_loss": "train/loss"}


def hparams_of(config: Mapping) -> Dict[str, object]:
    """The HPARAMS of a resolved config (plain dict); values TensorBoard cannot show become strings."""
    values = {}
    for name, path in HPARAMS:
        value: object = config
        for part in path.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        values[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return values


class TensorBoardWriter:
    def __init__(self, run_dir: Path, layer_names: List[str], purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        use_fast_event_checksums()
        self.layer_names = layer_names
        self.pending_figures: List[tuple] = []  # (step, stats, when), drawn by flush()/close()
        self.tb = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)
        if purge_step is None:  # a resumed run already has its layout
            self.tb.add_custom_scalars({
                "per-layer statistics": {m: ["Multiline", [f"^{m}/"]] for m in LAYER_METRICS},
                "training": {"loss": ["Multiline", ["^train/loss$", "^test/loss$"]],
                             "accuracy": ["Multiline", ["^train/acc$", "^test/acc$"]]},
            })

    def _add_scalars(self, step: int, values: Mapping[str, float]) -> None:
        """All of one step's scalars as one event: what add_scalar writes per tag, batched."""
        if not values:  # e.g. no preact percentiles this step: write no empty event
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()])
        self.tb._get_file_writer().add_summary(summary, step)

    def layer_stats(self, step: int, stats: Mapping[str, Mapping[str, float]]) -> None:
        self._add_scalars(step, {f"{metric}/{layer}": value
                                 for metric, per_layer in stats.items() for layer, value in per_layer.items()})

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._add_scalars(step, values)

    def depth_plot(self, step: int, stats: Mapping[str, Mapping[str, float]], when: str) -> None:
        """Record a depth figure; it is drawn at the next flush() or close(), not in the step loop."""
        self.pending_figures.append((step, stats, when))

    def _draw_pending(self) -> None:
        pending, self.pending_figures = self.pending_figures, []
        final_steps = {step for step, _, when in pending if when == "final"}
        for step, stats, when in pending:
            if when == "latest" and step in final_steps:  # the final probe at the same step supersedes it
                continue
            key = tuple(self.layer_names)
            if key not in _DEPTH_FIGURES:
                _DEPTH_FIGURES.clear()
                _DEPTH_FIGURES[key] = DepthFigure(self.layer_names)
            self._add_image(f"depth/{when}", _DEPTH_FIGURES[key].render(stats, f"{when} (step {step})"), step)

    def _add_image(self, tag: str, rgb, step: int) -> None:
        """What SummaryWriter.add_image writes for an (H, W, 3) uint8 image, with the PNG compressed at
        level 1 instead of 6: 2x faster to encode and ~7% larger for these flat-colored plots."""
        import io

        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        png = io.BytesIO()
        Image.fromarray(rgb).save(png, format="PNG", compress_level=1)
        image = Summary.Image(height=rgb.shape[0], width=rgb.shape[1], colorspace=3, encoded_image_string=png.getvalue())
        self.tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def hparams(self, step: int, config: Mapping, metrics: Mapping[str, float]) -> None:
        """List this run in TensorBoard's HParams tab: its hyper-parameters and final metrics.

        SummaryWriter.add_hparams would write them to a new timestamped sub-run, so each run would
        appear twice and the sweep's table would not line up with its dirs; the three hparams
        summaries go to this run's own event file instead.
        """
        from tensorboard.plugins.hparams import plugin_data_pb2
        from torch.utils.tensorboard.summary import hparams

        from nrexp.config import INITS, MODELS, NORMS, OPTIMIZERS, Activation

        final = {tag: float(metrics[key]) for tag, key in HPARAM_METRICS.items() if metrics.get(key) is not None}
        values = hparams_of(config)
        # every choice a string knob has, so the tab's filters offer them all (one run only knows its own)
        choices = {"model": MODELS, "norm": NORMS, "optim": OPTIMIZERS, "init": INITS,
                   "model.activation": [a.value for a in Activation]}
        domains = {k: list(v) for k, v in choices.items() if values[k] in v}
        experiment, start, end = hparams(values, final, hparam_domain_discrete=domains)
        # The seeds of one setting form one session group: the HParams tab shows them as one row
        # (metrics aggregated over seeds) that expands to the runs, as `nrexp report` groups them.
        group = ",".join(f"{k}={v}" for k, v in values.items() if k != "seed")
        data = plugin_data_pb2.HParamsPluginData.FromString(start.value[0].metadata.plugin_data.content)
        data.session_start_info.group_name = group
        start.value[0].metadata.plugin_data.content = data.SerializeToString()
        for summary in (experiment, start, end):
            self.tb._get_file_writer().add_summary(summary)
        self.scalars(step, final)

    def text(self, tag: str, text: str) -> None:
        self.tb.add_text(tag, text, 0)

    def flush(self) -> None:
        self._draw_pending()
        self.tb.flush()

    def close(self) -> None:
        self._draw_pending()
        self.tb.close()
