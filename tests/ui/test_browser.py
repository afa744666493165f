"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright opens ``streamlit run`` on a free
port, confirms a proposal by clicking, and the store holds the confirmed class; undo in the sidebar reverts it.
A screenshot goes to test-artifacts/. Skips when Chromium (scripts/browser.sh installs it) or Playwright is
missing."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from anomaly_discovery.ui.launch import dashboard_environment, free_port, streamlit_command
from tests.ui.test_pages import newest_decision, store_state

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
START_TIMEOUT_S = 90
REVIEWER = "browser-test"

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(),
                                reason=f"{CHROMIUM} is missing: run scripts/browser.sh (Debian's chromium package)")


def wait_until_healthy(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited with {process.returncode}: {process.stdout.read()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the dashboard at {url} did not answer within {START_TIMEOUT_S} s")


def settle(page) -> None:
    """Wait until the app's script run is over (no stale elements left on the page)."""
    page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]').wait_for(timeout=60_000)


@pytest.fixture
def dashboard(world):
    port = free_port()
    process = subprocess.Popen(streamlit_command("127.0.0.1", port), env=dashboard_environment(world),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def page():
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1000})
        finally:
            browser.close()


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
