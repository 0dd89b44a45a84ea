"""Admin console API: token, peers applied without restart, destinations C-ECHO, dead-letter replay,
and CLI parity (peers, destinations echo, send, status) against real DCMTK peers."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import dcmtk, dcmtk_env, run_dcmtk, store_successes, storescu
from synthetic import ct_series, write_series
from test_recovery import free_port, write_config

from dicomnode.admin import CONSOLE_HEADER, SESSION_COOKIE
from dicomnode.config import ADMIN_TOKEN_ENV, load_config
from dicomnode.domain import JobKind, JobState
from dicomnode.node import Node

TOKEN = "test-token-0f3c9a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
AdminNodeFactory = Callable[..., Node]


@pytest.fixture
def admin_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AdminNodeFactory]:
    """A node started from a config file (so peer edits are saved), admin on a free port."""
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    started: list[Node] = []

    def factory(**sections: Any) -> Node:
        admin = {"enabled": True, "port": free_port(), "token": TOKEN, **sections.pop("admin", {})}
        admin = {k: v for k, v in admin.items() if v is not None}  # None: leave the key out
        path, _ = write_config(tmp_path, admin=admin, **sections)
        node = Node(load_config(path), path)
        node.start()
        started.append(node)
        assert node.admin is not None, "admin server did not start"
        return node

    yield factory
    for node in started:
        node.stop()


@contextmanager
def storescp(port: int, folder: Path, ae_title: str = "PACS") -> Iterator[Path]:
    """DCMTK storescp as the destination PACS, ready when it answers C-ECHO."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([dcmtk("storescp"), "-aet", ae_title, "-od", str(folder), "+xa", str(port)],
                            env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while run_dcmtk("echoscu", "-aec", ae_title, "127.0.0.1", str(port)).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, "storescp did not start"
            time.sleep(0.05)
        yield folder
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def echo_from(port: int, calling: str) -> bool:
    return run_dcmtk("echoscu", "-aet", calling, "-aec", "DICOMNODE", "127.0.0.1", str(port)).returncode == 0


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomnode.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_token_protects_everything_but_healthz(admin_node: AdminNodeFactory) -> None:
    node = admin_node()
    url = node.admin.url  # type: ignore[union-attr]
    with httpx.Client(base_url=url) as http:
        health = http.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        for path in ("/api/overview", "/api/peers", "/api/series", "/api/dead-letters", "/metrics",
                     "/openapi.json", "/console/console.js", "/console/console.css", "/"):
            assert http.get(path).status_code == 401, path
            assert http.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
            assert http.get(path, headers=AUTH).status_code == 200, path
        assert http.post("/api/peers", json={"ae_title": "X"}).status_code == 401
        assert "login" in http.get("/").text  # the sign-in form, and nothing else
        schema = http.get("/openapi.json", headers=AUTH).json()
        expected = {"/api/peers", "/api/jobs/{job_id}/retry", "/api/destinations/{name}/echo"}
        assert expected <= set(schema["paths"])

        assert http.post("/login", data={"token": "wrong"}).status_code == 401
        login = http.post("/login", data={"token": TOKEN})
        assert login.status_code == 303
        cookie = login.cookies[SESSION_COOKIE]
        assert TOKEN not in cookie
        assert "httponly" in login.headers["set-cookie"].lower()
        assert "samesite=strict" in login.headers["set-cookie"].lower()
        assert http.get("/api/overview").status_code == 200  # the session cookie
        assert "Content-Security-Policy" in http.get("/").headers
        # A cookie alone cannot change anything: the console's header is required (CSRF).
        assert http.post("/api/jobs/999/retry").status_code == 401
        assert http.post("/api/jobs/999/retry", headers={CONSOLE_HEADER: "1"}).status_code == 404


def test_environment_token_overrides_config(admin_node: AdminNodeFactory,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "from-environment")
    node = admin_node()
    with httpx.Client(base_url=node.admin.url) as http:  # type: ignore[union-attr]
        assert http.get("/api/overview", headers=AUTH).status_code == 401
        environment = {"Authorization": "Bearer from-environment"}
        assert http.get("/api/overview", headers=environment).status_code == 200


