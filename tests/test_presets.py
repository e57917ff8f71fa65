"""Issue 5: experiment presets, preact percentiles, `nrexp evaluate` and the claim checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, TINY, compose, read_summary, run_cli, run_dirs

PRESETS = [
    "init_depth",
    "norm_fixes_init",
    "bn_paper_mnist",
    "ln_vs_bn_mlp",
    "regularization",
    "bn_batch_size",
    "bn_shift",
    "cnn_norms",
]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_validates_and_names_itself(name):
    from nrexp.config import validate

    cfg = compose([f"+experiment={name}"])
    validate(cfg)
    assert cfg.experiment == name
    text = (REPO / "configs" / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_")
    params = yaml.safe_load(text)["hydra"]["sweeper"]["params"]
    assert params, "each preset sweeps something"
    for key, values in params.items():  # every swept value composes and validates too
        for v in str(values).split(","):
            validate(compose([f"+experiment={name}", f"{key}={v}"]))


def test_presets_set_what_the_issue_says():
    c = compose(["+experiment=init_depth"])
    assert (c.model.depth, c.model.width, c.model.activation.value, c.norm.name, c.init.name, c.optim.name) == (
        50,
        100,
        "relu",
        "none",
        "normal",
        "sgd",
    )
    c = compose(["+experiment=bn_paper_mnist"])
    assert (c.model.depth, c.model.width, c.model.activation.value, c.data.batch_size, c.norm.position.value) == (
        3,
        100,
        "sigmoid",
        60,
        "before_act",
    )
    assert c.trainer.preact_percentiles is True
    assert compose(["+experiment=regularization"]).data.train_size == 1000


def test_preact_percentiles_need_an_mlp():
    from nrexp.config import ConfigError, validate

    with pytest.raises(ConfigError, match="trainer.preact_percentiles"):
        validate(compose(["model=cnn", "trainer.preact_percentiles=true"]))


def test_preact_collect_matches_the_input_to_the_last_activation_by_number():
    from nrexp import preact
    from nrexp.models import build_model

    torch.manual_seed(0)
    cfg = compose(["model.depth=2", "model.width=16", "norm=batch", "model.activation=sigmoid"])
    model = build_model(cfg, (1, 28, 28), 10)
    x = torch.randn(60, 1, 28, 28)
    assert preact.collect(preact.arm(model, False)) == {}
    armed = preact.arm(model, True)
    model(x)
    values = preact.collect(armed)
    # by hand: Linear -> train-mode BatchNorm (biased batch variance) of the last block, unit 0
    with torch.no_grad():
        h = model.blocks["block00"](x.flatten(1))
        last = model.blocks["block01"]
        z = last.linear(h)[:, 0]
        bn = last.norm
        z = (z - z.mean()) / torch.sqrt(z.var(unbiased=False) + bn.eps) * bn.weight[0] + bn.bias[0]
    expected = torch.quantile(z, torch.tensor([0.15, 0.5, 0.85])).tolist()
    assert list(values) == ["preact/block01/p15", "preact/block01/p50", "preact/block01/p85"]
    assert values["preact/block01/p15"] == pytest.approx(expected[0], abs=1e-5)
    assert values["preact/block01/p50"] == pytest.approx(expected[1], abs=1e-5)
    assert values["preact/block01/p85"] == pytest.approx(expected[2], abs=1e-5)
    # disarmed: the next (ordinary) step keeps nothing
    assert last.stash_preact is False and last.preact is None
    model(x)
    assert last.preact is None


@pytest.mark.slow
def test_preact_percentiles_logged_only_on_logging_steps(tiny_run):
    from nrexp.runs import Run

    _, run_dir = tiny_run("trainer.preact_percentiles=true", "model.activation=sigmoid", "norm=batch")
    run = Run(run_dir, read_summary(run_dir))
    steps = [s for s, _ in run.scalars("preact/block01/p50")]
    assert steps == [s for s, _ in run.scalars("train/loss")] == [0, 2, 4, 6]
    for s in range(4):
        p15, p50, p85 = (run.scalars(f"preact/block01/p{p}")[s][1] for p in (15, 50, 85))
        assert p15 <= p50 <= p85


# ---- nrexp evaluate


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bn")
    proc = run_cli(["train", *TINY, "norm=batch"], cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return run_dirs(tmp / "outputs")[-1]


def _evaluate(run_dir, *args):
    proc = run_cli(["evaluate", str(run_dir), "--json", *args], cwd=Path(run_dir).parent)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_evaluate_running_stats_equals_the_trainers_test_accuracy(bn_run):
    result = _evaluate(bn_run)
    assert result["bn_stats"] == "running" and result["shift"] == "none" and result["n"] == 1000
    assert result["acc"] == pytest.approx(read_summary(bn_run)["metrics"]["test/acc"], abs=1e-6)
    assert result["data_source"] == "bundled"


@pytest.mark.slow
def test_evaluate_test_batch_stats_equals_a_hand_computation(bn_run):
    """--bn-stats test on unshifted data, one batch of all 1,000 test digits: each BatchNorm normalizes with
    that batch's mean and biased variance. Recomputed here from the raw weights, without nn modules."""
    from nrexp.data import load_dataset

    result = _evaluate(bn_run, "--bn-stats", "test", "--batch-size", "1000")
    payload = torch.load(bn_run / "checkpoint.pt", map_location="cpu", weights_only=False)
    sd, cfg = payload["model"], payload["config"]
    from omegaconf import OmegaConf

    data = load_dataset(OmegaConf.create(cfg["data"]), torch.device("cpu"))
    h = data.test_x.flatten(1)
    for i in range(cfg["model"]["depth"]):
        p = f"blocks.block{i:02d}."
        z = h @ sd[p + "linear.weight"].T + sd[p + "linear.bias"]
        z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + cfg["norm"]["eps"])
        z = z * sd[p + "norm.weight"] + sd[p + "norm.bias"]
        h = torch.relu(z)
    logits = h @ sd["head.weight"].T + sd["head.bias"]
    acc = int((logits.argmax(1) == data.test_y).sum()) / len(data.test_y)
    assert result["acc"] == pytest.approx(acc, abs=1e-9)
    # the run's stored running statistics are untouched by the evaluation
    after = torch.load(bn_run / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    assert torch.equal(after["blocks.block00.norm.running_mean"], sd["blocks.block00.norm.running_mean"])


@pytest.mark.slow
def test_evaluate_identity_shifts_change_nothing_and_real_ones_do(bn_run):
    from nrexp.evaluate import evaluate_run, load_run

    loaded = load_run(bn_run)
    base = evaluate_run(bn_run, [], loaded=loaded)
    for shift in ("noise=0", "contrast=1", "translate=0"):
        # the same up to the clip at [0, 1]
        assert evaluate_run(bn_run, [shift], loaded=loaded).acc == pytest.approx(base.acc, abs=2e-3)
    assert evaluate_run(bn_run, ["noise=2"], loaded=loaded).acc < base.acc - 0.1
    shifted = evaluate_run(bn_run, ["contrast=0.2", "noise=0.3"], "test", 100, loaded=loaded)
    assert shifted.shift == "contrast=0.2,noise=0.3" and shifted.batch_size == 100


def test_apply_shifts_by_number():
    from nrexp.evaluate import apply_shifts

    mean, std = (0.5,), (0.25,)
    pixels = torch.rand(3, 1, 28, 28) * 0.5 + 0.25
    x = (pixels - 0.5) / 0.25
    flat = apply_shifts(x, [("contrast", 0.0)], mean, std) * 0.25 + 0.5
    assert torch.allclose(flat, pixels.mean(dim=(1, 2, 3), keepdim=True).expand_as(pixels), atol=1e-6)
    moved = apply_shifts(x, [("translate", 2)], mean, std) * 0.25 + 0.5
    assert torch.allclose(moved[:, :, 2:, 2:], pixels[:, :, :-2, :-2], atol=1e-6)
    assert moved[:, :, :2, :].abs().max() == 0 and moved[:, :, :, :2].abs().max() == 0
    noisy = apply_shifts(x, [("noise", 0.1)], mean, std, seed=1) * 0.25 + 0.5
    assert 0.05 < (noisy - pixels).std() < 0.15
    assert torch.equal(noisy, apply_shifts(x, [("noise", 0.1)], mean, std, seed=1) * 0.25 + 0.5)  # seeded


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, words",
    [
        (["--shift", "blur=1"], "--shift 'blur=1' is invalid"),
        (["--shift", "noise=abc"], "is not a number"),
        (["--shift", "noise=-1"], "must be >= 0"),
        (["--shift", "translate=1.5"], "whole pixels"),
        (["--bn-stats", "mean"], "--bn-stats 'mean' is invalid"),
        (["--bn-stats", "test", "--batch-size", "1"], "a batch of one example"),
        (["--batch-size", "0"], "must be >= 1"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_evaluate_bad_input_is_one_line(bn_run, args, words):
    proc = run_cli(["evaluate", str(bn_run), *args], cwd=bn_run.parent)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("nrexp: error: ") and words in proc.stderr
    assert "Fix:" in proc.stderr


@pytest.mark.slow
def test_evaluate_bad_run_dirs_are_one_line(tmp_path, tiny_run):
    for target, words in ((tmp_path / "nope", "does not exist"), (tmp_path, "has no checkpoint.pt")):
        proc = run_cli(["evaluate", str(target)], cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and words in proc.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    proc = run_cli(["evaluate", str(tmp_path / "bad")], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "corrupt" in proc.stderr
    _, plain = tiny_run()
    proc = run_cli(["evaluate", str(plain), "--bn-stats", "test"], cwd=tmp_path)
    assert proc.returncode == 2 and "needs a run with BatchNorm" in proc.stderr
    # a diverged run keeps its last periodic checkpoint, from before the blow-up: not its result
    _, diverged = tiny_run("optim.lr=20", "trainer.checkpoint_every=2")
    assert read_summary(diverged)["status"] == "diverged" and (diverged / "checkpoint.pt").is_file()
    proc = run_cli(["evaluate", str(diverged)], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert (
        "diverged (its loss was non-finite at step 5); its checkpoint.pt is a periodic one, saved after 4 steps"
        in proc.stderr
    )
    (diverged / "checkpoint.pt").unlink()  # the usual case: no periodic checkpoint before the blow-up
    proc = run_cli(["evaluate", str(diverged)], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "diverged (its loss was non-finite at step 5). Fix: evaluate a run that completed" in proc.stderr


# ---- claims


def _sweeps(tmp_path, *names, extra=None):
    """Start one sweep per preset, all at once (one CPU thread each: 2 threads per process were ~10x slower
    on a shared 2-core machine), at one training step: enough to record the network at init. `extra`: more
    overrides per preset."""
    import subprocess
    import sys

    from conftest import cli_env

    env = dict(cli_env(tmp_path), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nrexp",
                "train",
                "-m",
                f"+experiment={name}",
                f"hydra.sweep.dir={tmp_path / name}",
                "data.source=bundled",
                "data.train_size=256",
                "trainer.max_steps=1",
                "trainer.progress=false",
                "trainer.checkpoint_every=0",
                *(extra or {}).get(name, []),
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]


@pytest.mark.slow
def test_init_depth_and_norm_claims_at_init_reproduce(tmp_path):
    """Deterministic physics at step 0 (one step of training is enough to record it), three seeds each (the
    presets' own): without a norm, act norms over 50 layers shrink (s=1), stay flat (s=2) or grow (s=3) by
    orders of magnitude, and the gradient levels are orders apart; with LayerNorm/BatchNorm the act norms no
    longer depend on s or depth, BatchNorm's squared gradient norm grows towards the input by pi/(pi-1) per
    layer (within 3%), and LayerNorm's representations collapse with depth (act_cos, when the monitor
    records it). The training claims need real budgets: scripts/reproduce.py (the slow test below)."""
    import subprocess
    import sys

    from conftest import cli_env
    from nrexp.claims import check, print_checks

    _sweeps(tmp_path, "init_depth", "norm_fixes_init", extra={"norm_fixes_init": ["model=mlp"]})
    results = check(tmp_path)
    print_checks(results)
    at_init = [r for r in results if "at init" in r.claim]
    assert len(at_init) == 4 + 6  # init_depth: 3 act + 1 grad; norm_fixes_init: 2 per norm, LN collapse, BN rate
    collapse = [r for r in at_init if "collapse" in r.claim]
    assert len(collapse) == 1 and collapse[0].outcome in ("reproduced", "missing")  # missing: no act_cos yet
    others = [r for r in at_init if r not in collapse]
    assert all(r.reproduced for r in others), [r for r in others if not r.reproduced]
    assert all("(3 seeds)" in r.interval for r in others)
    assert {r.experiment for r in results} == {"init_depth", "norm_fixes_init"}
    # the same checks through `nrexp report --check`, after the report's own table
    out = subprocess.run(
        [sys.executable, "-m", "nrexp", "report", str(tmp_path / "init_depth"), "--check"],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.index("act_ratio_init") < out.stdout.index("act norm at init") and "reproduced" in out.stdout
    assert "95% interval" in out.stdout


def test_claims_bad_dir_is_one_line(tmp_path, capsys):
    from nrexp.claims import check
    from nrexp.cli import main
    from nrexp.errors import ConfigError

    for target in (tmp_path / "nope", tmp_path):
        assert main(["report", str(target), "--check"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Fix:" in err
        with pytest.raises(ConfigError, match="Fix:"):  # check() on its own says the same kind of line
            check(target)


def test_claims_of_missing_runs_say_so():
    from nrexp.claims import CHECKS

    for name, fn in CHECKS.items():
        results = fn([])
        assert results and all(not r.reproduced for r in results), name


@pytest.mark.parametrize(
    "losses,outcomes",
    [
        ({"none": 2.0, "batch": 0.5, "layer": 1.0, "group": 0.9}, ["reproduced", "reproduced"]),
        ({"none": 2.0, "batch": 1.2, "layer": 1.0, "group": 0.9}, ["contradicted", "reproduced"]),
        ({"none": 0.8, "batch": 0.5, "layer": 1.0, "group": 0.9}, ["reproduced", "contradicted"]),
    ],
)
def test_cnn_norms_claims_compare_the_training_losses(tmp_path, losses, outcomes):
    """The convnet preset's runs, as summary.json files of a sweep (training them takes hours on this CPU):
    three seeds a norm, each seed's losses shifted alike (the differences, paired by seed, are exact)."""
    from nrexp.claims import check

    for norm, loss in losses.items():
        for seed in range(3):
            (tmp_path / f"{norm}{seed}").mkdir()
            (tmp_path / f"{norm}{seed}" / "summary.json").write_text(
                json.dumps(
                    {
                        "status": "completed",
                        "config": {"experiment": "cnn_norms", "norm": {"name": norm}, "seed": seed},
                        "metrics": {"train/loss": loss + 0.1 * seed},
                    }
                )
            )
    results = check(tmp_path)
    assert [r.experiment for r in results] == ["cnn_norms"] * 2 and [r.outcome for r in results] == outcomes
    norms = ("none", "batch", "layer", "group")
    assert results[0].measured == (
        "train loss: " + ", ".join(f"{n} {losses[n] + 0.1:.3g}" for n in norms) + " (means of 3 seeds)"
    )


def test_cnn_norms_claims_rank_a_diverged_run_last(tmp_path):
    """A diverged no-norm run trained worse than any: its loss counts as the worst finite one or chance."""
    from nrexp.claims import check

    runs = {"none": [None, None, None], "batch": [0.1, 0.2, 0.15], "layer": [0.6, 0.8, 0.7], "group": [0.7, 0.9, 0.8]}
    for norm, losses in runs.items():
        for seed, loss in enumerate(losses):
            (tmp_path / f"{norm}{seed}").mkdir()
            (tmp_path / f"{norm}{seed}" / "summary.json").write_text(
                json.dumps(
                    {
                        "status": "diverged" if loss is None else "completed",
                        "config": {"experiment": "cnn_norms", "norm": {"name": norm}, "seed": seed},
                        "metrics": {"train/loss": loss},
                    }
                )
            )
    results = check(tmp_path)
    assert results[0].measured.startswith("train loss: none 2.3 (diverged runs), batch 0.15, layer 0.7, group 0.8")
    assert [r.outcome for r in results] == ["reproduced", "reproduced"]


def test_claims_treat_seeds_as_samples(tmp_path):
    """bn_batch_size's check compares (norm, batch size) settings: each seed's degradation is one sample of the
    effect, and the claim is judged on their interval (not on the last seed read, nor seed by seed)."""
    from nrexp.claims import check

    bn_small = {0: 0.6, 1: 0.65, 2: 0.62}
    for seed in range(3):
        accs = {("batch", 4): bn_small[seed], ("batch", 64): 0.9, ("layer", 4): 0.89, ("layer", 64): 0.9}
        for (norm, batch), acc in accs.items():
            run = tmp_path / f"{norm}{batch}s{seed}"
            run.mkdir()
            config = {
                "experiment": "bn_batch_size",
                "norm": {"name": norm},
                "data": {"batch_size": batch},
                "seed": seed,
            }
            (run / "summary.json").write_text(
                json.dumps({"status": "completed", "metrics": {"test/acc": acc}, "config": config})
            )
    degrades, stats = check(tmp_path)
    assert degrades.claim == "BN degrades at small batches, LN does not" and degrades.outcome == "reproduced"
    assert "BN error +0.277, LN error +0.01" in degrades.measured and "(3 seeds)" in degrades.interval
    assert stats.outcome == "missing"  # no checkpoints to evaluate with test-batch statistics


@pytest.mark.slow
def test_bn_tables_leave_a_diverged_run_out(tmp_path, tiny_run):
    """A diverged BatchNorm run that wrote a checkpoint is left out of bn_shift's and bn_batch_size's tables, as one
    without a checkpoint is: it is no result, and its n/a must not turn the other runs' means into n/a."""
    import math
    import shutil

    from nrexp.claims import batch_size_table, shift_table
    from nrexp.runs import Run

    _, good = tiny_run("norm=batch")
    diverged = tmp_path / "diverged"
    shutil.copytree(good, diverged)  # a checkpoint that loads: only its status says it is no result
    summary = {**read_summary(good), "status": "diverged"}
    (diverged / "summary.json").write_text(json.dumps(summary))
    runs = [Run(good, read_summary(good)), Run(diverged, summary)]
    alone = shift_table(runs[:1])
    assert all(math.isfinite(v) for row in alone.values() for v in row.values())
    assert shift_table(runs) == alone
    b = read_summary(good)["config"]["data"]["batch_size"]
    assert "test" in batch_size_table(runs[:1])["batch"][b] and "test" not in batch_size_table(runs[1:])["batch"][b]


@pytest.mark.reproduce  # trains every preset at quick-mode budgets (minutes): the training claims need them
def test_reproduce_quick_runs_and_writes_results(tmp_path):
    import subprocess
    import sys

    from conftest import cli_env

    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "reproduce.py"),
            "--quick",
            "--out",
            str(tmp_path / "out"),
            "--docs",
            str(tmp_path / "docs"),
        ],
        cwd=REPO,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = (tmp_path / "docs" / "results.md").read_text()
    assert "Quick mode" in text and "| experiment | claim |" in text
    assert len(list((tmp_path / "docs" / "figures").glob("*.png"))) >= 7


def test_claims_leave_a_diverged_runs_checkpoint_unevaluated(tmp_path):
    """bn_batch_size's and bn_shift's tables evaluate each run's checkpoint; a diverged run's is from before
    the blow-up, so its entries are n/a (NaN), as its test accuracy is, and nothing is loaded."""
    import math

    from nrexp.claims import bn_eval
    from nrexp.runs import Run

    assert math.isnan(bn_eval(Run(tmp_path, {"status": "diverged"}), [], "running", None, cache={}))
