"""Bad input, divergence, interrupts, kill -9 and exact resume: nothing lost, no tracebacks."""

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY, cli_env, compose, read_summary, run_cli, run_dirs

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
BAD_INPUTS = [  # (overrides, words the one-line error must contain)
    (["norm.foo=1"], ["norm.foo", "unknown key"]),
    (["+foo=1"], ["foo", "unknown key"]),
    (["optim.lr=abc"], ["optim.lr", "abc"]),
    (["model.depth=2.5"], ["model.depth"]),
    (["dropout.p=1"], ["dropout.p=1.0", "[0, 1)"]),
    (["dropout.p=-0.1"], ["dropout.p", "[0, 1)"]),
    (["dropout.input_p=1.5"], ["dropout.input_p"]),
    (["optim.lr=-1"], ["optim.lr", "> 0"]),
    (["optim.lr=inf"], ["optim.lr", "finite"]),
    (["optim.weight_decay=-0.1"], ["optim.weight_decay", ">= 0"]),
    (["optim.weight_decay=nan"], ["optim.weight_decay", "finite"]),
    (["data.batch_size=0"], ["data.batch_size", ">= 1"]),
    (["data.batch_size=5000"], ["data.batch_size", "4000"]),
    (["model.depth=0"], ["model.depth", ">= 1"]),
    (["model.width=0"], ["model.width", ">= 1"]),
    (["norm=bogus"], ["norm", "choose one of"]),
    (["init=he"], ["init", "choose one of"]),
    (["optim=rmsprop"], ["optim", "choose one of"]),
    (["model.activation=swish"], ["model.activation", "relu"]),
    (["trainer.device=cuda"], ["trainer.device", "no CUDA GPU", "trainer.device=auto"]),
    (["data.train_size=0"], ["data.train_size"]),
    (["data.train_size=4001"], ["data.train_size", "4000"]),
    (["norm=batch", "data.batch_size=1"], ["BatchNorm needs more than one example", "norm=layer"]),
    (["norm=none,batch"], ["sweep", "-m"]),
    (["-m", "dropout.p=0,2"], ["dropout.p=2.0"]),
    (["-m", "seed=0,abc"], ["seed", "'abc'", "Integer"]),  # each swept value type-checked before any job
    (["-m", "seed=0,1", "norm=none,bogus"], ["norm", "choose one of"]),
    (["trainer.on_nonfinite=ignore"], ["trainer.on_nonfinite"]),
    (["resume=nowhere"], ["resume", "no checkpoint"]),
    (["hydra.run.dir=/etc/hostname/run"], ["output directory", "not a writable directory", "hydra.run.dir="]),
    (["-m", "seed=0,1", "hydra.sweep.dir=/etc/hostname/sweep"], ["output directory", "hydra.sweep.dir="]),
    # /proc takes no new folders, though os.access tells root it does
    (["hydra.run.dir=/proc/nrexp-run"], ["output directory", "not a writable directory", "hydra.run.dir="]),
    (["-m", "seed=0,1", "--cfg", "job"], ["-m and --cfg cannot be combined", "--cfg job"]),  # Hydra: a traceback
    (["--info", "--cfg", "job"], ["--info and --cfg cannot be combined"]),
    (["--cfg", "job", "dropout.p=1.5"], ["dropout.p=1.5", "[0, 1)"]),  # what --cfg prints is validated
    (["-m", "seed=0,1", "hydra/launcher=joblibb"], ["hydra/launcher='joblibb'", "choose one of", "fused", "joblib"]),
    (["-m", "seed=0,1", "hydra/sweeper=optunaa"], ["hydra/sweeper='optunaa'", "choose one of", "optuna"]),
    (["-m", "trainer.device=cpu,cuda"], ["trainer.device='cuda'", "no CUDA GPU"]),  # before the cpu job runs
    (["experiment=init_depth"], ["group 'experiment'", "leading +", "nrexp train +experiment=init_depth"]),
    (["-m", "experiment=init_depth,cnn_norms"], ["leading +", "+experiment=init_depth"]),  # each value checked
    (["+norm=batch"], ["+norm=... adds group 'norm' a second time", "drop the +"]),
    (["+norm=batch", "norm=layer"], ["group 'norm' is given 2 times", "without the +"]),
    (["+experiment=init_depth", "+experiment=cnn_norms"], ["group 'experiment' is given 2 times", "give it once"]),
    (["-m", "seed=0,1", "--cfg=job"], ["-m and --cfg cannot be combined"]),  # argparse's other spellings
    (["-m", "seed=0,1", "-cjob"], ["-m and -c cannot be combined"]),
    (["--multirun", "-m", "--info=config", "seed=0,1"], ["--multirun and --info cannot be combined"]),
    (["--cfg", "job", "norm=batch,layer"], ["'norm=batch,layer' is a sweep", "one job's config", "e.g. norm=batch"]),
    (["--help", "norm=bogus"], ["norm", "choose one of"]),  # --help shows the config composed with them
    (["-m", "hydra/launcher=fused,basic", "seed=0,1"], ["sweeps Hydra's own config", "one command per value"]),
    # a preset's own sweep (hydra.sweeper.params: norm none,batch,layer,group) is checked before any job
    (["-m", "+experiment=cnn_norms", "data=mnist", "norm.groups=7"], ["norm.groups=7", "e.g. norm.groups=32"]),
    # issue 26 case 6: values torch cannot take, before any dir exists, in sweeps too
    (["seed=-1"], ["seed=-1", "[0, 2**40)"]),
    (["-m", "seed=0,1099511627776"], ["seed=1099511627776", "[0, 2**40)"]),
    (["-m", "seed=0,1", "sweep.resume=maybe"], ["sweep.resume='maybe'", "true or false"]),
    (["sweep.resume=true"], ["sweep.resume=true", "needs -m"]),
    (["-m", "seed=0,1", "sweep.resume=true"], ["sweep.resume=true needs the sweep's dir", "hydra.sweep.dir="]),
]


