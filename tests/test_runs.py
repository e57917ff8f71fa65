"""The Python API (nrexp.runs.load, nrexp.runs.curves) against the files and an independent reader of the
events (tbparse), and how a run knows the keys its sweep varies (runs.swept_overrides)."""

import math

import pytest
import yaml

from conftest import read_summary, run_dirs
from nrexp import runs

LAYERS = ["block00", "block01", "head"]  # TINY: model.depth=2


@pytest.mark.slow  # reads the session's tiny_sweep, a real sweep run in a subprocess
def test_load_has_one_row_per_run_with_the_numbers_of_its_summary(tiny_sweep):
    _, sweep = tiny_sweep
    df = runs.load(sweep)
    # the swept keys in the command line's order (norm=none,batch data.train_size=...), then seed
    assert list(df.columns[:4]) == ["run", "norm", "data.train_size", "seed"]
    assert {"status", "steps", "test_acc", "train_acc", "gen_gap", "act_ratio_init", "act_ratio_final", "dir"} <= set(
        df.columns
    )
    assert sorted(df["run"]) == sorted(d.name for d in run_dirs(sweep)) and len(df) == 12
    for _, row in df.iterrows():
        summary = read_summary(sweep / row["run"])
        config = summary["config"]
        assert (row["norm"], row["data.train_size"], row["seed"]) == (
            config["norm"]["name"],
            config["data"]["train_size"],
            config["seed"],
        )
        assert row["status"] == summary["status"]
        if summary["status"] != "completed":
            assert math.isnan(row["test_acc"]) and math.isnan(row["act_ratio_init"])
            continue
        assert row["test_acc"] == summary["metrics"]["test/acc"]
        assert row["gen_gap"] == pytest.approx(summary["metrics"]["train/acc"] - summary["metrics"]["test/acc"])
        for when in ("init", "final"):
            act = summary["layers"][when]["act_norm"]
            assert row[f"act_ratio_{when}"] == pytest.approx(act["block01"] / act["block00"])  # the head left out
    assert (df["status"] == "failed").sum() == 4


@pytest.mark.slow  # reads the session's tiny_sweep
def test_curves_are_the_events_as_tbparse_reads_them(tiny_sweep):
    from tbparse import SummaryReader

    _, sweep = tiny_sweep
    tags = ["act_norm", "test/acc", "depth_init/*", "depth_final/grad_norm"]
    ours = runs.curves(sweep, tags=tags)
    assert list(ours.columns) == ["run", "step", "tag", "layer", "value"]
    theirs = SummaryReader(str(sweep), extra_columns={"dir_name"}).scalars
    theirs = theirs[theirs["tag"].str.match(r"^(act_norm/|test/acc$|depth_init/|depth_final/grad_norm$)")]
    # a step written twice (the last logging step, then the final probe) counts once, with its last value
    theirs = theirs.drop_duplicates(["dir_name", "tag", "step"], keep="last")
    assert len(ours) == len(theirs) > 0
    merged = ours.merge(theirs, left_on=["run", "tag", "step"], right_on=["dir_name", "tag", "step"])
    assert len(merged) == len(ours)
    assert merged["value_x"].to_numpy() == pytest.approx(merged["value_y"].to_numpy())

    completed = [d for d in run_dirs(sweep) if read_summary(d)["status"] == "completed"]
    for run in completed:
        mine = ours[ours["run"] == run.name]
        per_layer = mine[mine["tag"].str.startswith("act_norm/")]
        assert (per_layer["layer"] == per_layer["tag"].str.split("/").str[1]).all()
        assert (mine[mine["tag"] == "test/acc"]["layer"] == "").all()
        # the depth profile: step i is layer i, its value the summary's per-layer statistic
        depth = mine[mine["tag"] == "depth_init/act_norm"].sort_values("step")
        assert list(depth["step"]) == [0, 1, 2] and list(depth["layer"]) == LAYERS
        init = read_summary(run)["layers"]["init"]["act_norm"]
        assert list(depth["value"]) == pytest.approx([init[name] for name in LAYERS], rel=1e-6)
    assert set(ours[ours["run"] == completed[0].name]["tag"]) >= {
        "depth_init/act_norm",
        "depth_init/grad_norm",
        "depth_final/grad_norm",
        "test/acc",
    }


def write_yaml(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_swept_overrides_from_hydras_record(tmp_path):
    # a job of Hydra's basic sweeper: the keys with several values in multirun.yaml, in the command line's order,
    # then the sweeper's params; constants, hydra.* and bookkeeping keys (trainer.progress) left out
    sweep = tmp_path / "sweep"
    write_yaml(
        sweep / "multirun.yaml",
        {
            "hydra": {
                "overrides": {
                    "hydra": ["hydra.mode=MULTIRUN"],
                    "task": [
                        "model.depth=3",
                        "norm=none,batch",
                        "+experiment=x",
                        "init.scale=range(1,3)",
                        "seed=0,1",
                        "trainer.progress=false",
                        "dropout.p=choice(0,0.5)",
                    ],
                },
                "sweeper": {"params": {"optim.lr": "0.1,0.01"}},
            }
        },
    )
    job = sweep / "norm=none"
    write_yaml(job / ".hydra" / "hydra.yaml", {"hydra": {"mode": "MULTIRUN", "overrides": {"task": ["norm=none"]}}})
    assert runs.swept_overrides(job) == ["norm", "init.scale", "seed", "dropout.p", "optim.lr"]

    # another sweeper (Optuna) writes no multirun.yaml: its search space, from the job's own record
    optuna = tmp_path / "optuna" / "0"
    write_yaml(
        optuna / ".hydra" / "hydra.yaml",
        {
            "hydra": {
                "mode": "MULTIRUN",
                "sweeper": {"params": {"optim.lr": "tag(log, interval(0.001, 1))", "dropout.p": "interval(0, 0.5)"}},
            }
        },
    )
    assert runs.swept_overrides(optuna) == ["optim.lr", "dropout.p"]

    # a single run: the keys set on its command line
    single = tmp_path / "outputs" / "12-00-00"
    write_yaml(single / ".hydra" / "hydra.yaml", {"hydra": {"mode": "RUN"}})
    (single / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump(["norm=batch", "dropout.p=0.2", "trainer.progress=false"])
    )
    assert runs.swept_overrides(single) == ["norm", "dropout.p"]

    # no Hydra record (a run started from Python): None, the caller's default
    (tmp_path / "bare").mkdir()
    assert runs.swept_overrides(tmp_path / "bare") is None
