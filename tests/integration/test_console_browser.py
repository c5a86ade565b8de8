"""The console in a real headless browser: Debian's chromium through chromium-driver (Selenium), nothing downloaded.

The browser signs in through the fake Entra ID (real redirects, an RS256-signed ID token), finds the dead-lettered
mentor, re-queues it and watches it turn in_sync; force-syncs another mentor and sees the PATCH reach the fake
portal; and saves a screenshot of every page. SCREENSHOTS_DIR names the directory for them (the README's come from
``SCREENSHOTS_DIR=docs/screenshots``); by default they go to the test's temporary directory.

No browser is a failure, not a skip: `.ci/run` installs chromium and chromium-driver.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from hlf_actors.testing.fake_oidc import FakeOidc
from hlf_actors.testing.fake_portal import FakePortal, Reply
from hlf_actors.testing.harness import eventually, running_service, sync_state, until
from hlf_actors.testing.http_server import free_port
from hlf_actors.testing.seed import add_device, add_mentor, add_organisation

pytestmark = pytest.mark.anyio

GROUP = "0f6a4bd2-3c1e-4d8a-9b7f-5e2c1a9d8e77"
_PAGES = ("sign-in", "overview", "mentors", "dead-letters", "mentor-story", "alerts", "expiry", "actions")
_CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1200",
)


def _which(name: str) -> str:
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if found is None:
        pytest.fail(f"{name} is not installed: apt-get install chromium chromium-driver (.ci/run does it)")
    return found


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not try to download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = _which("chromium")
    profile = tempfile.mkdtemp(prefix="hlf-chromium-")
    for flag in (*_CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=DriverService(_which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    where = Path(os.environ.get("SCREENSHOTS_DIR") or tmp_path / "screenshots")
    where.mkdir(parents=True, exist_ok=True)
    return where


def text_of(browser: WebDriver, element_id: str, contains: str, timeout: float = 5.0) -> str:
    """The element's text once it contains ``contains``: a click that submits a form returns before the next page
    has loaded, so the old page's element may be found, or go stale, first."""

    def read() -> str | None:
        try:
            text = browser.find_element(By.ID, element_id).text
        except (NoSuchElementException, StaleElementReferenceException):
            return None
        return text if contains in text else None

    return str(until(read, what=f"#{element_id} to say {contains!r}", timeout=timeout))