@pytest.mark.parametrize("overrides,words", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, monkeypatch, capsys, overrides, words):
    if any("cuda" in o for o in overrides) and _cuda_available():
        pytest.skip("this machine has a GPU")
    code = run_main(tmp_path, monkeypatch, ["train", "data.source=bundled", "trainer.max_steps=2", *overrides])
    out, err = capsys.readouterr()
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nrexp: error: "), err
    assert "Fix" in lines[0] or "choose one of" in lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in out + err
    assert not (tmp_path / "outputs").exists()  # nothing half-written, not even an empty folder


UNUSED = [  # (overrides, the warning; None: the knob is used by some job, no warning)
    (
        ["optim=adam", "optim.momentum=0.5"],
        "optim.momentum has no effect with optim=adam: it is used by optim=sgd only",
    ),
    (["norm=layer", "norm.momentum=0.5"], "norm.momentum has no effect with norm=layer: it is used by norm=batch only"),
    (["norm.groups=4"], "norm.groups has no effect with norm=none: it is used by norm=group only"),
    (["model=cnn", "model.width=64"], "model.width has no effect with model=cnn: it is used by model=mlp|resmlp only"),
    (["trainer.epochs=3", "trainer.max_steps=2"], "trainer.epochs has no effect: trainer.max_steps is set"),
    (["-m", "optim.momentum=0.5,0.8", "optim=adamw"], "optim.momentum has no effect with optim=adamw"),
    (["-m", "optim=sgd,adam", "optim.momentum=0.5"], None),  # the sgd jobs use it
    (["-m", "optim=adam,adamw", "optim.momentum=0.5"], "optim.momentum has no effect with optim=adam,adamw"),
    (["optim=adam", "optim.betas=[0.8,0.99]", "norm=batch", "norm.momentum=0.2"], None),
    (["-m", "+experiment=ln_vs_bn_mlp", "norm.momentum=0.2"], None),  # the preset sweeps norm=none,batch,layer
    (
        ["-m", "+experiment=ln_vs_bn_mlp", "norm=none,layer", "norm.momentum=0.2"],  # the command line's sweep wins
        "norm.momentum has no effect with norm=layer,none",
    ),
]


@pytest.mark.parametrize("overrides,warning", UNUSED, ids=[" ".join(o) for o, _ in UNUSED])
def test_a_knob_that_no_job_uses_gets_one_warning_line_and_the_run_goes_on(
    tmp_path, monkeypatch, capsys, overrides, warning
):
    """`optim=adam optim.momentum=0.5` is valid (a sweep may set momentum for its sgd jobs) but does nothing:
    one warning line on stderr, the command goes on (here --cfg job, or preflight's checks of a sweep)."""
    import nrexp.cli

    if "-m" in overrides:  # the sweep's checks only: preflight, as `nrexp train -m` runs it first
        nrexp.cli.preflight([o for o in overrides if o != "-m"], multirun=True)
    else:
        assert run_main(tmp_path, monkeypatch, ["train", "--cfg", "job", *overrides]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nrexp: warning: ")]
    if warning is None:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith("nrexp: warning: " + warning) and "Fix:" in lines[0], lines


def test_a_run_rejected_after_hydra_made_its_dir_removes_only_what_it_created(tmp_path, monkeypatch, capsys):
    """data.train_size=4001 is found out by the run itself, after Hydra made its run dir: the run removes
    that dir and the empty folders above it that it created, and no folder that was there before, even
    an empty one (test_bad_input_is_one_clear_line_and_writes_nothing: a first run leaves no outputs/)."""
    users_own = tmp_path / "outputs" / "2026-01-01"
    users_own.mkdir(parents=True)
    code = run_main(
        tmp_path,
        monkeypatch,
        ["train", "data.source=bundled", "data.train_size=4001", "hydra.run.dir=outputs/2026-01-01/10-00-01"],
    )
    assert code == 2, capsys.readouterr()
    listing = lambda: sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "outputs").rglob("*"))  # noqa: E731
    assert listing() == ["outputs/2026-01-01"]
    # into outputs/<day>/<time>
    code = run_main(tmp_path, monkeypatch, ["train", "data.source=bundled", "data.train_size=4001"])
    assert code == 2, capsys.readouterr()
    assert listing() == ["outputs/2026-01-01"]


