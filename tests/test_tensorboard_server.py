"""A real TensorBoard server over a small sweep: every job is its own run, every per-layer tag is served,
and the HParams tab lists every completed run with the same hyper-parameters and its final metrics."""
import json
import socket
import subprocess
import sys
import time
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


@pytest.fixture
def tensorboard(tiny_sweep, tmp_path):
    """Base URL of a `tensorboard` server over the shared sweep; the server is always stopped."""
    _, sweep = tiny_sweep
    port = free_port()
    log = open(tmp_path / "tensorboard.log", "w")
    # the module, not the console script: the same interpreter (and tensorboard) as the tests
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(sweep), "--port", str(port),
                             "--host", "127.0.0.1", "--reload_interval", "0"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # up, and done loading every run (reload_interval=0: it loads once, at start)
            try:
                if len(get(base, "/data/runs")) >= 8:
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "tensorboard.log").read_text()
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
        log.close()


def get(base, path):
    with urllib.request.urlopen(base + path, timeout=10) as response:
        return json.loads(response.read())


def post(base, path, body):
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
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

    experiment = post(tensorboard, "/data/plugin/hparams/experiment", {"experimentName": ""})
    hparam_names = {h["name"] for h in experiment["hparamInfos"]}
    assert {"norm", "dropout.p", "optim.weight_decay", "init", "init.scale", "data.batch_size", "optim.lr",
            "model.depth", "model.width", "model.activation", "optim", "seed"} <= hparam_names
    norm_info = next(h for h in experiment["hparamInfos"] if h["name"] == "norm")
    from nrexp.config import NORMS

    assert sorted(norm_info["domainDiscrete"]) == sorted(NORMS)  # every option, not only the swept ones
    assert {m["name"]["tag"] for m in experiment["metricInfos"]} == {
        "final/test_acc", "final/test_loss", "final/train_acc", "final/train_loss"}

    groups = post(tensorboard, "/data/plugin/hparams/session_groups", {
        "experimentName": "", "startIndex": 0, "sliceSize": 100,
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]})
    # one group (row) per setting, its seeds as the group's sessions: every run of the sweep, in one table
    assert len(groups["sessionGroups"]) == 4
    assert all(len(g["sessions"]) == 2 for g in groups["sessionGroups"])
    sessions = {s["name"]: (g["hparams"], s["metricValues"]) for g in groups["sessionGroups"] for s in g["sessions"]}
    assert sorted(sessions) == sorted(completed)
    for g in groups["sessionGroups"]:
        seeds = {completed[s["name"]]["config"]["seed"] for s in g["sessions"]}
        settings = {(completed[s["name"]]["config"]["norm"]["name"], completed[s["name"]]["config"]["data"]["train_size"])
                    for s in g["sessions"]}
        assert seeds == {0, 1} and len(settings) == 1
    for run, (hparams, metrics) in sessions.items():
        summary = completed[run]
        assert hparams["norm"] == summary["config"]["norm"]["name"]
        assert hparams["dropout.p"] == pytest.approx(summary["config"]["dropout"]["p"])
        assert hparams["data.train_size"] == summary["config"]["data"]["train_size"]
        final = {m["name"]["tag"]: m["value"] for m in metrics}
        assert final["final/test_acc"] == pytest.approx(summary["metrics"]["test/acc"])
