"""The one-line error: the type every module raises for a user mistake, and how it is printed.

Dependencies point one way: every module may import this one; it imports nothing of nrexp's.
"""

from __future__ import annotations

import sys


class ConfigError(ValueError):
    """A user mistake (config, command line, run dir): reported as one line, exit code 2, no traceback."""


def error(message: str, code: int = 2) -> int:
    """Print `nrexp: error: <message>` on stderr (no traceback) and return the exit code to use."""
    print(f"nrexp: error: {message}", file=sys.stderr)
    return code
