"""Notifications in the console, in a real browser: the series page's "notified" column shows each
event with the time from the last image to each channel's acknowledgement, and a dead notification
is listed and replayed from the dead-letters page."""

from __future__ import annotations

from pathlib import Path

from conftest import store_successes, storescu
from notify_fixtures import head_ct, write_model
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from synthetic import write_series
from test_admin import TOKEN, AdminNodeFactory, admin_node  # noqa: F401  (fixture)
from test_console import browser, click, text_of, wait  # noqa: F401  (fixture)
from webhook_receiver import WebhookReceiver

from dicomnode.domain import JobKind, JobState


def test_console_shows_time_to_notification_and_replays_a_dead_notification(
    admin_node: AdminNodeFactory, browser: WebDriver, tmp_path: Path  # noqa: F811
) -> None:
    write_model(tmp_path / "models" / "test-bleed")
    receiver = WebhookReceiver(tmp_path / "webhook", "a-test-secret-of-32-characters!!", ["400"])
    try:
        node = admin_node(analysis={"shipped_models": False, "model_dirs": [str(tmp_path / "models")]},
                          notify={"HOOK": receiver.channel()})
        files = write_series(head_ct("console")[:8], tmp_path / "ct")
        assert store_successes(storescu(node.receiver.ports[0], *files)) == 8
        node.run_until_idle(timeout=120)
        (dead,) = node.ledger.list_jobs(kind=JobKind.NOTIFY, states=[JobState.DEAD])
        url = node.admin.url  # type: ignore[union-attr]
        browser.get(url + "/")
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "login").click()
        wait(browser, lambda d: text_of(d, "ov-dead") == "1")

        browser.get(url + "/#dead")
        wait(browser, lambda d: "finding.critical test-bleed" in text_of(d, "dead-table"))
        assert "HOOK" in text_of(browser, "dead-table") and "HTTP 400" in text_of(browser, "dead-table")
        click(browser, f"replay-{dead.id}")
        wait(browser, lambda d: f"Job {dead.id} requeued" in text_of(d, "dead-message"))
        node.run_until_idle(timeout=60)
        assert node.ledger.job(dead.id).state == JobState.SUCCEEDED  # type: ignore[union-attr]

        browser.get(url + "/#series")
        cell = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#series-table td.notified .event"))
        assert cell.text.startswith("finding.critical: HOOK ") and cell.text.endswith(" s")
        assert float(cell.text.split()[-2]) > 0
    finally:
        receiver.stop()
