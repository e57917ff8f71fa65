#!/usr/bin/env python
"""Screenshot TensorBoard's scalars dashboard over a sweep, with headless Chromium (for a look, not a test).

    apt-get install -y chromium      # Debian's chromium
    python scripts/screenshot_tensorboard.py outputs/multirun/<date>/<time> --out tb.png --filter act_norm

Starts `tensorboard` on a free localhost port, waits until it serves the runs, lets Chromium render the
page (a JavaScript app: --virtual-time-budget gives it time to fetch and draw the charts), and always
stops the server. Chromium runs with a throwaway profile and no network features besides localhost.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_runs(base: str, server: subprocess.Popen, timeout: float = 60) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"tensorboard exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(base + "/data/runs", timeout=5) as response:
                runs = json.loads(response.read())
            if runs:
                return runs
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"tensorboard served no runs within {timeout:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", type=Path, help="a sweep dir (or any TensorBoard logdir)")
    parser.add_argument("--out", type=Path, default=Path("tensorboard.png"), help="PNG to write")
    parser.add_argument("--dashboard", default="scalars", help="scalars (default), hparams, timeseries, ...")
    parser.add_argument("--filter", default="act_norm", help="tag filter (regex) of the scalars dashboard")
    parser.add_argument("--size", default="1600,1200", help="window size WIDTH,HEIGHT in pixels")
    parser.add_argument("--budget-ms", type=int, default=20000, help="virtual time Chromium gives the page")
    args = parser.parse_args()

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("screenshot: error: chromium not found. Fix: apt-get install -y chromium", file=sys.stderr)
        return 2

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(args.logdir),
                               "--port", str(port), "--host", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        runs = wait_for_runs(base, server)
        print(f"tensorboard at {base}: {len(runs)} runs")
        url = f"{base}/#{args.dashboard}&tagFilter={urllib.parse.quote(args.filter)}&_smoothingWeight=0"
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                            "--disable-component-update", "--no-first-run", "--disable-sync",
                            f"--user-data-dir={profile}", f"--window-size={args.size}", "--hide-scrollbars",
                            f"--virtual-time-budget={args.budget_ms}", f"--screenshot={args.out.resolve()}", url],
                           check=True, timeout=180, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"wrote {args.out}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
