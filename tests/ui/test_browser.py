"""The dashboard in a real browser: ``run_ui`` (what ``adisc ui`` calls) starts ``streamlit run`` on a free port,
Debian's headless Chromium driven by Playwright confirms a proposal by clicking, and the store holds the confirmed
class; undo in the sidebar reverts it; the Export page's CSV and report download as files. A screenshot goes to
test-artifacts/. Skips when Chromium (scripts/browser.sh installs it) or Playwright is missing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from anomaly_discovery.platform.export.job import open_embeddings
from anomaly_discovery.platform.export.snapshot import read_snapshot, regions_csv
from anomaly_discovery.platform.storage.store import Store
from tests.ui.chromium import CHROMIUM, browser_page
from tests.ui.test_pages import newest_decision, store_state

REPOSITORY = Path(__file__).resolve().parents[2]
ARTIFACTS = REPOSITORY / "test-artifacts"
LAUNCH = "import json, sys; from anomaly_discovery.ui.launch import run_ui; sys.exit(run_ui(json.loads(sys.argv[1])))"
START_TIMEOUT_S = 90
REVIEWER = "browser-test"

pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(),
                                reason=f"{CHROMIUM} is missing: run scripts/browser.sh (Debian's chromium package)")


def wait_for_url(log: Path, process: subprocess.Popen) -> str:
    """The URL ``run_ui`` prints first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        found = re.search(r"adisc ui: (http://\S+) ", log.read_text())
        if found:
            return found.group(1)
        if process.poll() is not None:
            raise RuntimeError(f"adisc ui exited with {process.returncode}: {log.read_text()}")
        time.sleep(0.2)
    raise TimeoutError(f"adisc ui printed no URL within {START_TIMEOUT_S} s: {log.read_text()}")


def wait_until_healthy(url: str, log: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"adisc ui exited with {process.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the dashboard at {url} did not answer within {START_TIMEOUT_S} s: {log.read_text()}")


def settle(page) -> None:
    """Wait until the app's script run is over (no stale elements left on the page)."""
    page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]').wait_for(timeout=60_000)


@pytest.fixture
def dashboard(world, tmp_path):
    """``run_ui`` in a subprocess; Ctrl-C (SIGINT) stops it and its ``streamlit run`` child."""
    log = tmp_path / "adisc-ui.log"
    arguments = json.dumps({"workdir": str(world.workdir), "model": str(world.model), "data": str(world.data)})
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, "-c", LAUNCH, arguments], stdout=output, stderr=subprocess.STDOUT,
                                   cwd=REPOSITORY, start_new_session=True)
    try:
        url = wait_for_url(log, process)
        wait_until_healthy(url, log, process)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def page():
    with browser_page() as new_page:
        yield new_page


def test_a_reviewer_confirms_a_proposal_by_clicking_and_undoes_it(world, dashboard, page):
    before = store_state(world)
    page.goto(f"{dashboard}/proposals", timeout=60_000)
    page.get_by_role("heading", name="Proposals").wait_for(timeout=60_000)
    settle(page)
    reviewer = page.get_by_role("textbox", name="Reviewer")
    reviewer.fill(REVIEWER)
    reviewer.press("Enter")
    settle(page)
    page.get_by_role("textbox", name="name of the new defect class").fill("hole")
    page.get_by_role("button", name=re.compile("Confirm as a new class")).click()
    page.get_by_text(re.compile(r"confirm proposal #\d+: done")).wait_for(timeout=30_000)
    settle(page)

    assert ("hole", "confirmed") in {(c[1], c[2]) for c in store_state(world)[0]}
    decision = newest_decision(world)
    assert (decision.action, decision.reviewer) == ("confirm", REVIEWER)
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = page.screenshot(path=ARTIFACTS / "ui_confirm_proposal.png", full_page=True)
    assert len(screenshot) > 10_000, "the page rendered as an almost empty image"

    page.get_by_role("button", name=re.compile(r"Undo confirm #\d+")).click()
    page.get_by_text(re.compile(r"undo: done")).wait_for(timeout=30_000)
    assert store_state(world) == before


def test_the_export_page_downloads_the_reviewed_csv_and_report(world, dashboard, page):
    page.goto(f"{dashboard}/export", timeout=60_000)
    page.get_by_role("heading", name="Export").wait_for(timeout=60_000)
    settle(page)
    downloaded = {}
    for label in ("Regions (CSV)", "Report (HTML)"):
        with page.expect_download(timeout=60_000) as download:
            page.get_by_role("button", name=label).click()
        downloaded[label] = (download.value.suggested_filename, Path(download.value.path()).read_bytes())

    store = Store(world.store, upgrade=False)
    try:
        expected = regions_csv(read_snapshot(store, open_embeddings(store, world.index)).regions)
    finally:
        store.dispose()
    name, csv = downloaded["Regions (CSV)"]
    assert name == "adisc_csv_discovery-1_d0.csv" and csv == expected
    name, report = downloaded["Report (HTML)"]
    assert name.endswith(".html") and b'data-class="rust" data-status="known" data-regions="12"' in report
