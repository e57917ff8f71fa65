"""What a sweep (`nrexp train -m ...`) adds to a single run, whatever launcher runs its jobs.

- `job_dir_name`: the OmegaConf resolver behind `hydra.sweep.subdir` (configs/train.yaml): a job's dir
  is named by its overrides, made safe as one path component.
- `record_failure`: a job that raises is written down as summary.json with status "failed" and the
  error line, so the sweep goes on and `nrexp report` sees the failure instead of a missing dir.
- `gpu_for_job` / `claim_gpu`: jobs running side by side on a machine with several GPUs take turns
  over them (job.num % device_count).
- `SweepStatusTable`: a Hydra callback (registered in configs/train.yaml under hydra.callbacks) that
  prints one row per job and its status when the sweep ends.
- `recorded_jobs` / `job_key` / `job_action`: `nrexp train -m ... sweep.resume=true` finishes a sweep: each
  job is found by its overrides (its `.hydra/overrides.yaml`, not its dir name) and is skipped (a result:
  completed or diverged), resumed (from its checkpoint) or run (from step 0).
- `failure_line`: any exception of a run as one line, with the fix for the known resource errors.

No torch at module level: Hydra imports this module (through the callback) before any job starts,
and for `nrexp train --cfg job` too.
"""

from __future__ import annotations

import hashlib
import logging
import re
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

log = logging.getLogger("nrexp")

# Linux allows 255 bytes per path component; a long list of overrides is cut and made unique by a hash.
MAX_DIR_NAME = 200
# What nrexp adds to hydra.job.config.override_dirname.exclude_keys for a sweep: the keys the command line
# holds constant (naming_overrides), so that a job dir is named by what differs between the jobs.
EXCLUDE_KEYS = "hydra.job.config.override_dirname.exclude_keys"


def override_key(line: str) -> str:
    """The key an override sets, as Hydra's exclude_keys match it (Override.key_or_group): `norm` of
    `norm=batch`, `experiment` of `+experiment=x`, `db` of `db@pkg=mysql`, `seed` of `~seed`."""
    return str(line).split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def clean_dir_name(name: str) -> str:
    """`name` as one safe path component:
    - `+experiment=x` -> `experiment=x`: the `+` says how Hydra merges a key, not what the run is;
    - `/` in a value (a nested group option, a path) would make nested dirs: it becomes `-`; so do
      control characters;
    - names too long for the file system keep their start and get a short hash of the whole, so cut
      names stay distinct."""
    name = re.sub(r"(^|,)[+~]+", r"\1", name)
    name = re.sub(r"[/\x00-\x1f\x7f]", "-", name)
    if len(name.encode()) > MAX_DIR_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = name.encode()[: MAX_DIR_NAME - 12].decode(errors="ignore") + "~" + digest
    return name


def named_overrides(task: Sequence[str], exclude_keys: Sequence[str] = (), sweeper_params: Any = None) -> list[str]:
    """The overrides of a job (`task`: hydra.overrides.task) that name its dir: those whose key is not in
    `exclude_keys`, the command line's first, in its order, then those of hydra.sweeper.params (an
    experiment preset's sweep), in the preset's order."""
    excluded = {str(k).lstrip("+~") for k in exclude_keys or ()}
    kept = [str(o) for o in task or () if override_key(o) not in excluded]
    params = [str(k) for k in (sweeper_params or {})]
    from_params = sorted((o for o in kept if override_key(o) in params), key=lambda o: params.index(override_key(o)))
    return [o for o in kept if override_key(o) not in params] + from_params


def job_dir_name(task: Sequence[str], exclude_keys: Sequence[str] = (), sweeper_params: Any = None) -> str:
    """A sweep job's dir (hence its TensorBoard run name): the overrides that vary across the sweep, in
    command-line order (`norm=batch,init.scale=2`; nrexp excludes the constant ones, naming_overrides).
    A job of a sweep that varies nothing (one job) is named by all its overrides but the bookkeeping ones,
    and one with no overrides `defaults`, not the sweep dir itself (which would mix its files with
    multirun.yaml). Made safe by clean_dir_name."""
    name = ",".join(named_overrides(task, exclude_keys, sweeper_params))
    if not name:
        from nrexp.runs import BOOKKEEPING_KEYS

        name = ",".join(named_overrides(task, sorted(BOOKKEEPING_KEYS)))
    return clean_dir_name(name) or "defaults"


