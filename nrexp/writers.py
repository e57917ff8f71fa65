"""Everything a run writes for people and tools to read back (nrexp/runs.py): TensorBoard events and summary.json.

TensorBoard tags (the contract `nrexp report` and users rely on):
  act_norm/<layer>, grad_norm/<layer>, weight_norm/<layer>, weight_change/<layer>, update_ratio/<layer>,
  train/loss, train/acc, test/loss, test/acc, lr, throughput/samples_per_s; step 0 is the net at init.
  A custom-scalars layout puts each per-layer metric's layers in one chart, and `depth/<when>` figures
  plot activation and gradient norm against layer depth (the lecture's plot), drawn by nrexp/figures.py
  while the run goes on and written by flush()/close(). The scalars of one step go into one event.
The events live directly in the run dir, so `tensorboard --logdir <sweep dir>` names runs by dir.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nrexp import figures
from nrexp.monitor import LAYER_METRICS


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same dir + fsync + rename: readers (and a kill -9 at any moment)
    only ever see the previous complete file or the new complete file, never half of one. The fsync is
    for a power loss: without it the rename may reach the disk before the data does."""
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

    Every record carries a masked CRC-32C, which tensorboard computes in pure Python while holding the
    GIL the training loop needs; google-crc32c computes the same checksum in C (same bytes in the files).
    Without google-crc32c, nothing changes."""
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


def write_summary(run_dir: Path, summary: dict) -> None:
    atomic_write(Path(run_dir) / "summary.json", (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())


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


def hparams_of(config: Mapping) -> dict[str, object]:
    """The HPARAMS of a resolved config (plain dict); values TensorBoard cannot show become strings."""
    values = {}
    for name, path in HPARAMS:
        value: object = config
        for part in path.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        values[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return values


class TensorBoardWriter:
    def __init__(self, run_dir: Path, layer_names: list[str], purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        use_fast_event_checksums()
        self.layer_names = layer_names
        self.pending_figures: list[tuple] = []  # (step, when, stats, title, Future), written by flush()/close()
        self._layer_summaries: dict[tuple, object] = {}  # metrics -> the Summary layer_stats fills (see there)
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
        """`stats[metric][layer]` as `metric/layer`, all in one event. With every layer of the run in
        order (as the monitor gives them), the event's Summary is built once per set of metrics and
        only its values are set on later steps (building hundreds of tagged values anew is not free)."""
        if not stats:
            return
        metrics = tuple(stats)
        if any(list(per_layer) != self.layer_names for per_layer in stats.values()):  # a subset: the general way
            self._add_scalars(step, {f"{metric}/{layer}": value
                                     for metric, per_layer in stats.items() for layer, value in per_layer.items()})
            return
        summary = self._layer_summaries.get(metrics)
        if summary is None:
            from tensorboard.compat.proto.summary_pb2 import Summary

            summary = Summary(value=[Summary.Value(tag=f"{metric}/{layer}")
                                     for metric in metrics for layer in self.layer_names])
            self._layer_summaries[metrics] = summary
        for slot, value in zip(summary.value, (v for per_layer in stats.values() for v in per_layer.values())):
            slot.simple_value = float(value)
        self.tb._get_file_writer().add_summary(summary, step)  # serialized here, so the Summary can be reused

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._add_scalars(step, values)

    def depth_plot(self, step: int, stats: Mapping[str, Mapping[str, float]], when: str) -> None:
        """Record a depth figure: drawn now by the helper process (nrexp/figures.py), written at the
        next flush() or close()."""
        title = f"{when} (step {step})"
        self.pending_figures.append((step, when, stats, title, figures.submit(self.layer_names, stats, title)))

    def _write_pending(self) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        pending, self.pending_figures = self.pending_figures, []
        final_steps = {step for step, when, *_ in pending if when == "final"}
        for step, when, stats, title, future in pending:
            if when == "latest" and step in final_steps:  # the final probe at the same step supersedes it
                future.cancel()
                continue
            height, width, png = figures.result(future, self.layer_names, stats, title)
            image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
            summary = Summary(value=[Summary.Value(tag=f"depth/{when}", image=image)])
            self.tb._get_file_writer().add_summary(summary, step)

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
        self._write_pending()
        self.tb.flush()

    def close(self) -> None:
        self._write_pending()
        self.tb.close()
