"""Run dir guards (nrexp/rundir.py): a run dir holds one run, written by one process."""

import os
import subprocess
import sys

import pytest

from nrexp.errors import ConfigError
from nrexp.rundir import LOCK, RunLock, check_new_run_dir, holds_a_run, remove_stale_temp_files

HOLD = """
import sys, time
from nrexp.rundir import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("name", ["summary.json", "checkpoint.pt", "events.out.tfevents.1.host"])
def test_a_dir_with_a_summary_checkpoint_or_events_holds_a_run(tmp_path, name):
    (tmp_path / ".hydra").mkdir()
    assert not holds_a_run(tmp_path)  # Hydra's own files are not a run
    check_new_run_dir(tmp_path)
    (tmp_path / name).write_text("x")
    assert holds_a_run(tmp_path)
    with pytest.raises(ConfigError, match="already holds a run.*Fix: continue that run with resume="):
        check_new_run_dir(tmp_path)


def test_a_second_writer_is_refused_with_the_holders_pid_and_the_lock_ends_with_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"being written by process {holder.pid}.*kill {holder.pid}"):
            with RunLock(tmp_path):
                pass
    finally:
        holder.kill()  # as kill -9: the OS releases the lock
        holder.wait()
    with RunLock(tmp_path):
        assert (tmp_path / LOCK).read_text() == str(os.getpid())


def test_stale_temp_files_are_removed_and_nothing_else(tmp_path):
    (tmp_path / ".checkpoint.pt.abc123.tmp").write_bytes(b"half")
    (tmp_path / "checkpoint.pt").write_bytes(b"whole")
    assert [p.name for p in remove_stale_temp_files(tmp_path)] == [".checkpoint.pt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_clear_partial_run_removes_events_summary_and_temp_files_only(tmp_path):
    """A run started again from step 0 (no checkpoint to resume from) must not append to its old curves."""
    from nrexp.rundir import clear_partial_run

    for name in ("events.out.tfevents.1.host.0", "summary.json", ".checkpoint.pt.x1.tmp", "train.log", ".nrexp.lock"):
        (tmp_path / name).write_text(name)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 0\n")
    gone = clear_partial_run(tmp_path)
    assert sorted(p.name for p in gone) == [".checkpoint.pt.x1.tmp", "events.out.tfevents.1.host.0", "summary.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hydra", ".nrexp.lock", "train.log"]


def test_a_lock_held_by_this_process_is_known_and_released(tmp_path):
    from nrexp import rundir

    assert not rundir.held_by_this_process(tmp_path)
    rundir.hold(tmp_path)
    try:
        assert rundir.held_by_this_process(tmp_path)
    finally:
        rundir.release_all()
    assert not rundir.held_by_this_process(tmp_path)
    with rundir.RunLock(tmp_path):  # free again
        pass


def test_job_key_ignores_order_and_bookkeeping_keys():
    from nrexp.sweep import job_key

    assert job_key(["seed=1", "norm=batch", "trainer.progress=false"]) == job_key(["norm=batch", "seed=1"])
    assert job_key(["seed=1"]) != job_key(["seed=2"])


@pytest.mark.parametrize(
    "status,checkpoint,action",
    [
        ("completed", True, "skipped"),
        ("diverged", False, "skipped"),
        ("interrupted", True, "resumed"),
        ("failed", True, "resumed"),
        ("failed", False, "run"),
        (None, False, "run"),
    ],
)
def test_job_action(tmp_path, status, checkpoint, action):
    import json

    from nrexp.sweep import job_action

    if status:
        (tmp_path / "summary.json").write_text(json.dumps({"status": status}))
    if checkpoint:
        (tmp_path / "checkpoint.pt").write_bytes(b"x")
    assert job_action(tmp_path) == action


def test_failure_lines_of_resource_errors():
    import errno

    from nrexp.sweep import failure_line, width_that_fits

    cfg = {"model": {"name": "mlp", "width": 100_000_000, "depth": 2}, "data": {"batch_size": 128}}
    oom = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 313600000000 bytes. Error code 12 (Cannot allocate memory)"
    )
    line = failure_line(oom, cfg)
    assert line.startswith(
        "out of host memory: tried to allocate 292.1 GiB for model.width=100000000, "
        "data.batch_size=128. Fix: use a smaller width or batch, e.g. model.width="
    )
    assert width_that_fits(100_000_000, 2, 16 * 2**30) == 16384  # 16 B * (3072 w + w^2) <= 8 GiB: 5.1 GB
    cuda = RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 15.7 GiB total capacity)")
    assert failure_line(cuda, cfg).startswith("out of GPU memory: tried to allocate 20.00 GiB")
    full = OSError(errno.ENOSPC, "No space left on device")
    full.nrexp_path, full.nrexp_bytes = "/runs/a/checkpoint.pt", 3 * 2**20
    assert failure_line(full).startswith(
        "disk full: no space left on the device writing /runs/a/checkpoint.pt; it needs 3.0 MiB free there. Fix: "
    )
    assert failure_line(ValueError("bad")) == "ValueError: bad"
