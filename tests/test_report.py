"""`nrexp report` on a small real sweep: the table, numbers against the runs' summaries, figures, options,
and bad input."""

import contextlib
import csv
import io
import json
import math
import shutil
import statistics
import struct
import subprocess
import sys

import pytest

from conftest import cli_env, read_summary, run_cli, run_dirs
from nrexp.cli import main

pytestmark = pytest.mark.slow  # every test here reads the session's tiny_sweep, a real sweep run in a subprocess


def report(capsys, *args):
    """`nrexp report <args>` in this process (report.py imports no torch: fast); (exit code, out, err)."""
    code = main(["report", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def reported(tiny_sweep):
    """`nrexp report <sweep>` once for the tests that only read what it printed and wrote: (code, stdout)."""
    _, sweep = tiny_sweep
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["report", str(sweep)])
    return code, out.getvalue()


def png_size(path):
    """(width, height) of a PNG, after checking its signature: the IHDR chunk comes first."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def settings_of(sweep):
    """(norm, data.train_size) -> the summaries of its runs (seeds), straight from the files."""
    groups = {}
    for run in run_dirs(sweep):
        s = read_summary(run)
        groups.setdefault((s["config"]["norm"]["name"], s["config"]["data"]["train_size"]), []).append(s)
    return groups


def test_table_has_one_row_per_setting_with_seeds_aggregated(reported):
    code, out = reported
    assert code == 0
    for column in (
        "data.train_size",
        "norm",
        "runs",
        "status",
        "train_loss",
        "test_acc",
        "gen_gap",
        "act_ratio_init",
        "act_ratio_final",
    ):
        assert column in out, column
    assert "seed" not in out.split("┃", 1)[1].splitlines()[0]  # seeds are aggregated, not a column
    assert "12 runs, 6 settings" in out
    assert out.count("2 completed") == 4 and out.count("2 failed") == 2
    assert " ± " in out  # two seeds per setting: mean ± std


def test_csv_numbers_match_the_summaries(tiny_sweep, reported):
    _, sweep = tiny_sweep
    assert reported[0] == 0
    rows = list(csv.DictReader((sweep / "report.csv").read_text().splitlines()))
    assert [(r["norm"], int(r["data.train_size"])) for r in rows] == [
        ("batch", 256),
        ("none", 256),
        ("batch", 512),
        ("none", 512),
        ("batch", 5000),
        ("none", 5000),
    ]
    groups = settings_of(sweep)
    for row in rows:
        runs = groups[(row["norm"], int(row["data.train_size"]))]
        assert int(row["n"]) == len(runs) == 2
        if runs[0]["status"] == "failed":
            assert row["status"] == "2 failed" and row["test_acc_mean"] == "nan"
            continue
        acc = [r["metrics"]["test/acc"] for r in runs]
        assert float(row["test_acc_mean"]) == pytest.approx(statistics.mean(acc))
        assert float(row["test_acc_std"]) == pytest.approx(statistics.stdev(acc))
        gap = [r["metrics"]["train/acc"] - r["metrics"]["test/acc"] for r in runs]
        assert float(row["gen_gap_mean"]) == pytest.approx(statistics.mean(gap))
        loss = [r["metrics"]["train/loss"] for r in runs]
        assert float(row["train_loss_mean"]) == pytest.approx(statistics.mean(loss))
        for when in ("init", "final"):  # last hidden block over the first (model.depth=2: block01 / block00)
            act = [r["layers"][when]["act_norm"] for r in runs]
            ratio = statistics.mean(a["block01"] / a["block00"] for a in act)
            assert float(row[f"act_ratio_{when}_mean"]) == pytest.approx(ratio)
    md = (sweep / "report.md").read_text()
    assert "| data.train_size | norm | runs | status |" in md
    assert "![act_norm_vs_depth](figures/act_norm_vs_depth.png)" in md


def test_figures_are_valid_pngs(tiny_sweep, reported):
    _, sweep = tiny_sweep
    assert reported[0] == 0
    figures = sweep / "figures"
    names = sorted(p.name for p in figures.glob("*.png"))
    # data.train_size is the numeric swept key (norm is not numeric; seed is aggregated over)
    assert names == ["act_norm_vs_depth.png", "curves.png", "final_vs_data.train_size.png", "grad_norm_vs_depth.png"]
    for name in names:
        width, height = png_size(figures / name)  # 2 panels of 5.5 x 4.2 in at 100 dpi, and the legend beside them
        assert 1100 < width < 1700 and height == 420, name


def test_json_filter_and_sort(tiny_sweep, capsys, tmp_path):
    _, sweep = tiny_sweep
    code, out, _ = report(capsys, sweep, "--json", "--filter", "norm=batch", "--sort=-test_acc", "--out", tmp_path)
    assert code == 0
    data = json.loads(out)
    assert data["swept_keys"] == ["data.train_size"]  # within norm=batch only data.train_size differs
    acc = [s["test_acc_mean"] for s in data["settings"]]
    assert acc[-1] is None  # the failed setting: no accuracy (JSON null, not NaN), sorted last
    assert acc[:-1] == sorted(acc[:-1], reverse=True) and len(acc) == 3
    assert {r["setting"]["data.train_size"] for r in data["runs"]} == {256, 512, 5000}
    assert all(
        r["status"] == "failed" and "data.train_size=5000" in r["error"]
        for r in data["runs"]
        if r["setting"]["data.train_size"] == 5000
    )
    code, out, _ = report(
        capsys, sweep, "--json", "--filter", "data.train_size=512", "--filter", "seed=1", "--out", tmp_path
    )
    assert code == 0 and len(json.loads(out)["runs"]) == 2
    # the table's column "runs" sorts as the CSV's "n" does (with a filter, settings of 1 and 2 runs)
    by = {
        key: report(capsys, sweep, "--json", "--filter", "seed=1", f"--sort=-{key}", "--out", tmp_path)
        for key in ("runs", "n")
    }
    assert by["runs"][0] == 0 and by["runs"][1] == by["n"][1]


def test_a_filtered_report_goes_beside_the_sweeps_full_one(tiny_sweep, capsys, tmp_path):
    _, sweep = tiny_sweep
    sweep = shutil.copytree(sweep, tmp_path / "sweep")  # the shared sweep stays as the other tests expect it
    assert report(capsys, sweep)[0] == 0
    full = (sweep / "report.csv").read_text()
    code, out, _ = report(capsys, sweep, "--filter", "norm=batch")
    assert code == 0 and (sweep / "report.csv").read_text() == full  # not overwritten by the 3 settings kept
    kept = sweep / "report-norm=batch"
    assert str(kept / "report.csv") in out.replace("\n", "")
    with open(kept / "report.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert len(full.strip().splitlines()) == 1 + 6
    md = (kept / "report.md").read_text()
    assert "12 runs" not in md and "6 runs (the runs with norm=batch)" in md
    assert min(p.name for p in (kept / "figures").iterdir()) == "act_norm_vs_depth.png"


def test_one_run_dir(tiny_sweep, capsys, tmp_path):
    _, sweep = tiny_sweep
    run = next(d for d in run_dirs(sweep) if read_summary(d)["status"] == "completed")
    code, out, _ = report(capsys, run, "--json", "--out", tmp_path)
    assert code == 0
    data = json.loads(out)
    assert len(data["settings"]) == 1 and data["swept_keys"] == []
    assert data["settings"][0]["test_acc_mean"] == pytest.approx(read_summary(run)["metrics"]["test/acc"])
    assert (tmp_path / "report.csv").is_file() and (tmp_path / "figures" / "curves.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/nope"], "nrexp: error: no such directory: {tmp}/nope"),
        (["{tmp}"], "nrexp: error: no runs in {tmp} (no summary.json or .hydra/ below it)"),
        (["{sweep}", "--sort", "bogus"], "nrexp: error: --sort 'bogus' is invalid: not a column"),
        (["{sweep}", "--filter", "colour=red"], "nrexp: error: --filter key 'colour' is not a config key"),
        (["{sweep}", "--filter", "norm"], "nrexp: error: --filter 'norm' is invalid: expected key=value"),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_sweep, capsys, tmp_path, args, message):
    _, sweep = tiny_sweep
    fill = lambda s: s.format(tmp=tmp_path, sweep=sweep)  # noqa: E731
    code, out, err = report(capsys, *map(fill, args))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith(fill(message)), err


def test_report_cli_runs_without_torch(tiny_sweep, tmp_path):
    _, sweep = tiny_sweep
    code = (
        "import sys; from nrexp.cli import main; "
        f"rc = main(['report', {str(sweep)!r}, '--out', {str(tmp_path)!r}]);"
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nrexp report:" in proc.stdout
    proc = run_cli(["report", str(tmp_path / "missing")], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("nrexp: error: no such directory")
    assert math.isfinite(
        float(next(csv.DictReader((tmp_path / "report.csv").read_text().splitlines()))["test_acc_mean"])
    )


def test_a_job_without_summary_counts_in_its_setting(tiny_sweep, capsys, tmp_path):
    """A job killed before it wrote summary.json (or still running) is a row status, not a new setting."""
    _, sweep = tiny_sweep
    for run in run_dirs(sweep):
        config = read_summary(run)["config"]
        if config["data"]["train_size"] == 512:
            shutil.copytree(run, tmp_path / "sweep" / run.name)
    killed = min((tmp_path / "sweep").iterdir())
    (killed / "summary.json").unlink()
    code, out, _ = report(capsys, tmp_path / "sweep", "--json", "--out", tmp_path)
    data = json.loads(out)
    assert code == 0 and data["swept_keys"] == ["norm"]
    assert sorted(s["status"] for s in data["settings"]) == ["1 completed, 1 no summary", "2 completed"]


def test_final_vs_key_figures_only_for_swept_science_keys():
    from nrexp.report import Setting, numeric_keys

    settings = [
        Setting({"optim.lr": lr, "trainer.log_every": log, "norm": "batch", "model.depth": 4})
        for lr, log in ((0.1, 5), (0.01, 10))
    ]
    # log_every is not science, norm is not numeric, model.depth takes one value here
    assert numeric_keys(settings, ["optim.lr", "trainer.log_every", "norm", "model.depth"]) == ["optim.lr"]


def test_curves_csv_is_what_runs_curves_returns(tiny_sweep, capsys, tmp_path):
    from nrexp import runs

    _, sweep = tiny_sweep
    code, out, _ = report(capsys, sweep, "--curves", "--out", tmp_path)
    assert code == 0 and "curves.csv" in out
    rows = list(csv.DictReader((tmp_path / "curves.csv").read_text().splitlines()))
    frame = runs.curves(sweep)
    assert len(rows) == len(frame) > 0 and list(rows[0]) == ["run", "step", "tag", "layer", "value"]
    assert [(r["run"], int(r["step"]), r["tag"], r["layer"]) for r in rows] == list(
        frame[["run", "step", "tag", "layer"]].itertuples(index=False, name=None)
    )
    assert [float(r["value"]) for r in rows] == pytest.approx(list(frame["value"]))
