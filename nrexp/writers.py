"""Everything a run writes for people and tools to read back (nrexp/runs.py): TensorBoard events and summary.json.

TensorBoard tags (the contract `nrexp report` and users rely on; docs/tensorboard.md shows how to read them):
  act_norm/<layer>, act_cos/<layer>, grad_norm/<layer>, weight_norm/<layer>, weight_change/<layer>,
  update_ratio/<layer>, train/loss, train/acc, test/loss, test/acc, lr, throughput/samples_per_s; step 0 is the
  net at init. At a logging step t every per-layer tag describes the forward/backward of step t, with the
  weights W_t it used, except update_ratio/<layer>: ||W_{t+1} - W_t|| / ||W_t||, the update the optimizer
  took right after that forward/backward (at step 0: the first update, from the weights at init).
  depth_init/<metric>, depth_final/<metric>: the depth profile at init and at the end, as scalars whose
  step is the layer index (0 = block00 ... L = head), so TensorBoard's own scalar chart overlays a metric
  against depth for every run of a sweep.
  hist_act/<layer>, hist_grad/<layer>, hist_weight/<layer> (trainer.histograms=true): histograms of the layer's
  activation, dL/dW and W at each logging step (monitor.Histograms).
  final/*: the numbers of the HParams tab (HPARAM_METRICS), at the last step.
A custom-scalars layout (`custom_layout`) shows the depth charts, then per metric the first, middle and last
hidden block and the head, all runs overlaid; `depth/<when>` images plot activation and gradient norm
against depth for one run, drawn by nrexp/figures.py while the run goes on and written by flush()/close().
The scalars of one step go into one event. The events live directly in the run dir, so
`tensorboard --logdir <sweep dir>` names runs by dir.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nrexp import figures
from nrexp.metrics import LAYER_METRICS


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


def wait_for_a_later_event_file_name(run_dir: Path) -> None:
    """TensorBoard reads a run's event files in the order of their names, events.out.tfevents.<seconds>.
    <host>.<pid>.<n>, and a resumed attempt's purge applies to the files read before its own. Within the
    second of an earlier file the names need not sort in time (".10" before ".9"): wait for the next second."""
    import time

    latest = 0
    for path in run_dir.glob("events.out.tfevents.*"):
        stamp = path.name.split(".")[3]
        latest = max(latest, int(stamp) if stamp.isdigit() else 0)
    while int(time.time()) <= latest:
        time.sleep(0.05)


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


# TensorBoard's HParams tab shows a run's swept keys (runs.swept_overrides: what its sweep varies, in the
# command line's order) and these few, which every nrexp question needs: the normalization and the depth
# (what the depth profile is about) and the seed (tells a setting's runs apart). A run without a Hydra
# record (started from Python) shows DEFAULT_SWEPT instead of swept keys.
ALWAYS_HPARAMS = ("norm", "model.depth", "seed")
DEFAULT_SWEPT = ("norm", "init", "init.scale", "optim.lr", "optim.weight_decay", "dropout.p")
# The metrics of the HParams tab, written as scalars at the last step: train/acc in the curves is the running
# minibatch accuracy, while these are the full-split evaluations of summary.json. The activation ratio is the
# last hidden block's act_norm over the first's (runs.activation_ratio: the head left out), as log10 so that
# 0 is "preserved with depth", +1 "grew tenfold", -1 "shrank tenfold".
HPARAM_METRICS = {  # in the order of the tab's columns; it shows the first five at first (the others: a click)
    "final/test_acc": "final test accuracy (full test set)",
    "final/gen_gap": "generalization gap: train acc - test acc",
    "final/log10_act_ratio_init": "log10 activation norm, last hidden block / first, at init",
    "final/log10_act_ratio_final": "log10 activation norm, last hidden block / first, at the end",
    "final/diverged": "1 if the run diverged (non-finite loss), else 0",
    "final/train_acc": "final train accuracy (full training set)",
    "final/steps": "optimizer steps taken",
}
# The statistics written as depth profiles (depth_<when>/<metric>): weight_change is 0 everywhere at init, and
# the final probe takes no optimizer step (no update_ratio).
DEPTH_SCALARS = {
    "init": ("act_norm", "act_cos", "grad_norm", "weight_norm", "update_ratio"),
    "final": ("act_norm", "act_cos", "grad_norm", "weight_norm", "weight_change"),
}


def hparam_keys(run_dir: Path | None) -> tuple[list[str], list[str]]:
    """(keys the HParams tab shows, in order; those of them the sweep varies): the swept keys but seed, then
    ALWAYS_HPARAMS (seed last)."""
    from nrexp.runs import swept_overrides

    swept = swept_overrides(run_dir) if run_dir is not None else None
    swept = list(DEFAULT_SWEPT) if swept is None else swept
    return list(dict.fromkeys([*(k for k in swept if k != "seed"), *ALWAYS_HPARAMS])), swept


def hparams_of(config: Mapping, keys: Sequence[str], fallback: Mapping[str, str] | None = None) -> dict[str, object]:
    """{key: value} of a resolved config (plain dict), keys as typed on the command line (`norm` is norm.name);
    a key the config lacks takes its value as typed (`fallback`, e.g. +experiment=x), else "none"; values
    TensorBoard cannot show become strings."""
    from nrexp.runs import config_value

    values: dict[str, object] = {}
    for key in keys:
        value = config_value(config, key)
        if value is None and fallback and key in fallback:
            value = fallback[key]
        values[key] = value if isinstance(value, (bool, int, float, str)) else str(value).lower()
    return values


def hparam_metrics(summary: Mapping) -> dict[str, float]:
    """The HPARAM_METRICS of a run's summary (finite ones only: an unknown number stays an empty cell)."""
    from nrexp.runs import activation_ratio, log10_or_nan

    metrics = summary.get("metrics") or {}
    layers = summary.get("layers") or {}

    def number(v) -> float:
        return math.nan if v is None else float(v)

    def ratio(when: str) -> float:
        act = ((layers.get(when) or {}).get("act_norm")) or {}
        return log10_or_nan(activation_ratio({k: number(v) for k, v in act.items()}))

    values = {
        "final/test_acc": number(metrics.get("test/acc")),
        "final/train_acc": number(metrics.get("train/acc")),
        "final/gen_gap": number(metrics.get("train/acc")) - number(metrics.get("test/acc")),
        "final/log10_act_ratio_init": ratio("init"),
        "final/log10_act_ratio_final": ratio("final"),
        "final/diverged": 1.0 if summary.get("status") == "diverged" else 0.0,
        "final/steps": number(summary.get("steps")),
    }
    return {k: v for k, v in values.items() if math.isfinite(v)}


