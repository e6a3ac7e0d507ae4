"""Renders a run's report.html in a real headless browser (Debian's chromium) and saves a screenshot, to look at.

    .venv/bin/python bench/report_screenshot.py runs/lfs [--out /tmp/report.png] [--height 2400]

The report is self-contained (plots embedded as data URLs, no scripts), so it renders from the file alone.
Needs `chromium` on PATH (Debian: apt-get install chromium).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("/tmp/auto-merge-report.png"))
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args()
    report = (args.run_dir / "report.html").resolve()
    if not report.is_file():
        print(f"{report} does not exist: run a search first", file=sys.stderr)
        return 2
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("chromium is not installed (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--window-size=1200,{args.height}", f"--screenshot={args.out.resolve()}",
                           report.as_uri()], capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not args.out.is_file():
        print(done.stderr[-2000:], file=sys.stderr)
        return 1
    print(f"{args.out}: {args.out.stat().st_size} bytes ({browser})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