def test_without_token_binds_to_loopback_only_and_says_so(
    admin_node: AdminNodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="dicomnode.admin"):
        node = admin_node(admin={"host": "0.0.0.0", "token": None})
    assert node.admin is not None and node.admin.host == "127.0.0.1"
    assert any("no token configured" in r.message and "127.0.0.1 only" in r.message for r in caplog.records)
    assert httpx.get(f"{node.admin.url}/api/overview").status_code == 200


def test_taken_admin_port_does_not_stop_the_node(admin_node: AdminNodeFactory, tmp_path: Path) -> None:
    first = admin_node()
    assert first.admin is not None
    (tmp_path / "second").mkdir()
    path, _ = write_config(tmp_path / "second",
                           admin={"enabled": True, "port": first.admin.port, "token": TOKEN})
    with Node(load_config(path), path) as second:
        assert second.admin is None
        assert echo_from(second.receiver.ports[0], "ECHOSCU")  # still receives
        assert [r["event"] for r in second.audit.recent].count("admin.failed") == 1
    assert httpx.get(f"{first.admin.url}/healthz").status_code == 200


def test_peer_edits_are_saved_and_apply_to_the_next_association(admin_node: AdminNodeFactory) -> None:
    node = admin_node()
    assert node.config_path is not None
    port = node.receiver.ports[0]
    assert not echo_from(port, "NEWSCU")
    with httpx.Client(base_url=node.admin.url, headers=AUTH) as http:  # type: ignore[union-attr]
        added = http.post("/api/peers", json={"ae_title": "NEWSCU", "hosts": ["127.0.0.1"],
                                              "description": "added in test"})
        assert added.status_code == 201, added.text
        assert echo_from(port, "NEWSCU")  # no restart
        assert load_config(node.config_path).peer("NEWSCU") is not None

        before = node.config_path.read_bytes()
        bad = http.post("/api/peers", json={"ae_title": "A" * 17})
        assert bad.status_code == 422
        assert bad.json()["detail"] == ["peers[4].ae_title: longer than 16 characters"]
        duplicate = http.post("/api/peers", json={"ae_title": "NEWSCU"})
        assert duplicate.status_code == 422 and "is already peers[3]" in duplicate.json()["detail"][0]
        assert node.config_path.read_bytes() == before

        renamed = http.put("/api/peers/NEWSCU", json={"ae_title": "RENAMED", "hosts": []})
        assert renamed.status_code == 200, renamed.text
        assert echo_from(port, "RENAMED") and not echo_from(port, "NEWSCU")
        assert http.delete("/api/peers/RENAMED").status_code == 200
        assert not echo_from(port, "RENAMED")
        assert http.delete("/api/peers/RENAMED").status_code == 404
        assert [p["ae_title"] for p in http.get("/api/peers").json()["peers"]] == \
            ["STORESCU", "ECHOSCU", "PYNETDICOM"]
    events = [r["event"] for r in node.audit.recent]
    assert events.count("admin.peers_changed") == 3


