"""Sweeps (`nrexp train -m`): job dirs, failures that do not stop the sweep, the status table, and the
launcher/sweeper plugins (joblib, submitit_local, optuna) running real jobs."""

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY, read_summary, run_cli, run_dirs
from nrexp.sweep import EXCLUDE_KEYS, MAX_DIR_NAME, gpu_for_job, job_dir_name, naming_overrides, run_name_suffix

# A 2-job sweep for the launcher tests: as small as a real run gets.
LAUNCHER_TINY = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.eval_every"))] + [
    "trainer.max_steps=2",
    "trainer.eval_every=2",
    "trainer.progress=false",
]


def test_job_dir_names_carry_what_varies_in_command_line_order():
    task = ["data.source=bundled", "norm=batch", "init=normal", "init.scale=2", "trainer.progress=false"]
    constants = ["trainer.progress", "data.root", "data.source", "init"]  # what naming_overrides excludes
    assert job_dir_name(task, constants) == "norm=batch,init.scale=2"  # not alphabetical: as typed
    # a preset's sweep (hydra.sweeper.params) follows the command line's, in the preset's order
    assert (
        job_dir_name(["model.depth=50", "+experiment=x", "seed=1"], ["experiment"], {"model.depth": "10,50"})
        == "seed=1,model.depth=50"
    )
    # a sweep that varies nothing (one job): named by its overrides but the bookkeeping ones; none: `defaults`
    assert job_dir_name(["norm=batch", "trainer.progress=false"], ["trainer.progress", "norm"]) == "norm=batch"
    assert job_dir_name([]) == "defaults"  # not the sweep dir itself
    assert job_dir_name(["+experiment=deep", "norm=batch"]) == "experiment=deep,norm=batch"
    assert job_dir_name(["++optim.lr=0.1", "+x=1"]) == "optim.lr=0.1,x=1"
    assert job_dir_name(["experiment=paper/fig1", "seed=0"]) == "experiment=paper-fig1,seed=0"  # no nested dirs
    long_a, long_b = ["a=" + "1" * 300], ["a=" + "1" * 299 + "2"]
    assert len(job_dir_name(long_a).encode()) <= MAX_DIR_NAME
    assert job_dir_name(long_a) != job_dir_name(long_b)  # cut names stay distinct (hash of the whole)


def test_naming_overrides_exclude_the_constant_keys_of_a_sweep():
    line = naming_overrides(
        ["norm=none,batch", "+experiment=x", "init.scale=1,2", "seed=0", "hydra.sweep.dir=s", "hydra/launcher=joblib"],
        multirun=True,
    )
    assert line == [f"{EXCLUDE_KEYS}=[trainer.progress,data.root,data.eval_batch_size,experiment,seed]"]
    given = naming_overrides([f"{EXCLUDE_KEYS}=[seed]", "norm=none,batch", "init=normal"], multirun=True)
    assert given == [f"{EXCLUDE_KEYS}=[seed,init]"]  # added to the list the command line gives
    assert naming_overrides(["norm=batch"], multirun=False) == []  # a single run: named by all its overrides
    assert naming_overrides(["norm=none,batch"], multirun=True) == []  # nothing constant


def test_single_run_dir_is_the_time_and_the_overrides_and_never_reused(tmp_path):
    from nrexp.config import fresh_dir

    suffix = run_name_suffix(["norm=batch", "dropout.p=0.2", "trainer.progress=false"], ["trainer.progress"])
    assert suffix == "_norm=batch,dropout.p=0.2"
    assert run_name_suffix([], ["trainer.progress"]) == ""
    base = str(tmp_path / "day" / "12-00-00")
    names = [Path(fresh_dir(base, suffix)).name for _ in range(2)] + [Path(fresh_dir(base, "")).name]
    # the count follows the time, so it never reads as part of a value (dropout.p=0.2_1)
    assert names == ["12-00-00_norm=batch,dropout.p=0.2", "12-00-00_1_norm=batch,dropout.p=0.2", "12-00-00"]


def test_a_finished_job_is_one_line():
    from nrexp.console import job_line

    done = {"status": "completed", "metrics": {"test/acc": 0.91234}, "wall_time_s": 12.34}
    line = job_line("norm=batch,init.scale=2", done, 3)
    assert line == "#3 norm=batch,init.scale=2  completed  test acc 0.9123  12.3 s"
    error = "nrexp.errors.ConfigError: data.train_size=5000 is invalid"
    failed = {"status": "failed", "error": error, "metrics": {}}
    assert job_line("norm=none", failed, 0) == f"#0 norm=none  failed  {error}"
    diverged = {"status": "diverged", "metrics": {"test/acc": None}, "wall_time_s": 1.0}
    assert job_line("optim.lr=10", diverged) == "optim.lr=10  diverged  test acc -  1.0 s"


