"""A run dir holds one run, written by one process: the guards that keep it so.

- `holds_a_run`: a dir with events, a summary or a checkpoint holds a run; a new run never writes there
  (only `resume=` continues one).
- `RunLock`: an advisory lock (flock) on a file in the run dir, held while a process writes the run.
  The OS releases it when the process ends, however it ends (kill -9 included), so a lock is never stale.
- `remove_stale_temp_files`: what a write killed half-way left (atomic_write's hidden temp files).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from nrexp.errors import ConfigError

LOCK = ".nrexp.lock"
RUN_FILES = ("summary.json", "checkpoint.pt")
EVENTS = "events.out.tfevents.*"


def holds_a_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds (part of) a run: its summary, checkpoint or TensorBoard events."""
    run_dir = Path(run_dir)
    return any((run_dir / name).exists() for name in RUN_FILES) or any(run_dir.glob(EVENTS))


def check_new_run_dir(run_dir: Path) -> None:
    """One line if a new run would write into `run_dir`, which already holds one."""
    if holds_a_run(run_dir):
        raise ConfigError(
            f"{run_dir} already holds a run; a new run never writes into it. Fix: continue that run "
            f"with resume={run_dir}, or give the new run a dir of its own (leave hydra.run.dir unset)"
        )


class RunLock:
    """`with RunLock(run_dir):` this process is the run's one writer, or one ConfigError line names the
    process that is. The lock file stays (it holds the writer's pid); the lock itself ends with the process."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
            os.close(fd)
            message = (
                f"{self.path.parent} is being written by process {holder}; a run dir has one writer. "
                f"Fix: wait for that process to end (or stop it: kill {holder}), then run again"
            )
            raise ConfigError(message) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete the temp files a killed write left in `run_dir` (`.<name>.*.tmp`); call holding its RunLock."""
    stale = sorted(Path(run_dir).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def held_by_this_process(run_dir: Path) -> bool:
    """Whether this process already holds `run_dir`'s lock (cli takes it before Hydra starts)."""
    return any(lock.path.parent == Path(run_dir).resolve() for lock in HELD)


# the locks cli took before Hydra ran, held until the process ends (the run's one writer: this process)
HELD: list[RunLock] = []


def hold(run_dir: Path) -> RunLock:
    """Take `run_dir`'s lock for the rest of this process (or raise the one line naming its holder)."""
    lock = RunLock(Path(run_dir).resolve()).__enter__()
    HELD.append(lock)
    return lock


def release_all() -> None:
    while HELD:
        HELD.pop().__exit__()


def clear_partial_run(run_dir: Path) -> list[Path]:
    """Remove what a run that will start again from step 0 left behind: its TensorBoard events, summary
    and checkpoint temp files (its .hydra/ record and train.log stay), so the restarted run's curves do
    not append to the old ones. Call holding its RunLock, only for a run with no checkpoint to resume."""
    run_dir = Path(run_dir)
    gone = sorted(run_dir.glob(EVENTS)) + [p for p in (run_dir / "summary.json",) if p.exists()]
    for path in gone:
        path.unlink(missing_ok=True)
    return gone + remove_stale_temp_files(run_dir)
