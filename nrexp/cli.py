"""The `nrexp` command: dispatches subcommands. The only module that touches argv.

Kept free of torch imports at module level so that `nrexp --help` and `nrexp train --cfg job` start
in a fraction of a second; torch is imported only when a run actually starts.

Every user mistake ends the same way: one line `nrexp: error: <key, value, allowed, fix>` on stderr,
exit code 2, no traceback, and nothing left half-written. For `nrexp train` the whole command line is
checked *before* Hydra creates a run directory (`preflight`): each override, and each value of each
swept override, is composed against the typed schema and validated.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from nrexp.errors import ConfigError, error
from nrexp.rundir import LOCK

USAGE = """\
usage: nrexp <command> [args]

commands:
  train     train one network, or a sweep with -m (a Hydra app: `nrexp train --help` lists every knob)
  report    compare the runs of a sweep (or one run): table, report.csv/.md, figures; --check: the
            claims of an experiment preset, reproduced or not (`nrexp report -h`)
  evaluate  re-evaluate a run: shifted test data, BatchNorm running vs test-batch statistics (--help)
  bench     time nrexp's loop against a naive and a bare PyTorch loop (`nrexp bench --help`)

examples:
  nrexp train norm=batch dropout.p=0.2
  nrexp train -m norm=none,layer,batch init=normal init.scale=1,2,3
  nrexp train -m norm=none,batch seed=0,1,2 hydra/launcher=joblib hydra.launcher.n_jobs=4
  nrexp train resume=outputs/2026-11-21/10-00-00     # continue an interrupted run
  nrexp train -m seed=0,1,2 hydra.sweep.dir=<its dir> sweep.resume=true   # finish a killed sweep
  nrexp report outputs/multirun/<date>/<time> --sort=-test_acc
  tensorboard --logdir outputs
"""


# ------------------------------------------------------------------------------------------------
# nrexp train


def train_app(args: list[str]) -> int:
    """Run the Hydra app for `nrexp train` with `args` as its command line."""
    with interrupts_before_the_loop():
        return _train_app(args)


def _train_app(args: list[str]) -> int:
    import hydra

    import nrexp
    from nrexp import config, sweep  # sweep: the resolver that names sweep job dirs (configs/train.yaml)

    config.register()
    args = [quote_path_override(a) for a in args]
    flags = [hydra_flag(a) for a in args if a.startswith("-")]
    multirun = any(a in ("-m", "--multirun") for a in flags)
    try:
        args, sweep_resume = take_sweep_resume(args, multirun)
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        existing = check_command_line(overrides, flags, multirun)
        plan = sweep_plan(overrides, sweep_resume) if multirun and existing is not None else None
    except ConfigError as err:
        return error(str(err))
    resume = next((a.split("=", 1)[1] for a in overrides if a.startswith("resume=")), None)
    if existing is not None and resume:  # continue in the run's own directory, its recorded config untouched
        run_dir = Path(_unquote(resume)).resolve()
        args = [*args, quote_path_override(f"hydra.run.dir={run_dir}"), "hydra.output_subdir=null"]
    args += sweep.naming_overrides(overrides, multirun)  # a sweep's job dirs: named by what varies
    if existing is not None and not multirun:
        try:  # the run's one writer from here on, before Hydra writes .hydra/ or train.log into it
            lock_run_dir(Path(_unquote(resume)) if resume else explicit_dir(overrides, "hydra.run.dir"), bool(resume))
        except ConfigError as err:
            return error(str(err))

    @hydra.main(version_base="1.3", config_path=nrexp.config_dir(), config_name="train")
    def _train(cfg) -> float:
        return run_task(cfg, existing or Path.cwd(), plan)

    sys.argv = [sys.argv[0], *args]
    sweep.finished_jobs.clear()  # filled by the sweep's status table when it ends
    if plan is not None:
        sweep.plan.clear()
        sweep.plan.update(plan)
    try:
        if existing is None:  # --help, --cfg, completion: nothing runs
            _train()
            return 0
        stop_if_interrupted()
        _train()
    except StartupInterrupted as stop:
        run_dir = _hydra_output_dir()
        if run_dir is not None and not resume and not multirun:
            remove_if_empty_run_dir(run_dir, existing)
        return error(
            f"stopped by signal {stop.signum} during start-up, before the run began"
            + ("" if run_dir is None or not run_dir.exists() else f" (in {run_dir})"),
            code=stop.code,
        )
    failed = [job for job in sweep.finished_jobs if job["status"] == "failed"]
    if multirun and failed:  # the table above names them; a script or CI step must see it too
        return error(
            f"{len(failed)} of {len(sweep.finished_jobs)} jobs of the sweep failed (status failed in the "
            "table above; each one's error is in its summary.json and train.log). Fix: correct what the "
            "error says and rerun those jobs",
            code=1,
        )
    return 0


def _hydra_output_dir() -> Path | None:
    """The run dir Hydra set up in this process, if it got that far."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(str(HydraConfig.instance().cfg.hydra.runtime.output_dir))
    except Exception:  # noqa: BLE001 - not set up yet
        return None


