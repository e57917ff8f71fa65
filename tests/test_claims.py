"""Issue 27: the 95% intervals (nrexp/stats.py) against hand computations, the three outcomes on constructed
runs, the new norm_fixes_init claims, and the batch-size knobs (steps and lr by number)."""

from __future__ import annotations

import json
import math

import pytest

from conftest import compose
from nrexp import stats
from nrexp.stats import CONTRADICTED, INCONCLUSIVE, MISSING, REPRODUCED, Interval


def t_cdf_minus_half(q: float, df: int, n: int = 20000) -> float:
    """P(0 < T < q) for Student's t with df degrees of freedom, by Simpson's rule on its density."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    f = [c * (1 + (q * i / n) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
    return q / n / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


def test_t_quantiles_against_published_values_and_the_density():
    published = {
        1: 12.706,
        2: 4.303,
        3: 3.182,
        4: 2.776,
        5: 2.571,
        10: 2.228,
        20: 2.086,
        30: 2.042,
        40: 2.021,
        60: 2.000,
        120: 1.980,
    }
    for df, t in published.items():
        assert stats.t975(df) == pytest.approx(t, abs=6e-4), df
    for df in [*range(2, 31), 31, 45, 100]:  # the table and the expansion, independently: P(T < t) = 0.975
        assert t_cdf_minus_half(stats.t975(df), df) == pytest.approx(0.475, abs=2e-5), df
    assert stats.t975(2.9) == stats.t975(2)  # Welch's fractional df: rounded down (the wider interval)
    assert math.isnan(stats.t975(0.5)) and stats.t975(10**6) == pytest.approx(1.96, abs=1e-4)


def test_mean_interval_by_hand():
    iv = stats.mean_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.1824 * math.sqrt(5 / 3) / 2  # t(0.975, 3) * s / sqrt(n), s^2 = 5/3
    assert (iv.mean, iv.n) == (2.5, 4)
    assert (iv.low, iv.high) == (pytest.approx(2.5 - half), pytest.approx(2.5 + half))
    assert iv.half == pytest.approx(2.05423, abs=1e-5)
    one = stats.mean_interval([0.7, float("nan")])  # non-finite values left out; one value: no interval
    assert one.n == 1 and one.mean == 0.7 and math.isnan(one.low)
    assert stats.mean_interval([]).n == 0
    same = stats.mean_interval([0.3, 0.3, 0.3])  # deterministic: a zero-width interval
    assert (same.low, same.high) == (pytest.approx(0.3), pytest.approx(0.3))


def test_differences_paired_by_seed_else_welch():
    a, b = {0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.5, 1: 1.0, 2: 2.5}
    iv = stats.difference(a, b)  # per-seed differences 0.5, 1.0, 0.5
    half = 4.3027 * math.sqrt(1 / 12) / math.sqrt(3)
    assert iv.paired and iv.mean == pytest.approx(2 / 3)
    assert (iv.low, iv.high) == (pytest.approx(2 / 3 - half), pytest.approx(2 / 3 + half))
    w = stats.difference({0: 1.0, 1: 2.0, 2: 3.0}, {5: 4.0, 6: 6.0})  # no common seeds: Welch
    va, vb = 1 / 3, 2 / 2  # variance / n of each
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 1)  # 1.68 -> 1
    assert not w.paired and df == pytest.approx(1.6842, abs=1e-4)
    assert w.mean == -3.0 and w.half == pytest.approx(12.7062 * math.sqrt(va + vb))


@pytest.mark.parametrize(
    "iv,how,bounds,outcome",
    [
        (Interval(0.5, 0.1, 0.9, 3), "above", (0.0,), REPRODUCED),
        (Interval(-0.5, -0.9, -0.1, 3), "above", (0.0,), CONTRADICTED),
        (Interval(0.1, -0.2, 0.4, 3), "above", (0.0,), INCONCLUSIVE),
        (Interval(0.1, math.nan, math.nan, 1), "above", (0.0,), INCONCLUSIVE),  # one seed decides nothing
        (Interval(math.nan, math.nan, math.nan, 0), "above", (0.0,), MISSING),
        (Interval(-3.0, -3.5, -2.5, 3), "below", (-2.0,), REPRODUCED),
        (Interval(-1.0, -1.5, -0.5, 3), "below", (-2.0,), CONTRADICTED),
        (Interval(1.47, 1.45, 1.49, 3), "within", (1.423, 1.511), REPRODUCED),
        (Interval(1.47, 1.41, 1.53, 3), "within", (1.423, 1.511), INCONCLUSIVE),
        (Interval(1.30, 1.28, 1.32, 3), "within", (1.423, 1.511), CONTRADICTED),
    ],
)
def test_verdicts(iv, how, bounds, outcome):
    assert getattr(stats, how)(iv, *bounds) == outcome


def test_all_of():
    assert stats.all_of(REPRODUCED, REPRODUCED) == REPRODUCED
    assert stats.all_of(REPRODUCED, INCONCLUSIVE) == INCONCLUSIVE
    assert stats.all_of(INCONCLUSIVE, CONTRADICTED) == CONTRADICTED
    assert stats.all_of(CONTRADICTED, MISSING) == MISSING


# ---- verdicts of the claim checks on constructed runs (summary.json files of a sweep)


def write_run(root, name, config, metrics=None, layers=None, status="completed"):
    (root / name).mkdir(parents=True)
    (root / name / "summary.json").write_text(
        json.dumps({"status": status, "config": config, "metrics": metrics or {}, "layers": layers or {}})
    )


@pytest.mark.parametrize(
    "layer_losses,outcome",
    [
        ([0.9, 1.0, 1.1], REPRODUCED),  # well above the others
        ([0.1, 0.2, 0.15], CONTRADICTED),  # well below
        ([0.2, 1.5, 0.6], INCONCLUSIVE),
    ],
)  # the seeds disagree
def test_ln_vs_bn_outcomes_on_constructed_runs(tmp_path, layer_losses, outcome):
    from nrexp.claims import check

    losses = {"none": [0.3, 0.35, 0.32], "batch": [0.4, 0.42, 0.38], "layer": layer_losses}
    for norm, values in losses.items():
        for seed, loss in enumerate(values):
            write_run(
                tmp_path,
                f"{norm}{seed}",
                {"experiment": "ln_vs_bn_mlp", "norm": {"name": norm}, "seed": seed},
                {"train/loss": loss},
            )
    (result,) = check(tmp_path)
    assert result.outcome == outcome and result.reproduced == (outcome == REPRODUCED)
    assert "layer-batch: [" in result.interval and "(3 seeds)" in result.interval


def test_one_seed_is_inconclusive_and_a_diverged_run_counts_as_the_worst_loss(tmp_path):
    from nrexp.claims import check

    for norm, loss in {"none": 0.3, "batch": 0.4, "layer": None}.items():
        write_run(
            tmp_path,
            norm,
            {"experiment": "ln_vs_bn_mlp", "norm": {"name": norm}, "seed": 0},
            {"train/loss": loss},
            status="diverged" if loss is None else "completed",
        )
    (result,) = check(tmp_path)
    assert result.outcome == INCONCLUSIVE and "none (1 seed)" in result.interval
    assert "layer 2.3 (diverged runs)" in result.measured  # chance loss ln 10: above both finite ones


def bn_layers(rate: float, seed: int, depth: int = 50) -> dict:
    """At-init layer stats of a plain net whose grad_norm^2 grows by `rate` per layer towards the input."""
    blocks = [f"block{i:02d}" for i in range(depth)]
    grads = {b: math.sqrt(rate ** (depth - i)) * (1 + 0.01 * seed * (-1) ** i) for i, b in enumerate(blocks)}
    return {"init": {"act_norm": {b: 10.0 for b in blocks}, "grad_norm": grads}}


def norm_fixes_runs(tmp_path, rate: float, cos: float | None):
    for seed in range(3):
        for s in (1.0, 2.0, 3.0):
            base = {"experiment": "norm_fixes_init", "seed": seed, "init": {"scale": s}}
            layers = bn_layers(rate, seed)
            write_run(
                tmp_path,
                f"bn-mlp-{s}-{seed}",
                {**base, "norm": {"name": "batch"}, "model": {"name": "mlp"}},
                {"train/loss": 2.2, "test/acc": 0.2},
                layers,
            )
            ln = {"init": dict(layers["init"])}
            if cos is not None:
                ln["init"]["act_cos"] = {"block00": 0.48, "block49": cos + 0.001 * seed, "head": 0.9}
            write_run(
                tmp_path,
                f"ln-mlp-{s}-{seed}",
                {**base, "norm": {"name": "layer"}, "model": {"name": "mlp"}},
                {"train/loss": 2.3, "test/acc": 0.1},
                ln,
            )
            for norm in ("batch", "layer"):
                write_run(
                    tmp_path,
                    f"{norm}-res-{s}-{seed}",
                    {**base, "norm": {"name": norm}, "model": {"name": "resmlp"}},
                    {"train/loss": 0.2 + 0.01 * seed, "test/acc": 0.85 + 0.01 * seed},
                )


def test_norm_fixes_init_claims_on_constructed_runs(tmp_path):
    from nrexp.claims import check

    norm_fixes_runs(tmp_path / "a", rate=math.pi / (math.pi - 1), cos=0.995)
    results = {r.claim: r for r in check(tmp_path / "a")}
    assert all(r.outcome == REPRODUCED for r in results.values()), [r for r in results.values() if not r.reproduced]
    rate = results["batch: gradient explodes towards the input at pi/(pi-1) per layer at init"]
    assert "rate 1.467" in rate.measured and rate.interval.startswith("[1.46")
    assert {
        "layer: representations collapse with depth at init",
        "layer: with residual connections every s trains",
        "batch: the plain 50-layer net trains slower than the residual one",
    } <= set(results)
    assert not any("every s trains" in c and "residual" not in c for c in results)  # the plain-net claim is gone

    norm_fixes_runs(tmp_path / "b", rate=1.3, cos=None)  # runs from before the act_cos statistic
    results = {r.claim: r for r in check(tmp_path / "b")}
    assert results["batch: gradient explodes towards the input at pi/(pi-1) per layer at init"].outcome == CONTRADICTED
    missing = results["layer: representations collapse with depth at init"]
    assert missing.outcome == MISSING and "missing: statistic layers.init.act_cos" in missing.measured


def test_grad_growth_rate_fits_log_grad_norm_squared():
    from nrexp.claims import grad_growth_rate
    from nrexp.runs import Run

    run = Run(".", {"layers": bn_layers(1.5, seed=0)})
    assert grad_growth_rate(run) == pytest.approx(1.5, rel=1e-9)


# ---- trainer.max_examples and optim.lr_scaling


@pytest.mark.parametrize(
    "batch,scaling,lr",
    [
        (8, "none", 0.1),
        (8, "linear", 0.025),
        (128, "linear", 0.4),
        (8, "sqrt", 0.05),
        (128, "sqrt", 0.2),
        (32, "linear", 0.1),
    ],
)
def test_lr_scaling_by_number(batch, scaling, lr):
    import torch

    from nrexp.optim import build_optimizer, scaled_lr

    cfg = compose(
        [f"data.batch_size={batch}", f"optim.lr_scaling={scaling}", "optim.ref_batch_size=32", "optim.lr=0.1"]
    )
    assert scaled_lr(cfg.optim) == pytest.approx(lr)  # B read through the composed config
    opt = build_optimizer(torch.nn.Linear(3, 2), cfg.optim)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(lr)] * 2
    assert scaled_lr(cfg.optim, batch_size=32) == pytest.approx(0.1)  # B given: the reference batch, optim.lr


def test_max_examples_sets_the_steps_by_number():
    from omegaconf import OmegaConf

    from nrexp.train import make_schedule

    for batch, steps in ((2, 1500), (8, 375), (32, 94), (128, 24), (3000, 1)):  # ceil(3000 / B)
        t = OmegaConf.to_object(compose(["trainer.max_examples=3000"]).trainer)
        assert make_schedule(t, steps_per_epoch=1000 // batch or 1, batch_size=batch).total_steps == steps
    t = OmegaConf.to_object(compose(["trainer.epochs=2"]).trainer)
    assert make_schedule(t, steps_per_epoch=30, batch_size=32).total_steps == 60  # no budget: epochs as before


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["trainer.max_examples=0"], "trainer.max_examples=0 is invalid: must be >= 1 or null"),
        (["trainer.max_examples=100", "trainer.max_steps=5"], "both set the length of the run"),
        (["optim.lr_scaling=cubic"], "optim.lr_scaling='cubic' is invalid: one of none, linear, sqrt"),
        (["optim.ref_batch_size=0"], "optim.ref_batch_size=0 is invalid: must be >= 1"),
    ],
)
def test_batch_knobs_validate_in_one_line(overrides, words):
    from nrexp.config import ConfigError, validate

    with pytest.raises(ConfigError) as err:
        validate(compose(overrides))
    assert words in str(err.value) and "\n" not in str(err.value) and "Fix:" in str(err.value)


def test_a_run_sees_max_examples_and_logs_the_scaled_lr(tiny_run):
    from conftest import read_summary

    _, run = tiny_run(
        "trainer.max_steps=null",
        "trainer.max_examples=200",
        "data.batch_size=16",
        "optim.lr_scaling=linear",
        "optim.ref_batch_size=32",
        "optim.lr=0.1",
    )
    summary = read_summary(run)
    assert summary["steps"] == 13  # ceil(200 / 16)
    from nrexp.runs import Run

    assert Run(run).scalars("lr")[0][1] == pytest.approx(0.05)


def test_report_table_shows_mean_and_95_interval_of_seed_groups(tmp_path):
    from nrexp.report import group_settings, load_runs, rows_of, swept_keys, table_cells

    accs = {"batch": [0.80, 0.82, 0.87], "none": [0.75, 0.75, 0.75]}
    for norm, values in accs.items():
        for seed, acc in enumerate(values):
            write_run(
                tmp_path,
                f"{norm}{seed}",
                {"norm": {"name": norm}, "seed": seed},
                {"test/acc": acc, "train/acc": 1.0, "train/loss": 0.1},
            )
    write_run(
        tmp_path,
        "layer0",
        {"norm": {"name": "layer"}, "seed": 0},
        {"test/acc": 0.7, "train/acc": 1.0, "train/loss": 0.1},
    )
    runs = load_runs(tmp_path)
    keys = swept_keys(runs)
    settings = group_settings(runs, keys)
    half = 4.3027 * statistics_stdev(accs["batch"]) / math.sqrt(3)  # t(0.975, 2) s / sqrt(3)
    rows = {r["norm"]: r for r in rows_of(settings)}
    assert rows["batch"]["test_acc_ci95"] == pytest.approx(half) and rows["none"]["test_acc_ci95"] == 0.0
    assert math.isnan(rows["layer"]["test_acc_ci95"])  # one seed: no interval
    header, body = table_cells(settings, keys)
    cells = {row[0]: dict(zip(header, row)) for row in body}
    assert cells["batch"]["test_acc"] == f"{0.83:.4f} ± {half:.4f}"
    assert cells["layer"]["test_acc"] == "0.7000"


def statistics_stdev(values):
    import statistics

    return statistics.stdev(values)
