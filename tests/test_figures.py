"""Depth figures drawn by the helper process (nrexp/figures.py): the very PNG this process would draw,
and no figure lost when the helper gets Ctrl-C or dies."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import cli_env
from nrexp import figures

LAYERS = ["block00", "block01", "block02", "head"]


def stats(scale: float):
    """Per-layer values; scale 0 makes them all zero, which switches the figure's axes to linear."""
    return {
        "act_norm": {name: scale * (i + 1) for i, name in enumerate(LAYERS)},
        "grad_norm": {name: scale / (i + 1) for i, name in enumerate(LAYERS)},
    }


@pytest.fixture
def fresh_helper():
    figures.shutdown()
    figures._helper_failed = False
    yield
    figures.shutdown()
    figures._helper_failed = False


def helper_pid() -> int:
    (pid,) = figures._helper._processes  # the executor's one worker process
    return pid


def test_the_helper_draws_in_another_process_the_png_this_process_draws(fresh_helper):
    scales = [1.0, 1e3, 0.0, 2.0]  # log, log with other decades, linear, log again: the cached figure's scale changes
    futures = [figures.submit(LAYERS, stats(s), f"init (step {i})") for i, s in enumerate(scales)]
    drawn_there = [f.result() for f in futures]
    assert helper_pid() != os.getpid() and not figures._helper_failed
    drawn_here = [figures.render_png(LAYERS, stats(s), f"init (step {i})") for i, s in enumerate(scales)]
    assert drawn_there == drawn_here  # byte for byte
    assert len({png for _, _, png in drawn_here}) == len(scales)  # and each figure shows its own values
    height, width, png = drawn_there[0]
    assert Image.open(io.BytesIO(png)).size == (width, height) == (800, 360)


def test_the_helper_draws_at_the_lowest_priority(fresh_helper):
    """Figures wait for the threads that feed the training, not the other way round (figures._helper_init)."""
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    figures.submit(LAYERS, stats(1.0), "a").result()
    assert os.getpriority(os.PRIO_PROCESS, helper_pid()) == 19
    assert os.getpriority(os.PRIO_PROCESS, 0) == ours  # this process is left as it was


def test_helper_drawing_reads_whether_the_helper_process_is_runnable(fresh_helper):
    """monitor.idle_core leaves the helper out of the count of other work while it draws (state R)."""
    from concurrent.futures import Future

    assert not figures.helper_drawing()  # no helper yet
    figures.submit(LAYERS, stats(1.0), "a").result()
    assert figures._helper_pid[0].result() == helper_pid()
    deadline = time.monotonic() + 10
    while figures.helper_drawing() and time.monotonic() < deadline:  # idle once its start-up is over
        time.sleep(0.05)
    assert not figures.helper_drawing(), "an idle helper (waiting for work) read as drawing"
    spinning = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        figures._helper_pid[0] = Future()
        figures._helper_pid[0].set_result(spinning.pid)
        deadline = time.monotonic() + 10
        while not figures.helper_drawing() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert figures.helper_drawing(), "a process on a CPU read as not drawing"
    finally:
        spinning.kill()
        spinning.wait()
    assert not figures.helper_drawing()  # gone: no /proc entry


def test_ctrl_c_to_the_process_group_leaves_the_helper_drawing(fresh_helper):
    figures.submit(LAYERS, stats(1.0), "a").result()
    pid = helper_pid()
    os.kill(pid, signal.SIGINT)  # what a terminal's Ctrl-C sends to every process of the group
    assert figures.result(figures.submit(LAYERS, stats(3.0), "b"), LAYERS, stats(3.0), "b") == figures.render_png(
        LAYERS, stats(3.0), "b"
    )
    assert helper_pid() == pid and not figures._helper_failed


def test_a_helper_that_dies_loses_no_figure(fresh_helper):
    figures.submit(LAYERS, stats(1.0), "a").result()
    os.kill(helper_pid(), signal.SIGKILL)  # e.g. the OOM killer
    expected = figures.render_png(LAYERS, stats(5.0), "b")
    future = figures.submit(LAYERS, stats(5.0), "b")  # queued to the dead helper, or drawn here at once
    assert figures.result(future, LAYERS, stats(5.0), "b") == expected
    assert figures._helper_failed  # from now on figures are drawn in this process
    later = figures.submit(LAYERS, stats(7.0), "c")
    assert later.done() and later.result() == figures.render_png(LAYERS, stats(7.0), "c")