def test_dead_letter_replay_and_destination_echo_and_cli(admin_node: AdminNodeFactory,
                                                         tmp_path: Path) -> None:
    """A destination that was down with max_attempts=1 leaves dead letters; once it is up, C-ECHO
    succeeds and a replay delivers. The CLI sees the same state."""
    pacs_port = free_port()
    node = admin_node(destinations={"PACS": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}},
                      jobs={"max_attempts": 1, "retry_for_h": 0})
    assert node.config_path is not None
    config = str(node.config_path)
    files = write_series(ct_series(6, seed="admin-dead"), tmp_path / "ct")
    assert store_successes(storescu(node.receiver.ports[0], *files)) == 6
    node.run_until_idle(timeout=120)

    with httpx.Client(base_url=node.admin.url, headers=AUTH, timeout=30) as http:  # type: ignore[union-attr]
        dead = http.get("/api/dead-letters").json()
        assert dead and {d["destination"] for d in dead} == {"PACS"}
        assert all("cannot connect" in d["last_error"] or "no association" in d["last_error"] for d in dead)
        down = http.post("/api/destinations/PACS/echo").json()
        assert down["ok"] is False and down["error"]
        assert http.post("/api/destinations/NOPE/echo").status_code == 404
        overview = http.get("/api/overview").json()
        assert overview["dead_letters"] == len(dead) and overview["instances"] == 6

        status = cli("status", "--config", config)
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"dead letters: {len(dead)}" in status.stdout and ": ok" in status.stdout

        with storescp(pacs_port, tmp_path / "pacs") as received:
            up = http.post("/api/destinations/PACS/echo").json()
            assert up["ok"] is True and up["status"] == "0x0000"
            echo = cli("destinations", "echo", "PACS", "--config", config)
            assert echo.returncode == 0 and "status 0x0000" in echo.stdout
            for letter in dead:
                assert http.post(f"/api/jobs/{letter['id']}/retry").json() == {"requeued": True,
                                                                               "job": letter["id"]}
            assert http.post(f"/api/jobs/{dead[0]['id']}/retry").status_code == 409
            node.run_until_idle(timeout=120)
            deliveries = node.ledger.list_jobs(kind=JobKind.DELIVER)
            assert {d.state for d in deliveries} == {JobState.SUCCEEDED}
            assert len(list(received.iterdir())) == len(deliveries)

            sent = cli("send", str(tmp_path / "ct"), "--to", "PACS", "--config", config)
            assert sent.returncode == 0, sent.stderr
            assert "sent 6 of 6 files to PACS" in sent.stdout
            assert len(list(received.iterdir())) == len(deliveries) + 6

        assert http.get("/api/dead-letters").json() == []
        series = http.get("/api/series").json()
        assert len(series) == 1 and series[0]["instances"] == 6
        assert series[0]["results"] and all(r["status"] for r in series[0]["results"])
        assert series[0]["time_to_result_s"] is not None and series[0]["time_to_result_s"] >= 0
        assert http.get("/api/overview").json()["time_to_result"]["count"] == 1

    down = cli("destinations", "echo", "PACS", "--config", config)
    assert down.returncode == 1 and "C-ECHO failed" in down.stdout
    assert cli("destinations", "echo", "NOPE", "--config", config).returncode == 2