def test_compile_without_a_compiler_is_one_clear_line(tmp_path, monkeypatch, capsys):
    """trainer.compile=true where torch.compile cannot build kernels (no C++ compiler for CPU): one line
    naming the knob and the fix, exit 2, before anything is written."""
    if _cuda_available():
        pytest.skip("this machine has a GPU: trainer.device=auto would compile for CUDA")
    # torch._inductor.config reads $CXX once, when first imported (the run imports it with torch._dynamo):
    # imported under the patched CXX, every later torch.compile in this process would fail (seen when
    # this test ran before test_cli.py's compile test)
    import torch._inductor.config  # noqa: F401

    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    code = run_main(
        tmp_path, monkeypatch, ["train", "data.source=bundled", "trainer.max_steps=2", "trainer.compile=true"]
    )
    out, err = capsys.readouterr()
    assert code == 2, out + err
    (line,) = err.strip().splitlines()
    assert line.startswith("nrexp: error: trainer.compile=true") and "no-such-c++-compiler" in line and "Fix" in line
    assert not (tmp_path / "outputs").exists()


def run_main(cwd, monkeypatch, argv):
    """`nrexp <argv>` in this process (fast: no interpreter or torch start-up); returns the exit code."""
    from nrexp.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("NREXP_DATA_ROOT", str(cwd / "data"))
    monkeypatch.setattr(sys, "argv", ["nrexp"])
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.slow
@pytest.mark.parametrize(
    "source,words",
    [
        ("local", ["data.source=local", "no MNIST files", "data.source=bundled"]),
        ("download", ["data.source=download", "could not download"]),
    ],
)
def test_missing_data_is_one_clear_line(tmp_path, source, words):
    proc = run_cli(["train", f"data.source={source}", "trainer.max_steps=2"], cwd=tmp_path, timeout=600)
    if source == "download" and proc.returncode == 0:
        pytest.skip("this machine is online: the download worked")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip().splitlines()
    assert len(line) == 1 and all(w in line[0] for w in words), proc.stderr


