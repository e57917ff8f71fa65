"""The benchmark runs in its tiny mode and writes every arm; the speed-related pieces keep their contracts.

No timing is asserted here: the targets are ratios the benchmark reports, not pass/fail tests.
"""

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, cli_env, compose


@pytest.mark.slow
def test_bench_tiny_writes_json_with_all_arms(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nrexp",
            "bench",
            "--tiny",
            "--models",
            "mlp-3x256",
            "--batches",
            "128",
            "--json",
            str(out),
            "--markdown",
            str(tmp_path / "bench.md"),
        ],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert {"machine", "device", "data", "settings", "configs"} <= set(result)
    # the machine's vector units, as torch's CPU kernels dispatch on them, recorded and shown
    capability = torch.backends.cpu.get_cpu_capability()
    assert result["machine"]["cpu_capability"] == capability
    assert f", {capability}), torch" in (tmp_path / "bench.md").read_text()
    (entry,) = result["configs"]
    assert set(entry["median"]) == {"a0", "a2", "b", "c", "d", "e", "h"}
    assert all(v > 0 for v in entry["median"].values())
    assert set(entry["ratios"]) == {"c/a", "c/b", "d/b", "d/h", "e/b"}
    assert entry["ratios"]["d/h"]["value"] == pytest.approx(entry["median"]["d"] / entry["median"]["h"])
    # b/a, the ceiling of c/a (a: the faster of a0 and a2), and b/h, the ceiling of d/h (statistics cannot
    # make a loop faster than bare), from the same medians, in the JSON and the table
    best_a = max(entry["median"]["a0"], entry["median"]["a2"])
    assert entry["ceilings"] == {
        "b/a": {"value": pytest.approx(entry["median"]["b"] / best_a), "bounds": "c/a"},
        "b/h": {"value": pytest.approx(entry["median"]["b"] / entry["median"]["h"]), "bounds": "d/h"},
    }
    assert entry["ratios"]["c/a"]["value"] == pytest.approx(entry["median"]["c"] / best_a)
    assert "| b/a (ceiling of c/a) | b/h (ceiling of d/h) | losses agree |" in (tmp_path / "bench.md").read_text()
    ceilings = entry["ceilings"]
    row_end = f"| {ceilings['b/a']['value']:.2f} | {ceilings['b/h']['value']:.2f} | yes |"
    assert row_end in (tmp_path / "bench.md").read_text()
    assert entry["losses_agree"], entry["loss_after_steps"]  # same init, data order and optimizer in every arm
    assert set(entry["loss_after_steps"]) == set(entry["median"])  # the hand-written arm h among them
    assert "h: hand-written statistics every step" in proc.stdout
    assert "c/b" in (tmp_path / "bench.md").read_text()
    assert "nrexp bench" in proc.stdout
    # a smoke test judges no target: its figures say nothing of them
    assert result["settings"]["tiny"] and all(r["ok"] is None for r in entry["ratios"].values())
    assert "✗" not in proc.stdout + (tmp_path / "bench.md").read_text() and "no target judged" in proc.stdout
    assert (
        (tmp_path / "bench.md").read_text().startswith("**--tiny, a smoke test: numbers meaningless, no target judged")
    )
    # start-up: the 1-step run's wall time less its step loop, over the imports any such program pays
    startup = result["startup"]
    assert startup["command"] == "nrexp train trainer.max_steps=1 data.source=bundled"
    assert startup["baseline"] == 'python -c "import torch, torch.optim, hydra"'
    assert len(startup["wall_s"]) == len(startup["baseline_s"]) == 1 and startup["ok"] is None
    assert startup["overhead_s"][0] == pytest.approx(startup["wall_s"][0] - startup["train_time_s"][0])
    assert startup["ratio"] == pytest.approx(startup["median_overhead_s"] / startup["median_baseline_s"])
    assert (
        "start-up: `nrexp train trainer.max_steps=1 data.source=bundled` wall minus its train_time_s"
        in (tmp_path / "bench.md").read_text()
    )


