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