@pytest.mark.slow
def test_corrupt_data_file_is_one_clear_line(tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        (raw / name).write_bytes(b"\x00\x00\x08\x03garbage")
    proc = run_cli(["train", "data.source=local", "trainer.max_steps=2"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip().splitlines()
    assert len(line) == 1 and "corrupt" in line[0] and "data.source=bundled" in line[0], proc.stderr


@pytest.mark.slow
def test_divergence_stops_at_once_and_is_a_result(tiny_run):
    proc, run_dir = tiny_run("optim.lr=1e4", "trainer.max_steps=50")
    summary = read_summary(run_dir)
    assert summary["status"] == "diverged"
    assert summary["steps"] == summary["diverged_at_step"] + 1 < 50  # stopped right after the bad step
    assert summary["metrics"]["train/loss"] is None  # NaN is stored as null: summary.json stays valid JSON
    assert "non-finite training loss at step" in proc.stdout


def test_divergence_without_a_per_step_check_stops_after_the_next_log(tmp_path, monkeypatch):
    """CUDA's way (no per-step .item(): the logging steps' host copies check the loss), run here on the
    CPU: the run stops at the first logging step at or after the CPU check's step, right after it."""
    import nrexp.train as train_mod

    overrides = TINY + ["optim.lr=1e4", "trainer.max_steps=50", "trainer.log_every=5", "trainer.progress=false"]
    every_step = train_mod.train(compose(overrides), tmp_path / "cpu")
    monkeypatch.setattr(train_mod, "checks_every_step", lambda device: False)
    at_logs = train_mod.train(compose(overrides), tmp_path / "cuda-like")
    first_bad = every_step["diverged_at_step"]
    assert every_step["status"] == at_logs["status"] == "diverged" and first_bad < 40
    assert at_logs["diverged_at_step"] == -(-first_bad // 5) * 5  # the first log whose window holds it
    assert at_logs["steps"] == at_logs["diverged_at_step"] + 1  # stopped before the next optimizer step
    # a divergence after the last logging step is caught once, at the end
    tail = compose(
        TINY + ["optim.lr=1e4", f"trainer.max_steps={first_bad + 3}", "trainer.log_every=100", "trainer.progress=false"]
    )
    late = train_mod.train(tail, tmp_path / "late")
    assert late["status"] == "diverged" and late["diverged_at_step"] == late["steps"] - 1 == first_bad + 2


@pytest.mark.slow
def test_divergence_can_be_an_error(tmp_path):
    proc = run_cli(["train", *TINY, "optim.lr=1e4", "trainer.max_steps=50", "trainer.on_nonfinite=raise"], cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("nrexp: error: non-finite training loss at step")
    assert "Traceback" not in proc.stderr
    assert read_summary(run_dirs(tmp_path)[-1])["status"] == "diverged"


RESUMABLE = [
    "data.source=bundled",
    "data.train_size=1024",
    "data.batch_size=32",
    "model.width=48",
    "model.depth=3",
    "norm=batch",
    "dropout.p=0.3",
    "trainer.epochs=4",
    "trainer.log_every=4",
    "trainer.eval_every=16",
    "trainer.checkpoint_every=24",
]


def _start(tmp_path, overrides):
    out = open(tmp_path / "stdout.txt", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "nrexp", "train", *overrides],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(tmp_path, pattern, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for log in (tmp_path / "outputs").rglob("train.log"):
            if pattern in log.read_text():
                return log.parent
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} never appeared; stdout: {(tmp_path / 'stdout.txt').read_text()}")


def _scalars(run_dir, tag):
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    proc = run_cli(["train", *RESUMABLE], cwd=tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run_dirs(tmp)[-1]


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_and_resume_is_exact(tmp_path, uninterrupted, sig, code):
    proc = _start(tmp_path, RESUMABLE)
    run_dir = _wait_for(tmp_path, "step 40/")
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == code
    stopped = read_summary(run_dir)
    assert stopped["status"] == "interrupted" and 40 <= stopped["steps"] < 128 and stopped["signal"] == sig
    assert (run_dir / "checkpoint.pt").is_file()

    resumed = run_cli(["train", f"resume={run_dir}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    final, reference = read_summary(run_dir), read_summary(uninterrupted)
    assert final["status"] == "completed" and final["steps"] == reference["steps"] == 128
    assert final["metrics"] == reference["metrics"]  # exactly, not approximately
    assert final["layers"] == reference["layers"]
    assert len(run_dirs(tmp_path)) == 1  # resumed into the same directory
    for tag in ("train/loss", "act_norm/block01", "weight_change/head", "test/acc"):
        assert _scalars(run_dir, tag) == _scalars(uninterrupted, tag), tag  # no gaps, no duplicates


@pytest.mark.slow
def test_kill_9_leaves_a_loadable_checkpoint_and_resume_purges_later_events(tmp_path, uninterrupted):
    proc = _start(tmp_path, RESUMABLE)
    run_dir = _wait_for(tmp_path, "step 60/")  # past the checkpoint at step 48, events up to 60 written
    proc.kill()
    proc.wait(timeout=60)
    assert not (run_dir / "summary.json").exists()
    resumed = run_cli(["train", f"resume={run_dir}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in (run_dir / "train.log").read_text()
    assert read_summary(run_dir)["metrics"] == read_summary(uninterrupted)["metrics"]
    steps = [s for s, _ in _scalars(run_dir, "act_norm/head")]
    assert steps == sorted(set(steps))  # events after the checkpoint were purged, then written once
    assert _scalars(run_dir, "train/loss") == _scalars(uninterrupted, "train/loss")


@pytest.mark.slow
def test_resume_can_extend_training_but_not_change_the_model(tmp_path):
    proc = run_cli(["train", *TINY], cwd=tmp_path)
    assert proc.returncode == 0
    run_dir = run_dirs(tmp_path)[-1]
    bad = run_cli(["train", f"resume={run_dir}", "model.width=64"], cwd=tmp_path)
    assert bad.returncode == 2 and "cannot change when resuming" in bad.stderr
    more = run_cli(["train", f"resume={run_dir}", "trainer.max_steps=12"], cwd=tmp_path)
    assert more.returncode == 0, more.stdout + more.stderr
    assert read_summary(run_dir)["steps"] == 12
    # the run's own config decides which knobs act: it trains to max_steps, so epochs does nothing
    epochs = run_cli(["train", "--cfg", "job", f"resume={run_dir}", "trainer.epochs=3"], cwd=tmp_path)
    assert epochs.returncode == 0 and "nrexp: warning: trainer.epochs has no effect" in epochs.stderr, epochs.stderr
    if Path("/proc/self").is_dir():  # a resumed run writes into its own dir: a cwd that takes no new folders is fine
        further = run_cli(["train", f"resume={run_dir}", "trainer.max_steps=14"], cwd=Path("/proc"))
        assert further.returncode == 0, further.stdout + further.stderr
        assert read_summary(run_dir)["steps"] == 14


def _digest(run_dir):
    """Hashes of every file in the run dir but the log, which may only grow (checked separately), and the
    lock file, which names the last process that took the run's lock (a refused resume too)."""
    log = (run_dir / "train.log").read_text()
    return {
        "train.log (prefix)": log,
        **{
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.iterdir())
            if p.is_file() and p.name not in ("train.log", ".nrexp.lock")
        },
    }


def _unchanged(run_dir, before):
    after = _digest(run_dir)
    log_before = before.pop("train.log (prefix)")
    return after.pop("train.log (prefix)").startswith(log_before) and after == before


@pytest.mark.slow
def test_corrupt_or_foreign_checkpoint_is_refused_and_nothing_changes(tmp_path):
    import torch

    assert run_cli(["train", *TINY], cwd=tmp_path).returncode == 0
    assert run_cli(["train", *TINY, "model.width=16"], cwd=tmp_path).returncode == 0
    run_dir, other = run_dirs(tmp_path)
    good = (run_dir / "checkpoint.pt").read_bytes()

    (run_dir / "checkpoint.pt").write_bytes(good[:1000])  # truncated, as by a full disk
    before = _digest(run_dir)
    proc = run_cli(["train", f"resume={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 2 and "corrupt" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
    assert _unchanged(run_dir, before)

    # weights of another architecture (width 16) under this run's recorded config (width 32)
    foreign = torch.load(other / "checkpoint.pt", weights_only=False)
    foreign["config"] = read_summary(run_dir)["config"]
    torch.save(foreign, run_dir / "checkpoint.pt")
    before = _digest(run_dir)
    proc = run_cli(["train", f"resume={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "different architecture" in lines[0] and "Traceback" not in proc.stderr
    assert _unchanged(run_dir, before)  # nothing overwritten: not the checkpoint, not the events, not the summary


@pytest.mark.slow
def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    for seed in (0, 0, 1):
        assert run_cli(["train", *TINY, "dropout.p=0.2", f"seed={seed}"], cwd=tmp_path).returncode == 0
    a, b, c = (read_summary(d)["metrics"] for d in run_dirs(tmp_path))
    assert a == b
    assert a != c


@pytest.mark.slow
def test_run_dirs_are_never_reused(tmp_path):
    from nrexp.config import fresh_dir

    base = tmp_path / "outputs" / "day" / "12-00-00"
    first, second, third = fresh_dir(str(base)), fresh_dir(str(base)), fresh_dir(str(base))
    assert [Path(p).name for p in (first, second, third)] == ["12-00-00", "12-00-00_1", "12-00-00_2"]
    # two real runs started together, in the same second most of the time
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "nrexp", "train", *TINY],
            cwd=tmp_path,
            env=cli_env(tmp_path),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    dirs = run_dirs(tmp_path / "outputs")
    assert len(dirs) == 2 and len(set(dirs)) == 2


def _cuda_available():
    import torch

    return torch.cuda.is_available()


def test_throughput_of_a_log_whose_steps_straddle_a_resume_counts_the_time_before_it(tmp_path, step_clock):
    """The log at step 40 covers steps 21-40: 9 of them taken before the checkpoint at step 30, in the
    first process. Its samples per second count their time too (it once counted only the resumed
    process's 11 steps: 20 * 16 samples / 11 s)."""
    from nrexp.train import train

    common = [
        "data.source=bundled",
        "data.train_size=512",
        "data.batch_size=16",
        "model.width=16",
        "model.depth=2",
        "trainer.log_every=20",
        "trainer.progress=false",
        "trainer.eval_every=8",
    ]
    train(compose(common + ["trainer.max_steps=30"]), tmp_path)  # completed: its checkpoint is at step 30
    train(compose(common + ["trainer.max_steps=41"]), tmp_path, resume=True)
    assert step_clock[0] == 41
    assert _scalars(tmp_path, "throughput/samples_per_s") == [(0, 16.0), (20, 16.0), (40, 16.0)]


# ------------------------------------------------------------------------------------------------
# issue 26: run dirs are append-only history, one writer per run, sweeps resume, every failure one line.
# Each test is named after the numbered case it covers (docs/faults.md has the table).


def _tree(root: Path) -> dict:
    """Every file under root, hidden ones too, as {relative path: sha256}: what "untouched" means."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def _one_error_line(proc, code: int) -> str:
    assert proc.returncode == code, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nrexp: error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


def _event_steps(run_dir: Path, tag: str) -> list:
    """The steps of `tag` in every events file of the dir, file after file, as written (no purging applied)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            if any(v.tag == tag for v in event.summary.value):
                steps.append(event.step)
    return steps


def _no_temp_files(root: Path) -> bool:
    return not [p for p in Path(root).rglob(".*.tmp")]


@pytest.mark.slow
def test_case1_a_new_run_never_writes_into_a_dir_that_holds_a_run(tmp_path):
    assert run_cli(["train", *TINY, "hydra.run.dir=run"], cwd=tmp_path).returncode == 0
    before = _tree(tmp_path / "run")
    line = _one_error_line(run_cli(["train", *TINY, "seed=5", "hydra.run.dir=run"], cwd=tmp_path), 2)
    assert "already holds a run" in line and f"resume={tmp_path / 'run'}" in line
    # a rejected input aimed at it: not even .hydra/ is rewritten
    _one_error_line(run_cli(["train", *TINY, "dropout.p=1", "hydra.run.dir=run"], cwd=tmp_path), 2)
    assert _tree(tmp_path / "run") == before  # byte for byte, .hydra/ and train.log included


@pytest.mark.slow
def test_case2_a_second_process_on_a_run_is_refused_naming_the_holder(tmp_path, uninterrupted):
    proc = _start(tmp_path, RESUMABLE + ["hydra.run.dir=outputs/run"])
    run_dir = _wait_for(tmp_path, "step 40/")
    line = _one_error_line(run_cli(["train", f"resume={run_dir}"], cwd=tmp_path), 2)
    assert f"process {proc.pid}" in line and "one writer" in line
    assert proc.wait(timeout=300) == 0
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["steps"] == 128
    # the summary and the curves tell one story: the whole run, each step once
    assert _scalars(run_dir, "train/loss") == _scalars(uninterrupted, "train/loss")
    assert summary["metrics"] == read_summary(uninterrupted)["metrics"]


@pytest.mark.slow
def test_case6_a_temp_file_left_by_kill_9_during_a_checkpoint_write_is_removed_on_resume(tmp_path):
    proc = _start(tmp_path, RESUMABLE)
    run_dir = _wait_for(tmp_path, "step 32/")  # past the checkpoint at step 24
    proc.kill()
    proc.wait(timeout=60)
    stale = run_dir / ".checkpoint.pt.k9x2yz_1.tmp"  # the name atomic_write's mkstemp gives, half written
    stale.write_bytes((run_dir / "checkpoint.pt").read_bytes()[:100_000])
    resumed = run_cli(["train", f"resume={run_dir}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _no_temp_files(tmp_path) and read_summary(run_dir)["status"] == "completed"


SWEEP_KILLED = [
    "data.source=bundled",
    "data.train_size=1024",
    "data.batch_size=32",
    "model.width=64",
    "model.depth=3",
    "trainer.max_steps=200",
    "trainer.log_every=4",
    "trainer.eval_every=100",
    "trainer.checkpoint_every=64",
    "trainer.progress=false",
    "seed=0,1,2",
]


@pytest.mark.slow
@pytest.mark.parametrize("launcher,kill_at", [("basic", 100), ("basic", 20), ("joblib", 100), ("fused", 100)])
def test_case3_a_killed_sweep_is_finished_with_sweep_resume(tmp_path, launcher, kill_at):
    """kill -9 (the whole process group) while seed=1 is at step `kill_at` (20: before its first checkpoint at
    64, so it has events but nothing to resume from). Re-running is refused in one line naming sweep.resume;
    with sweep.resume=true each job is skipped, resumed or run, as the table says, every job completes, the
    jobs that had completed are untouched and no curve has a step twice."""
    import os
    import signal as signals

    from nrexp import sweep

    launch = {
        "basic": [],
        "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
        "fused": ["hydra/launcher=fused"],
    }[launcher]
    command = ["train", "-m", *SWEEP_KILLED, *launch, "hydra.sweep.dir=sweep"]
    out = open(tmp_path / "stdout.txt", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nrexp", *command],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while not any(f"step {kill_at}/" in log.read_text() for log in (tmp_path / "sweep").glob("*seed=1*/train.log")):
        assert time.time() < deadline and proc.poll() is None, (tmp_path / "stdout.txt").read_text()
        time.sleep(0.02)
    os.killpg(proc.pid, signals.SIGKILL)
    proc.wait(timeout=60)
    sweep_dir = tmp_path / "sweep"
    before = _tree(sweep_dir)

    line = _one_error_line(run_cli(command, cwd=tmp_path), 2)
    assert "sweep.resume=true" in line and "already holds" in line
    assert _tree(sweep_dir) == before

    jobs = {d.name: d for d in sweep_dir.iterdir() if d.is_dir()}
    expected = {name: sweep.job_action(d) for name, d in jobs.items()}
    assert expected[next(n for n in jobs if "seed=1" in n)] == ("resumed" if kill_at > 64 else "run")
    done = run_cli([*command, "sweep.resume=true"], cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = {d.name: d for d in sweep_dir.iterdir() if d.is_dir()}
    assert len(jobs) == 3
    actions = {name: expected.get(name, "run") for name in jobs}
    counts = {a: list(actions.values()).count(a) for a in ("skipped", "resumed", "run")}
    said = f"(this command: {counts['skipped']} skipped, {counts['resumed']} resumed, {counts['run']} run)"
    assert said in done.stdout, done.stdout
    for name, d in jobs.items():
        summary = read_summary(d)
        assert summary["status"] == "completed" and summary["steps"] == 200, name
        steps = [s for s, _ in _scalars(d, "train/loss")]  # as TensorBoard shows them
        assert steps == list(range(0, 200, 4)), name
        if actions[name] == "skipped":  # untouched, byte for byte: all but Hydra's record of this command
            kept = {
                k: v
                for k, v in before.items()
                if k.startswith(name + "/")
                and not k.endswith(  # and its lock
                    ("/train.log", "/.hydra/hydra.yaml", "/.nrexp.lock")
                )
            }
            assert {k: v for k, v in _tree(sweep_dir).items() if k in kept} == kept
        if actions[name] == "run":  # started from step 0: its partial events were removed, not appended to
            assert len(list(d.glob("events.out.tfevents.*"))) == 1
            raw = _event_steps(d, "train/loss")
            assert raw == sorted(set(raw))
    assert _no_temp_files(sweep_dir)


@pytest.mark.slow
def test_case4_report_skips_unreadable_and_foreign_summaries_keeps_a_resumed_seed_in_its_group(tiny_sweep, tmp_path):
    import json
    import shutil

    copy = tmp_path / "sweep"
    shutil.copytree(tiny_sweep[1], copy)
    completed = [d for d in run_dirs(copy) if read_summary(d)["status"] == "completed"]
    clean = run_cli(["report", str(copy), "--json", "--out", str(tmp_path / "clean")], cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr
    expected = json.loads(clean.stdout)

    resumed = read_summary(completed[0])  # as `nrexp train resume=<dir>` records it, output knobs changed too
    resumed["config"].update(resume=str(completed[0]))
    resumed["config"]["trainer"].update(checkpoint_every=7, progress=True)
    resumed["config"]["dropout"]["p"] = -0.0  # the same setting as 0.0
    (completed[0] / "summary.json").write_text(json.dumps(resumed))
    truncated, foreign = completed[1], completed[2]
    (truncated / "summary.json").write_bytes((truncated / "summary.json").read_bytes()[:120])
    (foreign / "summary.json").write_text(json.dumps({"status": "ok", "result": [1, 2, 3]}))

    proc = run_cli(["report", str(copy), "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("nrexp: warning: skipped ")]
    assert (
        len(warnings) == 2
        and "unreadable summary.json" in "".join(warnings)
        and "not an nrexp summary" in "".join(warnings)
    )
    assert "Traceback" not in proc.stderr
    got = json.loads(proc.stdout)
    assert got["swept_keys"] == expected["swept_keys"]  # not resume, checkpoint_every, progress or dropout.p
    skipped = {truncated.relative_to(copy).as_posix(), foreign.relative_to(copy).as_posix()}
    kept = sorted(r["name"] for r in expected["runs"] if r["name"] not in skipped)
    assert sorted(r["name"] for r in got["runs"]) == kept
    setting = {r["name"]: r["setting"] for r in expected["runs"]}
    assert all(r["setting"] == setting[r["name"]] for r in got["runs"])  # the resumed seed stays in its group


@pytest.mark.slow
def test_case5_a_run_that_diverges_on_its_last_step_is_diverged(tmp_path):
    proc = run_cli(["train", "data.source=bundled", "trainer.max_steps=1", "optim.lr=1e30"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = read_summary(run_dirs(tmp_path)[-1])
    assert summary["status"] == "diverged" and summary["metrics"]["test/loss"] is None


def _overcommits() -> bool:
    try:
        return Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(_overcommits(), reason="vm.overcommit_memory=1: the allocation succeeds and the OOM killer acts")
def test_case6_out_of_memory_is_one_line_with_the_size_and_a_smaller_width(tmp_path):
    proc = run_cli(
        [
            "train",
            "data.source=bundled",
            "trainer.max_steps=2",
            "trainer.device=cpu",
            "model.width=100000000",
            "hydra.run.dir=run",
        ],
        cwd=tmp_path,
    )
    line = _one_error_line(proc, 1)
    assert line.startswith("nrexp: error: out of host memory: tried to allocate ") and "GiB" in line
    assert "model.width=100000000" in line and "Fix: use a smaller width or batch, e.g. model.width=" in line
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "failed" and summary["error"] == line.removeprefix("nrexp: error: ")
    log = (tmp_path / "run" / "train.log").read_text()
    assert "Traceback (most recent call last)" in log and "DefaultCPUAllocator" in log  # the traceback: in the log


INJECT_ENOSPC = """
import errno, os, sys
_fdopen = os.fdopen
class FullDisk:  # a write of a checkpoint (over 100 kB) fails part-way, as on a full disk
    def __init__(self, f): self.f = f
    def write(self, data):
        if len(data) > 100_000:
            self.f.write(data[:4096])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)
    def __getattr__(self, name): return getattr(self.f, name)
    def __enter__(self): return self
    def __exit__(self, *exc): return self.f.__exit__(*exc)
def fdopen(fd, mode="r", *a, **k):
    f = _fdopen(fd, mode, *a, **k)
    return FullDisk(f) if "wb" in mode else f
os.fdopen = fdopen
from nrexp.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_case6_a_full_disk_is_one_line_with_the_path_and_size_and_resume_starts_again(tmp_path):
    (tmp_path / "inject.py").write_text(INJECT_ENOSPC)
    proc = subprocess.run(
        [sys.executable, "inject.py", "train", *TINY, "hydra.run.dir=run"],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = _one_error_line(proc, 1)
    run_dir = tmp_path / "run"
    assert f"disk full: no space left on the device writing {run_dir / 'checkpoint.pt'}; it needs " in line
    assert "KiB free there" in line and "resume=" in line
    assert read_summary(run_dir)["status"] == "failed" and not (run_dir / "checkpoint.pt").exists()
    assert _no_temp_files(run_dir)
    assert "Traceback" in (run_dir / "train.log").read_text()
    resumed = run_cli(["train", f"resume={run_dir}"], cwd=tmp_path)  # disk freed: from step 0, no duplicate steps
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert read_summary(run_dir)["status"] == "completed"
    raw = _event_steps(run_dir, "train/loss")
    assert raw == [0, 2, 4, 6] and len(list(run_dir.glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_case6_corrupt_data_through_the_default_source_is_one_line(tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        (raw / name).write_bytes(b"\x00\x00\x08\x03garbage")
    line = _one_error_line(run_cli(["train", "trainer.max_steps=2"], cwd=tmp_path), 2)  # data.source=auto
    assert "data.source=auto" in line and "corrupt" in line and "data.source=bundled" in line
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_case6_a_signal_during_start_up_leaves_nothing(tmp_path, sig):
    proc = subprocess.Popen(
        [sys.executable, "-m", "nrexp", "train", *TINY, "hydra.run.dir=run"],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (tmp_path / "run" / ".hydra" / "config.yaml").exists():  # Hydra made the dir; torch not imported yet
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.005)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nrexp: error: stopped by signal {int(sig)}"), err
    assert not (tmp_path / "run").exists()  # nothing left: no dir with .hydra/ only


@pytest.mark.slow
def test_case6_a_run_stopped_before_its_first_checkpoint_is_interrupted_and_resume_starts_it_from_step_0(tmp_path):
    """The other promise of start-up: a dir whose summary says interrupted (steps 0) is restarted by resume=."""
    import json

    assert run_cli(["train", *TINY, "hydra.run.dir=run"], cwd=tmp_path).returncode == 0
    run_dir = tmp_path / "run"
    summary = read_summary(run_dir)
    (run_dir / "checkpoint.pt").unlink()  # as if stopped in start-up after its first events
    (run_dir / "summary.json").write_text(
        json.dumps({"status": "interrupted", "steps": 0, "signal": 15, "config": summary["config"], "metrics": {}})
    )
    resumed = run_cli(["train", f"resume={run_dir}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert read_summary(run_dir)["metrics"] == summary["metrics"]  # the same run, from step 0
    assert _event_steps(run_dir, "train/loss") == [0, 2, 4, 6]  # the old events removed, not appended to
