"""`hydra/launcher=fused`: run a sweep's jobs as vectorized groups, one process, one group at a time.

    nrexp train -m seed=0,1,2,3 optim.weight_decay=0,1e-4,1e-3 dropout.p=0,0.2 hydra/launcher=fused

The launcher composes every job's config as Hydra's basic launcher does, then groups the jobs whose
configs are equal except for the keys a member may vary (nrexp.grouping.FREE_KEYS: seed, optim.lr,
optim.weight_decay, dropout.p, dropout.input_p, init.scale) and trains each group of two or more as one
vectorized model (nrexp/fused.py). Groups run one after another, in the order of their first job.
A job that is alone in its group, or whose settings cannot be vectorized (nrexp.grouping.unfusable_reason:
model other than mlp, resume, ...), runs as an ordinary job through Hydra's `run_job`, exactly as under
the basic launcher, and the log says why.

Every member gets what `run_job` gives an ordinary job: its run dir (hydra.sweep.dir/hydra.sweep.subdir),
`.hydra/{config,hydra,overrides}.yaml`, its `train.log`, the callbacks' on_job_start/on_job_end, and a
JobReturn whose value is the test accuracy (NaN if the member failed or diverged), which is what Hydra's
sweepers (e.g. optuna) read. Lines logged for the whole group go to every member's train.log.

This module is imported by Hydra's plugin discovery (without a sys.modules entry, hence no
`from __future__ import annotations`: dataclasses would fail) on every `nrexp train` start, `--help` too:
it imports neither torch nor nrexp.fused at its top.
"""

import contextlib
import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobRuntime, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger("nrexp")


@dataclass
class FusedLauncherConf:
    _target_: str = "hydra_plugins.nrexp_fused_launcher.fused_launcher.FusedLauncher"
    # Most members trained at once; a bigger group is split into chunks of this size. Memory and time
    # per step grow about linearly with the members; the gain over one-by-one levels off once the
    # batched matmuls keep the device busy.
    max_members: int = 64


ConfigStore.instance().store(group="hydra/launcher", name="fused", node=FusedLauncherConf, provider="nrexp")


class FusedLauncher(Launcher):
    def __init__(self, max_members: int = 64) -> None:
        super().__init__()
        if max_members < 1:
            raise ValueError(f"hydra.launcher.max_members={max_members} must be >= 1")
        self.max_members = max_members
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)

        configs = []
        for num, overrides in enumerate(job_overrides, start=initial_job_idx):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = sweep_config.hydra.job.num = num
            configs.append(sweep_config)

        task_configs = [_task_config(c) for c in configs]
        groups = _plan(configs, task_configs, self.max_members)
        log.info(
            "fused launcher: %d jobs in %d group(s): %s",
            len(configs),
            len(groups),
            "; ".join(f"{len(g.jobs)} x {g.label}" if g.fused else f"1 alone ({g.label})" for g in groups),
        )
        returns: list[JobReturn | None] = [None] * len(configs)
        for group in groups:
            for i in group.jobs:
                log.info("\t#%d : %s", initial_job_idx + i, " ".join(filter_overrides(list(job_overrides[i]))))
            if group.fused:
                for i, ret in zip(
                    group.jobs, self._run_group([configs[i] for i in group.jobs], [task_configs[i] for i in group.jobs])
                ):
                    returns[i] = ret
            else:
                returns[group.jobs[0]] = run_job(
                    hydra_context=self.hydra_context,
                    task_function=self.task_function,
                    config=configs[group.jobs[0]],
                    job_dir_key="hydra.sweep.dir",
                    job_subdir_key="hydra.sweep.subdir",
                )
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return returns

    def _run_group(self, configs: list[DictConfig], task_configs: list[DictConfig]) -> list[JobReturn]:
        """Set up every member as `run_job` sets up a job, train them together, then end each job."""

        saved_hydra_config = HydraConfig.instance().cfg
        returns, run_dirs, extra_logs = [], [], []
        with contextlib.ExitStack() as locks:  # each member's one writer: this process
            return self._train_group(configs, task_configs, saved_hydra_config, returns, run_dirs, extra_logs, locks)

    def _train_group(
        self, configs, task_configs, saved_hydra_config, returns, run_dirs, extra_logs, locks
    ) -> list[JobReturn]:
        from nrexp import fused, rundir, sweep

        try:
            for config, task_config in zip(configs, task_configs):
                returns.append(self._start_job(config, task_config))
                run_dirs.append(Path(config.hydra.runtime.output_dir))  # the job's dir, as run_job resolves it
                locks.enter_context(rundir.RunLock(run_dirs[-1]))
                rundir.clear_partial_run(run_dirs[-1])  # sweep.resume: a member killed before its first checkpoint
            # the console and the first member's train.log as Hydra configures them; the others' logs added
            HydraConfig.instance().set_config(configs[0])
            configure_log(configs[0].hydra.job_logging, configs[0].hydra.verbose)
            extra_logs = _add_log_files(run_dirs[1:], f"{configs[0].hydra.job.name}.log")
            try:
                summaries = fused.train_group(task_configs, run_dirs)
            except Exception as err:  # noqa: BLE001 - as under any launcher, a failure is recorded, the sweep goes on
                summaries = [sweep.record_failure(cfg, d, err) for cfg, d in zip(task_configs, run_dirs)]
            for config, ret, summary in zip(configs, returns, summaries):
                acc = summary.get("metrics", {}).get("test/acc")
                ret.return_value = float("nan") if acc is None or summary["status"] == "failed" else float(acc)
                ret.status = JobStatus.COMPLETED
                HydraConfig.instance().set_config(config)
                self.hydra_context.callbacks.on_job_end(config=config, job_return=ret)
        finally:
            for handler in extra_logs:
                logging.getLogger().removeHandler(handler)
                handler.close()
            HydraConfig.instance().cfg = saved_hydra_config
        signal = next((s.get("signal") for s in summaries if s.get("signal")), None)
        if signal:  # Ctrl-C / SIGTERM: every member is checkpointed; end the sweep as an ordinary job would
            raise SystemExit(128 + signal)
        return returns

    def _start_job(self, config: DictConfig, task_config: DictConfig) -> JobReturn:
        """What hydra.core.utils.run_job does before it calls the task function (Hydra 1.3)."""
        output_dir = _output_dir(config)
        with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
            config.hydra.runtime.output_dir = os.path.abspath(output_dir)
        HydraConfig.instance().set_config(config)
        ret = JobReturn()
        ret.cfg = task_config
        ret.hydra_cfg = copy.deepcopy(HydraConfig.instance().cfg)
        ret.overrides = OmegaConf.to_container(config.hydra.overrides.task)
        ret.working_dir = os.getcwd()
        ret.task_name = JobRuntime.instance().get("name")
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        if config.hydra.output_subdir is not None:
            hydra_output = Path(config.hydra.runtime.output_dir) / str(config.hydra.output_subdir)
            hydra_output.mkdir(parents=True, exist_ok=True)
            for name, node in (
                ("config.yaml", ret.cfg),
                ("hydra.yaml", ret.hydra_cfg),
                ("overrides.yaml", config.hydra.overrides.task),
            ):
                (hydra_output / name).write_text(OmegaConf.to_yaml(node), encoding="utf-8")
        self.hydra_context.callbacks.on_job_start(config=config, task_function=self.task_function)
        return ret


