"""The HTML report in a real browser: Debian's Chromium (installed by .ci/env.sh), driven
headless through Playwright. It renders from disk, logs no console error, and each chart has
one point per measured model; the page's script links table rows and chart points."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from test_report import ARTS, make_report, write_run

CHROMIUM = os.environ.get("SQUEEZE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "Chromium not found: .ci/env.sh installs Debian's chromium (apt-get install chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def open_page(browser, path: Path):
    """The page, plus every console error and uncaught exception it logged while loading."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: errors.append(f"network request {r.url}") if not r.url.startswith(("file:",
                                                                                                     "data:")) else None)
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    return page, errors


def test_error_detection_is_real(browser, tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('x'); notDefined();</script></body></html>")
    page, errors = open_page(browser, bad)
    page.close()
    assert len(errors) == 2


def test_report_html_renders_with_one_point_per_model(browser, tmp_path):
    d = write_run(tmp_path, "run", make_report("run", ARTS))
    page, errors = open_page(browser, d / "report.html")
    try:
        assert errors == []
        assert page.title() == "Squeeze report: run"
        rows = page.locator("table.sortable tbody tr")
        assert rows.count() == 1 + len(ARTS)
        # throughput chart: every model but the one without speed; memory chart: every model
        assert page.locator('svg g[id^="point-throughput-"]').count() == len(ARTS)
        assert page.locator('svg g[id^="point-memory-"]').count() == 1 + len(ARTS)
        assert page.locator('svg g[id^="point-memory-"]').first.bounding_box()["width"] > 0
        # the script runs: pointing at a row highlights its points; a header click sorts
        mid = page.locator('tr[data-row]', has_text="mid-twin")
        mid.hover()
        n = mid.get_attribute("data-row")
        assert "hi" in page.locator(f"#point-throughput-{n}").get_attribute("class")
        page.locator("th", has_text="perplexity").first.click()
        first = page.locator("table.sortable tbody tr").first.locator("td").first.inner_text()
        assert first == "baseline (tiny)"  # lowest perplexity first
        assert "Provenance" in page.content() and errors == []
        page.screenshot(path=str(tmp_path / "shot.png"), full_page=True)
        assert (tmp_path / "shot.png").stat().st_size > 20_000
    finally:
        page.close()


def test_comparison_html_renders_every_group(browser, tmp_path):
    from eval.report.compare import compare
    from eval.report.tables import write_comparison

    a = write_run(tmp_path, "a", make_report("a", {"mid": ARTS["mid"], "fast-bad": ARTS["fast-bad"]}))
    b = write_run(tmp_path, "b", make_report("b", {"x": ARTS["mid"]}, base_hash="other"))
    paths = write_comparison(compare([a, b]), tmp_path / "cmp")
    page, errors = open_page(browser, paths["html"])
    try:
        assert errors == []
        assert page.locator("section[data-group]").count() == 2
        assert page.locator('section[data-group="0"] svg g[id^="point-throughput-"]').count() == 3
        assert page.locator('section[data-group="1"] svg g[id^="point-throughput-"]').count() == 2
        assert "Not compared with group 1" in page.locator('section[data-group="1"]').inner_text()
    finally:
        page.close()