def run_name_suffix(task: Sequence[str], exclude_keys: Sequence[str] = ()) -> str:
    """What follows the time in a single run's dir: `_` and its command-line overrides in their order
    (`_norm=batch,dropout.p=0.2`), or nothing for a run of the defaults."""
    name = clean_dir_name(",".join(named_overrides(task, exclude_keys)))
    return "_" + name if name else ""


def naming_overrides(overrides: Sequence[str], multirun: bool) -> list[str]:
    """The Hydra override that makes a sweep's job dirs carry only what varies: the command line's
    constant keys added to hydra.job.config.override_dirname.exclude_keys (to the list the command line
    gives, else to configs/train.yaml's). [] for a single run, or a command line that holds nothing constant."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not multirun:
        return []
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    given = next((o for o in parsed if o.key_or_group == EXCLUDE_KEYS), None)
    constants = [o.key_or_group for o in parsed if not o.key_or_group.startswith("hydra") and not o.is_sweep_override()]
    if not constants:
        return []
    keys = list(given.value()) if given is not None else default_exclude_keys()
    keys = list(dict.fromkeys([*map(str, keys), *constants]))
    return [f"{EXCLUDE_KEYS}=[" + ",".join(keys) + "]"]


def default_exclude_keys() -> list[str]:
    """hydra.job.config.override_dirname.exclude_keys of configs/train.yaml: the knobs that never name a dir."""
    import nrexp

    cfg = OmegaConf.load(Path(nrexp.config_dir()) / "train.yaml")
    return [str(k) for k in OmegaConf.select(cfg, EXCLUDE_KEYS, default=[])]


# Registered when this module is imported: Hydra resolves hydra.sweep.subdir in the process that runs
# the job (a joblib worker, a submitit job), and that process unpickles the callback below, so it has
# imported this module by then.
OmegaConf.register_new_resolver("nrexp.job_dir", job_dir_name, replace=True)
OmegaConf.register_new_resolver("nrexp.run_name", run_name_suffix, replace=True)


def record_failure(cfg: Any, run_dir: Path, error: BaseException, console: bool = True) -> dict:
    """Write summary.json for a run that raised, with its one line (`failure_line`); the traceback goes
    to the run's train.log only, the line to the console too (`console`: a sweep's job; a single run's
    command prints it as its error line). A summary that cannot be written (the disk is full) is said
    in the log; the line is what matters."""
    from nrexp.writers import write_summary

    line = failure_line(error, cfg)
    if console:
        log.error("run failed: %s", line)
    else:
        log_to_files_only(f"run failed: {line}")
    log_to_files_only("traceback of the failure above:\n" + "".join(traceback.format_exception(error)))
    summary = {
        "status": "failed",
        "error": line,
        "config": _plain_config(cfg),
        "metrics": {},
        "run_dir": str(run_dir),
    }
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_summary(Path(run_dir), summary)
    except OSError as err:
        log.error("could not write %s/summary.json either: %s", run_dir, err)
    return summary


def log_to_files_only(message: str) -> None:
    """Log `message` to the run's train.log (the root logger's file handlers), not to the terminal."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def failure_line(error: BaseException, cfg: Any = None) -> str:
    """One line for an exception a run raised: what happened and, for the resource errors one can fix
    (out of memory, a full disk), the fix. Anything else: the exception's own last line."""
    import errno

    text = str(error)
    lowered = text.lower()
    if (
        isinstance(error, MemoryError)
        or "out of memory" in lowered
        or "can't allocate memory" in lowered
        or type(error).__name__ == "OutOfMemoryError"
    ):
        return out_of_memory_line(text, cfg)
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = getattr(error, "nrexp_path", None) or error.filename or "the run dir"
        need = getattr(error, "nrexp_bytes", None)
        need_text = f"; it needs {_size(need)} free there" if need else ""
        return (
            f"disk full: no space left on the device writing {where}{need_text}. Fix: free space on that file "
            "system (or write elsewhere: hydra.run.dir / hydra.sweep.dir), then continue the run with "
            "resume=<run dir>"
        )
    return traceback.format_exception_only(type(error), error)[-1].strip()


