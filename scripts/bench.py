"""Benchmark of the nrexp harness against a naive and a bare PyTorch loop: `python scripts/bench.py --quick`.

The same as `nrexp bench`; the code lives in nrexp/bench.py. Run from the repo root.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's nrexp, not an installed one

from nrexp.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