def test_gpu_for_job_round_robin():
    assert [gpu_for_job(n, 4) for n in range(6)] == [0, 1, 2, 3, 0, 1]
    assert gpu_for_job(3, 1) is None and gpu_for_job(3, 0) is None  # one GPU or none: leave the device alone


def _hydra_cfg(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import nrexp
    from nrexp import config

    config.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=nrexp.config_dir(), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True).hydra


def test_launcher_and_sweeper_presets_compose():
    slurm = _hydra_cfg(["hydra/launcher=slurm_gpu"]).launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert (slurm.partition, slurm.gpus_per_task, slurm.timeout_min, slurm.array_parallelism) == ("gpu", 1, 240, 32)
    assert _hydra_cfg(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]).launcher.n_jobs == 2
    optuna = _hydra_cfg(["hydra/sweeper=optuna_wd_dropout"]).sweeper
    assert optuna.direction == "maximize" and set(optuna.params) == {"optim.weight_decay", "dropout.p"}
    hydra = _hydra_cfg([])
    assert [c._target_ for c in hydra.callbacks.values()] == [
        "nrexp.console.RunConsole",
        "nrexp.sweep.SweepRecord",
        "nrexp.sweep.SweepStatusTable",
    ]


@pytest.mark.slow
def test_sweep_one_dir_per_job_failures_recorded_and_status_table(tiny_sweep):
    proc, sweep = tiny_sweep
    jobs = sorted(p.name for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert len(jobs) == 12
    # named by the keys the sweep varies, in command-line order: not its constants (data.batch_size=64, ...)
    assert "norm=batch,data.train_size=512,seed=1" in jobs
    assert all(re.fullmatch(r"norm=(none|batch),data\.train_size=(256|512|5000),seed=[01]", name) for name in jobs)
    statuses = {}
    for job in jobs:
        summary = read_summary(sweep / job)
        statuses[job] = summary["status"]
        if "data.train_size=5000" in job:  # more examples than the data has: this job fails, the others run
            assert summary["status"] == "failed"
            assert summary["error"].startswith("nrexp.errors.ConfigError: data.train_size=5000 is invalid")
            assert "\n" not in summary["error"]
            assert "Traceback" in (sweep / job / "train.log").read_text()  # the full story stays in the job log
        else:
            assert summary["status"] == "completed" and math.isfinite(summary["metrics"]["test/acc"])
            assert list((sweep / job).glob("events.out.tfevents.*"))  # each job its own TensorBoard run
    assert sorted(statuses.values()).count("failed") == 4
    # the end-of-sweep table: every job with its status, named by what differs between jobs
    assert "8 completed, 4 failed" in proc.stdout
    assert "norm=none,data.train_size=5000,seed=1" in proc.stdout and "4000 examples" in proc.stdout


@pytest.mark.slow
def test_a_sweep_names_jobs_by_what_varies_and_records_its_constants(tmp_path):
    """Through the CLI: job dirs (TensorBoard's run names) carry only the swept keys, in the command line's
    order (norm before init.scale, not alphabetical); sweep.yaml and each run's text tab list the constants;
    the terminal shows the sweep dir first, one line per finished job, no per-job table, then the table."""
    constants = [*LAUNCHER_TINY, "init=normal"]
    proc = run_cli(
        ["train", "-m", "norm=none,batch", *constants, "init.scale=1,2", "hydra.sweep.dir=sweep"], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sweep = tmp_path / "sweep"
    names = [f"norm={n},init.scale={s}" for n in ("none", "batch") for s in (1, 2)]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == sorted(names)

    (entry,) = yaml.safe_load((sweep / "sweep.yaml").read_text())["commands"]
    assert entry["varies"] == ["norm", "init.scale"]
    assert entry["constants"] == constants
    assert entry["command"].startswith("nrexp train -m norm=none,batch data.source=bundled")
    assert entry["command"].endswith("init.scale=1,2 hydra.sweep.dir=sweep")
    events = EventAccumulator(str(sweep / names[-1])).Reload()
    text = events.Tensors("run/name/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"**{names[-1]}**" in text and "`init=normal`" in text and "`model.depth=2`" in text

    lines = proc.stdout.splitlines()
    assert lines[0] == "sweep dir: sweep"
    finished = [line for line in lines if re.match(r"#\d ", line)]
    assert [line.split()[1] for line in finished] == names  # in the order the jobs ran
    assert all(re.fullmatch(r"#\d \S+  completed  test acc \d\.\d{4}  \d+\.\d s", line) for line in finished), finished
    assert "nrexp run:" not in proc.stdout  # the per-job summary table of a single run
    assert "sweep sweep: 4 completed" in proc.stdout
    assert proc.stdout.index(finished[-1]) < proc.stdout.index("4 completed")


@pytest.mark.slow
def test_hparams_written_to_the_run_itself_with_the_same_keys(tiny_sweep):
    _, sweep = tiny_sweep
    from tensorboard.plugins.hparams import plugin_data_pb2

    key_sets = set()
    for run in run_dirs(sweep):
        if read_summary(run)["status"] != "completed":
            continue
        assert [p for p in run.iterdir() if p.is_dir() and p.name != ".hydra"] == []  # no add_hparams sub-run
        events = EventAccumulator(str(run)).Reload()
        content = events.PluginTagToContent("hparams")
        assert set(content) == {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
        key_sets.add(frozenset(start.hparams))
        assert "seed=" not in start.group_name and f"norm={start.hparams['norm'].string_value}," in start.group_name
        summary = read_summary(run)
        assert start.hparams["norm"].string_value == summary["config"]["norm"]["name"]
        assert start.hparams["data.train_size"].number_value == summary["config"]["data"]["train_size"]
        assert events.Scalars("final/test_acc")[-1].value == pytest.approx(summary["metrics"]["test/acc"])
    # the swept keys and nrexp.writers.ALWAYS_HPARAMS (norm, model.depth, seed), the same for every run
    assert key_sets == {frozenset({"norm", "data.train_size", "model.depth", "seed"})}


def test_single_run_config_error_still_exits_2(tmp_path):
    proc = run_cli(["train", *TINY, "dropout.p=1.5"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("nrexp: error: dropout.p=1.5 is invalid")


@pytest.mark.slow
def test_the_exit_code_of_a_sweep_into_a_used_dir_is_that_of_its_own_jobs(tmp_path):
    """hydra.sweep.dir given again (with sweep.resume=true: without it, a used sweep dir is refused): the
    table lists every job there, but an earlier command's failed job (here fixed by a rerun with another
    data.train_size) does not fail this command; a new failure does. A completed job is skipped."""
    sweep = ["train", "-m", *TINY, "trainer.progress=false", "hydra.sweep.dir=sweep"]
    failing = run_cli([*sweep, "data.train_size=5000"], cwd=tmp_path)  # fails in the job, after preflight
    assert failing.returncode == 1 and "1 of 1 jobs of the sweep failed" in failing.stderr, failing.stderr
    refused = run_cli([*sweep, "data.train_size=256,512"], cwd=tmp_path)
    assert refused.returncode == 2 and "sweep.resume=true" in refused.stderr, refused.stderr
    fixed = run_cli([*sweep, "data.train_size=256,512", "sweep.resume=true"], cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "1 failed" in fixed.stdout and "2 completed" in fixed.stdout  # the table: the whole dir
    again = run_cli([*sweep, "data.train_size=5000,256", "sweep.resume=true"], cwd=tmp_path)  # 256: skipped
    assert again.returncode == 1 and "1 of 1 jobs of the sweep failed" in again.stderr, again.stderr
    assert "(this command: 1 skipped, 0 resumed, 1 run)" in again.stdout, again.stdout
    commands = [c["command"] for c in yaml.safe_load((tmp_path / "sweep" / "sweep.yaml").read_text())["commands"]]
    assert [c.endswith("sweep.resume=true") for c in commands] == [False, True, True], commands
    assert "data.train_size=5000,256" in commands[-1]


@pytest.mark.slow  # reason: starts 2 loky worker processes that each import torch (~20 s on 2 cores)
def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path):
    proc = run_cli(
        [
            "train",
            "-m",
            *LAUNCHER_TINY,
            "norm=none,batch",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "hydra.sweep.dir=sweep",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    summaries = [read_summary(d) for d in run_dirs(tmp_path / "sweep")]
    assert sorted(s["config"]["norm"]["name"] for s in summaries) == ["batch", "none"]
    assert all(s["status"] == "completed" for s in summaries)
    assert "2 completed" in proc.stdout


@pytest.mark.slow  # reason: submitit_local starts each job as its own Python process (~20 s on 2 cores)
def test_submitit_local_launcher_runs_separate_job_processes(tmp_path):
    fixed = [o for o in LAUNCHER_TINY if not o.startswith("data.train_size")]
    proc = run_cli(
        ["train", "-m", *fixed, "data.train_size=256,5000", "hydra/launcher=submitit_local", "hydra.sweep.dir=sweep"],
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one job failed
    sweep = tmp_path / "sweep"
    statuses = sorted(read_summary(d)["status"] for d in run_dirs(sweep))
    assert statuses == ["completed", "failed"]  # a failure inside a submitit job is recorded, not raised
    # submitit's own per-job records: one folder per job process, with its pickled result and logs
    results = list((sweep / ".submitit").glob("*/*_result.pkl"))
    assert len(results) == 2 and len({p.parent for p in results}) == 2
    assert "1 completed, 1 failed" in proc.stdout


@pytest.mark.slow  # reason: 2 Optuna trials in sequence (~15 s on 2 cores)
def test_optuna_sweeper_searches_and_reports_the_best_trial(tmp_path):
    proc = run_cli(
        [
            "train",
            "-m",
            *LAUNCHER_TINY,
            "hydra/sweeper=optuna_wd_dropout",
            "hydra.sweeper.n_trials=2",
            "hydra.sweep.dir=sweep",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sweep = tmp_path / "sweep"
    summaries = [read_summary(d) for d in run_dirs(sweep)]
    assert len(summaries) == 2 and all(s["status"] == "completed" for s in summaries)
    assert len({s["config"]["dropout"]["p"] for s in summaries}) == 2  # the sampler proposed different values
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(max(s["metrics"]["test/acc"] for s in summaries))
    assert 1e-6 <= result["best_params"]["optim.weight_decay"] <= 1e-2
    json.dumps(result)  # plain values a script can read


@pytest.mark.parametrize(
    "override",
    [
        "seed=7",
        "optim.lr=0.125",
        "trainer.max_steps=null",
        "data.train_size=100",
        "model.activation=tanh",
        "data.root=/tmp/x",
    ],
)
def test_preflight_shortcut_gives_hydras_own_config(override):
    """preflight checks a swept plain value by updating one composed config instead of composing anew:
    the config it checks must be exactly the one Hydra composes for that job."""
    from omegaconf import OmegaConf

    from conftest import compose
    from nrexp.cli import _with_plain_override

    fixed = ["norm=batch", "data.batch_size=32"]
    shortcut = _with_plain_override(compose(fixed), override)
    assert shortcut is not None
    assert OmegaConf.to_container(shortcut) == OmegaConf.to_container(compose(fixed + [override]))


@pytest.mark.parametrize(
    "override",
    [
        "norm=layer",
        "+foo=1",
        "~seed",
        "norm.foo=1",
        "seed=abc",
        "model.depth=2.5",
        "optim.betas=[0.5,0.75]",
        "experiment=x",
    ],
)
def test_preflight_shortcut_leaves_groups_new_keys_and_bad_values_to_hydra(override):
    """Groups, +/~ overrides, unknown keys, values of the wrong type and lists (merged by Hydra's rules) take
    Hydra's full compose (and its error wording): the shortcut declines them."""
    from conftest import compose
    from nrexp.cli import _with_plain_override

    assert _with_plain_override(compose([]), override) is None


def test_nrexp_reaches_into_hydra_internals_only_in_hydra_compat():
    """Hydra's private modules are used in one place, behind a version check (issue 24): everything else
    goes through Hydra's public API, so a Hydra upgrade breaks one small module at most."""
    from conftest import REPO

    sources = [p for folder in ("nrexp", "hydra_plugins") for p in sorted((REPO / folder).rglob("*.py"))]
    users = [str(p.relative_to(REPO)) for p in sources if "hydra._internal" in p.read_text()]
    assert users == ["nrexp/hydra_compat.py"]
    cli = (REPO / "nrexp" / "cli.py").read_text()
    assert not any(f in cli for f in ("os._exit", "_run_exitfuncs", "threading._shutdown"))  # a plain exit


def test_hydra_compat_skips_the_basic_sweepers_check_on_the_versions_it_knows(monkeypatch):
    """On Hydra 1.3 the basic sweeper's check of every job is skipped (preflight checked them); another
    version keeps Hydra's behaviour untouched."""
    import hydra
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.plugins.sweeper import Sweeper

    from nrexp import hydra_compat

    monkeypatch.setattr(BasicSweeper, "validate_batch_is_legal", Sweeper.validate_batch_is_legal)  # restored after
    monkeypatch.setattr(hydra, "__version__", "1.4.0")
    assert hydra_compat.skip_basic_sweeper_validation() is False
    assert BasicSweeper.validate_batch_is_legal is Sweeper.validate_batch_is_legal
    monkeypatch.setattr(hydra, "__version__", "1.3.2")
    assert hydra_compat.skip_basic_sweeper_validation() is True
    assert BasicSweeper.validate_batch_is_legal is not Sweeper.validate_batch_is_legal
    BasicSweeper(max_batch_size=None, params=None).validate_batch_is_legal([["seed=abc"]])  # no compose, no error