def out_of_memory_line(text: str, cfg: Any = None) -> str:
    """Out of memory, with the size it tried and a width (or batch) that fits this machine's memory."""
    tried = re.search(r"tried to allocate (\d+) bytes", text) or re.search(
        r"[Tt]ried to allocate ([0-9.]+ ?[KMGT]i?B)", text
    )
    amount = tried.group(1) if tried else None
    if amount and amount.isdigit():
        amount = _size(int(amount))
    gpu = "cuda" in text.lower()
    sizes, fix = "", "a smaller model or data.batch_size"
    model = _get(cfg, "model.name")
    width, batch, depth = _get(cfg, "model.width"), _get(cfg, "data.batch_size"), _get(cfg, "model.depth") or 1
    if model in ("mlp", "resmlp") and width:
        sizes = f" for model.width={width}, data.batch_size={batch}"
        fitting = width_that_fits(width, depth, _memory_bytes(gpu))
        fix = f"a smaller width or batch, e.g. model.width={fitting} or data.batch_size={max(2, (batch or 2) // 4)}"
    elif model == "cnn":
        sizes = f" for model.channels={list(_get(cfg, 'model.channels') or [])}, data.batch_size={batch}"
        fix = f"fewer channels or a smaller batch, e.g. data.batch_size={max(2, (batch or 2) // 4)}"
    tried_text = f"tried to allocate {amount}" if amount else "an allocation failed"
    return f"out of {'GPU' if gpu else 'host'} memory: {tried_text}{sizes}. Fix: use {fix}"


