"""Shared test helpers: compose configs with Hydra's compose API, and run the real CLI in a subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# CI replays the same examples every run (a red CI must be reproducible); locally, hypothesis explores.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Small and fast, on the data the package ships: every end-to-end test starts from these.
TINY = [
    "data.source=bundled",
    "data.train_size=512",
    "data.batch_size=64",
    "model.width=32",
    "model.depth=2",
    "trainer.max_steps=8",
    "trainer.log_every=2",
    "trainer.eval_every=4",
]


def compose(overrides: list[str] | None = None):
    """The config `nrexp train <overrides>` would run with (no run dir, nothing written)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import nrexp
    from nrexp import config

    config.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=nrexp.config_dir(), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides or []))


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["NREXP_DATA_ROOT"] = str(tmp_path / "data")  # never the user's cache
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_cli(args: list[str], cwd: Path, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """`nrexp <args>` in a subprocess, as a user would run it (stdout is not a terminal here)."""
    return subprocess.run(
        [sys.executable, "-m", "nrexp", *args],
        cwd=cwd,
        env=cli_env(Path(cwd)),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def run_dirs(root: Path) -> list[Path]:
    """Every run directory (one holding summary.json) under root, oldest first."""
    return sorted((p.parent for p in Path(root).rglob("summary.json")), key=lambda p: p.stat().st_mtime)


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


@pytest.fixture
def tiny_run(tmp_path):
    """Run `nrexp train` with TINY + extra overrides in tmp_path; return (completed process, run dir)."""

    def _run(*overrides: str, expect_ok: bool = True):
        proc = run_cli(["train", *TINY, *overrides], cwd=tmp_path)
        if expect_ok:
            assert proc.returncode == 0, proc.stdout + proc.stderr
            dirs = run_dirs(tmp_path / "outputs")
            return proc, dirs[-1]
        return proc, None

    return _run


# A small real sweep shared by the sweep, report and TensorBoard tests (built once: 12 jobs, 4 of them fail at
# once): 2 norms x 3 training-set sizes x 2 seeds. data.train_size=5000 passes the preflight checks (the data's
# size is known only once it is loaded) and fails in the job: those 4 jobs record "failed" and the sweep goes
# on. trainer.progress=false is an excluded key: it must not name the job dirs.
SWEEP_TINY = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.eval_every", "data.train_size"))] + [
    "trainer.max_steps=4",
    "trainer.eval_every=4",
]
SWEEP_ARGS = [
    "-m",
    *SWEEP_TINY,
    "trainer.progress=false",
    "norm=none,batch",
    "data.train_size=256,512,5000",
    "seed=0,1",
]


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory):
    """(completed process, sweep dir) of `nrexp train -m SWEEP_ARGS`."""
    cwd = tmp_path_factory.mktemp("sweep")
    proc = run_cli(["train", *SWEEP_ARGS, "hydra.sweep.dir=sweep"], cwd=cwd)
    # all 12 jobs ran; the 4 that failed make the command's exit status 1, said in its last line
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("nrexp: error: 4 of 12 jobs of the sweep failed"), (
        proc.stderr
    )
    return proc, cwd / "sweep"


@pytest.fixture
def step_clock(monkeypatch):
    """The trainers' clock (nrexp.train's and nrexp.fused's) replaced by one that reads how many optimizer
    steps have been taken, a fused group's step counting one: in seconds of it every logged throughput is
    exactly batch_size samples per second, whatever the machine. Returns the count, in a list."""
    import types

    import nrexp.fused
    import nrexp.train

    steps = [0]
    build, stacked_step = nrexp.train.build, nrexp.fused.StackedMLP.step

    def counting_build(*args, **kwargs):
        model, optimizer, monitor = build(*args, **kwargs)
        step = optimizer.step

        def counted(*a, **k):
            steps[0] += 1
            return step(*a, **k)

        optimizer.step = counted
        return model, optimizer, monitor

    def counted_stacked_step(self):
        steps[0] += 1
        return stacked_step(self)

    clock = types.SimpleNamespace(perf_counter=lambda: float(steps[0]))
    monkeypatch.setattr(nrexp.train, "build", counting_build)  # not nrexp.fused's: a member's own optimizer never steps
    monkeypatch.setattr(nrexp.fused.StackedMLP, "step", counted_stacked_step)
    monkeypatch.setattr(nrexp.train, "time", clock)  # the one loop's clock (train.run_loop)
    return steps
