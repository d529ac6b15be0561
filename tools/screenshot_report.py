#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Screenshot an HTML report in headless Chromium, to check that it renders (CI artifact, review).

    python tools/screenshot_report.py tqs-report/index.html report.png [--width 1280 --height 2000]

Needs /usr/bin/chromium (Debian/Ubuntu: apt-get install -y chromium) or --chromium PATH. The browser
runs with a throw-away profile and no network features; exit code 1 if it writes no image.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
QUIET_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars"]


def find_chromium(explicit: str | None) -> str:
    for cand in ([explicit] if explicit else CANDIDATES):
        found = shutil.which(cand)
        if found:
            return found
    raise SystemExit("no Chromium found: apt-get install -y chromium, or pass --chromium PATH")


def screenshot(chromium: str, page: Path, out: Path, width: int, height: int, timeout: float = 120) -> None:
    """Render `page` (a local HTML file) into the PNG `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="tqs-chromium-") as profile:
        cmd = [chromium, *QUIET_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out.resolve()}",
               f"--window-size={width},{height}", page.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not out.is_file() or out.stat().st_size == 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"chromium wrote no screenshot (exit {proc.returncode}): {' | '.join(tail)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("page", type=Path, help="the report's index.html")
    p.add_argument("output", type=Path, help="PNG to write")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=2000)
    p.add_argument("--chromium", help="browser binary (default: /usr/bin/chromium or one on PATH)")
    a = p.parse_args(argv)
    if not a.page.is_file():
        raise SystemExit(f"{a.page}: no such file")
    screenshot(find_chromium(a.chromium), a.page, a.output, a.width, a.height)
    print(f"wrote {a.output} ({a.output.stat().st_size:,} bytes, {a.width}x{a.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
