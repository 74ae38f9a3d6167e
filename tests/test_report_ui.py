"""The markdown report in the real Prefect UI (Playwright, Debian's chromium): every picture renders."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows import report
from nst import storage
from nst_testing.prefect import PrefectServer
from tests.test_report import _records
from tests.test_ui_retry import CHROMIUM, CHROMIUM_ARGS

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def test_report_pictures_render_in_the_prefect_ui(prefect_server: PrefectServer, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.fail("Chromium not found at /usr/bin/chromium: run `apt-get update && apt-get install -y chromium`")
    from playwright.sync_api import sync_playwright
    from prefect.client.schemas.actions import ArtifactCreate

    records = _records(str(tmp_path))
    png = report.loss_curves_png(records)
    assert png is not None
    curves = storage.join(str(tmp_path), "out/_runs/r-losses.png")
    storage.write_bytes(curves, png)
    markdown = report.markdown_report(
        name="ui", run_id="r", records=records, summary_uri=None, curves_url=report.display_url(curves)
    )
    with prefect_server.client() as client:
        artifact = client.create_artifact(ArtifactCreate(key="ui-report", type="markdown", data=markdown))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{prefect_server.ui_url}/artifacts/artifact/{artifact.id}")
            page.wait_for_function("document.querySelectorAll('img[src^=\"data:image/\"]').length >= 6", timeout=30_000)
            sizes = page.eval_on_selector_all(
                'img[src^="data:image/"]', "els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])"
            )
            text = page.inner_text("body")
        finally:
            browser.close()
    assert len(sizes) == 6 and all(done and w > 0 and h > 0 for done, w, h in sizes), sizes
    assert "<img src=x" in text  # the error's HTML is shown as text, not run
