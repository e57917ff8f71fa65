"""Graceful stop on SIGINT (Ctrl-C) and SIGTERM (SLURM preemption, `kill`).

The first signal only sets a flag: the trainer finishes the step in flight, writes a checkpoint, the
summary (status `interrupted`) and flushes TensorBoard, then exits 130 (SIGINT) or 143 (SIGTERM), the
shell's 128 + signal number. A second Ctrl-C gets Python's default behaviour: stop right now.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("nrexp")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        log.warning(
            "%s received: finishing this step, then saving a checkpoint (again to abort now)",
            signal.Signals(signum).name,
        )
        for sig in SIGNALS:  # a second signal falls through to the previous handler (abort)
            signal.signal(sig, self._previous.get(sig, signal.SIG_DFL))

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
            for sig in SIGNALS:
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
