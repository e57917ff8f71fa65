"""Where a 1-step run's start-up goes: timestamps inside `nrexp train trainer.max_steps=1 data.source=bundled`.

    python scripts/startup_timeline.py [runs] [extra overrides...]

Each run is a fresh interpreter (in a temp dir) whose nrexp functions are wrapped to print the seconds since
the command started; the last line is when the process was gone (its exit included). Compare with
`nrexp bench --no-arms --startup-repeats 5`, which gives the ratio to `import torch, torch.optim, hydra`.
"""

import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import os, sys, time
T0 = float(os.environ["T0"])
def mark(what):
    print(f"{time.time() - T0:6.3f}  {what}", file=sys.stderr, flush=True)
mark("interpreter up")
import atexit
atexit.register(mark, "last atexit hook (threads and the figures' helper joined)")
import nrexp.cli as cli
from nrexp import figures
mark("nrexp.cli imported")

def wrap(owner, name, label=None):
    fn = getattr(owner, name)
    label = label or f"{owner.__name__}.{name}"
    def timed(*args, **kwargs):
        mark(f"> {label}")
        try:
            return fn(*args, **kwargs)
        finally:
            mark(f"< {label}")
    setattr(owner, name, timed)

def run_task(*args, **kwargs):
    mark("run_task starts (Hydra has composed, made the run dir, set up logging)")
    if args[0].trainer.layer_stats:
        figures.start_helper()  # what cli.run_task does first
    import nrexp.train as train, nrexp.writers as writers
    mark("nrexp.train imported (torch, rich, nrexp's modules)")
    for name in ("load_dataset", "build", "final_evaluation"):
        wrap(train, name)
    wrap(writers.TensorBoardWriter, "__init__", "TensorBoardWriter()")
    wrap(writers.TensorBoardWriter, "close", "TensorBoardWriter.close (waits for the depth figures)")
    return task(*args, **kwargs)

wrap(cli, "preflight")
task, cli.run_task = cli.run_task, run_task
sys.argv = ["nrexp", "train", "trainer.max_steps=1", "data.source=bundled", *sys.argv[1:]]
try:
    cli.entry()
finally:
    mark("cli.entry ends")
"""


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    for run in range(runs):
        with tempfile.TemporaryDirectory() as cwd:
            started = time.time()
            env = dict(os.environ, T0=repr(started))
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, *sys.argv[2:]], cwd=cwd, env=env, capture_output=True, text=True
            )
            gone = time.time() - started
        print(f"run {run + 1} (exit code {proc.returncode})")
        print(proc.stderr.rstrip())
        print(f"{gone:6.3f}  process gone\n")


if __name__ == "__main__":
    main()
