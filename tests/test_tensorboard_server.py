"""A real TensorBoard server over a small sweep, through its HTTP API: every job is its own run, every
per-layer tag is served, each run's depth profile is a series over steps 0..L, the custom layout holds the
depth charts and one chart per picked layer, and the HParams tab lists every completed run with exactly the
swept keys plus the documented few (nrexp.writers.ALWAYS_HPARAMS) and the science metrics."""

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from conftest import read_summary, run_dirs

pytestmark = pytest.mark.slow  # every test here reads the session's tiny_sweep, a real sweep run in a subprocess

LAYER_METRICS = ("act_norm", "grad_norm", "weight_norm", "weight_change", "update_ratio")
LAYERS = ("block00", "block01", "head")  # TINY: model.depth=2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tensorboard(tiny_sweep, tmp_path_factory):
    """Base URL of a `tensorboard` server over the shared sweep (one for this module's tests); always stopped."""
    _, sweep = tiny_sweep
    port = free_port()
    log_path = tmp_path_factory.mktemp("tensorboard") / "tensorboard.log"
    with open(log_path, "w") as log:
        # the module, not the console script: the same interpreter (and tensorboard) as the tests
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorboard.main",
                "--logdir",
                str(sweep),
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--reload_interval",
                "0",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:  # up, and done loading every run (reload_interval=0: it loads once, at start)
                try:
                    if len(get(base, "/data/runs")) >= 8:
                        break
                except OSError:
                    pass
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "tensorboard did not serve the runs in 60 s"
                time.sleep(0.5)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def get(base, path):
    with urllib.request.urlopen(base + path, timeout=10) as response:
        return json.loads(response.read())


def post(base, path, body):
    request = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_tensorboard_serves_every_run_tag_and_hparams(tiny_sweep, tensorboard):
    _, sweep = tiny_sweep
    completed = {d.name: read_summary(d) for d in run_dirs(sweep) if read_summary(d)["status"] == "completed"}
    assert len(completed) == 8

    # every job is its own run, named by its dir (no timestamped add_hparams sub-runs)
    assert sorted(get(tensorboard, "/data/runs")) == sorted(completed)

    tags = get(tensorboard, "/data/plugin/scalars/tags")
    for run in completed:
        run_tags = set(tags[run])
        for metric in LAYER_METRICS:
            for layer in LAYERS:
                assert f"{metric}/{layer}" in run_tags, (run, metric, layer)
        assert {"train/loss", "test/acc", "final/test_acc"} <= run_tags

    from nrexp.config import NORMS
    from nrexp.writers import ALWAYS_HPARAMS, HPARAM_METRICS

    experiment = post(tensorboard, "/data/plugin/hparams/experiment", {"experimentName": ""})
    # the sweep's swept keys (norm=none,batch data.train_size=256,512,5000; seed is one of the few) and no others
    hparams = {h["name"]: h for h in experiment["hparamInfos"]}
    assert set(hparams) == {"norm", "data.train_size", *ALWAYS_HPARAMS}
    assert {name for name, h in hparams.items() if h.get("differs")} == {"norm", "data.train_size", "seed"}
    assert sorted(hparams["norm"]["domainDiscrete"]) == sorted(NORMS)  # every option, not only the swept ones
    assert {m["name"]["tag"] for m in experiment["metricInfos"]} == set(HPARAM_METRICS)

    groups = post(
        tensorboard,
        "/data/plugin/hparams/session_groups",
        {
            "experimentName": "",
            "startIndex": 0,
            "sliceSize": 100,
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        },
    )
    # one group (row) per setting, its seeds as the group's sessions: every run of the sweep, in one table
    assert len(groups["sessionGroups"]) == 4
    assert all(len(g["sessions"]) == 2 for g in groups["sessionGroups"])
    sessions = {s["name"]: (g["hparams"], s["metricValues"]) for g in groups["sessionGroups"] for s in g["sessions"]}
    assert sorted(sessions) == sorted(completed)
    for g in groups["sessionGroups"]:
        seeds = {completed[s["name"]]["config"]["seed"] for s in g["sessions"]}
        settings = {
            (completed[s["name"]]["config"]["norm"]["name"], completed[s["name"]]["config"]["data"]["train_size"])
            for s in g["sessions"]
        }
        assert seeds == {0, 1} and len(settings) == 1
    for run, (hparams, metrics) in sessions.items():
        summary = completed[run]
        assert hparams["norm"] == summary["config"]["norm"]["name"]
        assert hparams["data.train_size"] == summary["config"]["data"]["train_size"]
        assert hparams["model.depth"] == 2  # (a group's seed is one of its runs': the sessions tell them apart)
        final = {m["name"]["tag"]: m["value"] for m in metrics}
        assert final["final/test_acc"] == pytest.approx(summary["metrics"]["test/acc"])
        assert final["final/gen_gap"] == pytest.approx(summary["metrics"]["train/acc"] - summary["metrics"]["test/acc"])
        assert final["final/diverged"] == 0 and final["final/steps"] == summary["steps"]
        act = summary["layers"]["final"]["act_norm"]
        assert 10 ** final["final/log10_act_ratio_final"] == pytest.approx(act["block01"] / act["block00"], rel=1e-5)


def test_tensorboard_serves_depth_profiles_and_the_layout(tiny_sweep, tensorboard):
    _, sweep = tiny_sweep
    completed = {d.name: read_summary(d) for d in run_dirs(sweep) if read_summary(d)["status"] == "completed"}
    tags = get(tensorboard, "/data/plugin/scalars/tags")
    for run, summary in completed.items():
        for when in ("init", "final"):
            for metric in ("act_norm", "grad_norm"):
                query = urllib.parse.urlencode({"run": run, "tag": f"depth_{when}/{metric}"})
                points = get(tensorboard, f"/data/plugin/scalars/scalars?{query}")  # [wall time, step, value]
                assert [step for _, step, _ in points] == list(range(len(LAYERS))), (run, when, metric)
                expected = [summary["layers"][when][metric][layer] for layer in LAYERS]
                assert [value for *_, value in points] == pytest.approx(expected, rel=1e-6)
        assert {f"depth_{w}/{m}" for w in ("init", "final") for m in LAYER_METRICS} - set(tags[run]) == {
            "depth_init/weight_change",
            "depth_final/update_ratio",
        }  # 0 at init; the final probe takes no step

    layout = get(tensorboard, "/data/plugin/custom_scalars/layout")
    categories = {
        c["title"]: {chart["title"]: chart["multiline"]["tag"] for chart in c["chart"]} for c in layout["category"]
    }
    first = layout["category"][0]["title"]
    assert first.startswith("depth profile")
    assert sorted(categories[first].values()) == sorted(
        [f"^depth_{when}/{metric}$"] for metric in ("act_norm", "grad_norm") for when in ("init", "final")
    )
    for metric in LAYER_METRICS:  # merged over the runs: one chart per picked layer, every run on it
        charts = categories[f"{metric}: first, middle, last block and head (all runs)"]
        assert sorted(charts.values()) == sorted([f"^{metric}/{layer}$"] for layer in LAYERS)
