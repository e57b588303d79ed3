"""Screenshot of a report or comparison page in headless Chromium (for the README).

    python benchmarks/report_screenshot.py checkpoints/demo/comparison.html benchmarks/figures/demo-comparison.png

Uses Debian's chromium (installed by .ci/env.sh) through Playwright, as the browser tests do;
fails if the page logs a console error.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--full-page", action="store_true", help="the whole page, not the first screen")
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        print("chromium not found (apt-get install chromium)", file=sys.stderr)
        return 2
    errors = []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = b.new_page(viewport={"width": a.width, "height": 1000}, device_scale_factor=1)
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(a.html.resolve().as_uri())
        a.png.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(a.png), full_page=a.full_page)
        b.close()
    for e in errors:
        print(f"console error: {e}", file=sys.stderr)
    print(a.png)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
