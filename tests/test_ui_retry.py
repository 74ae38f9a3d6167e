"""The Prefect UI as a user drives it (Playwright): Retry re-runs only the failed pair; the Custom run form shows
every engine parameter and run option with its description, and a value typed there reaches the pairs' records.

Chromium comes from Debian (`apt-get install -y chromium`); Playwright's own browser downloads are not used.
Screenshots (docs/ui-retry.png, docs/ui-run-form.png) are written into docs/ when NST_UPDATE_DOCS=1 (to refresh the
pictures in the docs), else to temporary files, so that test runs leave the working tree clean.
"""

import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from nst_testing.paths import REPO, SAMPLES
from nst_testing.prefect import PrefectServer, WorkerFactory, deploy_all, wait_for_flow_run

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
DOCS_SCREENSHOT = REPO / "docs" / "ui-retry.png"
DOCS_FORM_SCREENSHOT = REPO / "docs" / "ui-run-form.png"


def save_small_png(png: bytes, path: Path, width: int = 1000) -> None:
    """Scale a screenshot to `width` px and store it with a 64-colour palette (a few tens of KB)."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    img = img.resize((width, round(img.height * width / img.width)), Image.Resampling.LANCZOS)
    img.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def test_ui_retry_button_reruns_only_the_failed_pair(
    prefect_server: PrefectServer, process_worker: WorkerFactory, tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.fail("Chromium not found at /usr/bin/chromium: run `apt-get update && apt-get install -y chromium`")
    from playwright.sync_api import expect, sync_playwright

    screenshot = DOCS_SCREENSHOT if os.environ.get("NST_UPDATE_DOCS") == "1" else tmp_path / "ui-retry.png"

    broken = tmp_path / "portrait.jpg"
    broken.write_bytes(b"half an upload")
    manifest = tmp_path / "manifest.yaml"
    content, styles = SAMPLES / "content", SAMPLES / "styles"
    manifest.write_text(
        "version: 1\nname: ui-retry\noutput: out/\ndefaults: {size: 32, iterations: 2}\npairs:\n"
        f"  - {{id: cat, content: {content / 'chelsea.jpg'}, style: {styles / 'brick.jpg'}}}\n"
        f"  - {{id: coffee, content: {content / 'coffee.jpg'}, style: {styles / 'hubble.jpg'}}}\n"
        f"  - {{id: portrait, content: {broken}, style: {styles / 'ihc.jpg'}}}\n"
    )

    def record(pair: str) -> dict[str, Any]:
        return json.loads((tmp_path / "out" / f"{pair}.json").read_text())

    deploy_all(prefect_server, REPO)
    worker = process_worker("gpu-pool")
    out = prefect_server.cli("deployment", "run", "stylize-manifest/on-demand", "-p", f"manifest={manifest}").stdout
    flow_run_id = out.split("UUID: ", 1)[1].split()[0]
    run = wait_for_flow_run(prefect_server, flow_run_id, worker=worker)
    assert run.state.is_failed() and "portrait" in (run.state.message or "")
    assert record("portrait")["status"] == "failed"
    first_finish = {p: record(p)["finished_at"] for p in ("cat", "coffee")}

    shutil.copy(SAMPLES / "content" / "astronaut.jpg", broken)  # the fix, before pressing Retry
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{prefect_server.ui_url}/runs/flow-run/{flow_run_id}")
            retry_button = page.get_by_role("button", name="Retry", exact=True)
            expect(retry_button).to_be_visible(timeout=30_000)
            retry_button.click()
            dialog = page.get_by_role("dialog")
            expect(dialog).to_be_visible(timeout=10_000)
            dialog.get_by_role("button", name="Retry", exact=True).click()
            run = wait_for_flow_run(prefect_server, flow_run_id, worker=worker, after_run_count=run.run_count)
            page.reload()
            expect(page.get_by_text("Completed").first).to_be_visible(timeout=30_000)
            page.wait_for_timeout(1500)  # let the timeline and logs settle for the picture
            save_small_png(page.screenshot(), screenshot)
        finally:
            browser.close()

    assert run.state.is_completed(), run.state.message
    assert str(run.id) == flow_run_id and run.run_count == 2
    assert record("portrait")["status"] == "succeeded" and record("portrait")["run_id"] == flow_run_id
    assert {p: record(p)["finished_at"] for p in ("cat", "coffee")} == first_finish  # not run again
    summary = json.loads((tmp_path / "out" / "_runs" / f"{flow_run_id}.json").read_text())
    assert {p["id"]: p["status"] for p in summary["pairs"]} == {
        "cat": "skipped",
        "coffee": "skipped",
        "portrait": "succeeded",
    }
    assert 10_000 < screenshot.stat().st_size < 300_000


def submitted_runs(server: PrefectServer, deployment_id: Any, manifest: str, timeout_s: float = 30.0) -> list[Any]:
    """Flow runs of a deployment with this manifest parameter, once at least one exists (or after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with server.client() as client:
            runs = [r for r in client.read_flow_runs() if r.deployment_id == deployment_id]
        found = [r for r in runs if r.parameters.get("manifest") == manifest]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_custom_run_form_shows_engine_parameters_and_submits_them(
    prefect_server: PrefectServer, tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.fail("Chromium not found at /usr/bin/chromium: run `apt-get update && apt-get install -y chromium`")
    from playwright.sync_api import expect, sync_playwright

    from nst.manifest import ParamOverrides, override_values
    from nst.params import StyleParams
    from nst.run_options import RunOptions

    screenshot = DOCS_FORM_SCREENSHOT if os.environ.get("NST_UPDATE_DOCS") == "1" else tmp_path / "ui-run-form.png"
    manifest = str(tmp_path / "from-the-form.yaml")
    deploy_all(prefect_server, REPO)
    with prefect_server.client() as client:
        deployment = client.read_deployment_by_name("stylize-manifest/on-demand")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(f"{prefect_server.ui_url}/deployments/deployment/{deployment.id}/run")
            for description in (
                StyleParams.model_fields["style_weight"].description,
                StyleParams.model_fields["size"].description,
                RunOptions.model_fields["max_batch_pairs"].description,
                RunOptions.model_fields["force"].description,
            ):
                expect(page.get_by_text(str(description), exact=False).first).to_be_visible(timeout=30_000)
            page.wait_for_timeout(1000)
            save_small_png(page.screenshot(full_page=False), screenshot)
            # A user fills in the manifest and one engine parameter, then submits the form.
            page.locator("textarea").first.fill(manifest)
            size_help = json.dumps(StyleParams.model_fields["size"].description)
            page.locator(f"xpath=//*[text()={size_help}]/following::input[1]").fill("24")
            page.get_by_role("button", name="Submit").click()
            runs = submitted_runs(prefect_server, deployment.id, manifest)
        finally:
            browser.close()
    assert 10_000 < screenshot.stat().st_size < 400_000
    assert len(runs) == 1, runs
    parameters = runs[0].parameters
    # What the flow applies: the fields given; switches left at "None" and empty fields are not given.
    assert override_values(ParamOverrides.model_validate(parameters["overrides"])) == {"size": 24}, parameters
    assert RunOptions.model_validate(parameters["options"]) == RunOptions(), parameters