def take_sweep_resume(args: list[str], multirun: bool) -> tuple[list[str], bool]:
    """`sweep.resume=true|false` is an option of the command, not of the runs: taken out of the command
    line before Hydra sees it, so a finished sweep's jobs keep the overrides (and configs) they started with."""
    rest, value = [], False
    for a in args:
        key, sep, given = a.partition("=")
        if sep and key == "sweep.resume":
            if given.lower() not in ("true", "false"):
                raise ConfigError(
                    f"sweep.resume={given!r} is invalid: must be true or false. Fix: sweep.resume=true "
                    "to finish the sweep in hydra.sweep.dir"
                )
            value = given.lower() == "true"
        else:
            rest.append(a)
    if value and not multirun:
        raise ConfigError(
            "sweep.resume=true finishes a sweep: it needs -m. Fix: nrexp train -m <the sweep's "
            "overrides> hydra.sweep.dir=<its dir> sweep.resume=true; a single run: resume=<run dir>"
        )
    return rest, value


def explicit_dir(overrides: list[str], key: str) -> Path | None:
    """The dir `key=...` (hydra.run.dir, hydra.sweep.dir) names on the command line, when it is a literal path."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for o in OverridesParser.create().parse_overrides(overrides):
        if o.key_or_group == key and not o.is_sweep_override():
            value = str(o.value())
            return None if "${" in value else Path(value).absolute()
    return None


def lock_run_dir(run_dir: Path | None, resuming: bool) -> None:
    """Become `run_dir`'s one writer for the rest of this process (a new run in an explicit hydra.run.dir,
    or a resume), then remove what a killed write left there. One line if another process holds it."""
    from nrexp import rundir

    if run_dir is None:
        return
    if not resuming and not run_dir.exists():
        run_dir.mkdir(parents=True)  # Hydra would make it a moment later; the lock file lives in it
    rundir.hold(run_dir)
    if not resuming:  # checked again under the lock: a run that started since preflight holds it now
        rundir.check_new_run_dir(run_dir)
    rundir.remove_stale_temp_files(run_dir)


def sweep_plan(overrides: list[str], resume: bool) -> dict:
    """What `nrexp train -m` does with the jobs an earlier command left in hydra.sweep.dir: without
    sweep.resume=true, a used sweep dir is refused; with it, each recorded job (found by its overrides)
    is skipped, resumed or run again (sweep.job_action), and none may be another process's now."""
    from nrexp import rundir, sweep

    sweep_dir = explicit_dir(overrides, "hydra.sweep.dir")
    if resume and sweep_dir is None:
        raise ConfigError(
            "sweep.resume=true needs the sweep's dir. Fix: add hydra.sweep.dir=<the sweep's dir> "
            "(e.g. outputs/multirun/<date>/<time>) to the sweep's own command line"
        )
    jobs = sweep.recorded_jobs(sweep_dir) if sweep_dir is not None else {}
    if jobs and not resume:
        raise ConfigError(
            f"{sweep_dir} already holds {len(jobs)} job(s) of a sweep; a new sweep never writes into "
            "it. Fix: finish that sweep with sweep.resume=true (its own overrides: completed jobs are "
            "skipped, the others resumed), or give this one a new hydra.sweep.dir"
        )
    for job_dir in jobs.values():  # a sweep being finished by another command: say so before any job starts
        with rundir.RunLock(Path(job_dir)):
            pass
    return {
        "resume": resume,
        "jobs": jobs,
        "actions": {job_dir: sweep.job_action(Path(job_dir)) for job_dir in jobs.values()},
    }


def check_command_line(overrides: list[str], flags: list[str], multirun: bool) -> Path | None:
    """Raise ConfigError for what Hydra would answer with a traceback, or a job would fail on. Returns
    None when nothing runs (--help, --cfg, --info, completion), else what preflight returns."""
    modes: dict = {}  # Hydra's modes, of which it takes one: mode -> the first flag that asked for it
    for flag in flags:
        if flag in MODE_FLAGS:
            modes.setdefault(MODE_FLAGS[flag], flag)
    if len(modes) > 1:
        first, second = list(modes.values())[:2]
        raise ConfigError(
            f"{first} and {second} cannot be combined. Fix: use one of them; to see a sweep job's "
            "config, give each key one value: nrexp train --cfg job <overrides>"
        )
    printing = any(a in ("--cfg", "-c") for a in flags)  # prints the composed config: validated, nothing runs
    # --help and --info show the config composed with the overrides too: validated like --cfg's.
    # Shell completion is not: it is handed half-typed words.
    showing = any(a in ("--help", "-h", "--hydra-help", "--info", "-i") for a in flags)
    if any(a in ("-sc", "--shell-completion") for a in flags) or (showing and not overrides):
        return None
    if printing or showing:
        preflight(overrides, printing=True)
        return None
    existing = preflight(overrides, multirun=multirun)
    if multirun:  # preflight has checked every swept value: the basic sweeper need not compose each job first
        from nrexp.hydra_compat import skip_basic_sweeper_validation

        skip_basic_sweeper_validation()
    return existing