async def test_the_browser_signs_in_requeues_force_syncs_and_photographs_every_page(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, browser: WebDriver, shots: Path, tmp_path: Path
) -> None:
    oslo = add_organisation(conn, "HLF Oslo", alert_topic="hlf-oslo-coordinators")
    bergen = add_organisation(conn, "HLF Bergen")
    add_device(conn, oslo, "demo-device-token-coordinator-anna")
    kari, _ = add_mentor(conn, oslo, portal=portal, name="Kari Nordmann", cert_valid_days=40)
    ola, ola_rec = add_mentor(conn, oslo, portal=portal, name="Ola Hansen", cert_valid_days=12)
    ingrid, ingrid_rec = add_mentor(conn, bergen, portal=portal, name="Ingrid Berg")
    add_mentor(conn, bergen, portal=portal, name="Lars Dahl", status="paused")
    assert ola_rec is not None and ingrid_rec is not None
    # A record-level access check that fails for this record alone ("Troubleshoot Dataverse client errors",
    # -2147187962): the tenant check passes, so it is Ingrid's own dead letter, not a tenant-wide incident.
    refusal = b'{"error":{"code":"0x80048306","message":"Principal user lacks WriteAccess right(s) for record"}}'
    portal.always(Reply(status=403, body=refusal), ingrid_rec)

    with FakeOidc() as oidc:
        oidc.user.update(preferred_username="ops@hlf.example", name="Ops Person", groups=[GROUP])
        secret = tmp_path / "console-client-secret"
        secret.write_text(oidc.client_secret)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {"HLF_HTTP_PORT": str(port), "HLF_MAX_ATTEMPTS": "2", **oidc.env(str(secret), GROUP)}
        async with running_service(db_url, portal, env=env):
            await eventually(lambda: sync_state(conn, ingrid) == "dead_lettered", what="Ingrid's dead letter")
            await eventually(lambda: sync_state(conn, kari) == "in_sync" and sync_state(conn, ola) == "in_sync")

            def drive() -> None:
                b = browser

                def shot(name: str) -> None:
                    assert b.save_screenshot(str(shots / f"{name}.png")), name

                # 1. Sign in: the console sends the browser to the fake Entra ID and back.
                b.get(base + "/dead-letters")
                until(lambda: b.current_url == base + "/login", what="the redirect to sign-in")
                shot("sign-in")
                b.find_element(By.ID, "sign-in-entra").click()
                until(lambda: b.current_url == base + "/", what="the way back from Entra ID")
                text_of(b, "role", "leader")
                assert b.find_element(By.TAG_NAME, "h1").text == "Overview"
                assert b.find_element(By.ID, "role").text == "leader"
                assert "ops@hlf.example" in b.find_element(By.CLASS_NAME, "user").text
                assert b.find_element(By.ID, "count-dead_lettered").text.startswith("1")
                assert any(path.endswith("/token") for _, path in oidc.requests)
                shot("overview")

                # 2. Find the dead-lettered mentor and re-queue it, once the portal lets us.
                b.find_element(By.ID, "count-dead_lettered").click()
                until(lambda: "state=dead_lettered" in b.current_url, what="the mentors page")
                rows = b.find_elements(By.CSS_SELECTOR, "#mentors tbody tr")
                assert len(rows) == 1 and "Ingrid Berg" in rows[0].text
                shot("mentors")
                b.get(base + "/dead-letters")
                letter = b.find_element(By.CSS_SELECTOR, "#dead-letters tbody tr")
                assert "Ingrid Berg" in letter.text and "403" in letter.text
                shot("dead-letters")
                portal.always(None, record_id=ingrid_rec)
                letter.find_element(By.CLASS_NAME, "requeue").click()
                text_of(b, "flash", "Re-queued 1 dead letter(s)")
                with psycopg.connect(db_url, autocommit=True) as own:
                    until(
                        lambda: sync_state(own, ingrid) == "in_sync",
                        what="Ingrid in sync after the re-queue",
                        timeout=5,
                    )
                b.get(base + "/mentors")
                b.find_element(By.ID, "q").send_keys("ingrid")
                b.find_element(By.CSS_SELECTOR, "form.search button").click()
                until(lambda: "q=ingrid" in b.current_url, what="the search")
                b.find_element(By.LINK_TEXT, "Ingrid Berg").click()
                until(lambda: f"/mentors/{ingrid}" in b.current_url, what="Ingrid's page")
                text_of(b, "sync-state", "in sync")
                assert "requeued" in b.find_element(By.ID, "story").text
                shot("mentor-story")

                # 3. Force-sync another mentor: the PATCH reaches the fake portal.
                before = len(portal.patches(ola_rec))
                b.get(f"{base}/mentors/{ola}")
                b.find_element(By.ID, "force-sync").click()
                text_of(b, "flash", "Force sync of")
                until(lambda: len(portal.patches(ola_rec)) > before, what="the forced PATCH at the portal", timeout=5)

                # 4. The remaining pages.
                for name, path in (("alerts", "/alerts"), ("expiry", "/expiry"), ("actions", "/actions")):
                    b.get(base + path)
                    assert "Sign in" not in b.title
                    shot(name)
                assert "force sync" in b.find_element(By.ID, "audit").text
                b.get(base + "/expiry")
                assert "Ola Hansen" in b.page_source and "Kari Nordmann" in b.page_source
                b.get(base + "/alerts")
                assert "hlf_sync_failure" in b.page_source

            await anyio.to_thread.run_sync(drive)

    actions = conn.execute(
        "SELECT data ->> 'actor', data ->> 'action' FROM event_log WHERE kind = 'console_action' ORDER BY seq"
    ).fetchall()
    assert actions == [("ops@hlf.example", "requeue"), ("ops@hlf.example", "force_sync")]
    sizes = {name: (shots / f"{name}.png").stat().st_size for name in _PAGES}
    assert all(size > 10_000 for size in sizes.values()), sizes
