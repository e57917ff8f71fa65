"""Property: any override set drawn from the schema either runs or is rejected with one clean line."""

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_faults import run_main

floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
KNOBS = {  # valid values and invalid ones, for every kind of knob
    "norm": st.sampled_from(["none", "layer", "batch", "bogus"]),
    "norm.eps": st.one_of(st.floats(1e-8, 1e-2), st.sampled_from(["0", "-1", "abc"])),
    "norm.momentum": st.floats(-0.5, 1.5),
    "norm.affine": st.sampled_from(["true", "false", "maybe"]),
    "norm.position": st.sampled_from(["before_act", "after_act", "middle"]),
    "dropout.p": st.one_of(st.floats(-0.5, 1.5), st.just("nan")),
    "dropout.input_p": st.floats(-0.2, 1.2),
    "optim": st.sampled_from(["sgd", "adam", "adamw", "lbfgs"]),
    "optim.lr": st.one_of(st.floats(1e-4, 1.0), st.sampled_from(["0", "-1", "nan", "inf", "fast"])),
    "optim.momentum": st.floats(-0.5, 1.5),
    "optim.weight_decay": st.one_of(st.floats(0, 0.1), st.sampled_from(["-1", "nan", "[1,2]"])),
    "optim.decay_norm_and_bias": st.sampled_from(["true", "false"]),
    "optim.lr_scaling": st.sampled_from(["none", "linear", "sqrt", "cubic"]),
    "optim.ref_batch_size": st.integers(-1, 300),
    "init": st.sampled_from(["kaiming", "xavier", "normal", "uniform", "orthogonal", "default", "he"]),
    "init.scale": st.one_of(st.floats(-1, 4), st.just("inf")),
    "data.batch_size": st.integers(-2, 4100),
    "data.train_size": st.one_of(st.integers(-5, 4100), st.just("null")),
    "model.depth": st.integers(-1, 4),
    "model.width": st.integers(-1, 48),
    "model.activation": st.sampled_from(["relu", "tanh", "sigmoid", "gelu", "swish"]),
    "trainer.log_every": st.integers(-1, 3),
    "trainer.max_examples": st.one_of(st.integers(-1, 300), st.just("null")),  # beside max_steps=2: one line
    "trainer.eval_every": st.integers(-1, 3),
    "trainer.checkpoint_every": st.integers(-1, 3),
    "seed": st.integers(0, 2**31 - 1),
    "bogus.key": st.just("1"),
    "+extra": st.just("1"),
}

override_sets = st.lists(st.sampled_from(sorted(KNOBS)), unique=True, max_size=5).flatmap(
    lambda keys: st.tuples(*[KNOBS[k].map(lambda v, k=k: f"{k}={v}") for k in keys])
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=override_sets)
def test_every_override_set_runs_or_fails_cleanly(capsys, overrides):
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        tmp = Path(tmp)
        code = run_main(tmp, mp, ["train", "data.source=bundled", "trainer.max_steps=2", *overrides])
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err, (overrides, err)
        assert code in (0, 2), (overrides, code, err)
        summaries = list(tmp.rglob("summary.json"))
        if code == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("nrexp: error: "), (overrides, err)
            assert not summaries
        else:
            assert len(summaries) == 1, overrides
            summary = json.loads(summaries[0].read_text())
            assert summary["status"] in ("completed", "diverged")
            if summary["status"] == "completed":
                assert all(math.isfinite(v) for v in summary["metrics"].values())