@pytest.mark.slow
def test_a_script_without_a_main_guard_runs_once(tmp_path):
    # multiprocessing's spawn re-runs the parent's main script in the child unless the script guards
    # itself; a user's script that trains in-process must not run twice because a figure was drawn
    script = tmp_path / "unguarded.py"
    script.write_text(
        "open('runs.txt', 'a').write('run ')\n"
        "from nrexp import figures\n"
        "stats = {'act_norm': {'a': 1.0, 'b': 2.0}, 'grad_norm': {'a': 3.0, 'b': 4.0}}\n"
        "drawn = figures.result(figures.submit(['a', 'b'], stats, 't'), ['a', 'b'], stats, 't')\n"
        "assert drawn == figures.render_png(['a', 'b'], stats, 't')\n"
        "print('helper ok' if figures._helper is not None and not figures._helper_failed else 'helper failed')\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "helper ok", proc.stdout + proc.stderr
    assert (tmp_path / "runs.txt").read_text() == "run "


def _running(pid: int) -> bool:
    """Whether process `pid` still runs (an exited one that nobody has reaped yet does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_the_helper_leaves_when_nrexp_is_killed(tmp_path):
    # nrexp killed outright (kill -9, the OOM killer) cannot stop its helper: the helper must notice
    code = (
        "import os\nfrom nrexp import figures\n"
        "figures.submit(['a'], {'act_norm': {'a': 1.0}, 'grad_norm': {'a': 2.0}}, 't').result()\n"
        "(pid,) = figures._helper._processes\nprint(pid, flush=True)\n"
        "os._exit(0)\n"
    )  # gone without a word, as after kill -9
    out = tmp_path / "out.txt"  # a file, not a pipe: the helper holds the parent's stdout open while it lives
    with out.open("w") as stdout:
        subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env=cli_env(tmp_path), stdout=stdout, timeout=120, check=False
        )
    helper = int(out.read_text())
    # it looks every 0.5 s, but at nice 19: give a loaded machine's scheduler ample time to run it
    deadline = time.monotonic() + 30
    while _running(helper) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(helper)


def test_depth_lines_put_the_head_at_its_own_x_across_depths():
    """Runs of depth 2 and 5 on one plot: block01 is at x 1 for both, the head after the deepest block (never at a
    block's x); tick labels are layer names, thinned when there are many."""
    _, (ax,) = figures.new_figure(1)
    shallow = {"block00": 1.0, "block01": 2.0, "head": 3.0}
    deep = {f"block{i:02d}": 1.0 + i for i in range(5)} | {"head": 9.0}
    assert figures.depth_lines(ax, {"depth 2": shallow, "depth 5": deep}, "activation norm")
    assert figures.depth_positions([list(shallow), list(deep)]) == {**{f"block{i:02d}": i for i in range(5)}, "head": 5}
    heads = [line.get_xdata()[0] for line in ax.get_lines() if line.get_marker() == "s"]
    assert heads == [5, 5]
    assert [t.get_text() for t in ax.get_xticklabels()] == [*deep]
    assert figures.thinned([f"block{i:02d}" for i in range(40)] + ["head"]) == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40]


def test_a_figure_of_many_runs_keeps_its_legend_outside_the_panels(tmp_path):
    fig, axes = figures.new_figure(2, "many runs")
    for ax in axes:
        figures.curve_lines(
            ax,
            {f"norm=batch, model.depth={d}, seed={s}": [(0, d + s), (1, d)] for d in range(12) for s in range(2)},
            "step",
            "loss",
            logy=True,
        )
    path = figures.save(fig, tmp_path / "many.png")
    (legend,) = fig.legends  # one legend for the two panels, not one per panel
    assert len(legend.get_texts()) == 24
    renderer = fig.canvas.get_renderer()
    right_of_panels = max(ax.get_window_extent(renderer).x1 for ax in fig.axes)
    assert legend.get_window_extent(renderer).x0 >= right_of_panels  # it covers no data
    assert fig.get_size_inches()[0] > 2 * 5.5  # the figure grew to hold it
    assert Image.open(path).size[0] == round(fig.get_size_inches()[0] * fig.dpi)
    assert all(t.get_text() for ax in axes for t in ax.get_yticklabels() if t.get_position()[1] > 0)