def run_task(cfg, existing: Path, plan: dict | None = None) -> float:
    """Hydra's task function: one run, or one job of a sweep; returns the test accuracy, what a Hydra
    sweeper (e.g. optuna) optimizes. `existing`: the folder a rejected run must not remove; `plan`: what
    cli.sweep_plan found in the sweep dir (joblib's workers get it with this function)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from nrexp import rundir, sweep

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if cfg.trainer.layer_stats:  # the run draws depth figures: the helper gets ready while torch is imported
        from nrexp import figures

        figures.start_helper()
    with interrupts_before_the_loop():
        try:
            from nrexp.train import Diverged, train  # torch is imported here, once a run really starts

            if hc.mode == RunMode.MULTIRUN:
                summary = sweep_job(cfg, run_dir, hc, plan or {"resume": False, "jobs": {}})
            else:
                lock = contextlib.nullcontext() if rundir.held_by_this_process(run_dir) else rundir.RunLock(run_dir)
                with lock, the_loop_runs():
                    if not cfg.resume:  # preflight checked a literal hydra.run.dir; this is for any other
                        rundir.check_new_run_dir(run_dir)
                    rundir.remove_stale_temp_files(run_dir)
                    if not cfg.resume:
                        summary = train(cfg, run_dir)
                    elif (run_dir / "checkpoint.pt").is_file():
                        summary = train(resume_config(cfg, list(hc.overrides.task)), run_dir, resume=True)
                    else:  # stopped or failed before its first checkpoint: from step 0
                        again = resume_config(cfg, list(hc.overrides.task))
                        rundir.clear_partial_run(run_dir)
                        summary = train(again, run_dir)
        except StartupInterrupted as stop:
            sys.exit(interrupted_before_the_loop(cfg, run_dir, existing, stop))
        except ConfigError as err:
            if not cfg.resume and hc.mode != RunMode.MULTIRUN:
                remove_if_empty_run_dir(run_dir, existing)
            sys.exit(error(str(err)))
        except Diverged as err:  # trainer.on_nonfinite=raise: the summary is written; fail the command
            sys.exit(error(str(err), code=1))
        except Exception as err:  # noqa: BLE001 - any error of the run: one line, its traceback in train.log
            summary = sweep.record_failure(cfg, run_dir, err, console=False)
            sys.exit(error(summary["error"], code=1))
    if summary.get("signal"):  # Ctrl-C / SIGTERM ends a sweep too, after this job's checkpoint
        sys.exit(128 + summary["signal"])  # 130 for Ctrl-C, 143 for SIGTERM, as shells report them
    test_acc = summary.get("metrics", {}).get("test/acc")
    return float("nan") if test_acc is None or summary.get("status") == "failed" else test_acc


def sweep_job(cfg, run_dir: Path, hc, plan: dict) -> dict:
    """One job of a sweep: one failure must not stop the others. It is recorded in the job's summary.json
    and the job returns NaN, which Hydra's sweepers ignore and Optuna records as a failed trial. When
    finishing a sweep (sweep.resume=true) the job is found by its overrides and skipped, resumed or run."""
    import logging

    from nrexp import rundir, sweep
    from nrexp.runs import read_summary
    from nrexp.train import Diverged, train

    log = logging.getLogger("nrexp")
    recorded = plan["jobs"].get(sweep.job_key(hc.overrides.task))
    if recorded is not None and Path(recorded).resolve() != run_dir.resolve():  # named otherwise before
        log.info("this job's run is in %s (found by its overrides): it continues there", recorded)
        remove_if_empty_run_dir(run_dir, run_dir.parent)
        run_dir = Path(recorded)
    try:
        lock = rundir.RunLock(run_dir).__enter__()
    except ConfigError as err:  # another process writes this job: nothing is written into it
        log.error("job refused: %s", err)
        return {"status": "failed", "error": str(err)}
    try:
        if recorded is None and rundir.holds_a_run(run_dir):
            log.error(
                "job refused: %s holds another job's run; a job never writes into it. Fix: give the sweep "
                "a new hydra.sweep.dir",
                run_dir,
            )
            return {"status": "failed", "error": f"{run_dir} holds another job's run"}
        rundir.remove_stale_temp_files(run_dir)
        action = sweep.job_action(run_dir) if recorded is not None else sweep.RUN
        if action == sweep.SKIPPED:
            summary = read_summary(run_dir)
            log.info("sweep.resume: %s is a result already (%s): skipped", run_dir.name, summary.get("status"))
            return summary
        sweep.claim_gpu(str(getattr(cfg.trainer.device, "value", cfg.trainer.device)), hc.job.num)
        if action == sweep.RESUMED:
            log.info("sweep.resume: %s continues from its checkpoint", run_dir.name)
            resumed = config_to_resume(run_dir, [])
            with the_loop_runs():
                return train(resumed, run_dir, resume=True)
        cleared = rundir.clear_partial_run(run_dir)
        if cleared:
            log.info(
                "sweep.resume: %s had no checkpoint: runs again from step 0 (removed %s)",
                run_dir.name,
                ", ".join(p.name for p in cleared),
            )
        with the_loop_runs():
            return train(cfg, run_dir)
    except Diverged:  # trainer.on_nonfinite=raise: its summary (diverged) is already written
        return {"status": "diverged"}
    except Exception as err:  # noqa: BLE001 - any error of one job; Ctrl-C still stops them all
        return sweep.record_failure(cfg, run_dir, err)
    finally:
        lock.__exit__(None, None, None)


class StartupInterrupted(BaseException):
    """Ctrl-C or SIGTERM before the training loop took over the signals (nrexp.signals.GracefulStop), or a
    second one while it stops: the run stops now. BaseException: Hydra passes it on, as it does Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum, self.code = signum, 128 + signum