def test_cli_peers_edit_the_file_and_a_running_node_applies_them(admin_node: AdminNodeFactory,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    node = admin_node()
    assert node.config_path is not None
    config = str(node.config_path)
    port = node.receiver.ports[0]
    added = cli("peers", "add", "CLISCU", "--host", "127.0.0.1", "--description", "from the CLI",
                "--config", config)
    assert added.returncode == 0, added.stderr
    assert "applied to the running node" in added.stdout
    assert echo_from(port, "CLISCU")
    listed = cli("peers", "list", "--config", config)
    assert "CLISCU" in listed.stdout and "from the CLI" in listed.stdout
    bad = cli("peers", "add", "CLISCU", "--config", config)
    assert bad.returncode == 2 and "is already peers[" in bad.stderr
    removed = cli("peers", "remove", "CLISCU", "--config", config)
    assert removed.returncode == 0 and not echo_from(port, "CLISCU")
    assert cli("peers", "remove", "CLISCU", "--config", config).returncode == 1

    node.stop()
    offline = cli("peers", "add", "LATER", "--config", config)
    assert offline.returncode == 0 and "node not running" in offline.stdout
    assert load_config(config).peer("LATER") is not None
    status = cli("status", "--config", config)
    assert status.returncode == 1 and "not reachable" in status.stdout and "queue depth: 0" in status.stdout


def test_blank_environment_token_binds_loopback_and_opens_no_session(
    admin_node: AdminNodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blank token is no token (the config refuses one; the environment's is ignored): the
    console binds loopback only, and a blank token typed at the sign-in form is refused."""
    monkeypatch.setenv(ADMIN_TOKEN_ENV, " ")
    node = admin_node(admin={"host": "0.0.0.0", "token": None})
    assert node.admin is not None and node.admin.host == "127.0.0.1"
    with httpx.Client(base_url=node.admin.url) as http:
        for given in ("", " "):
            response = http.post("/login", data={"token": given})
            assert response.status_code == 401 and SESSION_COOKIE not in response.cookies


def test_console_files_come_from_the_package(admin_node: AdminNodeFactory) -> None:
    node = admin_node()
    with httpx.Client(base_url=node.admin.url, headers=AUTH) as http:  # type: ignore[union-attr]
        page = http.get("/")
        assert '<script src="/console/console.js">' in page.text
        script = http.get("/console/console.js")
        assert script.headers["content-type"].startswith(("text/javascript", "application/javascript"))
        assert "Content-Security-Policy" in script.headers and "loadOverview" in script.text
        assert http.get("/console/console.css").headers["content-type"].startswith("text/css")
        assert http.get("/console/nothing.js").status_code == 404
        assert http.get("/console/../admin.py").status_code in (401, 404)


HOSTILE_SEGMENTS = ["99999999999999999999999", "-1", "0", "9223372036854775808", "1e9", "%00", "x" * 5000,
                    "%E2%80%AE", "..%2F..%2Fetc%2Fpasswd", "NaN", "1.5"]
HOSTILE_QUERIES = ["limit=99999999999999999999999", "limit=-1", "limit=0", "limit=abc", "kind=nope",
                   "state=nope", "limit=1e3", "state=dead&state=%00"]


def test_no_input_gives_a_500(admin_node: AdminNodeFactory) -> None:
    """Every route of the API, with every path parameter replaced by hostile values and every
    query by out-of-range ones: 4xx (or 2xx), never 5xx. Out-of-range ids are 422."""
    node = admin_node()
    with httpx.Client(base_url=node.admin.url, headers=AUTH, timeout=30) as http:  # type: ignore[union-attr]
        overflow = http.post("/api/jobs/99999999999999999999999/retry")
        assert overflow.status_code == 422, overflow.text
        assert http.post("/api/jobs/9223372036854775807/retry").status_code == 404
        assert http.post("/api/jobs/0/retry").status_code == 422
        schema = http.get("/openapi.json").json()
        checked = 0
        for template, operations in schema["paths"].items():
            for method in operations:
                names = [part.split("}")[0] for part in template.split("{")[1:]]
                urls = []
                for segment in HOSTILE_SEGMENTS if names else [""]:
                    path = template
                    for name in names:
                        path = path.replace("{" + name + "}", segment)
                    urls.append(path)
                if method == "get":
                    urls += [f"{urls[0]}?{query}" for query in HOSTILE_QUERIES]
                for url in urls:
                    body = {"ae_title": "X" * 17, "hosts": ["not a host"], "description": "\x00"}
                    extra = {"json": body} if method in ("post", "put") else {}
                    response = http.request(method.upper(), url, **extra)
                    assert response.status_code < 500, (method, url, response.status_code, response.text)
                    checked += 1
        assert checked > 80, checked
        # The peers file was never made invalid by any of this.
        assert load_config(node.config_path).peers


def test_peer_edits_on_a_node_without_a_config_file_are_refused(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    path, _ = write_config(tmp_path, admin={"enabled": True, "port": free_port(), "token": TOKEN})
    with Node(load_config(path), None) as node:  # as `dicomnode serve` on the embedded default
        assert node.admin is not None
        with httpx.Client(base_url=node.admin.url, headers=AUTH) as http:
            peers = http.get("/api/peers").json()
            assert peers["editable"] is False and "dicomnode init" in peers["read_only_reason"]
            refused = http.post("/api/peers", json={"ae_title": "NEWSCU"})
            assert refused.status_code == 409
            assert "embedded default" in refused.json()["detail"] and "dicomnode init" in refused.json()["detail"]
            assert http.post("/api/peers/reload").status_code == 409
