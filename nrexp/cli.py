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
  bench     time nrexp's loop against a naive and a bare PyTorch loop (`nrexp bench --help`)

examples:
  nrexp train norm=batch dropout.p=0.2
  nrexp train -m norm=none,layer,batch init.scale=1,2,3 init=normal
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

    @hydra.main(version_base="1.3", config_path=nrexp.config_dir(), config_name="train")
    def _train(cfg) -> Optional[float]:
        from hydra.core.hydra_config import HydraConfig

        from nrexp.train import train  # torch is imported here, once a run really starts

        try:
            summary = train(cfg, HydraConfig.get().runtime.output_dir)
        except config.ConfigError as err:
            sys.exit(error(str(err)))
        return summary["metrics"]["test/acc"]  # what a Hydra sweeper (e.g. optuna) optimizes

    sys.argv = [sys.argv[0], *args]
    _train()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_app(rest)
    if command == "bench":
        from nrexp.bench import main as bench_main

        return bench_main(rest)
    if command.startswith("-") or "=" in command:  # `nrexp norm=batch` or shell completion: the train app
        return train_app(argv)
    return error(f"unknown command {command!r}. Fix: run `nrexp --help` for the list of commands")


if __name__ == "__main__":
    sys.exit(main())