# A signal before the run's loop (start-up: imports, data, model) is noted here and acted on at the next safe
# point (`stop_if_interrupted`): raised inside `import torch` it would leave torch half-imported.
_startup: dict = {"signum": None, "in_run": False, "installed": False}


def _startup_handler(signum, frame) -> None:
    import signal

    if _startup["in_run"] or _startup["signum"] is not None:
        # a second signal, or one after the loop's GracefulStop handed the signals back while it stops: now
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _startup["signum"] = signum


def stop_if_interrupted() -> None:
    """Raise StartupInterrupted if a signal came during start-up."""
    if _startup["signum"] is not None:
        raise StartupInterrupted(_startup["signum"])


@contextlib.contextmanager
def interrupts_before_the_loop():
    """While active, SIGINT and SIGTERM before the training loop are noted and end the command at the next
    safe point (SIGTERM would otherwise end the process with nothing said). The loop's GracefulStop
    replaces these handlers while it runs."""
    import signal

    if _startup["installed"] or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    _startup.update(signum=None, in_run=False, installed=True)
    for sig in previous:
        signal.signal(sig, _startup_handler)
    try:
        yield
    finally:
        _startup["installed"] = False
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def the_loop_runs():
    """Around train(): the loop's own GracefulStop handles signals; one reaching ours is a second one: abort."""
    stop_if_interrupted()
    _startup["in_run"] = True
    try:
        yield
    finally:
        _startup["in_run"] = False


def interrupted_before_the_loop(cfg, run_dir: Path, existing: Path, stop: StartupInterrupted) -> int:
    """A signal before the loop's first checkpoint leaves nothing (a new run's dir is removed), or a dir
    whose summary says `interrupted` at step 0, which resume= starts again from step 0. A signal after a
    checkpoint (a second Ctrl-C while the run stops) leaves that checkpoint to resume from."""
    from nrexp import rundir
    from nrexp.writers import write_summary

    if not cfg.resume and not rundir.holds_a_run(run_dir):
        remove_if_empty_run_dir(run_dir, existing)
    if run_dir.is_dir() and not (run_dir / "checkpoint.pt").exists() and rundir.holds_a_run(run_dir):
        from nrexp.sweep import _plain_config

        write_summary(
            run_dir,
            {
                "status": "interrupted",
                "signal": stop.signum,
                "steps": 0,
                "config": _plain_config(cfg),
                "metrics": {},
                "run_dir": str(run_dir),
            },
        )
    return error(
        f"stopped by signal {stop.signum} before the first checkpoint"
        + (f"; continue with: nrexp train resume={run_dir}" if run_dir.is_dir() else ": nothing was written"),
        code=stop.code,
    )


# Hydra's command-line modes: the flags of each (Hydra rejects two modes with a traceback)
MODE_FLAGS = {
    "-m": "multirun",
    "--multirun": "multirun",
    "-c": "cfg",
    "--cfg": "cfg",
    "-i": "info",
    "--info": "info",
    "-sc": "shell_completion",
    "--shell-completion": "shell_completion",
    "-r": "run",
    "--run": "run",
}


def hydra_flag(arg: str) -> str:
    """A flag of Hydra's command line as MODE_FLAGS names it, whichever way argparse accepts it:
    --cfg=job and -cjob are --cfg and -c (but -cn, -cp, -cd are flags of their own)."""
    if arg.startswith("--"):
        return arg.split("=", 1)[0]
    if arg[:2] in ("-c", "-i") and len(arg) > 2 and arg[:3] not in ("-cn", "-cp", "-cd"):
        return arg[:2]
    return arg


PATH_KEYS = ("resume", "hydra.run.dir", "hydra.sweep.dir", "data.root")
_GRAMMAR = set("=,()[]{}:'\" \t$")


