"""TensorBoardWriter's events, read back with TensorBoard's own reader."""
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nrexp.writers import TensorBoardWriter

LAYERS = ["block00", "block01", "head"]


def stats(offset: float, layers=LAYERS):
    return {metric: {layer: offset + 10 * m + i for i, layer in enumerate(layers)}
            for m, metric in enumerate(("act_norm", "grad_norm", "update_ratio"))}


def test_layer_stats_are_read_back_as_written_at_every_step(tmp_path):
    """layer_stats fills one reused Summary per set of metrics: each step's event must still carry that
    step's values (not the last ones written), a different set of metrics its own tags, and stats of
    some layers only (not the run's layer list) their own tags too."""
    writer = TensorBoardWriter(tmp_path, LAYERS)
    for step in range(3):
        writer.layer_stats(step, stats(0.5 * step))
    writer.layer_stats(3, {"weight_norm": {layer: 7.0 + i for i, layer in enumerate(LAYERS)}})
    writer.layer_stats(4, stats(100.0, layers=["head", "block00"]))  # other layers, other order
    writer.close()

    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0}).Reload()
    for m, metric in enumerate(("act_norm", "grad_norm", "update_ratio")):
        for i, layer in enumerate(LAYERS):
            got = [(e.step, e.value) for e in events.Scalars(f"{metric}/{layer}")]
            expected = [(step, 0.5 * step + 10 * m + i) for step in range(3)]
            if layer == "head":
                expected.append((4, 100.0 + 10 * m))
            if layer == "block00":
                expected.append((4, 100.0 + 10 * m + 1))
            assert got == [(s, pytest.approx(v)) for s, v in expected], (metric, layer)
    assert [(e.step, e.value) for e in events.Scalars("weight_norm/head")] == [(3, 9.0)]
