#!/usr/bin/env python
"""Screenshot TensorBoard's views of a sweep with headless Chromium (for a look, not a test): the depth chart
(scalars filtered to depth_*), the custom-scalars layout and the HParams table (docs/tensorboard.md).

    apt-get install -y chromium      # Debian's chromium
    python scripts/screenshot_tensorboard.py outputs/multirun/<date>/<time> --out screens/
    python scripts/screenshot_tensorboard.py <sweep> --out screens/ --views depth --filter '^depth_init/'

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


# view name -> the URL fragment of its dashboard; the depth chart is the scalars dashboard filtered to depth_*
VIEWS = {
    "depth": "scalars&tagFilter={filter}&_smoothingWeight=0",
    "custom": "custom_scalars&_smoothingWeight=0",
    "hparams": "hparams",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", type=Path, help="a sweep dir (or any TensorBoard logdir)")
    parser.add_argument("--out", type=Path, default=Path("tensorboard-screens"), help="dir for <view>.png")
    parser.add_argument("--views", default=",".join(VIEWS), help=f"comma-separated, of {', '.join(VIEWS)}")
    parser.add_argument("--filter", default="^depth_", help="tag filter (regex) of the depth view")
    parser.add_argument("--size", default="1600,1200", help="window size WIDTH,HEIGHT in pixels")
    parser.add_argument("--budget-ms", type=int, default=20000, help="virtual time Chromium gives each page")
    args = parser.parse_args()
    views = [v.strip() for v in args.views.split(",") if v.strip()]
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        print(f"screenshot: error: unknown view {unknown[0]!r}. Fix: use some of {', '.join(VIEWS)}", file=sys.stderr)
        return 2

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("screenshot: error: chromium not found. Fix: apt-get install -y chromium", file=sys.stderr)
        return 2

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(args.logdir),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        runs = wait_for_runs(base, server)
        print(f"tensorboard at {base}: {len(runs)} runs")
        args.out.mkdir(parents=True, exist_ok=True)
        for view in views:
            url = f"{base}/#" + VIEWS[view].format(filter=urllib.parse.quote(args.filter))
            out = (args.out / f"{view}.png").resolve()
            with tempfile.TemporaryDirectory() as profile:
                subprocess.run(
                    [
                        chromium,
                        "--headless",
                        "--no-sandbox",
                        "--disable-gpu",
                        "--disable-background-networking",
                        "--disable-component-update",
                        "--no-first-run",
                        "--disable-sync",
                        f"--user-data-dir={profile}",
                        f"--window-size={args.size}",
                        "--hide-scrollbars",
                        f"--virtual-time-budget={args.budget_ms}",
                        f"--screenshot={out}",
                        url,
                    ],
                    check=True,
                    timeout=180,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            print(f"wrote {out}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