def quote_path_override(arg: str) -> str:
    """`resume=<dir>` with the dir quoted for Hydra's override grammar when it needs it.

    Sweep job dirs are named by their overrides (`dropout.p=0.2,norm=batch`), so the path of a sweep
    member holds `=` and `,`, which Hydra's parser would read as syntax: `nrexp train resume=<member dir>`
    would not parse. A path value is a string whatever it holds, so we quote it for the user.
    """
    key, sep, value = arg.partition("=")
    if not sep or key not in PATH_KEYS or not value or value[0] in "'\"" or "${" in value:
        return arg
    if not (_GRAMMAR & set(value)):
        return arg
    return f"{key}='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _unquote(value: str) -> str:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return str(OverridesParser.create().parse_override(f"x={value}").value())


def preflight(overrides: list[str], multirun: bool = False, printing: bool = False) -> Path:
    """Compose and validate the config of every job the command line asks for; raise ConfigError.
    Returns the nearest folder at or above the output directory that exists before anything runs.
    `printing` (--cfg): the config is only shown, so its output directory and devices are not checked.

    Swept overrides (`norm=none,batch`) are checked value by value, each on top of the fixed overrides,
    so a typo in a sweep stops it before the first job rather than in the middle. Cross-field rules
    between two swept keys are checked again by each job.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import open_dict

    import nrexp
    from nrexp.config import unused_knobs, validate

    parsed = parse_command_line(overrides, multirun, printing)
    ours = [o for o in parsed if not o.key_or_group.startswith("hydra")]
    sweeps = [o for o in ours if o.is_sweep_override()]
    resume = next((o.value() for o in ours if o.key_or_group == "resume"), None)
    if resume is not None:
        check_resume(resume, ours, multirun)
    # a resumed run writes into its own dir (checked above), not into a new one
    existing = Path.cwd() if printing or resume is not None else check_output_writable(parsed, multirun)
    if not (printing or multirun or resume is not None):  # a run dir holds one run: never a second one
        from nrexp.rundir import check_new_run_dir

        run_dir = next(
            (
                Path(str(o.value())).absolute()
                for o in parsed
                if o.key_or_group == "hydra.run.dir" and not o.is_sweep_override() and "${" not in str(o.value())
            ),
            None,
        )
        if run_dir is not None:
            check_new_run_dir(run_dir)
    # hydra/launcher=..., hydra/sweeper=...: composed too, so that a misspelt option is one line here
    fixed = [
        o.input_line for o in parsed if not o.is_sweep_override() and (o in ours or o.key_or_group.startswith("hydra/"))
    ]
    launcher = next((str(o.value()) for o in parsed if o.key_or_group == "hydra/launcher"), "basic")

    def composed(extra: list[str], with_hydra: bool = False):
        try:
            return compose(config_name="train", overrides=fixed + extra, return_hydra_config=with_hydra)
        except HydraException as err:
            raise ConfigError(explain_compose_error(err, fixed + extra)) from None

    GlobalHydra.instance().clear()
    swept_configs = []  # (key, config) of each swept value, on top of the fixed overrides
    with initialize_config_dir(config_dir=nrexp.config_dir(), version_base="1.3"):
        base = composed([], with_hydra=multirun)
        variants = swept_values(sweeps)
        if multirun:  # a preset's own sweep (hydra.sweeper.params) is checked value by value too
            variants += sweeper_param_variants(base, {o.key_or_group for o in sweeps})
            with open_dict(base):
                del base["hydra"]
        if resume is None:  # a resumed run is checked against its own config when it starts
            validate(base)
        for override in variants:  # none when resuming: a sweep with resume= is rejected above
            # a swept plain value (seed=3) is set on the composed config; anything else is composed by Hydra
            cfg = _with_plain_override(base, override)
            cfg = composed([override]) if cfg is None else cfg
            validate(cfg)
            swept_configs.append((override.split("=", 1)[0], cfg))
    GlobalHydra.instance().clear()
    every_job = [base] + [cfg for _, cfg in swept_configs]
    devices = {str(getattr(cfg.trainer.device, "value", cfg.trainer.device)) for cfg in every_job}
    if resume is not None:  # the knobs given act on the run's own config, not on the defaults
        base = resumed_config_for_warnings(Path(str(resume)), ours)
    for line in unused_knobs([o.key_or_group for o in ours], base, swept_configs) if base is not None else []:
        print(f"nrexp: warning: {line}", file=sys.stderr)
    if multirun and "cuda" in devices and launcher not in REMOTE_LAUNCHERS:
        from nrexp.train import resolve_device  # imports torch: only when a sweep asks for CUDA here

        resolve_device("cuda")  # no GPU here: the single run's one line, before the sweep's first job
    return existing


def parse_command_line(overrides: list[str], multirun: bool, printing: bool) -> list:
    """The overrides parsed by Hydra's public parser, with what cannot run said in one line: a sweep
    without -m or with --cfg, a sweep of Hydra's own keys, a bad hydra.launcher.max_members."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(
            f"cannot parse the command line: {str(err).splitlines()[0]}. Fix: write overrides as "
            "key=value (quote values with spaces); sweeps as key=a,b,c with -m"
        ) from None
    sweeps = [o for o in parsed if o.is_sweep_override()]
    hydra_sweeps = [o.input_line for o in sweeps if o.key_or_group.startswith("hydra")]
    if hydra_sweeps:  # Hydra: "Sweeping over Hydra's configuration is not supported", three lines
        raise ConfigError(
            f"'{hydra_sweeps[0]}' sweeps Hydra's own config, which Hydra cannot do. Fix: run one command per value"
        )
    if sweeps and printing:
        first = f"{sweeps[0].get_key_element()}={next(iter(sweeps[0].sweep_string_iterator()), '<value>')}"
        raise ConfigError(
            f"'{sweeps[0].input_line}' is a sweep, and --cfg, --help and --info show one job's "
            f"config. Fix: give each key one value, e.g. {first}"
        )
    if sweeps and not multirun:
        raise ConfigError(
            f"'{sweeps[0].input_line}' is a sweep. Fix: add -m (nrexp train -m ...) to run one job per value"
        )
    for o in parsed:  # the fused launcher's knob (a hydra key, so not in nrexp's schema)
        if o.key_or_group == "hydra.launcher.max_members":
            value = o.value()
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(
                    f"hydra.launcher.max_members={value!r} is invalid: must be an integer >= 1 "
                    "(members trained at once by hydra/launcher=fused). Fix: e.g. "
                    "hydra.launcher.max_members=16"
                )
    return parsed


