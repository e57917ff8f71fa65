"""What a sweep (`nrexp train -m ...`) adds to a single run, whatever launcher runs its jobs.

- `job_dir_name`: the OmegaConf resolver behind `hydra.sweep.subdir` (configs/train.yaml): a job's dir
  is named by its overrides, made safe as one path component.
- `record_failure`: a job that raises is written down as summary.json with status "failed" and the
  error line, so the sweep goes on and `nrexp report` sees the failure instead of a missing dir.
- `gpu_for_job` / `claim_gpu`: jobs running side by side on a machine with several GPUs take turns
  over them (job.num % device_count).
- `SweepStatusTable`: a Hydra callback (registered in configs/train.yaml under hydra.callbacks) that
  prints one row per job and its status when the sweep ends.

No torch at module level: Hydra imports this module (through the callback) before any job starts,
and for `nrexp train --cfg job` too.
"""
from __future__ import annotations

import hashlib
import logging
import re
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

log = logging.getLogger("nrexp")

# Linux allows 255 bytes per path component; a long list of overrides is cut and made unique by a hash.
MAX_DIR_NAME = 200


def job_dir_name(override_dirname: str) -> str:
    """`norm=batch,dropout.p=0.2` stays as it is. Also:
    - no overrides at all (`nrexp train -m`) -> `defaults`, not the sweep dir itself (which would
      mix the job's files with multirun.yaml);
    - `+experiment=x` -> `experiment=x`: the `+` says how Hydra merges a key, not what the run is;
    - `/` in a value (a nested group option, a path) would make nested dirs: it becomes `-`;
    - names too long for the file system keep their start and get a short hash of the whole.
    """
    name = re.sub(r"(^|,)\++", r"\1", override_dirname).replace("/", "-")
    if not name:
        return "defaults"
    if len(name.encode()) > MAX_DIR_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = name.encode()[: MAX_DIR_NAME - 12].decode(errors="ignore") + "~" + digest
    return name


# Registered when this module is imported: Hydra resolves hydra.sweep.subdir in the process that runs
# the job (a joblib worker, a submitit job), and that process unpickles the callback below, so it has
# imported this module by then.
OmegaConf.register_new_resolver("nrexp.job_dir", job_dir_name, replace=True)


def record_failure(cfg: Any, run_dir: Path, error: BaseException) -> dict:
    """Write summary.json for a job that raised, with the error's last line, and log the traceback."""
    from nrexp.writers import write_summary

    line = traceback.format_exception_only(type(error), error)[-1].strip()
    log.error("job failed: %s\n%s", line, "".join(traceback.format_exception(error)))
    summary = {
        "status": "failed",
        "error": line,
        "config": _plain_config(cfg),
        "metrics": {},
        "run_dir": str(run_dir),
    }
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_summary(Path(run_dir), summary)
    return summary


def _plain_config(cfg: Any) -> dict:
    try:
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    except Exception:  # noqa: BLE001 - an interpolation that cannot resolve may be the very error recorded
        return OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)


def gpu_for_job(job_num: int, device_count: int) -> int | None:
    """The GPU index job `job_num` of a sweep uses: round robin, so parallel jobs spread evenly."""
    return job_num % device_count if device_count > 1 else None


def claim_gpu(requested_device: str, job_num: int) -> int | None:
    """Make GPU `gpu_for_job(...)` the current CUDA device of this job's process, for
    trainer.device=auto|cuda on a machine with more than one GPU; return its index (None: unchanged).

    `torch.device("cuda")` means "the current device", so train.py's resolve_device() result then
    lands on this GPU without any change to train.py. (train.py may record the index in summary.json
    with `torch.device("cuda", torch.cuda.current_device())`.)
    """
    if requested_device not in ("auto", "cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    index = gpu_for_job(job_num, torch.cuda.device_count())
    if index is not None:
        torch.cuda.set_device(index)
        log.info("sweep job %d runs on cuda:%d", job_num, index)
    return index


# The jobs of the sweep that ended last in this process, as its table lists them: `nrexp train -m`
# exits with 1 when one of them failed (nrexp/cli.py).
finished_jobs: list[dict] = []


def _job_stamps(sweep_dir: Path) -> dict[str, int]:
    """Each job dir of a sweep dir with the time its summary (or, before one, its config) was written."""
    from nrexp.report import find_job_dirs

    stamps = {}
    for d in find_job_dirs(sweep_dir) if sweep_dir.is_dir() else []:
        for f in (d / "summary.json", d / ".hydra" / "config.yaml"):
            if f.is_file():
                stamps[str(d)] = f.stat().st_mtime_ns
                break
    return stamps


class SweepStatusTable(Callback):
    """At the end of a sweep, one row per job: its dir, status, test accuracy, steps, time, error."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        # a sweep dir given again (hydra.sweep.dir=...) holds the jobs of earlier commands: the table
        # lists them all, but the exit code is this command's (finished_jobs)
        self.before = _job_stamps(Path(str(config.hydra.sweep.dir)))

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from rich.table import Table

        from nrexp.report import find_job_dirs, read_job, wide_console

        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = [read_job(d, sweep_dir) for d in find_job_dirs(sweep_dir)]
        before, now = getattr(self, "before", {}), _job_stamps(sweep_dir)
        finished_jobs[:] = [job for job in jobs
                            if job["dir"] not in before or before[job["dir"]] != now.get(job["dir"])]
        # name jobs by what differs between them: overrides shared by every job only add width
        shared = set.intersection(*(set(job["name"].split(",")) for job in jobs)) if len(jobs) > 1 else set()
        counts: dict[str, int] = {}
        for job in jobs:
            counts[job["status"]] = counts.get(job["status"], 0) + 1
        title = f"sweep {sweep_dir}: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        table = Table(title=title, header_style="bold")
        for column, justify in (("job", "left"), ("status", "left"), ("test acc", "right"),
                                ("steps", "right"), ("time s", "right"), ("error", "left")):
            table.add_column(column, justify=justify, overflow="fold")
        style = {"completed": "green", "failed": "red", "diverged": "yellow"}
        for job in jobs:
            acc = job["metrics"].get("test/acc")
            name = ",".join(p for p in job["name"].split(",") if p not in shared) or job["name"]
            table.add_row(name, f"[{style.get(job['status'], 'magenta')}]{job['status']}",
                          "" if acc is None else f"{acc:.4f}", str(job.get("steps", "")),
                          "" if job.get("wall_time_s") is None else f"{job['wall_time_s']:.1f}",
                          job.get("error", ""))
        if shared:
            table.caption = "every job also has: " + ",".join(sorted(shared))
        wide_console().print(table)
