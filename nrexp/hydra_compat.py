"""The one place nrexp changes Hydra's behaviour through its internals, on the Hydra versions it was checked on.

`nrexp train -m` composes and validates each swept value before the sweep starts (cli.preflight), so the
basic sweeper's own check, a compose of every job before its launcher composes that job again, finds nothing
new: it is skipped. Other sweepers (optuna) keep theirs: preflight cannot list the values they sample.
Measured: `nrexp train -m 'seed=range(32)' trainer.max_steps=1 data.source=bundled`, 2-core CPU: 60 ms per job.
"""
from __future__ import annotations

import hydra

CHECKED_ON = ("1.3.",)  # Hydra versions whose BasicSweeper.sweep calls validate_batch_is_legal as patched here


def skip_basic_sweeper_validation() -> bool:
    """Make the basic sweeper skip its compose-every-job check in this process; False on other Hydra versions."""
    if not hydra.__version__.startswith(CHECKED_ON):
        return False
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    BasicSweeper.validate_batch_is_legal = lambda self, batch: None  # type: ignore[method-assign]
    return True