def width_that_fits(width: int, depth: int, memory: int | None, inputs: int = 3072) -> int:
    """The largest power of two below `width` whose MLP (inputs x w, depth - 1 times w x w; weights, gradients,
    optimizer state and the monitor's copy: 16 bytes a parameter) takes at most half of `memory` (None: width / 8)."""
    if not memory:
        return max(1, width // 8)
    w = 1
    while w * 2 < width and 16 * (inputs * w * 2 + (depth - 1) * (w * 2) ** 2) <= memory / 2:
        w *= 2
    return w


def _memory_bytes(gpu: bool) -> int | None:
    """The GPU's total memory, or the host's available memory; None if unknown."""
    import os

    try:
        if gpu:
            import torch

            return torch.cuda.mem_get_info()[1]
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except Exception:  # noqa: BLE001 - only a hint in a message
        return None


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        try:
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        except (AttributeError, KeyError, TypeError):
            return None
    return getattr(node, "value", node)


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ------------------------------------------------------------------------------------------------
# finishing a sweep: sweep.resume=true

# what a job's overrides may differ in and still be the same job: how it shows progress and where it reads
IGNORED_IN_JOB_KEY = {"trainer.progress", "data.root", "data.eval_batch_size"}
SKIPPED, RESUMED, RUN = "skipped", "resumed", "run"
# the plan of the sweep this process launches (cli): {"resume": bool, "jobs": {job key: recorded job dir}}
plan: dict = {"resume": False, "jobs": {}}


def job_key(overrides: Any) -> tuple:
    """A job's identity: its task overrides (as Hydra records them in .hydra/overrides.yaml), in any order,
    bookkeeping keys left out. Dir names may change with nrexp's naming; the overrides do not."""
    keys = []
    for o in overrides or []:
        o = str(o)
        key = o.split("=", 1)[0].lstrip("+~")
        if key not in IGNORED_IN_JOB_KEY:
            keys.append(o)
    return tuple(sorted(keys))


def recorded_jobs(sweep_dir: Path) -> dict[tuple, str]:
    """{job key: job dir} of every job an earlier command ran in `sweep_dir` (a dir with .hydra/overrides.yaml)."""
    import yaml

    jobs: dict[tuple, str] = {}
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return jobs
    for record in sorted(sweep_dir.glob("**/.hydra/overrides.yaml")):
        try:
            overrides = yaml.safe_load(record.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(overrides, list):
            jobs.setdefault(job_key(overrides), str(record.parent.parent.resolve()))
    return jobs


def job_action(run_dir: Path) -> str:
    """What finishing the sweep does with this job dir: a result (completed, diverged) is skipped, a run
    with a checkpoint is resumed, anything else (no dir, killed or failed before its first checkpoint)
    is run from step 0."""
    from nrexp.runs import read_summary

    run_dir = Path(run_dir)
    if read_summary(run_dir).get("status") in ("completed", "diverged"):
        return SKIPPED
    if (run_dir / "checkpoint.pt").is_file():
        return RESUMED
    return RUN


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


# ------------------------------------------------------------------------------------------------
# <sweep dir>/sweep.yaml: what a sweep varies (its job dirs' names) and what it holds constant

SWEEP_FILE = "sweep.yaml"
SWEEP_FILE_HEADER = """\
# Written by `nrexp train -m`, one entry per command run into this sweep dir. Each job dir (a run in
# TensorBoard) is named by the keys the command varies, in this order; the constants are the same for
# every job of the command and are left out of the names. Hydra's full record: multirun.yaml, and each
# job's .hydra/overrides.yaml.
"""


def sweep_entry(config: Any) -> dict:
    """What a sweep's command varies and holds constant, from Hydra's record of it (the sweep's config):
    {started, command, varies: [key...], sweeps: {key: values as typed}, constants: [key=value...]}.
    `varies`: the command line's swept keys in its order, then those of hydra.sweeper.params (an
    experiment preset's sweep, an Optuna search space) that the command line does not set."""
    import datetime
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = [str(o) for o in config.hydra.overrides.task]
    parsed = OverridesParser.create().parse_overrides(task)
    sweeps = {o.key_or_group: o.input_line.split("=", 1)[1] for o in parsed if o.is_sweep_override()}
    constants = [o.input_line for o in parsed if not o.is_sweep_override()]
    given = {o.key_or_group for o in parsed}
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    sweeps.update({str(k): str(v) for k, v in params.items() if str(k) not in given})
    hydra_args = [
        str(o) for o in config.hydra.overrides.hydra if not str(o).startswith(("hydra.mode=", EXCLUDE_KEYS + "="))
    ]
    resuming = ["sweep.resume=true"] if plan["resume"] else []  # cli takes it off before Hydra sees it
    return {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["nrexp train -m", *map(shlex.quote, [*task, *hydra_args, *resuming])]),
        "varies": list(sweeps),
        "sweeps": sweeps,
        "constants": constants,
    }


def read_sweep_file(sweep_dir: Path) -> list[dict]:
    """The entries of a sweep dir's sweep.yaml, oldest first ([] if it has none)."""
    import yaml

    try:
        data = yaml.safe_load((Path(sweep_dir) / SWEEP_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return []
    commands = data.get("commands") if isinstance(data, dict) else None
    return [c for c in commands if isinstance(c, dict)] if isinstance(commands, list) else []


def write_sweep_file(config: Any) -> Path:
    """Add this command's entry (sweep_entry) to <sweep dir>/sweep.yaml; return the file's path."""
    import os

    import yaml

    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    commands = [*read_sweep_file(sweep_dir), sweep_entry(config)]
    text = SWEEP_FILE_HEADER + yaml.safe_dump({"commands": commands}, sort_keys=False, width=1000)
    path, tmp = sweep_dir / SWEEP_FILE, sweep_dir / f".{SWEEP_FILE}.{os.getpid()}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)  # a reader sees the old file or the new one (no torch here: nrexp.writers imports it)
    return path


class SweepRecord(Callback):
    """A Hydra callback: writes <sweep dir>/sweep.yaml (write_sweep_file) when a sweep starts."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        write_sweep_file(config)


def run_text(run_dir: Path) -> str:
    """The run's name and what it shares with the other runs of its sweep, as Markdown for its TensorBoard
    text tab: a sweep job's varying keys, the sweep's constants and command (from sweep.yaml); a single
    run's command-line overrides (from .hydra/overrides.yaml)."""
    import yaml

    run_dir = Path(run_dir)
    entries = read_sweep_file(run_dir.parent)
    if entries:
        entry = entries[-1]
        return "\n".join(
            [
                f"**{run_dir.name}**: a run of the sweep `{run_dir.parent}`",
                "",
                "- varies across the sweep (the run names): "
                + (", ".join(f"`{k}`" for k in entry["varies"]) or "nothing"),
                "- the same in every run: " + (", ".join(f"`{c}`" for c in entry["constants"]) or "no overrides"),
                f"- command: `{entry['command']}`",
            ]
        )
    try:
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    except (OSError, yaml.YAMLError):
        overrides = []
    return f"**{run_dir.name}**: " + (", ".join(f"`{o}`" for o in overrides) or "the default config")


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


def _log_stamps(sweep_dir: Path) -> dict[str, int]:
    """Each job dir's train.log with the time it was last written: a skipped job's log says it was skipped."""
    from nrexp.report import find_job_dirs

    dirs = find_job_dirs(sweep_dir) if sweep_dir.is_dir() else []
    return {str(d): (d / "train.log").stat().st_mtime_ns for d in dirs if (d / "train.log").is_file()}


class SweepStatusTable(Callback):
    """At the end of a sweep, one row per job: its dir, status, test accuracy, steps, time, error."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        # a sweep dir given again (hydra.sweep.dir=...) holds the jobs of earlier commands: the table
        # lists them all, but the exit code is this command's (finished_jobs)
        self.before = _job_stamps(Path(str(config.hydra.sweep.dir)))
        self.logs_before = _log_stamps(Path(str(config.hydra.sweep.dir)))

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from rich.table import Table

        from nrexp.report import find_job_dirs, read_job, wide_console

        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = [read_job(d, sweep_dir) for d in find_job_dirs(sweep_dir)]
        before, now = getattr(self, "before", {}), _job_stamps(sweep_dir)
        finished_jobs[:] = [
            job for job in jobs if job["dir"] not in before or before[job["dir"]] != now.get(job["dir"])
        ]
        resuming = plan["resume"]
        logs_before, logs_now = getattr(self, "logs_before", {}), _log_stamps(sweep_dir)
        for job in jobs:  # sweep.resume=true: what this command did with each job ("" for one it did not run)
            touched = (
                job["dir"] not in before
                or before[job["dir"]] != now.get(job["dir"])
                or logs_before.get(job["dir"]) != logs_now.get(job["dir"])
            )
            job["action"] = plan.get("actions", {}).get(str(Path(job["dir"]).resolve()), RUN) if touched else ""
        # name jobs by what differs between them: overrides shared by every job only add width
        shared = set.intersection(*(set(job["name"].split(",")) for job in jobs)) if len(jobs) > 1 else set()
        counts: dict[str, int] = {}
        for job in jobs:
            counts[job["status"]] = counts.get(job["status"], 0) + 1
        title = f"sweep {sweep_dir}: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        if resuming:
            done = {a: sum(job["action"] == a for job in jobs) for a in (SKIPPED, RESUMED, RUN)}
            title += " (this command: " + ", ".join(f"{n} {a}" for a, n in done.items()) + ")"
        table = Table(title=title, header_style="bold")
        columns = (
            ("job", "left"),
            ("status", "left"),
            ("test acc", "right"),
            ("steps", "right"),
            ("time s", "right"),
            ("error", "left"),
        )
        columns += (("this command", "left"),) if resuming else ()
        for column, justify in columns:
            table.add_column(column, justify=justify, overflow="fold")
        style = {"completed": "green", "failed": "red", "diverged": "yellow"}
        for job in jobs:
            acc = job["metrics"].get("test/acc")
            name = ",".join(p for p in job["name"].split(",") if p not in shared) or job["name"]
            table.add_row(
                name,
                f"[{style.get(job['status'], 'magenta')}]{job['status']}",
                "" if acc is None else f"{acc:.4f}",
                str(job.get("steps", "")),
                "" if job.get("wall_time_s") is None else f"{job['wall_time_s']:.1f}",
                job.get("error", ""),
                *((job["action"],) if resuming else ()),
            )
        if shared:
            table.caption = "every job also has: " + ",".join(sorted(shared))
        wide_console().print(table)
