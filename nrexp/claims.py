"""Claim checks (`nrexp report <sweep dir> --check`): does a sweep reproduce what the lecture and the papers
say, and by which numbers?

`check(sweep_dir)` reads the runs under `sweep_dir` (nrexp/runs.py), groups them by the preset they ran
from (the `experiment` key each preset sets), and returns one ClaimResult per claim: measured, expected,
reproduced. A dir holding several sweeps (scripts/reproduce.py's) is checked preset by preset; a claim
whose runs are missing is reported as not reproduced, with the reason as its measured value.

Thresholds come from the claim itself, never from a run that passed: "orders of magnitude" is a factor
of 100; "roughly flat" is within a factor of 10 over the whole depth; "trains" is test accuracy >= 0.5
(chance is 0.1) and "little progress" at least 0.2 below it; accuracy differences count above 2 points
(the binomial standard error of one accuracy on 1,000 test digits is about 1.3 points at 80 %).
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from nrexp.errors import ConfigError
from nrexp.runs import Run, read_runs

CHANCE_LOSS = math.log(10)
TRAINS_ACC = 0.5
ACC_NOISE = 0.02
ORDERS = 100.0


@dataclass
class ClaimResult:
    experiment: str
    claim: str
    measured: str
    expected: str
    reproduced: bool


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
        raise ConfigError(f"no summary.json under {str(sweep_dir)!r}. Fix: pass the directory a sweep wrote "
                          "(nrexp train -m +experiment=<name> prints it)")
    results: list[ClaimResult] = []
    for name, group in sorted(by_experiment(runs).items()):
        fn = CHECKS.get(name)
        if fn is None:
            results.append(ClaimResult(name, "known preset", f"{len(group)} runs with experiment={name}",
                                       "one of " + ", ".join(CHECKS), False))
            continue
        results += fn(group) if name in AVERAGES_SEEDS else per_seed(fn, group)
    return results


def per_seed(fn: Callable[[Sequence[Run]], list[ClaimResult]], runs: Sequence[Run]) -> list[ClaimResult]:
    """fn's claims checked in each seed's runs on their own, when the sweep has several seeds (`-m
    +experiment=init_depth seed=0,1,2`): the checks index the runs by setting, where a second seed's run
    would silently replace the first. Each claim is then reported once per seed, "seed N: ..."."""
    seeds: dict = defaultdict(list)
    for run in runs:
        seeds[run.get("seed")].append(run)
    if len(seeds) < 2:
        return fn(runs)
    out = []
    for seed, group in sorted(seeds.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        out += [ClaimResult(r.experiment, f"seed {seed}: {r.claim}", r.measured, r.expected, r.reproduced)
                for r in fn(group)]
    return out


# ------------------------------------------------------------------------------------------------
# helpers


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.2e}"
    return f"{x:.{digits}g}"


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _missing(experiment: str, claim: str, expected: str, what: str) -> ClaimResult:
    return ClaimResult(experiment, claim, f"missing: {what}", expected, False)


def _key(run: Run, *keys: str) -> tuple:
    return tuple(run.get(k) for k in keys)


def _index(runs: Sequence[Run], *keys: str) -> dict[tuple, Run]:
    out = {}
    for run in runs:
        out[_key(run, *keys)] = run
    return out


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


def test_acc(run: Run) -> float:
    return run.metric("test/acc") if run.status == "completed" else 0.0


# ------------------------------------------------------------------------------------------------
# the presets


def check_init_depth(runs: Sequence[Run]) -> list[ClaimResult]:
    exp = "init_depth"
    by_s = {float(k[0]): r for k, r in _index(runs, "init.scale").items() if k[0] is not None}
    out = []
    expectations = {
        1.0: ("decays by orders of magnitude over depth (s=1)", lambda r: r < 1 / ORDERS, "last/first < 1e-2"),
        2.0: ("stays roughly flat over depth (s=2)", lambda r: 0.1 <= r <= 10, "0.1 <= last/first <= 10"),
        3.0: ("grows by orders of magnitude over depth (s=3)", lambda r: r > ORDERS, "last/first > 1e2"),
    }
    for s, (claim, ok, expected) in expectations.items():
        claim = "act norm at init " + claim
        if s not in by_s:
            out.append(_missing(exp, claim, expected, f"run with init.scale={s:g}"))
            continue
        ratio = depth_ratio(by_s[s])
        out.append(ClaimResult(exp, claim, f"last/first = {_fmt(ratio)}", expected, bool(ok(ratio))))
    claim = "grad norms at init orders of magnitude apart (s=1 tiny, s=3 huge)"
    expected = "g(2)/g(1) > 1e2 and g(3)/g(2) > 1e2"
    if all(s in by_s for s in (1.0, 2.0, 3.0)):
        g = {s: median_grad(by_s[s]) for s in (1.0, 2.0, 3.0)}
        note = f"; s=3 {by_s[3.0].status}"
        measured = f"median block grad: s=1 {_fmt(g[1.0])}, s=2 {_fmt(g[2.0])}, s=3 {_fmt(g[3.0])}{note}"
        out.append(ClaimResult(exp, claim, measured, expected, g[2.0] / g[1.0] > ORDERS and g[3.0] / g[2.0] > ORDERS))
    else:
        out.append(_missing(exp, claim, expected, "runs with init.scale=1,2,3"))
    claim, expected = "s=2 trains, s=1 makes little progress", f"acc(s=2) >= {TRAINS_ACC}, acc(s=1) <= acc(s=2) - 0.2"
    if 1.0 in by_s and 2.0 in by_s:
        a1, a2 = test_acc(by_s[1.0]), test_acc(by_s[2.0])
        measured = f"test acc s=1 {_fmt(a1)}, s=2 {_fmt(a2)} after {by_s[2.0].summary.get('steps')} steps"
        out.append(ClaimResult(exp, claim, measured, expected, a2 >= TRAINS_ACC and a1 <= a2 - 0.2))
    else:
        out.append(_missing(exp, claim, expected, "runs with init.scale=1,2"))
    claim, expected = "after training the weights stay close to init (s=2)", "median block weight_change < 0.2"
    if 2.0 in by_s and by_s[2.0].layers("final", "weight_change"):
        wc = [_num(v) for k, v in by_s[2.0].layers("final", "weight_change").items() if k.startswith("block")]
        med = statistics.median(wc)
        out.append(ClaimResult(exp, claim, f"median {_fmt(med)}, max {_fmt(max(wc))}", expected, med < 0.2))
    else:
        out.append(_missing(exp, claim, expected, "final layer stats of the s=2 run"))
    return out


def check_norm_fixes_init(runs: Sequence[Run]) -> list[ClaimResult]:
    exp = "norm_fixes_init"
    out = []
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.get("norm.name")].append(run)
    for norm in ("layer", "batch"):
        group = sorted(groups.get(norm, []), key=lambda r: r.get("init.scale"))
        claim = f"{norm}: act norm at init flat over depth for every s"
        expected = "0.1 <= last/first <= 10 for each s"
        if not group:
            out.append(_missing(exp, claim, expected, f"norm={norm} runs"))
            continue
        ratios = {r.get("init.scale"): depth_ratio(r) for r in group}
        out.append(ClaimResult(exp, claim, ", ".join(f"s={s:g}: {_fmt(v)}" for s, v in ratios.items()), expected,
                               all(0.1 <= v <= 10 for v in ratios.values())))
        claim = f"{norm}: act norm at init no longer depends on s"
        expected = "max/min over s of last-block act norm < 2"
        last = [_num(r.layers("init", "act_norm").get(_blocks(r.layers("init", "act_norm"))[-1])) for r in group]
        spread = max(last) / min(last) if min(last) > 0 else float("inf")
        out.append(ClaimResult(exp, claim, f"max/min = {_fmt(spread)} over s={[r.get('init.scale') for r in group]}",
                               expected, len(group) >= 2 and spread < 2))
        claim, expected = f"{norm}: every s trains", f"test acc >= {TRAINS_ACC} for each s"
        accs = {r.get("init.scale"): test_acc(r) for r in group}
        out.append(ClaimResult(exp, claim, ", ".join(f"s={s:g}: {_fmt(a)}" for s, a in accs.items()), expected,
                               all(a >= TRAINS_ACC for a in accs.values())))
    return out


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


def check_bn_paper_mnist(runs: Sequence[Run]) -> list[ClaimResult]:
    exp = "bn_paper_mnist"
    by_norm = {r.get("norm.name"): r for r in runs}
    out = []
    claim, expected = "BN reaches higher test accuracy sooner", f"BN - no BN > {ACC_NOISE} at the first evaluation"
    if "batch" in by_norm and "none" in by_norm:
        bn, plain = by_norm["batch"].scalars("test/acc"), by_norm["none"].scalars("test/acc")
        if bn and plain:
            out.append(ClaimResult(exp, claim, f"step {bn[0][0]}: BN {_fmt(bn[0][1])} vs no BN {_fmt(plain[0][1])}",
                                   expected, bn[0][1] - plain[0][1] > ACC_NOISE))
        else:
            out.append(_missing(exp, claim, expected, "test/acc events"))
        claim = "BN's test accuracy still higher at the end of the budget (paper: after 50k steps)"
        expected = "BN > no BN"
        end = (test_acc(by_norm["batch"]), test_acc(by_norm["none"]))
        out.append(ClaimResult(exp, claim, f"step {by_norm['batch'].summary.get('steps')}: BN {_fmt(end[0])} vs no BN "
                               f"{_fmt(end[1])}", expected, end[0] > end[1]))
        d_bn, _ = percentile_drift(by_norm["batch"])
        d_plain, _ = percentile_drift(by_norm["none"])
        claim = "sigmoid-input percentiles drift without BN, stable with BN"
        expected = "drift(no BN) >= 0.5 and drift(BN) <= drift(no BN)/2"
        out.append(ClaimResult(exp, claim, f"drift in initial p15-p85 spreads: no BN {_fmt(d_plain)}, BN {_fmt(d_bn)}",
                               expected, d_plain >= 0.5 and d_bn <= d_plain / 2))
    else:
        out.append(_missing(exp, claim, expected, "norm=none and norm=batch runs"))
    return out


def train_loss_by_norm(runs: Sequence[Run]) -> tuple[dict[str, float], dict[str, int]]:
    """({norm: mean final train/loss over its runs (seeds)}, {norm: how many runs}). A diverged run counts
    as an infinite loss: it trained worse than any run that stayed finite."""
    losses: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        diverged = r.status == "diverged"
        losses[r.get("norm.name")].append(math.inf if diverged else r.metric("train/loss"))
    return {n: statistics.mean(v) for n, v in losses.items()}, {n: len(v) for n, v in losses.items()}


def _losses_text(norms: Sequence[str], loss: dict[str, float], count: dict[str, int]) -> str:
    text = "train loss: " + ", ".join(f"{n} {'diverged' if loss.get(n) == math.inf else _fmt(loss.get(n))}"
                                      for n in norms)
    seeds = max(count.values(), default=1)
    return text + (f" (means of up to {seeds} runs)" if seeds > 1 else "")


def check_ln_vs_bn_mlp(runs: Sequence[Run]) -> list[ClaimResult]:
    exp = "ln_vs_bn_mlp"
    loss, count = train_loss_by_norm(runs)
    claim = "LayerNorm reaches a higher training loss than BN and no norm (same budget)"
    expected = "loss(layer) > loss(batch) and > loss(none)"
    if not all(n in loss for n in ("none", "batch", "layer")):
        return [_missing(exp, claim, expected, "norm=none,batch,layer runs")]
    return [ClaimResult(exp, claim, _losses_text(("layer", "batch", "none"), loss, count),
                        expected, loss["layer"] > loss["batch"] and loss["layer"] > loss["none"])]


def check_cnn_norms(runs: Sequence[Run]) -> list[ClaimResult]:
    """The convnet preset's expectation (configs/experiment/cnn_norms.yaml, from the literature): BatchNorm
    trains fastest of the four, and every norm trains faster than none (same budget)."""
    exp = "cnn_norms"
    loss, count = train_loss_by_norm(runs)
    norms = ("none", "batch", "layer", "group")
    measured = _losses_text(norms, loss, count)
    claims = [("BatchNorm reaches the lowest training loss of the four norms (same budget)",
               "loss(batch) < loss(layer), loss(group), loss(none)",
               lambda: all(loss["batch"] < loss[n] for n in norms if n != "batch")),
              ("every norm trains faster than none", "loss(batch), loss(layer), loss(group) < loss(none)",
               lambda: all(loss[n] < loss["none"] for n in norms if n != "none"))]
    if not all(n in loss for n in norms):
        return [_missing(exp, claim, expected, "norm=none,batch,layer,group runs") for claim, expected, _ in claims]
    return [ClaimResult(exp, claim, measured, expected, holds()) for claim, expected, holds in claims]

def weight_norm_total(run: Run) -> float:
    return math.sqrt(sum(_num(v) ** 2 for v in run.layers("final", "weight_norm").values()))


def check_regularization(runs: Sequence[Run]) -> list[ClaimResult]:
    exp = "regularization"
    idx = {(float(r.get("optim.weight_decay")), float(r.get("dropout.p"))): r for r in runs}
    out = []
    base = idx.get((0.0, 0.0))

    def gap(r: Run) -> float:
        return r.metric("train/acc") - r.metric("test/acc")

    claim = "regularization shrinks the generalization gap"
    expected = f"min gap of regularized runs with train acc >= 0.9 < gap(0,0) - {ACC_NOISE}"
    if base is None:
        return [_missing(exp, claim, expected, "the unregularized run (weight_decay=0, p=0)")]
    fitted = [(k, gap(r)) for k, r in idx.items() if k != (0.0, 0.0) and r.metric("train/acc") >= 0.9]
    if fitted:
        k, g = min(fitted, key=lambda kv: kv[1])
        measured = f"gap(0,0) {_fmt(gap(base))}; smallest {_fmt(g)} at lambda={k[0]:g}, p={k[1]:g}"
        out.append(ClaimResult(exp, claim, measured, expected, g < gap(base) - ACC_NOISE))
    else:
        out.append(_missing(exp, claim, expected, "a regularized run that fits the training set"))
    claim, expected = "weight norms shrink as lambda grows (p=0)", "||W|| strictly decreasing in lambda"
    lams = sorted(k[0] for k in idx if k[1] == 0.0)
    norms = [weight_norm_total(idx[(lam, 0.0)]) for lam in lams]
    out.append(ClaimResult(exp, claim, ", ".join(f"lambda={lam:g}: {_fmt(n)}" for lam, n in zip(lams, norms)), expected,
                           len(lams) >= 2 and all(b < a for a, b in pairwise(norms))))
    base_train = base.metric("train/acc")
    for knob, key in (("lambda", lambda k: k[1] == 0.0 and k[0] > 0), ("p", lambda k: k[0] == 0.0 and k[1] > 0)):
        claim, expected = f"very large {knob} underfits", "train acc at the largest value <= train acc(0,0) - 0.05"
        keys = sorted(k for k in idx if key(k))
        if not keys:
            out.append(_missing(exp, claim, expected, f"runs with {knob} > 0"))
            continue
        top = keys[-1]
        acc = idx[top].metric("train/acc")
        measured = f"train acc {_fmt(acc)} at lambda={top[0]:g}, p={top[1]:g} vs {_fmt(base_train)} unregularized"
        out.append(ClaimResult(exp, claim, measured, expected, acc <= base_train - 0.05))
    return out


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


def batch_size_table(runs: Sequence[Run]) -> dict[str, dict[int, dict[str, float]]]:
    """{norm: {batch size: {"running": test acc, "test": acc with test-batch statistics (BN only)}}}."""
    table: dict[str, dict[int, dict[str, float]]] = defaultdict(dict)
    cache: dict = {}
    for r in runs:
        b, norm = int(r.get("data.batch_size")), r.get("norm.name")
        row = {"running": test_acc(r)}
        if norm == "batch" and _evaluable(r):
            row["test"] = bn_eval(r, [], "test", max(b, 2), cache)
        table[norm][b] = row
    return table


def check_bn_batch_size(runs: Sequence[Run], table=None) -> list[ClaimResult]:
    exp = "bn_batch_size"
    table = table or batch_size_table(runs)
    out = []
    claim = "BN degrades at small batches, LN does not"
    expected = f"[err(Bmin)-err(Bref)] of BN exceeds LN's by > {ACC_NOISE}"
    bn, ln = table.get("batch", {}), table.get("layer", {})
    common = sorted(set(bn) & set(ln))
    if len(common) < 2:
        return [_missing(exp, claim, expected, "norm=batch and norm=layer runs at >= 2 common batch sizes")]
    small = common[0]
    ref = min((b for b in common if b >= 32), default=common[-1])
    deg = {n: (1 - t[small]["running"]) - (1 - t[ref]["running"]) for n, t in (("batch", bn), ("layer", ln))}
    measured = f"B={small} vs B={ref}: BN error +{_fmt(deg['batch'])}, LN error +{_fmt(deg['layer'])}"
    out.append(ClaimResult(exp, claim, measured, expected, deg["batch"] - deg["layer"] > ACC_NOISE))
    claim = "BN at B>=32: running and test-batch statistics agree"
    expected = f"|acc(running) - acc(test batch of B)| <= {ACC_NOISE}"
    big = [b for b in sorted(bn) if b >= 32 and "test" in bn[b]]
    if big:
        diffs = {b: bn[b]["running"] - bn[b]["test"] for b in big}
        out.append(ClaimResult(exp, claim, ", ".join(f"B={b}: {_fmt(d)}" for b, d in diffs.items()), expected,
                               all(abs(d) <= ACC_NOISE for d in diffs.values())))
    else:
        out.append(_missing(exp, claim, expected, "BN runs with B >= 32 and a checkpoint"))
    return out


SHIFT_SET = {"clean": [], "noise=0.5": ["noise=0.5"], "contrast=0.3": ["contrast=0.3"], "translate=2": ["translate=2"]}


def shift_table(runs: Sequence[Run]) -> dict[str, dict[str, float]]:
    """{shift: {"running": mean test acc over seeds, "test": ...}} for the BN runs with a checkpoint."""
    cache: dict = {}
    table: dict[str, dict[str, list[float]]] = {s: {"running": [], "test": []} for s in SHIFT_SET}
    for r in runs:
        if r.get("norm.name") != "batch" or not _evaluable(r):
            continue
        for name, shifts in SHIFT_SET.items():
            for stats in ("running", "test"):
                table[name][stats].append(bn_eval(r, shifts, stats, None, cache))
    return {s: {k: statistics.mean(v) if v else float("nan") for k, v in d.items()} for s, d in table.items()}


def check_bn_shift(runs: Sequence[Run], table=None) -> list[ClaimResult]:
    exp = "bn_shift"
    table = table or shift_table(runs)
    n = sum(1 for r in runs if r.get("norm.name") == "batch")
    out = []
    for shift, claim, expected, ok in (
        ("clean", "clean test data: running and test-batch statistics agree", f"|diff| <= {ACC_NOISE}",
         lambda d: abs(d) <= ACC_NOISE),
        ("noise=0.5", "noise: re-estimated statistics recover accuracy", f"test - running > {ACC_NOISE}",
         lambda d: d > ACC_NOISE),
        ("contrast=0.3", "contrast: re-estimated statistics recover accuracy", f"test - running > {ACC_NOISE}",
         lambda d: d > ACC_NOISE),
        ("translate=2", "translation: re-estimated statistics do not hurt", "test - running >= 0", lambda d: d >= 0),
    ):
        row = table[shift]
        d = row["test"] - row["running"]
        measured = f"acc running {_fmt(row['running'])}, test stats {_fmt(row['test'])} (mean of {n} runs)"
        out.append(ClaimResult(exp, claim, measured, expected, bool(math.isfinite(d) and ok(d))))
    return out


# Presets whose checks average their runs over seeds (bn_shift sweeps seeds itself); the others' checks
# compare settings run by run and are checked seed by seed (per_seed).
AVERAGES_SEEDS = {"ln_vs_bn_mlp", "cnn_norms", "bn_shift"}

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


def print_checks(results: Sequence[ClaimResult], console=None) -> None:
    """The claims as a rich table: experiment, claim, measured, expected, reproduced."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="Claim checks", show_lines=False)
    for col in ("experiment", "claim", "measured", "expected", "reproduced"):
        table.add_column(col, overflow="fold")
    for r in results:
        table.add_row(*(escape(c) for c in (r.experiment, r.claim, r.measured, r.expected)),
                      "[green]yes[/]" if r.reproduced else "[red]no[/]")
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=180)  # a log file or pipe: don't squeeze the numbers into 80 columns
    console.print(table)


def markdown_table(results: Sequence[ClaimResult]) -> str:
    lines = ["| experiment | claim | measured | expected | reproduced |", "|---|---|---|---|---|"]
    for r in results:
        cells = [r.experiment, r.claim, r.measured, r.expected, "yes" if r.reproduced else "**no**"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
