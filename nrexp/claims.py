"""Claim checks (`nrexp report <sweep dir> --check`): does a sweep reproduce what the lecture and the papers
say, and by which numbers, with which uncertainty?

`check(sweep_dir)` reads the runs under `sweep_dir` (nrexp/runs.py), groups them by the preset they ran
from (the `experiment` key each preset sets), and returns one ClaimResult per claim: measured, its 95%
interval across seeds, expected, and the outcome. A dir holding several sweeps (scripts/reproduce.py's) is
checked preset by preset.

Every claim is judged on an effect measured once per seed (a difference of two settings, paired by seed;
a log-ratio; a fitted rate), with a 95% t-interval over the seeds (nrexp/stats.py). Outcomes: reproduced
(the interval on the claimed side of the threshold), contradicted (on the other side), inconclusive (it
straddles the threshold, or there is one seed only), missing (the runs or the statistic are not there).

Thresholds come from the claim itself, never from a run that passed: "orders of magnitude" is a factor
of 100 (log10 > 2); "roughly flat" is within a factor of 10 over the whole depth; "trains" is test
accuracy > 0.5 (chance is 0.1) and "little progress" at least 0.2 below it. Where the older checks added
a noise margin (2 points of accuracy) to a difference, the interval now does that job: a difference is
claimed > 0, and the seeds decide whether it is.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

from nrexp.errors import ConfigError
from nrexp.runs import Run, read_runs
from nrexp.stats import (
    CONTRADICTED,
    INCONCLUSIVE,
    MISSING,
    REPRODUCED,
    Interval,
    above,
    all_of,
    below,
    difference,
    mean_interval,
    within,
)

CHANCE_LOSS = math.log(10)
TRAINS_ACC = 0.5
ACC_NOISE = 0.02  # an equivalence margin: two accuracies "agree" when their difference is within 2 points
ORDERS = 2.0  # log10 of "orders of magnitude"
BN_RELU_RATE = math.pi / (math.pi - 1)  # Yang et al. 2019: BatchNorm-ReLU gradient growth per layer at init
RATE_TOLERANCE = 0.03
LN_COLLAPSE_COS = 0.95
OUTCOMES = (REPRODUCED, CONTRADICTED, INCONCLUSIVE, MISSING)


@dataclass
class ClaimResult:
    experiment: str
    claim: str
    measured: str
    expected: str
    outcome: str  # one of OUTCOMES
    interval: str = ""  # the 95% interval(s) across seeds the outcome was read from

    @property
    def reproduced(self) -> bool:
        return self.outcome == REPRODUCED


def load_runs(sweep_dir) -> list[Run]:
    """The runs under `sweep_dir` that wrote a summary.json (the claims compare finished runs)."""
    return [run for run in read_runs(sweep_dir) if run.summary]


def by_experiment(runs: Sequence[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.config.get("experiment") or "(none)"].append(run)
    return dict(groups)


def check(sweep_dir) -> list[ClaimResult]:
    """Every claim of every preset found under `sweep_dir` (see the module docstring)."""
    runs = load_runs(sweep_dir)
    if not runs:
        raise ConfigError(
            f"no summary.json under {str(sweep_dir)!r}. Fix: pass the directory a sweep wrote "
            "(nrexp train -m +experiment=<name> prints it)"
        )
    results: list[ClaimResult] = []
    for name, group in sorted(by_experiment(runs).items()):
        fn = CHECKS.get(name)
        if fn is None:
            results.append(
                ClaimResult(
                    name,
                    "known preset",
                    f"{len(group)} runs with experiment={name}",
                    "one of " + ", ".join(CHECKS),
                    MISSING,
                )
            )
            continue
        results += fn(group)
    return results


# ------------------------------------------------------------------------------------------------
# helpers: numbers, selecting runs, per-seed values


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.2e}"
    return f"{x:.{digits}g}"


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _log10(x: float) -> float:
    return math.log10(x) if x > 0 and math.isfinite(x) else float("nan")


def _missing(experiment: str, claim: str, expected: str, what: str) -> ClaimResult:
    return ClaimResult(experiment, claim, f"missing: {what}", expected, MISSING)


def _same(value, wanted) -> bool:
    if isinstance(wanted, (int, float)) and not isinstance(wanted, bool):
        try:
            return value is not None and math.isclose(float(value), float(wanted))
        except (TypeError, ValueError):
            return False
    return value == wanted


def select(runs: Sequence[Run], **where) -> list[Run]:
    """The runs whose config has every `key=value` of `where` (dots in keys written as `__`)."""
    return [r for r in runs if all(_same(r.get(k.replace("__", ".")), v) for k, v in where.items())]


def seed_values(runs: Sequence[Run], value: Callable[[Run], float]) -> dict:
    """{seed: value(run)}; two runs of one seed (a rerun) keep the last read."""
    return {r.get("seed"): value(r) for r in runs}


def values_of(runs: Sequence[Run], key: str) -> list:
    """The distinct values of config `key` over `runs`, sorted."""
    return sorted({r.get(key) for r in runs if r.get(key) is not None})


def span(iv: Interval, fmt: Callable[[float], str] = _fmt) -> str:
    """The interval column: `[low, high]` (n seeds), or why there is none."""
    if iv.n == 0:
        return "no runs"
    if iv.n < 2 or not math.isfinite(iv.low):
        return f"none ({iv.n} seed{'s' if iv.n != 1 else ''})"
    return f"[{fmt(iv.low)}, {fmt(iv.high)}] ({iv.n} seeds{'' if iv.paired else ', unpaired'})"


def _blocks(values: dict[str, float]) -> list[str]:
    return sorted(k for k in values if k.startswith("block"))


def depth_ratio(run: Run, when: str = "init") -> float:
    """act_norm of the last hidden block over that of the first."""
    act = run.layers(when, "act_norm")
    blocks = _blocks(act)
    if len(blocks) < 2 or not act[blocks[0]]:
        return float("nan")
    return _num(act[blocks[-1]]) / _num(act[blocks[0]])


def median_grad(run: Run, when: str = "init") -> float:
    grads = [_num(v) for k, v in run.layers(when, "grad_norm").items() if k.startswith("block")]
    return statistics.median(grads) if grads else float("nan")


def grad_growth_rate(run: Run, when: str = "init") -> float:
    """exp(-slope) of the least-squares line through log(grad_norm^2) against the block index: the factor by
    which the squared weight-gradient norm grows per layer towards the input (NaN with < 3 blocks)."""
    grads = run.layers(when, "grad_norm")
    ys = [2 * math.log(grads[k]) for k in _blocks(grads) if grads[k] > 0 and math.isfinite(grads[k])]
    if len(ys) < 3:
        return float("nan")
    xs = range(len(ys))
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return math.exp(-slope)


def last_block(run: Run, metric: str, when: str = "init") -> float:
    values = run.layers(when, metric)
    blocks = _blocks(values)
    return _num(values[blocks[-1]]) if blocks else float("nan")


def test_acc(run: Run) -> float:
    """Final test accuracy; 0 for a run that did not complete (diverged: it learned nothing usable)."""
    return run.metric("test/acc") if run.status == "completed" else 0.0


def train_loss(runs: Sequence[Run]) -> Callable[[Run], float]:
    """A run's final train/loss, a diverged run's counted as the worst finite loss among `runs` or chance
    (ln 10), whichever is larger: it trained no better than any run that stayed finite. (A finite stand-in
    keeps the intervals finite; the measured text says "diverged".)"""
    finite = [r.metric("train/loss") for r in runs if r.status != "diverged" and math.isfinite(r.metric("train/loss"))]
    worst = max([CHANCE_LOSS, *finite])
    return lambda r: worst if r.status == "diverged" else r.metric("train/loss")


def _judge(iv: Interval, how: str, *bounds: float) -> str:
    return {"above": above, "below": below, "within": within}[how](iv, *bounds)


# ------------------------------------------------------------------------------------------------
# init_depth: the init scale over 50 plain layers


def check_init_depth(runs: Sequence[Run]) -> list[ClaimResult]:
    exp = "init_depth"
    out = []
    expectations = {
        1.0: ("decays by orders of magnitude over depth (s=1)", "below", (-ORDERS,), "log10(last/first) < -2"),
        2.0: ("stays roughly flat over depth (s=2)", "within", (-1.0, 1.0), "-1 <= log10(last/first) <= 1"),
        3.0: ("grows by orders of magnitude over depth (s=3)", "above", (ORDERS,), "log10(last/first) > 2"),
    }
    for s, (claim, how, bounds, expected) in expectations.items():
        claim = "act norm at init " + claim
        group = select(runs, init__scale=s)
        if not group:
            out.append(_missing(exp, claim, expected, f"runs with init.scale={s:g}"))
            continue
        iv = mean_interval(seed_values(group, lambda r: _log10(depth_ratio(r))).values())
        out.append(
            ClaimResult(
                exp,
                claim,
                f"log10(last/first) = {_fmt(iv.mean)} (last/first {_fmt(10**iv.mean)})",
                expected,
                _judge(iv, how, *bounds),
                span(iv),
            )
        )
    out.append(_init_depth_grads(exp, runs))
    out.append(_init_depth_training(exp, runs))
    claim, expected = "after training the weights stay close to init (s=2)", "median block weight_change < 0.2"
    group = [r for r in select(runs, init__scale=2.0) if r.layers("final", "weight_change")]
    if group:
        iv = mean_interval(
            seed_values(
                group,
                lambda r: statistics.median(
                    v for k, v in r.layers("final", "weight_change").items() if k.startswith("block")
                ),
            ).values()
        )
        out.append(ClaimResult(exp, claim, f"median {_fmt(iv.mean)}", expected, below(iv, 0.2), span(iv)))
    else:
        out.append(_missing(exp, claim, expected, "final layer stats of the s=2 runs"))
    return out


def _init_depth_grads(exp: str, runs: Sequence[Run]) -> ClaimResult:
    claim = "grad norms at init orders of magnitude apart (s=1 tiny, s=3 huge)"
    expected = "log10 g(2)/g(1) > 2 and log10 g(3)/g(2) > 2 (g: median block grad norm)"
    g = {s: seed_values(select(runs, init__scale=s), lambda r: _log10(median_grad(r))) for s in (1.0, 2.0, 3.0)}
    if not all(g.values()):
        return _missing(exp, claim, expected, "runs with init.scale=1,2,3")
    low, high = difference(g[2.0], g[1.0]), difference(g[3.0], g[2.0])
    measured = f"log10 g(2)/g(1) = {_fmt(low.mean)}, log10 g(3)/g(2) = {_fmt(high.mean)}"
    return ClaimResult(
        exp, claim, measured, expected, all_of(above(low, ORDERS), above(high, ORDERS)), f"{span(low)}; {span(high)}"
    )


def _init_depth_training(exp: str, runs: Sequence[Run]) -> ClaimResult:
    claim = "s=2 trains, s=1 makes little progress"
    expected = f"acc(s=2) > {TRAINS_ACC}, acc(s=2) - acc(s=1) > 0.2"
    a1, a2 = (seed_values(select(runs, init__scale=s), test_acc) for s in (1.0, 2.0))
    if not a1 or not a2:
        return _missing(exp, claim, expected, "runs with init.scale=1,2")
    trains, gap = mean_interval(a2.values()), difference(a2, a1)
    steps = select(runs, init__scale=2.0)[0].summary.get("steps")
    return ClaimResult(
        exp,
        claim,
        f"test acc s=2 {_fmt(trains.mean)}, s=2 - s=1 {_fmt(gap.mean)} after {steps} steps",
        expected,
        all_of(above(trains, TRAINS_ACC), above(gap, 0.2)),
        f"{span(trains)}; {span(gap)}",
    )


# ------------------------------------------------------------------------------------------------
# norm_fixes_init: what normalization does to the 50 x 100 net at init, and what residual connections add


def check_norm_fixes_init(runs: Sequence[Run]) -> list[ClaimResult]:
    exp = "norm_fixes_init"
    out = []
    plain = [r for r in runs if r.get("model.name") in (None, "mlp")]
    residual = select(runs, model__name="resmlp")
    for norm in ("layer", "batch"):
        group = select(plain, norm__name=norm)
        out += _flat_at_init(exp, norm, group)
        out.append(_ln_collapse(exp, group) if norm == "layer" else _bn_gradient_rate(exp, group))
    for norm in ("layer", "batch"):
        out.append(_residual_trains(exp, norm, select(residual, norm__name=norm)))
    for norm in ("layer", "batch"):
        out.append(_plain_slower(exp, norm, select(plain, norm__name=norm), select(residual, norm__name=norm), runs))
    return out


def _flat_at_init(exp: str, norm: str, group: Sequence[Run]) -> list[ClaimResult]:
    claim, expected = f"{norm}: act norm at init flat over depth for every s", "-1 <= log10(last/first) <= 1 for each s"
    claim2, expected2 = f"{norm}: act norm at init no longer depends on s", "max/min over s of last-block act norm < 2"
    if not group:
        return [
            _missing(exp, claim, expected, f"norm={norm} runs (model=mlp)"),
            _missing(exp, claim2, expected2, f"norm={norm} runs (model=mlp)"),
        ]
    scales = values_of(group, "init.scale")
    ivs = {
        s: mean_interval(seed_values(select(group, init__scale=s), lambda r: _log10(depth_ratio(r))).values())
        for s in scales
    }
    flat = ClaimResult(
        exp,
        claim,
        ", ".join(f"s={s:g}: last/first {_fmt(10**iv.mean)}" for s, iv in ivs.items()),
        expected,
        all_of(*(within(iv, -1, 1) for iv in ivs.values())),
        "log10: " + "; ".join(span(iv) for iv in ivs.values()),
    )
    per_seed: dict = defaultdict(dict)
    for r in group:
        per_seed[r.get("seed")][r.get("init.scale")] = last_block(r, "act_norm")
    spreads = [
        max(v.values()) / min(v.values()) for v in per_seed.values() if len(v) == len(scales) and min(v.values()) > 0
    ]
    iv = mean_interval(spreads)
    outcome = below(iv, 2.0) if len(scales) >= 2 else MISSING
    return [flat, ClaimResult(exp, claim2, f"max/min = {_fmt(iv.mean)} over s={scales}", expected2, outcome, span(iv))]


def _ln_collapse(exp: str, group: Sequence[Run]) -> ClaimResult:
    """LayerNorm on a plain ReLU MLP at init: the examples' representations align with depth (the mean
    pairwise cosine of the batch's activations, `act_cos`, rises towards 1). Measured: 0.48 at block00,
    0.995 at block49 (50 x 100, batch 64)."""
    claim = "layer: representations collapse with depth at init"
    expected = f"act_cos of the last block > {LN_COLLAPSE_COS}"
    with_cos = [r for r in group if r.layers("init", "act_cos")]
    if not group:
        return _missing(exp, claim, expected, "norm=layer runs (model=mlp)")
    if not with_cos:
        return _missing(
            exp, claim, expected, "statistic layers.init.act_cos in summary.json (runs from before the act_cos monitor)"
        )
    per_seed: dict = defaultdict(list)
    for r in with_cos:
        per_seed[r.get("seed")].append(last_block(r, "act_cos"))
    iv = mean_interval(statistics.fmean(v) for v in per_seed.values())
    first = statistics.fmean(_num(r.layers("init", "act_cos").get("block00")) for r in with_cos)
    return ClaimResult(
        exp,
        claim,
        f"act_cos block00 {_fmt(first)}, last block {_fmt(iv.mean, 4)}",
        expected,
        above(iv, LN_COLLAPSE_COS),
        span(iv, lambda x: _fmt(x, 4)),
    )


def _bn_gradient_rate(exp: str, group: Sequence[Run]) -> ClaimResult:
    """BatchNorm on a plain ReLU MLP at init: ||dL/dW||^2 grows towards the input by pi/(pi - 1) per layer
    (Yang et al. 2019, the infinite-width, infinite-batch limit). Each run's rate is exp(-slope) of a
    least-squares fit of log grad_norm^2 against the block index; a seed's runs (one per s: BatchNorm makes
    them nearly the same net) are averaged, then the interval is over seeds."""
    claim = "batch: gradient explodes towards the input at pi/(pi-1) per layer at init"
    lo, hi = BN_RELU_RATE * (1 - RATE_TOLERANCE), BN_RELU_RATE * (1 + RATE_TOLERANCE)
    expected = f"{_fmt(lo, 4)} <= rate <= {_fmt(hi, 4)} (pi/(pi-1) = {BN_RELU_RATE:.4f} +- 3%)"
    if not group:
        return _missing(exp, claim, expected, "norm=batch runs (model=mlp)")
    per_seed: dict = defaultdict(list)
    for r in group:
        per_seed[r.get("seed")].append(grad_growth_rate(r))
    iv = mean_interval(statistics.fmean(v) for v in per_seed.values())
    return ClaimResult(
        exp,
        claim,
        f"rate {_fmt(iv.mean, 4)} per layer ({_fmt(100 * (iv.mean / BN_RELU_RATE - 1))} % from pi/(pi-1))",
        expected,
        within(iv, lo, hi),
        span(iv, lambda x: _fmt(x, 4)),
    )


def _residual_trains(exp: str, norm: str, group: Sequence[Run]) -> ClaimResult:
    claim, expected = f"{norm}: with residual connections every s trains", f"test acc > {TRAINS_ACC} for each s"
    if not group:
        return _missing(exp, claim, expected, f"model=resmlp norm={norm} runs")
    ivs = {
        s: mean_interval(seed_values(select(group, init__scale=s), test_acc).values())
        for s in values_of(group, "init.scale")
    }
    return ClaimResult(
        exp,
        claim,
        ", ".join(f"s={s:g}: {_fmt(iv.mean)}" for s, iv in ivs.items()),
        expected,
        all_of(*(above(iv, TRAINS_ACC) for iv in ivs.values())),
        "; ".join(map(span, ivs.values())),
    )


def _plain_slower(exp: str, norm: str, plain: Sequence[Run], residual: Sequence[Run], runs) -> ClaimResult:
    claim = f"{norm}: the plain 50-layer net trains slower than the residual one"
    expected = "train loss(plain) - train loss(residual) > 0 for each s (same steps)"
    if not plain or not residual:
        return _missing(exp, claim, expected, f"model=mlp and model=resmlp runs with norm={norm}")
    loss = train_loss(runs)
    ivs = {
        s: difference(
            seed_values(select(plain, init__scale=s), loss), seed_values(select(residual, init__scale=s), loss)
        )
        for s in values_of(plain, "init.scale")
        if select(residual, init__scale=s)
    }
    if not ivs:
        return _missing(exp, claim, expected, "plain and residual runs at a common init.scale")
    return ClaimResult(
        exp,
        claim,
        ", ".join(f"s={s:g}: {_fmt(iv.mean)}" for s, iv in ivs.items()),
        expected,
        all_of(*(above(iv, 0.0) for iv in ivs.values())),
        "; ".join(map(span, ivs.values())),
    )


# ------------------------------------------------------------------------------------------------
# bn_paper_mnist, ln_vs_bn_mlp, cnn_norms: settings compared seed by seed


def percentile_drift(run: Run) -> tuple[float, dict[str, list[tuple[int, float]]]]:
    """Largest move of the p15/p50/p85 curves (mean of the last 3 logged values minus the mean of the first 3),
    in units of the initial p15-p85 spread; and the curves."""
    curves = {}
    for tag in (t for t in run.tags() if t.startswith("preact/")):
        curves[tag.rsplit("/", 1)[1]] = run.scalars(tag)
    if not all(p in curves and len(curves[p]) >= 6 for p in ("p15", "p50", "p85")):
        return float("nan"), curves
    first = {p: statistics.mean(v for _, v in curves[p][:3]) for p in curves}
    last = {p: statistics.mean(v for _, v in curves[p][-3:]) for p in curves}
    spread = first["p85"] - first["p15"]
    return max(abs(last[p] - first[p]) for p in ("p15", "p50", "p85")) / spread, curves


def first_eval_acc(run: Run) -> float:
    points = run.scalars("test/acc")
    return points[0][1] if points else float("nan")


def check_bn_paper_mnist(runs: Sequence[Run]) -> list[ClaimResult]:
    exp = "bn_paper_mnist"
    bn, plain = select(runs, norm__name="batch"), select(runs, norm__name="none")
    claims = [
        ("BN reaches higher test accuracy sooner", "acc(BN) - acc(no BN) > 0 at the first evaluation"),
        (
            "BN's test accuracy still higher at the end of the budget (paper: after 50k steps)",
            "acc(BN) - acc(no BN) > 0 at the end",
        ),
        (
            "sigmoid-input percentiles drift without BN, stable with BN",
            "drift(no BN) > 0.5 and drift(BN)/drift(no BN) < 0.5",
        ),
    ]
    if not bn or not plain:
        return [_missing(exp, c, e, "norm=none and norm=batch runs") for c, e in claims]
    out = []
    first = difference(seed_values(bn, first_eval_acc), seed_values(plain, first_eval_acc))
    step = (bn[0].scalars("test/acc") or [(None, None)])[0][0]
    out.append(
        ClaimResult(
            exp,
            claims[0][0],
            f"step {step}: BN - no BN = {_fmt(first.mean)}",
            claims[0][1],
            above(first, 0.0),
            span(first),
        )
    )
    end = difference(seed_values(bn, test_acc), seed_values(plain, test_acc))
    out.append(
        ClaimResult(
            exp,
            claims[1][0],
            f"step {bn[0].summary.get('steps')}: BN - no BN = {_fmt(end.mean)}",
            claims[1][1],
            above(end, 0.0),
            span(end),
        )
    )
    d_bn, d_plain = (seed_values(g, lambda r: percentile_drift(r)[0]) for g in (bn, plain))
    drift = mean_interval(d_plain.values())
    ratio = mean_interval(d_bn[s] / d_plain[s] for s in d_bn if s in d_plain and d_plain[s] > 0)
    out.append(
        ClaimResult(
            exp,
            claims[2][0],
            f"drift in initial p15-p85 spreads: no BN {_fmt(drift.mean)}, BN/no BN {_fmt(ratio.mean)}",
            claims[2][1],
            all_of(above(drift, 0.5), below(ratio, 0.5)),
            f"{span(drift)}; {span(ratio)}",
        )
    )
    return out


def _loss_claim(
    exp: str, claim: str, expected: str, runs: Sequence[Run], pairs: Sequence[tuple[str, str]], norms: Sequence[str]
) -> ClaimResult:
    """The claim loss(a) - loss(b) > 0 for every (a, b) of `pairs` (norm names), paired by seed."""
    if not all(select(runs, norm__name=n) for n in norms):
        return _missing(exp, claim, expected, f"norm={','.join(norms)} runs")
    loss = train_loss(runs)
    per = {n: seed_values(select(runs, norm__name=n), loss) for n in norms}
    diverged = {n for n in norms if any(r.status == "diverged" for r in select(runs, norm__name=n))}
    ivs = [difference(per[a], per[b]) for a, b in pairs]
    means = ", ".join(
        f"{n} {_fmt(statistics.fmean(per[n].values()))}{' (diverged runs)' if n in diverged else ''}" for n in norms
    )
    seeds = max(len(v) for v in per.values())
    measured = f"train loss: {means}" + (f" (means of {seeds} seeds)" if seeds > 1 else "")
    return ClaimResult(
        exp,
        claim,
        measured,
        expected,
        all_of(*(above(iv, 0.0) for iv in ivs)),
        "; ".join(f"{a}-{b}: {span(iv)}" for (a, b), iv in zip(pairs, ivs)),
    )


def check_ln_vs_bn_mlp(runs: Sequence[Run]) -> list[ClaimResult]:
    return [
        _loss_claim(
            "ln_vs_bn_mlp",
            "LayerNorm reaches a higher training loss than BN and no norm (same budget)",
            "loss(layer) - loss(batch) > 0 and loss(layer) - loss(none) > 0",
            runs,
            [("layer", "batch"), ("layer", "none")],
            ("layer", "batch", "none"),
        )
    ]


def check_cnn_norms(runs: Sequence[Run]) -> list[ClaimResult]:
    """The convnet preset's expectation (configs/experiment/cnn_norms.yaml, from the literature): BatchNorm
    trains fastest of the four, and every norm trains faster than none (same budget)."""
    exp, norms = "cnn_norms", ("none", "batch", "layer", "group")
    return [
        _loss_claim(
            exp,
            "BatchNorm reaches the lowest training loss of the four norms (same budget)",
            "loss(n) - loss(batch) > 0 for n = layer, group, none",
            runs,
            [(n, "batch") for n in norms if n != "batch"],
            norms,
        ),
        _loss_claim(
            exp,
            "every norm trains faster than none",
            "loss(none) - loss(n) > 0 for n = batch, layer, group",
            runs,
            [("none", n) for n in norms if n != "none"],
            norms,
        ),
    ]


# ------------------------------------------------------------------------------------------------
# regularization


def weight_norm_total(run: Run) -> float:
    return math.sqrt(sum(_num(v) ** 2 for v in run.layers("final", "weight_norm").values()))


def check_regularization(runs: Sequence[Run]) -> list[ClaimResult]:
    exp = "regularization"

    def at(lam: float, p: float) -> list[Run]:
        return select(runs, optim__weight_decay=lam, dropout__p=p)

    def gap(r: Run) -> float:
        return r.metric("train/acc") - r.metric("test/acc")

    def train_acc(r: Run) -> float:
        return r.metric("train/acc")

    out = []
    claim = "regularization shrinks the generalization gap"
    expected = "gap(0,0) - gap(best regularized setting with mean train acc >= 0.9) > 0"
    base = at(0.0, 0.0)
    if not base:
        return [_missing(exp, claim, expected, "the unregularized runs (weight_decay=0, p=0)")]
    settings = sorted({(float(r.get("optim.weight_decay")), float(r.get("dropout.p"))) for r in runs} - {(0.0, 0.0)})
    fitted = [k for k in settings if statistics.fmean(train_acc(r) for r in at(*k)) >= 0.9]
    if fitted:  # the smallest mean gap: a selection among settings, said in the claim
        k = min(fitted, key=lambda k: statistics.fmean(gap(r) for r in at(*k)))
        iv = difference(seed_values(base, gap), seed_values(at(*k), gap))
        measured = (
            f"gap(0,0) {_fmt(statistics.fmean(gap(r) for r in base))}; smallest at lambda={k[0]:g}, p={k[1]:g}: "
            f"shrinks by {_fmt(iv.mean)}"
        )
        out.append(ClaimResult(exp, claim, measured, expected, above(iv, 0.0), span(iv)))
    else:
        out.append(_missing(exp, claim, expected, "a regularized setting that fits the training set"))
    claim, expected = "weight norms shrink as lambda grows (p=0)", "||W||(lambda_i) - ||W||(lambda_i+1) > 0 for each i"
    lams = sorted({k[0] for k in settings if k[1] == 0.0} | {0.0})
    norms = {lam: seed_values(at(lam, 0.0), weight_norm_total) for lam in lams}
    ivs = [difference(norms[a], norms[b]) for a, b in pairwise(lams)]
    out.append(
        ClaimResult(
            exp,
            claim,
            ", ".join(f"lambda={lam:g}: {_fmt(statistics.fmean(norms[lam].values()))}" for lam in lams),
            expected,
            all_of(*(above(iv, 0.0) for iv in ivs)) if ivs else MISSING,
            "; ".join(map(span, ivs)),
        )
    )
    base_acc = seed_values(base, train_acc)
    for knob, tops in (
        ("lambda", [k for k in settings if k[1] == 0.0 and k[0] > 0]),
        ("p", [k for k in settings if k[0] == 0.0 and k[1] > 0]),
    ):
        claim, expected = f"very large {knob} underfits", "train acc(0,0) - train acc(largest value) > 0.05"
        if not tops:
            out.append(_missing(exp, claim, expected, f"runs with {knob} > 0"))
            continue
        top = max(tops)
        iv = difference(base_acc, seed_values(at(*top), train_acc))
        measured = (
            f"train acc {_fmt(statistics.fmean(base_acc.values()))} unregularized, {_fmt(iv.mean)} lower at "
            f"lambda={top[0]:g}, p={top[1]:g}"
        )
        out.append(ClaimResult(exp, claim, measured, expected, above(iv, 0.05), span(iv)))
    return out


# ------------------------------------------------------------------------------------------------
# bn_batch_size, bn_shift: BatchNorm runs evaluated again from their checkpoints


def _evaluable(run: Run) -> bool:
    """A run with a trained net to evaluate: a checkpoint, and no divergence (a diverged run's checkpoint,
    when it wrote one, is from before the blow-up: not its result). The tables leave the others out."""
    return (run.dir / "checkpoint.pt").is_file() and run.status != "diverged"


def bn_eval(run: Run, shifts: Sequence[str], bn_stats: str, batch_size: int | None, cache: dict) -> float:
    from nrexp.evaluate import evaluate_run, load_run

    if run.status == "diverged":  # no trained net to evaluate: n/a, as its test accuracy
        return float("nan")
    if run.dir not in cache:
        cache[run.dir] = load_run(run.dir)
    return evaluate_run(run.dir, shifts, bn_stats, batch_size, loaded=cache[run.dir]).acc


def _means(seeds: Mapping) -> float:
    values = [v for v in seeds.values() if math.isfinite(v)]
    return statistics.fmean(values) if values else float("nan")


def batch_size_values(runs: Sequence[Run]) -> dict[str, dict[int, dict[str, dict]]]:
    """{norm: {batch size: {"running": {seed: test acc}, "test": {seed: acc with test-batch statistics} (BN)}}}."""
    table: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    cache: dict = {}
    for r in runs:
        b, norm, seed = int(r.get("data.batch_size")), r.get("norm.name"), r.get("seed")
        table[norm][b]["running"][seed] = test_acc(r)
        if norm == "batch" and _evaluable(r):
            table[norm][b]["test"][seed] = bn_eval(r, [], "test", max(b, 2), cache)
    return {n: {b: dict(row) for b, row in rows.items()} for n, rows in table.items()}


def batch_size_table(runs: Sequence[Run], values=None) -> dict[str, dict[int, dict[str, float]]]:
    """{norm: {batch size: {"running": mean test acc over seeds, "test": ... (BN only)}}}."""
    values = batch_size_values(runs) if values is None else values
    return {
        n: {b: {k: _means(v) for k, v in row.items() if v} for b, row in rows.items()} for n, rows in values.items()
    }


def check_bn_batch_size(runs: Sequence[Run], values=None) -> list[ClaimResult]:
    exp = "bn_batch_size"
    values = batch_size_values(runs) if values is None else values
    out = []
    claim = "BN degrades at small batches, LN does not"
    expected = "[err(Bmin) - err(Bref)] of BN - that of LN > 0 (Bref: smallest B >= 32)"
    claim2 = "BN at B>=32: running and test-batch statistics agree"
    expected2 = f"-{ACC_NOISE} <= acc(running) - acc(test batch of B) <= {ACC_NOISE}"
    bn, ln = values.get("batch", {}), values.get("layer", {})
    common = sorted(set(bn) & set(ln))
    if len(common) < 2:
        return [
            _missing(exp, claim, expected, "norm=batch and norm=layer runs at >= 2 common batch sizes"),
            _missing(exp, claim2, expected2, "norm=batch runs"),
        ]
    small, ref = common[0], min((b for b in common if b >= 32), default=common[-1])

    def degradation(rows) -> dict:
        return {
            s: rows[ref]["running"][s] - rows[small]["running"][s]
            for s in rows[small]["running"]
            if s in rows[ref]["running"]
        }

    d_bn, d_ln = degradation(bn), degradation(ln)
    iv = difference(d_bn, d_ln)
    measured = (
        f"B={small} vs B={ref}: BN error +{_fmt(_means(d_bn))}, LN error +{_fmt(_means(d_ln))}, "
        f"difference {_fmt(iv.mean)}"
    )
    out.append(ClaimResult(exp, claim, measured, expected, above(iv, 0.0), span(iv)))
    big = [b for b in sorted(bn) if b >= 32 and bn[b].get("test")]
    if big:
        ivs = {b: difference(bn[b]["running"], bn[b]["test"]) for b in big}
        out.append(
            ClaimResult(
                exp,
                claim2,
                ", ".join(f"B={b}: {_fmt(iv.mean)}" for b, iv in ivs.items()),
                expected2,
                all_of(*(within(iv, -ACC_NOISE, ACC_NOISE) for iv in ivs.values())),
                "; ".join(map(span, ivs.values())),
            )
        )
    else:
        out.append(_missing(exp, claim2, expected2, "BN runs with B >= 32 and a checkpoint"))
    return out


SHIFT_SET = {"clean": [], "noise=0.5": ["noise=0.5"], "contrast=0.3": ["contrast=0.3"], "translate=2": ["translate=2"]}


def shift_values(runs: Sequence[Run]) -> dict[str, dict[str, dict]]:
    """{shift: {"running": {seed: acc}, "test": {seed: acc}}} of the BN runs with a checkpoint."""
    cache: dict = {}
    table: dict = {s: {"running": {}, "test": {}} for s in SHIFT_SET}
    for r in runs:
        if r.get("norm.name") != "batch" or not _evaluable(r):
            continue
        for name, shifts in SHIFT_SET.items():
            for stats in ("running", "test"):
                table[name][stats][r.get("seed")] = bn_eval(r, shifts, stats, None, cache)
    return table


def shift_table(runs: Sequence[Run], values=None) -> dict[str, dict[str, float]]:
    """{shift: {"running": mean test acc over seeds, "test": ...}} for the BN runs with a checkpoint."""
    values = shift_values(runs) if values is None else values
    return {s: {k: _means(v) for k, v in d.items()} for s, d in values.items()}


def check_bn_shift(runs: Sequence[Run], values=None) -> list[ClaimResult]:
    exp = "bn_shift"
    values = shift_values(runs) if values is None else values
    out = []
    for shift, claim, expected, judge in (
        (
            "clean",
            "clean test data: running and test-batch statistics agree",
            f"-{ACC_NOISE} <= test - running <= {ACC_NOISE}",
            lambda iv: within(iv, -ACC_NOISE, ACC_NOISE),
        ),
        (
            "noise=0.5",
            "noise: re-estimated statistics recover accuracy",
            "test - running > 0",
            lambda iv: above(iv, 0.0),
        ),
        (
            "contrast=0.3",
            "contrast: re-estimated statistics recover accuracy",
            "test - running > 0",
            lambda iv: above(iv, 0.0),
        ),
        (
            "translate=2",
            "translation: re-estimated statistics do not hurt",
            f"test - running > -{ACC_NOISE}",
            lambda iv: above(iv, -ACC_NOISE),
        ),
    ):
        row = values[shift]
        iv = difference(row["test"], row["running"])
        measured = (
            f"acc running {_fmt(_means(row['running']))}, test stats {_fmt(_means(row['test']))}, "
            f"difference {_fmt(iv.mean)}"
        )
        out.append(ClaimResult(exp, claim, measured, expected, judge(iv), span(iv)))
    return out


CHECKS: dict[str, Callable[[Sequence[Run]], list[ClaimResult]]] = {
    "init_depth": check_init_depth,
    "norm_fixes_init": check_norm_fixes_init,
    "bn_paper_mnist": check_bn_paper_mnist,
    "ln_vs_bn_mlp": check_ln_vs_bn_mlp,
    "regularization": check_regularization,
    "bn_batch_size": check_bn_batch_size,
    "bn_shift": check_bn_shift,
    "cnn_norms": check_cnn_norms,
}

STYLE = {REPRODUCED: "green", CONTRADICTED: "red", INCONCLUSIVE: "yellow", MISSING: "magenta"}


def print_checks(results: Sequence[ClaimResult], console=None) -> None:
    """The claims as a rich table: experiment, claim, measured, 95% interval, expected, outcome."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="Claim checks (95% intervals across seeds)", show_lines=False)
    for col in ("experiment", "claim", "measured (mean over seeds)", "95% interval", "expected", "outcome"):
        table.add_column(col, overflow="fold")
    for r in results:
        table.add_row(
            *(escape(c) for c in (r.experiment, r.claim, r.measured, r.interval, r.expected)),
            f"[{STYLE.get(r.outcome, 'white')}]{r.outcome}[/]",
        )
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)  # a log file or pipe: don't squeeze the numbers into 80 columns
    console.print(table)
    counts = {o: sum(r.outcome == o for r in results) for o in OUTCOMES}
    console.print(", ".join(f"{n} {o}" for o, n in counts.items() if n))


def markdown_table(results: Sequence[ClaimResult]) -> str:
    lines = [
        "| experiment | claim | measured (mean over seeds) | 95% interval | expected | outcome |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        outcome = r.outcome if r.outcome == REPRODUCED else f"**{r.outcome}**"
        cells = [r.experiment, r.claim, r.measured, r.interval, r.expected, outcome]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