def _output_dir(config: DictConfig) -> str:
    """The job's run dir: hydra.sweep.dir/hydra.sweep.subdir, as run_job makes it."""
    return os.path.join(str(config.hydra.sweep.dir), str(OmegaConf.select(config, "hydra.sweep.subdir")))


def _plan(configs: list[DictConfig], task_configs: list[DictConfig], max_members: int) -> list:
    """grouping.plan, but when finishing a sweep (sweep.resume=true) a job with a run already (a result to
    skip, a checkpoint to resume) runs alone, through the task function, which skips or resumes it."""
    from nrexp import grouping, rundir, sweep

    alone = {}
    if sweep.plan.get("resume"):
        for i, config in enumerate(configs):
            recorded = sweep.plan["jobs"].get(sweep.job_key(config.hydra.overrides.task))
            if recorded is not None and sweep.job_action(Path(recorded)) != sweep.RUN:
                alone[i] = f"sweep.resume: {sweep.job_action(Path(recorded))}"
            elif recorded is not None and Path(recorded).resolve() != Path(_output_dir(config)).resolve():
                alone[i] = "sweep.resume: its run is in a dir of another name"
            elif recorded is None and rundir.holds_a_run(Path(_output_dir(config))):
                alone[i] = "its dir holds another job's run"
    rest = [i for i in range(len(configs)) if i not in alone]
    groups = [grouping.Group([i], False, reason) for i, reason in alone.items()]
    for group in grouping.plan([task_configs[i] for i in rest], max_members):
        groups.append(grouping.Group([rest[j] for j in group.jobs], group.fused, group.label))
    return sorted(groups, key=lambda g: g.jobs[0])


def _task_config(config: DictConfig) -> DictConfig:
    """The job's config as its task function sees it: without the `hydra` node."""
    task_cfg = copy.deepcopy(config)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    return task_cfg


def _add_log_files(run_dirs: Sequence[Path], name: str) -> list[logging.Handler]:
    """A file handler per member like the one Hydra's job_logging gave the first member (same format)."""
    root = logging.getLogger()
    template = next((h for h in root.handlers if isinstance(h, logging.FileHandler)), None)
    handlers = []
    for run_dir in run_dirs:
        handler = logging.FileHandler(Path(run_dir) / name)
        if template is not None:
            handler.setFormatter(template.formatter)
            handler.setLevel(template.level)
        root.addHandler(handler)
        handlers.append(handler)
    return handlers