def swept_values(sweeps: list) -> list[str]:
    """`key=value` for each value of each sweep of the command line (Hydra's own expansion of
    `a,b`, `range(...)`, `choice(...)`). Interval sweeps (optuna) have none: the sweeper samples them."""
    from hydra.errors import HydraException

    values = []
    for o in sweeps:
        try:
            values += [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        except HydraException:
            pass
    return values


def check_resume(resume, ours: list, multirun: bool) -> None:
    """`resume=<dir>` continues one run that wrote a checkpoint, and may change only trainer.* knobs."""
    if multirun:
        raise ConfigError(f"resume={resume!r} continues one run. Fix: drop -m")
    check_resumable(Path(str(resume)))
    changed = [o.input_line for o in ours if o.key_or_group != "resume" and not o.key_or_group.startswith("trainer.")]
    if changed:
        raise ConfigError(
            f"{changed[0]!r} cannot change when resuming: the run's model, data and optimizer "
            "are fixed. Fix: only trainer.* (e.g. trainer.max_steps=2000) may change; start a "
            "new run for anything else"
        )


# launchers whose jobs run on other machines (SLURM nodes): their GPUs are not this machine's to check
REMOTE_LAUNCHERS = ("submitit_slurm", "slurm_gpu")


def _with_plain_override(base, override: str):
    """`base` with a `key=value` override of an existing plain value set on a copy, as Hydra sets it
    after composing, or None when the override is anything else (a group, +key, ~key, a list, a value
    of the wrong type). Only preflight's check uses it: a job's config is always Hydra's own compose."""
    import copy

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        (o,) = OverridesParser.create().parse_overrides([override])
        if o.package is not None or o.type != OverrideType.CHANGE or o.is_sweep_override():
            return None
        if not _is_plain_value(base, o.key_or_group):
            return None
        cfg = copy.deepcopy(base)
        OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
        return cfg
    except (OmegaConfBaseException, ValueError, TypeError):
        return None


def _is_plain_value(cfg, key: str) -> bool:
    """Whether `key` names an existing plain value of `cfg`: not a new key, not a node, not a list, and
    not a config group of configs/ (`experiment` is both a string of the config and a group)."""
    from omegaconf import OmegaConf

    import nrexp

    missing = object()
    node = OmegaConf.select(cfg, key, default=missing, throw_on_missing=False)
    return (
        node is not missing
        and not OmegaConf.is_config(node)
        and not (Path(nrexp.config_dir()) / key.replace(".", "/")).is_dir()
    )


def explain_compose_error(err: Exception, overrides: Sequence[str] = ()) -> str:
    """Hydra/OmegaConf's multi-line composition errors, as one line with the fix (`overrides`: the
    command line's, to quote the one at fault)."""
    import re

    from hydra.errors import MissingConfigException

    text, cause = str(err), str(err.__cause__ or "")
    # a group outside the defaults list (the experiment presets) is added with +, one in it is not
    group = re.match(r"Could not override '([^']+)'\. No match in the defaults list", text)
    if group:
        line = next((o for o in overrides if o.startswith(group[1] + "=")), group[1] + "=<option>")
        return (
            f"{line.split(',')[0]!r}: group '{group[1]}' is not in the default config, so it is added, not "
            f"overridden. Fix: write it with a leading +, e.g. nrexp train +{line.split(',')[0]}"
        )
    group = re.match(r"Multiple values for ([\w/.]+)\. To override a value use", text) or re.match(
        r"([\w/.]+) appears more than once in the final defaults list", text
    )
    if group:
        given = [o for o in overrides if o.lstrip("+~").split("=", 1)[0].split("@", 1)[0] == group[1]]
        if len(given) > 1:  # +experiment=a +experiment=b, +norm=batch norm=layer
            return (
                f"group '{group[1]}' is given {len(given)} times ({' '.join(given)}). Fix: give it once"
                + ("" if any(not o.startswith("+") for o in given) else f", e.g. {given[-1]}")
                + (
                    f", without the + (it is in the default config): {group[1]}=<option>"
                    if any(not o.startswith("+") for o in given)
                    else ""
                )
            )
        return (
            f"+{group[1]}=... adds group '{group[1]}' a second time: the default config has it already. "
            f"Fix: drop the +, e.g. nrexp train {group[1]}=<option>"
        )
    full_key = next((line.split(":", 1)[1].strip() for line in cause.splitlines() if "full_key:" in line), None)
    if isinstance(err, MissingConfigException) and "Could not find '" in text:
        missing = text.split("Could not find '", 1)[1].split("'", 1)[0]
        group, _, option = missing.rpartition("/")
        options = [
            line.strip()
            for line in text.split("Available options", 1)[-1].splitlines()[1:]
            if line.startswith("\t") and "=" not in line
        ]
        return f"{group}={option!r} is not an option of group '{group}': choose one of {', '.join(options)}"
    if "not in" in cause and full_key:
        return (
            f"unknown key '{full_key}'. Fix: check its spelling; `nrexp train --help` lists every key with its meaning"
        )
    if full_key:
        return f"{full_key}: {cause.splitlines()[0]}. Fix: `nrexp train --help` gives each key's type and range"
    return f"{text.splitlines()[0]}. Fix: `nrexp train --help` lists every key and group"


def check_output_writable(parsed, multirun: bool = False) -> Path:
    """Fail before anything runs if the run (or sweep) directory could not be created; else return the
    nearest folder at or above it that exists now (what a rejected run must not remove)."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"  # the one this command uses
    target = "outputs"
    for o in parsed:
        if o.key_or_group == key and not o.is_sweep_override():
            target = str(o.value())
    path = Path(target.split("${", 1)[0] or ".").absolute()  # the literal part of the pattern
    while not path.exists():
        path = path.parent
    if not path.is_dir() or not _can_create_in(path):
        raise ConfigError(
            f"the output directory {target!r} cannot be created: {path} is not a writable "
            f"directory. Fix: run from a writable directory or set {key}=<writable dir>"
        )
    return path


def _can_create_in(folder: Path) -> bool:
    """Whether a folder can be made in `folder`, found by making (and removing) one: os.access says
    yes where mkdir then fails (root on /proc or a read-only mount), and Hydra would fail with a traceback."""
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".nrexp-probe-", dir=folder))
    except OSError:
        return False
    return True


def sweeper_param_variants(cfg, swept_here) -> list[str]:
    """`key=value` for each value of each sweep in the config's hydra.sweeper.params (an experiment
    preset's `norm: none,batch,layer`), but for keys this command line sweeps itself: Hydra's basic
    sweeper lets the command line win. Values a sweeper samples (optuna's interval) can't be listed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    variants: list[str] = []
    for key, value in params.items():
        if key in swept_here:
            continue
        try:
            (o,) = OverridesParser.create().parse_overrides([f"{key}={value}"])
        except HydraException:
            continue
        variants += swept_values([o]) if o.is_sweep_override() else [f"{o.get_key_element()}={value}"]
    return variants


def resumed_config_for_warnings(run_dir: Path, parsed):
    """The run's recorded config (.hydra/config.yaml, what Hydra saved when it started) with this
    command's trainer.* overrides: what unused_knobs judges a resume by. None when it was not saved."""
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        for o in parsed:
            if o.key_or_group.startswith("trainer."):
                OmegaConf.update(cfg, o.key_or_group, o.value(), merge=False)
    except Exception:  # noqa: BLE001 - warnings only: the run itself reads its checkpoint's config
        return None
    return cfg


def check_resumable(run_dir: Path) -> None:
    from nrexp.runs import read_summary

    summary = read_summary(run_dir)
    if summary.get("status") in ("interrupted", "failed") and isinstance(summary.get("config"), dict):
        return  # stopped or failed before its first checkpoint: resume= starts it again from step 0
    if not (run_dir / "checkpoint.pt").is_file():
        raise ConfigError(
            f"resume={str(run_dir)!r}: no checkpoint.pt there. Fix: pass the directory of a run "
            "that wrote a checkpoint (see `ls outputs/*/*/checkpoint.pt`)"
        )


def resume_config(cfg, task_overrides: list[str]):
    """The config to resume with: the run's own, plus any trainer.* overrides from this command line."""
    return config_to_resume(Path(cfg.resume).resolve(), task_overrides)


def config_to_resume(run_dir: Path, task_overrides: list[str]):
    """The run's own config (its checkpoint's; before one, its summary's) with this command's trainer.* overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from nrexp.checkpoint import read_checkpoint
    from nrexp.config import TrainConfig
    from nrexp.runs import read_summary

    run_dir = Path(run_dir).resolve()
    if (run_dir / "checkpoint.pt").is_file():
        saved = read_checkpoint(run_dir / "checkpoint.pt")["config"]
    else:
        saved = read_summary(run_dir)["config"]
    resumed = OmegaConf.merge(OmegaConf.structured(TrainConfig), saved)
    for o in OverridesParser.create().parse_overrides(task_overrides):
        key = o.key_or_group
        if key.startswith("trainer."):  # preflight rejected anything else
            OmegaConf.update(resumed, key, o.value(), merge=False)
    resumed.resume = str(run_dir)
    return resumed


def remove_if_empty_run_dir(run_dir: Path, existing: Path) -> None:
    """Remove a run dir that holds only what Hydra wrote before the run was rejected, and the folders
    above it that this run created (the day's, `outputs/` on a first run), up to `existing` (see
    check_output_writable): those that are empty now."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log", LOCK}:
        shutil.rmtree(run_dir, ignore_errors=True)
        for folder in run_dir.parents:
            if folder == existing or existing not in folder.parents:
                break
            try:
                folder.rmdir()  # only if empty: another run's dir keeps it
            except OSError:
                break


def strip_subcommand_from_completion_line() -> None:
    """Hydra's completion script calls `nrexp -sc query=bash` with the typed line in COMP_LINE; Hydra
    expects `<app> <overrides>`, so drop the `train` word (and shift the cursor) before it parses."""
    words = os.environ.get("COMP_LINE", "").split(" ")
    if len(words) > 1 and words[1] == "train":
        os.environ["COMP_LINE"] = " ".join(words[:1] + words[2:])
        point = int(os.environ.get("COMP_POINT", len(os.environ["COMP_LINE"]) + 6))
        os.environ["COMP_POINT"] = str(max(point - len("train "), 0))


def report_command(args: list[str]) -> int:
    """`nrexp report`: argparse here (argv is this module's), the work in nrexp/report.py."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="nrexp report",
        description="Compare the runs under DIR (a sweep dir or one run dir): one row per setting, the seeds "
        "of a setting aggregated as mean ± std. Writes report.csv, report.md and figures/*.png.",
    )
    parser.add_argument("dir", help="a sweep dir (outputs/multirun/<date>/<time>) or a run dir")
    parser.add_argument(
        "--sort",
        metavar="KEY",
        help="sort by a column: a swept key, runs, status, train_loss, "
        "train_acc, test_acc, gen_gap, act_ratio_init, act_ratio_final; -KEY for descending",
    )
    parser.add_argument(
        "--filter",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="keep runs whose config has KEY=VALUE (e.g. norm=batch, dropout.p=0.2); repeatable",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON (for scripts) instead of a table")
    parser.add_argument("--out", metavar="DIR", help="where to write report.csv, report.md, figures/ (default: DIR)")
    parser.add_argument(
        "--curves",
        action="store_true",
        help="also write curves.csv: every logged scalar of every "
        "run, one row per point (run, step, tag, layer, value), as nrexp.runs.curves returns them",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="then check the claims of the experiment preset the "
        "sweep ran (+experiment=<name>): measured value, expected, reproduced yes/no",
    )
    options = parser.parse_args(args)

    from nrexp.evaluate import EvaluateError  # no torch at its top: `nrexp report` stays fast
    from nrexp.report import ReportError, report

    try:
        code = report(
            options.dir,
            sort=options.sort,
            filters=options.filter,
            as_json=options.json,
            out=options.out,
            curves=options.curves,
        )
        if options.check and code == 0:
            from nrexp.claims import check, print_checks

            print_checks(check(options.dir))
        return code
    except (ReportError, ConfigError, EvaluateError) as err:
        return error(str(err))
    except BrokenPipeError:  # `nrexp report DIR --json | head`: main() stops quietly
        raise
    except OSError as err:  # e.g. a sweep dir one may read but not write: say where to write instead
        return error(f"cannot write the report: {err}. Fix: pass --out DIR, a directory you can write to")


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # output still buffered meets a closed pipe here, not in the interpreter's exit
        return code
    except BrokenPipeError:  # `nrexp train --help | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141  # 128 + SIGPIPE, what a shell reports for such a pipeline member


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_app(rest)
    if command == "report":
        return report_command(rest)
    if command == "evaluate":
        from nrexp.evaluate import main as evaluate_main  # torch is imported there, on use

        return evaluate_main(rest)
    if command == "bench":
        from nrexp.bench import main as bench_main

        return bench_main(rest)
    if command in ("-sc", "--shell-completion"):  # tab completion, installed by `nrexp train -sc install=bash`
        strip_subcommand_from_completion_line()
        return train_app(argv)
    return error(f"unknown command {command!r}. Fix: run `nrexp --help` for the list of commands")


def entry() -> None:
    """The `nrexp` command (and `python -m nrexp`); in-process callers (tests) call main().

    gc.freeze(): the interpreter's exit then does not garbage-collect what torch and a run left in memory,
    its slowest part once torch is imported; atexit handlers, threads and stream flushes run as usual."""
    import gc

    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