def custom_layout(layer_names: Sequence[str]) -> dict:
    """The custom-scalars layout of a run with these layers: first the depth charts (a metric against the
    layer index, init and end), then per metric one chart per picked layer (first, middle and last hidden
    block, the head) with every run overlaid, then training. TensorBoard merges the layouts of all runs:
    categories by title, charts when equal, so runs of one depth share every chart; the chart titles name
    the layer, so a sweep over depths gets one chart per layer picked."""
    names = list(layer_names)
    hidden = [n for n in names if n != "head"] or names
    picks = {hidden[0]: "first block", hidden[len(hidden) // 2]: "middle block", hidden[-1]: "last block"}
    picks.update({n: "head" for n in names if n == "head"})
    layout = {
        "depth profile (x = layer index: 0 = first block, last = head)": {
            f"{metric} vs depth, {'at init' if when == 'init' else 'at the end'}": [
                "Multiline",
                [f"^depth_{when}/{metric}$"],
            ]
            for metric in ("act_norm", "grad_norm")
            for when in ("init", "final")
        }
    }
    for metric in LAYER_METRICS:
        layout[f"{metric}: first, middle, last block and head (all runs)"] = {
            f"{metric}/{layer} ({role})": ["Multiline", [f"^{metric}/{layer}$"]] for layer, role in picks.items()
        }
    layout["training"] = {
        "loss": ["Multiline", ["^train/loss$", "^test/loss$"]],
        "accuracy": ["Multiline", ["^train/acc$", "^test/acc$"]],
    }
    return layout


def figure_title(run_name: str, when: str, step: int, width: int = 90) -> str:
    """A depth figure's title: the run's name (wrapped, at most two lines), what and when."""
    lines = textwrap.wrap(run_name.replace(",", ", "), width) or [""]
    if len(lines) > 2:
        lines = [lines[0], lines[1][: width - 1] + "…"]
    return "\n".join([*lines[:-1], f"{lines[-1]} — {when} (step {step})"])


class TensorBoardWriter:
    def __init__(self, run_dir: Path, layer_names: list[str], purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        use_fast_event_checksums()
        self.run_dir = Path(run_dir)
        self.layer_names = layer_names
        self.pending_figures: list[tuple] = []  # (step, when, stats, title, Future), written by flush()/close()
        self._layer_summaries: dict[tuple, object] = {}  # metrics -> the Summary layer_stats fills (see there)
        self.pending_histograms: list[tuple] = []  # (step, monitor.Histograms), written by write_histograms
        if purge_step is not None:
            wait_for_a_later_event_file_name(self.run_dir)
        self.tb = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)
        if purge_step is None:  # a resumed run already has its layout
            self.tb.add_custom_scalars(custom_layout(layer_names))
        elif purge_step < len(layer_names):
            # TensorBoard drops every step >= purge_step of the earlier attempt, the depth profile's steps too:
            # those layers of the profile at init are written again from the run's summary.json (the
            # interrupted attempt's)
            from nrexp.runs import read_summary

            init = (read_summary(self.run_dir).get("layers") or {}).get("init")
            if init:
                self.depth_scalars(init, "init", first=purge_step)

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
            self._add_scalars(
                step,
                {
                    f"{metric}/{layer}": value
                    for metric, per_layer in stats.items()
                    for layer, value in per_layer.items()
                },
            )
            return
        summary = self._layer_summaries.get(metrics)
        if summary is None:
            from tensorboard.compat.proto.summary_pb2 import Summary

            summary = Summary(
                value=[Summary.Value(tag=f"{metric}/{layer}") for metric in metrics for layer in self.layer_names]
            )
            self._layer_summaries[metrics] = summary
        for slot, value in zip(summary.value, (v for per_layer in stats.values() for v in per_layer.values())):
            slot.simple_value = float(value)
        self.tb._get_file_writer().add_summary(summary, step)  # serialized here, so the Summary can be reused

    def queue_histograms(self, step: int, histograms) -> None:
        """trainer.histograms: a logging step's histograms (monitor.Histograms, still on the device), written by
        the next write_histograms (when the step is written: its host copy then waits only for its own kernels)."""
        self.pending_histograms.append((step, histograms))

    def write_histograms(self) -> None:
        """Write the queued histograms as hist_act/<layer>, hist_grad/<layer>, hist_weight/<layer>."""
        pending, self.pending_histograms = self.pending_histograms, []
        for step, histograms in pending:
            for tag, histogram in histograms.to_host().items():
                self.tb.add_histogram_raw(tag, global_step=step, **histogram)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._add_scalars(step, values)

    def depth_plot(self, step: int, stats: Mapping[str, Mapping[str, float]], when: str) -> None:
        """Record a depth figure: drawn now by the helper process (nrexp/figures.py), written at the
        next flush() or close(). At init and at the end, also the depth profile as scalars (depth_scalars)."""
        if when in DEPTH_SCALARS:
            self.depth_scalars(stats, when)
        title = figure_title(self.run_dir.name, when, step)
        self.pending_figures.append((step, when, stats, title, figures.submit(self.layer_names, stats, title)))

    def depth_scalars(self, stats: Mapping[str, Mapping[str, float]], when: str, first: int = 0) -> None:
        """`depth_<when>/<metric>` at step i = the metric of the run's i-th layer (block00 ... head), one event per
        layer (from layer `first` on): TensorBoard's scalar chart then draws the metric against depth, one line
        per run."""
        metrics = [m for m in DEPTH_SCALARS[when] if m in stats]
        for index, layer in enumerate(self.layer_names[first:], start=first):
            self._add_scalars(index, {f"depth_{when}/{m}": stats[m][layer] for m in metrics if layer in stats[m]})

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

    def hparams(self, step: int, config: Mapping, metrics: Mapping[str, float], summary: Mapping | None = None) -> None:
        """List this run in TensorBoard's HParams tab: its swept keys and ALWAYS_HPARAMS (hparam_keys), and
        HPARAM_METRICS, also written as scalars at `step`.

        The numbers come from `summary` (the run's summary.json: status, steps, per-layer statistics), read
        from the run dir when not given (finish_run writes it just before); `config` and `metrics` stand in
        for a run without one. The swept keys are marked as differing, so the tab shows them first and
        checked (it checks the first five). SummaryWriter.add_hparams would write to a new timestamped
        sub-run, so each run would appear twice: the three hparams summaries go to this run's own events.
        """
        from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
        from torch.utils.tensorboard.summary import hparams

        from nrexp.config import INITS, MODELS, NORMS, OPTIMIZERS, Activation
        from nrexp.runs import job_override_values, read_summary

        if summary is None:
            summary = read_summary(self.run_dir) or {
                "status": "completed",
                "config": config,
                "metrics": metrics,
                "steps": step,
            }
        keys, swept = hparam_keys(self.run_dir)
        values = hparams_of(summary.get("config") or config, keys, job_override_values(self.run_dir))
        final = hparam_metrics(summary)
        # every choice a string knob has, so the tab's filters offer them all (one run only knows its own)
        choices = {
            "model": MODELS,
            "norm": NORMS,
            "optim": OPTIMIZERS,
            "init": INITS,
            "model.activation": [a.value for a in Activation],
        }
        domains = {k: list(v) for k, v in choices.items() if k in values and values[k] in v}
        experiment, start, end = hparams(
            values, {k: final.get(k, 0.0) for k in HPARAM_METRICS}, hparam_domain_discrete=domains
        )
        data = plugin_data_pb2.HParamsPluginData.FromString(experiment.value[0].metadata.plugin_data.content)
        for info in data.experiment.hparam_infos:
            info.differs = info.name in swept
        for info in data.experiment.metric_infos:
            info.description = HPARAM_METRICS.get(info.name.tag, "")
        experiment.value[0].metadata.plugin_data.content = data.SerializeToString()
        # The seeds of one setting form one session group: the HParams tab shows them as one row
        # (metrics aggregated over seeds) that expands to the runs, as `nrexp report` groups them.
        data = plugin_data_pb2.HParamsPluginData.FromString(start.value[0].metadata.plugin_data.content)
        data.session_start_info.group_name = ",".join(f"{k}={v}" for k, v in values.items() if k != "seed")
        start.value[0].metadata.plugin_data.content = data.SerializeToString()
        data = plugin_data_pb2.HParamsPluginData.FromString(end.value[0].metadata.plugin_data.content)
        data.session_end_info.status = {"completed": api_pb2.STATUS_SUCCESS, "interrupted": api_pb2.STATUS_RUNNING}.get(
            str(summary.get("status")), api_pb2.STATUS_FAILURE
        )
        end.value[0].metadata.plugin_data.content = data.SerializeToString()
        for summary_pb in (experiment, start, end):
            self.tb._get_file_writer().add_summary(summary_pb)
        self.scalars(step, final)

    def text(self, tag: str, text: str) -> None:
        self.tb.add_text(tag, text, 0)

    def flush(self) -> None:
        self.write_histograms()
        self._write_pending()
        self.tb.flush()

    def close(self) -> None:
        self.write_histograms()
        self._write_pending()
        self.tb.close()
