"""The console in a real browser (Debian chromium + chromedriver, driven by selenium).

Signs in, adds an AE title (then DCMTK echoscu from it is accepted), C-ECHOes a destination, replays
dead letters once the destination is up, reads the verdicts, and screenshots the overview.
Set DICOMNODE_UPDATE_SCREENSHOT=1 to write the screenshot to docs/console.png.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_dcmtk, store_successes, storescu
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from synthetic import ct_series, write_series
from test_admin import TOKEN, AdminNodeFactory, admin_node, storescp  # noqa: F401  (fixture)
from test_recovery import free_port

from dicomnode.domain import JobKind, JobState

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            pytest.fail(f"{path} is missing: apt-get install chromium chromium-driver (see .ci/run)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--window-size=1280,860",
                 "--disable-dev-shm-usage"):
        options.add_argument(flag)
    # An explicit driver path: selenium never downloads anything.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: WebDriver, condition, timeout: float = 20):  # type: ignore[no-untyped-def]
    return WebDriverWait(driver, timeout, poll_frequency=0.05,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
                         ).until(condition)


def text_of(driver: WebDriver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def click(driver: WebDriver, element_id: str) -> None:
    """Click, retrying while the periodic refresh replaces the element."""
    wait(driver, lambda d: d.find_element(By.ID, element_id).click() or True)


def test_console_add_peer_echo_replay_and_screenshot(admin_node: AdminNodeFactory,  # noqa: F811
                                                     browser: WebDriver,
                                                     tmp_path: Path) -> None:
    pacs_port = free_port()
    node = admin_node(destinations={"PACS": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}},
                      jobs={"max_attempts": 1, "retry_for_h": 0})
    port = node.receiver.ports[0]
    files = write_series(ct_series(6, seed="browser"), tmp_path / "ct")
    assert store_successes(storescu(port, *files)) == 6
    node.run_until_idle(timeout=120)
    dead = node.ledger.list_jobs(kind=JobKind.DELIVER, states=[JobState.DEAD])
    assert dead, "the destination was down: deliveries should be dead letters"
    url = node.admin.url  # type: ignore[union-attr]

    # Sign in.
    browser.get(url + "/")
    assert browser.find_elements(By.ID, "ov-rate") == []  # nothing but the login form
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "login").click()
    wait(browser, lambda d: text_of(d, "ov-instances") == "6")
    assert text_of(browser, "ov-dead") == str(len(dead))

    # Add an AE title; the very next association from it is accepted.
    assert run_dcmtk("echoscu", "-aet", "BROWSERSCU", "-aec", "DICOMNODE", "127.0.0.1",
                     str(port)).returncode != 0
    browser.get(url + "/#peers")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#peers-table tr[data-ae="STORESCU"]'))
    browser.find_element(By.ID, "peer-ae").send_keys("BROWSERSCU")
    browser.find_element(By.ID, "peer-hosts").send_keys("127.0.0.1")
    browser.find_element(By.ID, "peer-description").send_keys("added from the console")
    click(browser, "peer-save")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#peers-table tr[data-ae="BROWSERSCU"]'))
    assert "Added BROWSERSCU" in text_of(browser, "peer-message")
    assert run_dcmtk("echoscu", "-aet", "BROWSERSCU", "-aec", "DICOMNODE", "127.0.0.1",
                     str(port)).returncode == 0
    assert "BROWSERSCU" in node.config_path.read_text()  # type: ignore[union-attr]
    # An invalid AE title is refused with the config's own message.
    browser.find_element(By.ID, "peer-ae").send_keys("STORESCU")
    click(browser, "peer-save")
    wait(browser, lambda d: "is already peers[0]" in text_of(d, "peer-error"))

    # Destinations: C-ECHO fails while the PACS is down, works once it is up; then replay.
    browser.get(url + "/#destinations")
    click(browser, "echo-PACS")
    wait(browser, lambda d: text_of(d, "echo-result-PACS").startswith("FAILED"))
    with storescp(pacs_port, tmp_path / "pacs") as received:
        click(browser, "echo-PACS")
        wait(browser, lambda d: text_of(d, "echo-result-PACS").startswith("OK 0x0000"))

        browser.get(url + "/#dead")
        # A refresh with nothing new keeps the rows (a button pressed during it still works).
        button = wait(browser, lambda d: d.find_element(By.ID, f"replay-{dead[0].id}"))
        browser.execute_async_script("loadDead().then(arguments[0])")
        assert button.get_attribute("id") == f"replay-{dead[0].id}"  # not stale: the same element
        for job in dead:
            click(browser, f"replay-{job.id}")
            wait(browser, lambda d, job=job: f"Job {job.id} requeued" in text_of(d, "dead-message"))
            # The table has been redrawn without it before the next button is pressed.
            wait(browser, lambda d, job=job: not d.find_elements(By.ID, f"replay-{job.id}"))
        node.run_until_idle(timeout=120)
        states = {j.state for j in node.ledger.list_jobs(kind=JobKind.DELIVER)}
        assert states == {JobState.SUCCEEDED}
        assert len(list(received.iterdir())) == len(dead)

    browser.get(url + "/#series")
    wait(browser, lambda d: "HEAD ROUTINE" in text_of(d, "series-table"))
    verdicts = [v.text for v in browser.find_elements(By.CSS_SELECTOR, "#series-table .verdict")]
    assert verdicts and all(":" in v for v in verdicts)

    browser.get(url + "/#overview")
    wait(browser, lambda d: text_of(d, "ov-dead") == "0" and text_of(d, "ov-ttr") != "-")
    shot = tmp_path / "console.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    if os.environ.get("DICOMNODE_UPDATE_SCREENSHOT") == "1":
        shutil.copy(shot, DOCS / "console.png")
