"""The `nrexp` command end to end, through a real subprocess, and what it leaves on disk."""

import json
import math
import os
import re
import subprocess
import sys
import zipfile

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, TINY, cli_env, read_summary, run_cli

LAYER_METRICS = ("act_norm", "grad_norm", "weight_norm", "weight_change", "update_ratio")


def test_help_lists_commands_without_importing_torch(tmp_path):
    code = (
        "import sys; from nrexp.cli import main; main(['--help']); assert 'torch' not in sys.modules, 'torch imported'"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "usage: nrexp" in proc.stdout


def test_cfg_job_composes_without_importing_torch(tmp_path):
    code = (
        "import sys; from nrexp.cli import main; main(['train', '--cfg', 'job', 'norm=batch', 'dropout.p=0.2']);"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "name: batch" in proc.stdout and "p: 0.2" in proc.stdout
    assert not (tmp_path / "outputs").exists()  # printing the config runs nothing


@pytest.mark.slow
def test_a_run_with_layer_stats_starts_the_figures_helper_before_importing_torch(tmp_path):
    """The helper imports matplotlib while the run imports torch (start-up, docs/speed.md); not without
    layer statistics, which draw no figure."""
    code = (
        "import sys, nrexp.figures as figures\n"
        "calls = []\n"
        "start = figures.start_helper\n"
        "figures.start_helper = lambda: (calls.append('torch' in sys.modules), start())\n"
        "from nrexp.cli import main\n"
        f"assert main(['train', *{TINY!r}, *sys.argv[1:]]) == 0\n"
        "print(calls[:1], figures._helper is not None)\n"
    )
    for extra, expected in (([], "[False] True"), (["trainer.layer_stats=false"], "[] False")):
        proc = subprocess.run(
            [sys.executable, "-c", code, *extra], cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == expected, (extra, proc.stdout)


@pytest.mark.slow
def test_entry_exits_as_python_does_after_main(tmp_path):
    # entry() is main() then a plain exit: a worker thread finishes its file, atexit handlers run,
    # unflushed output (no newline, stdout a pipe) arrives, and main()'s exit code is the process's.
    code = (
        "import atexit, threading, time, torch, nrexp.cli as cli\n"
        "atexit.register(lambda: open('atexit.txt', 'w').write('ran'))\n"
        "def slow_writer():\n    time.sleep(0.5); open('thread.txt', 'w').write('done')\n"
        "threading.Thread(target=slow_writer).start()\n"
        "cli._main = lambda argv: (print('last words', end=''), 7)[1]\n"
        "cli.entry()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True
    )
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "last words"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert (tmp_path / "thread.txt").read_text() == "done"


@pytest.mark.slow
def test_exit_into_a_closed_pipe_is_quiet(tmp_path):
    # output still buffered when the command returns meets a pipe whose reader left: exit 141, no traceback
    code = "import nrexp.cli as cli; cli._main = lambda argv: (print('x' * 10, end=''), 0)[1]; cli.entry()"
    env = {k: v for k, v in cli_env(tmp_path).items() if k != "PYTHONUNBUFFERED"}  # keep stdout buffered
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=write_end, stderr=subprocess.PIPE, text=True
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def test_train_help_shows_groups_and_every_knob(tmp_path):
    proc = run_cli(["train", "--help"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for text in (
        "norm: batch, group, instance, layer, none, rms, weight",
        "model: cnn, mlp, resmlp",
        "data: cifar10, fashion_mnist, mnist",
        "model.channels",
        "norm.groups",
        "data.augment",
        "dropout.spatial",
        "optim: adam, adamw, sgd",
        "init: default, kaiming, normal",
        "dropout.p",
        "dropout.input_p",
        "optim.decay_norm_and_bias",
        "init.scale",
        "data.train_size",
        "data.source",
        "model.activation",
        "trainer.log_every",
        "trainer.device",
        "norm.position",
    ):
        assert text in proc.stdout, text


def test_unknown_command_is_one_clear_line(tmp_path):
    proc = run_cli(["trian"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "nrexp: error: unknown command 'trian'. Fix: run `nrexp --help` for the list of commands"
    ]


@pytest.mark.slow
def test_train_end_to_end_writes_events_summary_checkpoint(tiny_run):
    proc, run_dir = tiny_run("norm=batch", "dropout.p=0.2")
    assert "completed" in proc.stdout
    # outputs/<day>/<time>_<the command line's overrides, in its order>, printed when the run starts
    assert re.fullmatch(r"\d\d-\d\d-\d\d_" + re.escape(",".join([*TINY, "norm=batch", "dropout.p=0.2"])), run_dir.name)
    assert proc.stdout.splitlines()[0] == f"run dir: outputs/{run_dir.parent.name}/{run_dir.name}"
    # the run dir holds the composed config, a log, events, summary and a checkpoint
    for name in (".hydra/config.yaml", "train.log", "summary.json", "checkpoint.pt"):
        assert (run_dir / name).is_file(), name
    assert list(run_dir.glob("events.out.tfevents.*"))

    summary = read_summary(run_dir)
    assert summary["status"] == "completed"
    assert summary["steps"] == 8 and summary["data_source"] == "bundled"
    import torch

    assert summary["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # trainer.device=auto
    assert summary["config"]["norm"]["name"] == "batch" and summary["config"]["dropout"]["p"] == 0.2
    for key in ("train/loss", "train/acc", "test/loss", "test/acc"):
        assert math.isfinite(summary["metrics"][key]), key
    assert 0 <= summary["metrics"]["test/acc"] <= 1
    assert summary["versions"]["torch"] and summary["wall_time_s"] > 0

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = set(events.Tags()["scalars"])
    layers = ["block00", "block01", "head"]
    for metric in LAYER_METRICS:
        for layer in layers:
            tag = f"{metric}/{layer}"
            assert tag in tags, tag
            values = events.Scalars(tag)
            assert all(math.isfinite(v.value) for v in values), tag
            assert values[0].step == 0, tag  # step 0 is the network at init
    assert [e.step for e in events.Scalars("act_norm/head")] == [0, 2, 4, 6, 8]  # log_every=2, plus the end
    assert [e.step for e in events.Scalars("test/acc")] == [4, 8]  # eval_every=4, and the final evaluation
    for tag in ("train/loss", "train/acc", "test/loss", "test/acc", "lr", "throughput/samples_per_s"):
        assert tag in tags, tag
    assert {"depth/init", "depth/final"} <= set(events.Tags()["images"])
    import io

    from PIL import Image

    for tag in ("depth/init", "depth/final"):  # each a PNG of the whole figure, drawn (not blank)
        (record,) = events.Images(tag)
        picture = Image.open(io.BytesIO(record.encoded_image_string))
        assert picture.format == "PNG" and picture.size == (record.width, record.height)
        assert record.width == 800 and record.height in (320, 360)  # the title: the run's name on 1 or 2 lines
        # text, lines and markers, not one color
        assert len(picture.convert("L").getcolors(maxcolors=256 * 256) or ()) > 20, tag
    # the custom-scalars layout (one chart per per-layer metric) and the run's config and data source
    from tensorboard.plugins.custom_scalar import layout_pb2

    tensors = set(events.Tags()["tensors"])
    assert {"custom_scalars__config__", "run/config/text_summary", "run/data_source/text_summary"} <= tensors
    layout = layout_pb2.Layout.FromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for cat in layout.category for chart in cat.chart}
    # depth charts first (a metric against the layer index), then one chart per picked layer, all runs overlaid
    assert charts["act_norm vs depth, at init"] == ["^depth_init/act_norm$"]
    assert charts["act_norm/block00 (first block)"] == ["^act_norm/block00$"]
    assert charts["grad_norm/head (head)"] == ["^grad_norm/head$"]


@pytest.mark.slow
def test_weight_change_is_zero_at_init_and_grows(tiny_run):
    _, run_dir = tiny_run()
    events = EventAccumulator(str(run_dir)).Reload()
    change = events.Scalars("weight_change/block00")
    assert change[0].value == 0.0 and change[-1].value > 0


@pytest.mark.slow
def test_installed_wheel_finds_its_configs(tmp_path):
    """Build the wheel, install it into a bare target dir, run from elsewhere: configs ship inside."""
    wheel_dir, target, elsewhere = tmp_path / "dist", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(wheel_dir.glob("nrexp-*.whl"))
    assert "nrexp/configs/train.yaml" in zipfile.ZipFile(wheel).namelist()
    assert "nrexp/assets/mnist_sample.npz" in zipfile.ZipFile(wheel).namelist()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = cli_env(tmp_path)
    env["PYTHONPATH"] = str(target)  # the installed copy only, not the repo
    code = "import nrexp; print(nrexp.__file__); print(nrexp.config_dir())"
    where = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.stdout.splitlines()[1].startswith(str(target)), where.stdout + where.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "nrexp", "train", *TINY, "trainer.max_steps=2"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list((elsewhere / "outputs").rglob("summary.json"))
    # the fused launcher ships in the wheel, in Hydra's plugin namespace, and Hydra finds it there
    plugin = "import hydra_plugins.nrexp_fused_launcher as m; print(m.__file__)"
    where = subprocess.run([sys.executable, "-c", plugin], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(target)), where.stdout + where.stderr
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nrexp",
            "train",
            "-m",
            *TINY,
            "trainer.max_steps=2",
            "seed=0,1",
            "hydra/launcher=fused",
            "hydra.sweep.dir=fused",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "fused launcher: 2 jobs" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert len(list((elsewhere / "fused").rglob("summary.json"))) == 2


def test_readme_starts_with_the_two_setup_commands_and_ci_runs_the_same_tests():
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```")[1].strip().splitlines()
    commands = [line for line in first_block if line.strip() and not line.startswith(("bash", "#"))]
    assert commands[0] == 'pip install -e ".[dev]" && nrexp train'
    test_command = commands[1]
    ci = (REPO / ".ci" / "run").read_text()
    assert test_command in ci.splitlines(), f"{test_command!r} is not a line of .ci/run"
    # two tiers: bare `python -m pytest -q` deselects the slow tests (pyproject's addopts); the README's command
    # gives its own -m, which replaces that one, so that it and CI run the slow tier too
    addopts = next(line for line in (REPO / "pyproject.toml").read_text().splitlines() if line.startswith("addopts"))
    assert "not slow" in addopts and "not reproduce" in addopts, addopts
    assert test_command == 'python -m pytest -q -m "not reproduce"', test_command
    assert ci.index("ruff check .") < ci.index("ruff format --check .") < ci.index(test_command)


def test_tab_completion_through_the_train_subcommand(tmp_path):
    """The script from `nrexp train -sc install=bash` calls `nrexp -sc query=bash` with COMP_LINE."""
    install = run_cli(["train", "-sc", "install=bash"], cwd=tmp_path)
    assert "hydra_bash_completion" in install.stdout
    env = cli_env(tmp_path)
    env.update(COMP_LINE="nrexp train norm=", COMP_POINT=str(len("nrexp train norm=")))
    proc = subprocess.run(
        [sys.executable, "-m", "nrexp", "-sc", "query=bash"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert {"norm=batch", "norm=layer", "norm=none"} <= set(proc.stdout.split()), proc.stdout + proc.stderr
    assert all(word.startswith("norm=") for word in proc.stdout.split())


def test_bf16_autocast_changes_the_arithmetic_not_the_bookkeeping(tmp_path):
    """trainer.precision=bf16 runs the forward in bfloat16 (numbers move a little), statistics stay fp32."""
    from conftest import compose
    from nrexp.train import train

    results = {}
    for precision in ("fp32", "bf16"):
        cfg = compose([*TINY, f"trainer.precision={precision}", "trainer.progress=false"])
        results[precision] = train(cfg, tmp_path / precision)
    fp32, bf16 = results["fp32"], results["bf16"]
    assert bf16["status"] == "completed" and bf16["steps"] == fp32["steps"]
    assert bf16["metrics"]["train/loss"] != fp32["metrics"]["train/loss"]  # autocast really took effect
    assert abs(bf16["metrics"]["train/loss"] - fp32["metrics"]["train/loss"]) < 0.05 * fp32["metrics"]["train/loss"]
    assert bf16["layers"]["init"]["act_norm"].keys() == fp32["layers"]["init"]["act_norm"].keys()


@pytest.mark.slow
def test_bf16_rms_norm_run_prints_no_torch_kernel_warning(tmp_path):
    """Under bf16, torch's RMSNorm warns once per process that it cannot use its fused kernel (bf16 input,
    float32 gain): torch's business, not the user's (nrexp/norms.py filters it). A fresh process, since
    torch warns only once per process."""
    proc = run_cli(["train", *TINY, "norm=rms", "trainer.precision=bf16", "trainer.progress=false"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Mismatch dtype" not in proc.stdout + proc.stderr and "UserWarning" not in proc.stderr, proc.stderr


def test_compile_computes_what_eager_does_and_keeps_every_statistic(tmp_path):
    """trainer.compile=true: steps without statistics run the torch.compile'd forward (BatchNorm buffers
    included), logging steps the eager one; losses and statistics match the eager run to float rounding."""
    import os
    import shutil

    import pytest

    from conftest import compose
    from nrexp.train import train

    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip(
            "no C++ compiler here: torch.compile cannot build CPU kernels (the error path is tested in test_faults)"
        )
    runs = {}
    for compiled in ("false", "true"):
        cfg = compose([*TINY, "norm=batch", f"trainer.compile={compiled}", "trainer.progress=false"])
        runs[compiled] = train(cfg, tmp_path / compiled)
    eager, fast = runs["false"], runs["true"]
    assert fast["compile"] == "compiled" and "compile" not in eager  # the compiled forward really ran
    assert fast["status"] == "completed" and fast["steps"] == eager["steps"] == 8
    for key, value in eager["metrics"].items():  # final evaluations, after 4 compiled + 4 eager steps
        assert math.isclose(fast["metrics"][key], value, rel_tol=1e-4, abs_tol=1e-6), key
    curves = {name: EventAccumulator(str(tmp_path / name)).Reload() for name in runs}
    losses = {name: [e.value for e in acc.Scalars("train/loss")] for name, acc in curves.items()}
    assert len(losses["true"]) == len(losses["false"]) == 4
    assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(losses["true"], losses["false"]))
    for when in ("init", "final"):  # every layer's statistics, at init and of the trained net
        for metric, per_layer in eager["layers"][when].items():
            assert per_layer.keys() == fast["layers"][when][metric].keys()
            for layer, value in per_layer.items():
                got = fast["layers"][when][metric][layer]
                assert math.isclose(got, value, rel_tol=1e-3, abs_tol=1e-6), (when, metric, layer)
    assert set(curves["true"].Tags()["scalars"]) == set(curves["false"].Tags()["scalars"])


@pytest.mark.slow
@pytest.mark.parametrize("command", [["train", "--help"], ["report", "sweep", "--json"]])
def test_output_into_a_closed_pipe_ends_quietly(tmp_path, command):
    """`nrexp train --help | head -1`, `nrexp report DIR --json | head`: the reader is gone before nrexp writes;
    no traceback and no error line on stderr (the report's 'cannot write' line was one)."""
    (tmp_path / "sweep" / "job").mkdir(parents=True)
    (tmp_path / "sweep" / "job" / "summary.json").write_text(
        json.dumps({"status": "completed", "config": {"norm": {"name": "none"}}, "metrics": {"test/acc": 0.5}})
    )
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write into the pipe now fails with EPIPE, as after `head` has exited
    proc = subprocess.run(
        [sys.executable, "-m", "nrexp", *command],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )
    os.close(write_end)
    assert proc.stderr == "" and proc.returncode == 141, proc.stderr
