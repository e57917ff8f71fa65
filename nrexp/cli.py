"""The `nrexp` command: dispatches subcommands. The only module that touches argv.

Kept free of torch imports at module level so that `nrexp --help` and `nrexp train --cfg job` start
in a fraction of a second; torch is imported only when a run actually starts.
"""
from __future__ import annotations

import sys
from typing import List, Optional

USAGE = """\
usage: nrexp <command> [args]

commands:
  train     train one network, or a sweep with -m (a Hydra app: `nrexp train --help` lists every knob)
  report    compare the runs of a sweep (or one run): table, report.csv/.md, figures (`nrexp report -h`)

examples:
  nrexp train norm=batch dropout.p=0.2
  nrexp train -m norm=none,layer,batch init.scale=1,2,3 init=normal
  nrexp train -m norm=none,batch seed=0,1,2 hydra/launcher=joblib hydra.launcher.n_jobs=4
  nrexp report outputs/multirun/<date>/<time> --sort=-test_acc
  tensorboard --logdir outputs
"""


def error(message: str, code: int = 2) -> int:
    """One line on stderr, no traceback: how every user mistake is reported."""
    print(f"nrexp: error: {message}", file=sys.stderr)
    return code


def train_app(args: List[str]) -> int:
    """Run the Hydra app for `nrexp train` with `args` as its command line."""
    import hydra

    import nrexp
    from nrexp import config

    config.register()
    import nrexp.sweep  # noqa: F401 - registers the resolver that names sweep job dirs (configs/train.yaml)

    @hydra.main(version_base="1.3", config_path=nrexp.config_dir(), config_name="train")
    def _train(cfg) -> Optional[float]:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from nrexp import sweep
        from nrexp.train import train  # torch is imported here, once a run really starts

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            try:
                summary = train(cfg, hc.runtime.output_dir)
            except config.ConfigError as err:
                sys.exit(error(str(err)))
            return summary["metrics"]["test/acc"]  # what a Hydra sweeper (e.g. optuna) optimizes

        # A sweep job: one failure must not stop the others. It is recorded in the job's summary.json
        # and the job returns NaN, which Hydra's sweepers ignore and Optuna records as a failed trial.
        try:
            sweep.claim_gpu(str(getattr(cfg.trainer.device, "value", cfg.trainer.device)), hc.job.num)
            return train(cfg, hc.runtime.output_dir)["metrics"]["test/acc"]
        except Exception as err:  # noqa: BLE001 - any error of one job, KeyboardInterrupt still stops all
            sweep.record_failure(cfg, hc.runtime.output_dir, err)
            return float("nan")

    sys.argv = [sys.argv[0], *args]
    _train()
    return 0


def report_command(args: List[str]) -> int:
    """`nrexp report`: argparse here (argv is this module's), the work in nrexp/report.py."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="nrexp report",
        description="Compare the runs under DIR (a sweep dir or one run dir): one row per setting, the seeds "
                    "of a setting aggregated as mean ± std. Writes report.csv, report.md and figures/*.png.")
    parser.add_argument("dir", help="a sweep dir (outputs/multirun/<date>/<time>) or a run dir")
    parser.add_argument("--sort", metavar="KEY", help="sort by a column: a swept key, n, status, train_loss, "
                        "train_acc, test_acc, gen_gap, act_ratio_init, act_ratio_final; -KEY for descending")
    parser.add_argument("--filter", metavar="KEY=VALUE", action="append", default=[],
                        help="keep runs whose config has KEY=VALUE (e.g. norm=batch, dropout.p=0.2); repeatable")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (for scripts) instead of a table")
    parser.add_argument("--out", metavar="DIR", help="where to write report.csv, report.md, figures/ (default: DIR)")
    options = parser.parse_args(args)

    from nrexp.report import ReportError, report

    try:
        return report(options.dir, sort=options.sort, filters=options.filter, as_json=options.json, out=options.out)
    except ReportError as err:
        return error(str(err))
    except OSError as err:  # e.g. a sweep dir one may read but not write: say where to write instead
        return error(f"cannot write the report: {err}. Fix: pass --out DIR, a directory you can write to")


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_app(rest)
    if command == "report":
        return report_command(rest)
    if command.startswith("-") or "=" in command:  # `nrexp norm=batch` or shell completion: the train app
        return train_app(argv)
    return error(f"unknown command {command!r}. Fix: run `nrexp --help` for the list of commands")


if __name__ == "__main__":
    sys.exit(main())