@pytest.mark.parametrize(
    "args, says",
    [
        (["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
        (["--batches", "128", "0"], "argument --batches: must be >= 1, got 0"),
        (["--threads", "-1"], "argument --threads: must be >= 0, got -1"),
        (
            ["--train-size", "50", "--batches", "128"],
            "a measurement at batch 128 takes 32768 samples, more than --train-size 50",
        ),
        (["--samples", "100000"], "a measurement at batch 128 takes 99968 samples, more than --train-size 60000"),
        (
            ["--no-arms", "--fused", "--fused-batches", "5000"],
            "--fused-batches 5000 is larger than the bundled sample's 4000",
        ),
        (
            ["--no-arms", "--fused", "--fused-data", "mnist", "--train-size", "1000", "--fused-batches", "2000"],
            "--fused-batches 2000 is larger than --train-size 1000, the digits of the --fused-data mnist sweep",
        ),
        (["--json", "{file}/bench.json"], "cannot write in {file}: choose a path in a folder you can write"),
        (["--markdown", "."], "--markdown .: cannot write in"),
    ],
)
def test_bad_bench_arguments_get_one_line_before_anything_runs(tmp_path, args, says):
    """Each of these used to fail with a traceback, some only after minutes of other measurements."""
    from conftest import run_cli

    (tmp_path / "file").write_text("a file, not a folder")
    args = [a.replace("{file}", str(tmp_path / "file")) for a in args]
    proc = run_cli(["bench", *args], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    says = says.replace("{file}", str(tmp_path / "file"))
    assert last.startswith("nrexp bench: error: ") and says in last, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written, no bench.json


def test_dataset_is_cached_per_process_by_its_key():
    from nrexp.data import load_dataset

    cfg = compose(["data.source=bundled", "data.train_size=256"])
    first = load_dataset(cfg.data, torch.device("cpu"))
    assert load_dataset(cfg.data, torch.device("cpu")) is first  # a sweep's next job reuses it
    other = load_dataset(compose(["data.source=bundled", "data.train_size=128"]).data, torch.device("cpu"))
    assert other is not first and len(other.train_x) == 128


def test_cached_dataset_still_checks_the_batch_size():
    from nrexp.config import ConfigError
    from nrexp.data import load_dataset

    load_dataset(compose(["data.source=bundled", "data.train_size=64", "data.batch_size=32"]).data, torch.device("cpu"))
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_dataset(
            compose(["data.source=bundled", "data.train_size=64", "data.batch_size=65"]).data, torch.device("cpu")
        )


def _strict_step_loop(monkeypatch, strict_on, strict_off):
    """Make train.py's progress context (the step loop, and the end of the run inside it) strict, save in
    what may read from the device: the logging step's one host copy (LayerMonitor.to_host), the loss
    check (stop_nonfinite: every step on CPU, else once after the last log), evaluation, the final probe
    and checkpoints (which copy the weights)."""
    import nrexp.train as train_mod
    from nrexp.monitor import LayerMonitor

    def allowed(fn):
        def wrapped(*args, **kwargs):
            strict_off()
            try:
                return fn(*args, **kwargs)
            finally:
                strict_on()

        return wrapped

    class StrictProgress(train_mod.TrainProgress):
        def __enter__(self):
            strict_on()
            return super().__enter__()

        def __exit__(self, *exc):
            strict_off()
            return super().__exit__(*exc)

    monkeypatch.setattr(train_mod, "TrainProgress", StrictProgress)
    monkeypatch.setattr(LayerMonitor, "to_host", allowed(LayerMonitor.to_host))
    for name in ("evaluate", "probe", "save_checkpoint", "stop_nonfinite"):
        monkeypatch.setattr(train_mod, name, allowed(getattr(train_mod, name)))
    return train_mod


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_sync_in_the_cuda_step_loop(tmp_path, monkeypatch):
    """On CUDA the step loop never waits for the GPU, except in the one host copy of a logging step
    (and evaluation, which is outside the step loop's timing, and checkpoints, which copy the weights)."""
    train_mod = _strict_step_loop(
        monkeypatch, lambda: torch.cuda.set_sync_debug_mode("error"), lambda: torch.cuda.set_sync_debug_mode("default")
    )
    cfg = compose(
        [
            "data.source=bundled",
            "data.train_size=512",
            "data.batch_size=64",
            "trainer.device=cuda",
            "trainer.max_steps=12",
            "trainer.log_every=5",
            "trainer.progress=false",
        ]
    )
    try:
        summary = train_mod.train(cfg, tmp_path)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert summary["status"] == "completed"


def test_nrexp_reads_nothing_back_in_the_step_loop_without_a_per_step_check(tmp_path, monkeypatch):
    """The CPU's stand-in for the CUDA test above, so that CI runs it: with CUDA's way of checking the
    loss (train.checks_every_step false), nrexp's own code calls none of the tensor methods that copy
    to the host (.item(), .tolist(), .cpu(), bool(), float(), ...) in the step loop, outside the
    logging step's host copy, evaluation, probe and checkpoints. (Both host syncs the CUDA test found
    on a GPU were such calls.)"""
    import sys

    strict = {"on": False}
    train_mod = _strict_step_loop(monkeypatch, lambda: strict.update(on=True), lambda: strict.update(on=False))
    monkeypatch.setattr(train_mod, "checks_every_step", lambda device: False)
    # as on CUDA, no statistics thread (on CPU it reads the floats for to_host itself, which syncs nothing)
    monkeypatch.setattr("nrexp.monitor.spare_core", lambda device: False)
    package = str(REPO / "nrexp")
    calls = []

    def guarded(name):
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if strict["on"] and caller.startswith(package):
                calls.append(f"Tensor.{name} from {caller}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)

        return wrapped

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, guarded(name))
    cfg = compose(
        [
            "data.source=bundled",
            "data.train_size=512",
            "data.batch_size=64",
            "trainer.max_steps=12",
            "trainer.log_every=5",
            "trainer.checkpoint_every=6",
            "trainer.eval_every=4",
            "trainer.progress=false",
            "dropout.p=0.2",
            "norm=batch",
        ]
    )
    summary = train_mod.train(cfg, tmp_path)
    assert summary["status"] == "completed"
    assert not calls, calls


@pytest.mark.slow
def test_fused_sweeps_run_on_both_workloads_and_report_each(tmp_path):
    """`--fused` end to end, tiny: each workload's 16-job sweep under both launchers, read back from the JSON.
    The MNIST-like one trains on the bench's own data (data.source=local), one epoch."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nrexp",
            "bench",
            "--tiny",
            "--no-arms",
            "--fused",
            "--fused-batches",
            "1000",
            "--fused-repeats",
            "1",
            "--json",
            str(out),
            "--markdown",
            str(tmp_path / "bench.md"),
        ],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fused = json.loads(out.read_text())["fused"]
    assert list(fused) == ["bundled", "mnist"]
    assert "data.source=bundled" in fused["bundled"]["command"]
    assert "data.source=local data.root=<data> trainer.epochs=1" in fused["mnist"]["command"]
    for workload in fused.values():
        b = workload["batches"]["1000"]
        assert b["jobs"] == 16 and len(b["wall_s"]["basic"]) == len(b["wall_s"]["fused"]) == 1
        assert b["speedup"] == pytest.approx(b["median_wall_s"]["basic"] / b["median_wall_s"]["fused"])
        assert b["loop_speedup"] == pytest.approx(b["step_loops_s"]["basic"][0] / b["step_loops_s"]["fused"][0])
        assert all(t > 0 for t in b["step_loops_s"]["basic"] + b["step_loops_s"]["fused"])
    markdown = (tmp_path / "bench.md").read_text()
    assert all(b["ok"] is None for w in fused.values() for b in w["batches"].values()) and "target >=" not in markdown
    assert "fused sweep on 5 epochs of the bundled 4,000 digits" in markdown
    assert "fused sweep on 1 epoch of the bench's MNIST-like data" in markdown


@pytest.mark.slow
def test_gpu_check_script_says_in_one_line_that_it_needs_a_gpu(tmp_path):
    """scripts/gpu_check.sh (the checks for a lent GPU) on a machine without one: one line, exit 2, no output dir."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the script would run its checks")
    env = dict(cli_env(tmp_path), OUT=str(tmp_path / "out"))
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "30"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: no CUDA GPU is visible to PyTorch here. Fix: run it on a machine with one"
    ]
    assert not (tmp_path / "out").exists()


def test_fast_event_checksums_are_tensorboards_own():
    """The C CRC-32C patched into tensorboard's event writer gives exactly tensorboard's masked checksum
    (event files stay byte for byte the same; tensorboard's reader checks every record with its own)."""
    import os

    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference
    from tensorboard.summary.writer import record_writer

    from nrexp.writers import use_fast_event_checksums

    if not use_fast_event_checksums():
        pytest.skip("google-crc32c with its C extension is not installed: tensorboard's own checksum is used")
    assert record_writer.masked_crc32c is not reference
    for data in (b"", b"\x00", b"123456789", bytes(range(256)) * 29, os.urandom(7000)):
        assert record_writer.masked_crc32c(data) == reference(data)


def test_fused_sweep_lines_report_ratio_target_and_gaps():
    """The --fused section's wording from a result of fused_checks' shape (the sweeps themselves take minutes)."""
    from nrexp.bench import fused_lines

    batch = {
        "wall_s": {"basic": [40.0, 38.0, 39.0], "fused": [25.0, 26.0, 24.0]},
        "median_wall_s": {"basic": 39.0, "fused": 25.0},
        "step_loops_s": {"basic": [22.0, 23.0, 21.0], "fused": [10.0, 11.0, 12.0]},
        "speedup": 39.0 / 25.0,
        "loop_speedup": 22.0 / 11.0,
        "target": 2.0,
        "ok": False,
        "jobs": 16,
        "test_acc_abs_diff": [0.0] * 14 + [0.004, 0.012],
        "pairs_equal_1e-4": 14,
    }
    result = {
        "fused": {
            "bundled": {
                "data": "5 epochs of the bundled 4,000 digits",
                "command": "nrexp train -m ...",
                "batches": {32: batch},
            }
        }
    }
    lines = fused_lines(result)
    assert lines[0].startswith("fused sweep on 5 epochs of the bundled 4,000 digits, `nrexp train -m ...`")
    assert "median of 3 interleaved runs" in lines[0]
    assert "basic launcher 39.0 s, fused 25.0 s -> **1.56x** (target >= 2x ✗)" in lines[1]
    assert "16 basic jobs 22.0 s, fused group 11.0 s (2.00x, the sweep's ratio as training gets longer)" in lines[1]
    assert "14 of 16 pairs, largest gap 0.012" in lines[1]


def test_ratios_carry_the_spread_of_the_rounds():
    """Each target's ratio is of the arms' medians; beside it, the lowest and highest ratio of the two arms
    within one round (timed one after the other, under the same load); "a" is the faster of a0 and a2."""
    from nrexp.bench import ratios, table_rows

    rounds = {
        "a0": [1.0, 1.2, 1.1],
        "a2": [2.0, 1.0, 2.2],
        "b": [20.0, 22.0, 21.0],
        "c": [19.0, 21.0, 20.0],
        "d": [18.0, 17.0, 19.0],
        "e": [19.0, 21.0, 20.0],
        "h": [9.0, 10.0, 8.0],
    }
    median = {arm: sorted(v)[1] for arm, v in rounds.items()}
    r = ratios(median, rounds)
    assert r["d/b"]["value"] == pytest.approx(18.0 / 21.0)
    assert r["d/b"]["rounds"] == pytest.approx([18 / 20, 17 / 22, 19 / 21])
    assert (r["d/b"]["low"], r["d/b"]["high"]) == (pytest.approx(17 / 22), pytest.approx(19 / 21))
    assert r["c/a"]["rounds"] == pytest.approx([19 / 2.0, 21 / 1.2, 20 / 2.2])
    assert r["d/h"]["ok"] and not r["d/b"]["ok"]
    result = {
        "settings": {"arms": list(rounds)},
        "configs": [{"model": "m", "batch": 128, "median": median, "ratios": r, "ceilings": {}, "losses_agree": True}],
    }
    assert f"{18 / 21:.2f} ({17 / 22:.2f}-{19 / 21:.2f}) ✗" in table_rows(result)[0]
