"""Operator console, REST API and Prometheus metrics, served by the node itself.

A FastAPI application (:func:`create_app`) run by uvicorn in a thread (:class:`AdminServer`), started
and stopped with the :class:`~dicomnode.node.Node`. It reads the ledger (series, jobs, results),
tests destinations with C-ECHO (PS3.7 9.1.5), replays dead letters (``Ledger.retry_job``) and edits
the accepted peers (Calling AE Titles, PS3.8 7.1.1.3) through :mod:`dicomnode.config_edit`, which
validates with the same code that reads the config and writes the file atomically; the node applies
the new peers at once (``Node.update_peers``), so the very next association sees them.

Security (documented in docs/operate.md):

* A token (``admin.token``, overridden by ``DICOMNODE_ADMIN_TOKEN``) protects everything but
  ``/healthz`` and the login form: API clients send ``Authorization: Bearer <token>``; the console
  logs in with a plain HTML form that sets an HttpOnly, SameSite=Strict session cookie (an HMAC of
  the token, never the token itself). Unsafe requests authenticated by the cookie must also carry
  the ``X-Dicomnode-Console`` header, which a cross-site form cannot send.
* ``/metrics`` is protected like the API: a Prometheus scrape job sends the token with
  ``authorization: {credentials_file: ...}``. Counts of studies and AE titles are operational data.
* Without a token the server binds only to loopback (whatever ``admin.host`` says) and logs so.
* No CDN, no inline script: the console is served from here with ``Content-Security-Policy:
  default-src 'self'``; FastAPI's Swagger page (which loads from a CDN) is off, the OpenAPI schema
  is at ``/openapi.json``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import socket
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import sqlalchemy as sa
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
from pydantic import BaseModel, Field

from dicomnode import config_edit
from dicomnode.config import Config, load_config
from dicomnode.domain import JobKind, JobState
from dicomnode.errors import ConfigError, DicomNodeError
from dicomnode.metrics import CONTENT_TYPE
from dicomnode.notify import event_views

if TYPE_CHECKING:
    from dicomnode.ledger import JobRow
    from dicomnode.node import Node

LOG = logging.getLogger(__name__)

SESSION_COOKIE = "dicomnode_session"
CONSOLE_HEADER = "X-Dicomnode-Console"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# --- authentication ----------------------------------------------------------------------------


def session_value(token: str) -> str:
    """The console cookie: an HMAC of the token, so a leaked cookie does not reveal the API token."""
    return hmac.new(token.encode(), b"dicomnode console session", hashlib.sha256).hexdigest()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_host(host: str, token: str | None) -> str:
    """Where to listen: the configured host, or loopback when no token protects the console."""
    if token is None and not is_loopback(host):
        LOG.warning("admin: no token configured (admin.token or DICOMNODE_ADMIN_TOKEN); the console "
                    "listens on 127.0.0.1 only, not on %s", host)
        return "127.0.0.1"
    if token is None:
        LOG.warning("admin: no token configured; the console on %s is open to every local user", host)
    return host


class _Auth:
    def __init__(self, token: str | None) -> None:
        self.token = token
        self.session = session_value(token) if token else None

    def bearer_ok(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return bool(self.token) and scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), (self.token or "").encode())

    def cookie_ok(self, request: Request) -> bool:
        cookie = request.cookies.get(SESSION_COOKIE, "")
        return self.session is not None and hmac.compare_digest(cookie.encode(), self.session.encode())

    def allowed(self, request: Request) -> bool:
        if self.token is None:
            return True
        if self.bearer_ok(request):
            return True
        if self.cookie_ok(request):
            return request.method in ("GET", "HEAD") or request.headers.get(CONSOLE_HEADER) == "1"
        return False

    def __call__(self, request: Request) -> None:
        if not self.allowed(request):
            raise HTTPException(401, "missing or wrong token", headers={"WWW-Authenticate": "Bearer"})


# --- request and response bodies ---------------------------------------------------------------


class PeerBody(BaseModel):
    """A peer as typed by the operator; validated by the config code, not here."""

    ae_title: str
    hosts: list[str] = Field(default_factory=list)
    description: str = ""


class EchoResult(BaseModel):
    name: str
    ok: bool
    status: str
    seconds: float
    error: str = ""


# --- ledger views -----------------------------------------------------------------------------


def _job_dict(job: JobRow) -> dict[str, Any]:
    seconds = (job.finished_at - job.started_at) if job.finished_at and job.started_at else None
    return {
        "id": job.id, "kind": job.kind.value, "state": job.state.value, "series_instance_uid":
        job.series_instance_uid, "epoch": job.epoch, "priority": job.priority.name.lower(),
        "attempts": job.attempts, "max_attempts": job.max_attempts, "created_at": job.created_at,
        "started_at": job.started_at, "finished_at": job.finished_at, "seconds": seconds,
        "destination": job.payload.get("destination"), "last_error": job.last_error,
        "channel": job.payload.get("channel"), "event_id": job.payload.get("event_id"),
    }


def _summary(text: str) -> dict[str, Any]:
    import json

    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _time_to_result(node: Node, limit: int = 100) -> dict[str, Any]:
    """From the last image of a series epoch to its first delivered result, over recent deliveries
    (read from the ledger, so it survives restarts)."""
    first_delivery: dict[tuple[str, int], float] = {}
    for job in node.ledger.list_jobs(kind=JobKind.DELIVER, states=[JobState.SUCCEEDED], limit=limit):
        key = (job.series_instance_uid, job.epoch)
        if job.finished_at is not None:
            first_delivery[key] = min(first_delivery.get(key, job.finished_at), job.finished_at)
    values: list[float] = []
    for (uid, epoch), delivered in first_delivery.items():
        row = node.ledger.series_row(uid)
        if row is not None and row.epoch == epoch:
            values.append(max(0.0, delivered - row.last_received_at))
    if not values:
        return {"count": 0, "median_s": None, "p90_s": None}
    values.sort()
    return {"count": len(values), "median_s": round(statistics.median(values), 3),
            "p90_s": round(values[min(len(values) - 1, int(0.9 * len(values)))], 3)}


def overview(node: Node) -> dict[str, Any]:
    """Node health at a glance: throughput, queue depth by state, failures, time to result."""
    counts: dict[str, dict[str, int]] = {k.value: {s.value: 0 for s in JobState} for k in JobKind}
    for (kind, state), n in node.ledger.job_counts().items():
        counts.setdefault(kind, {})[state] = n
    open_states = (JobState.QUEUED, JobState.RUNNING, JobState.FAILED)
    return {
        "ae_title": node.config.node.ae_title,
        "dicom_ports": node.receiver.ports if node.receiver is not None else [],
        "images_per_second": round(node.metrics.images_per_second(), 3),
        "instances": node.ledger.count_instances(),
        "jobs": counts,
        "queue_depth": sum(counts[k][s] for k in counts for s in open_states),
        "dead_letters": counts[JobKind.DELIVER]["dead"] + counts[JobKind.NOTIFY]["dead"],
        "failed_analyses": counts[JobKind.ANALYZE]["dead"],
        "retrying": sum(counts[k][JobState.FAILED] for k in counts),
        "time_to_result": _time_to_result(node),
    }


def recent_series(node: Node, limit: int) -> list[dict[str, Any]]:
    """Recent series with their verdicts (results ``summary``: status, priority, findings), jobs
    and time to result."""
    out: list[dict[str, Any]] = []
    for row in node.ledger.recent_series(limit):
        jobs = node.ledger.list_jobs(series_uid=row.series_instance_uid, limit=50)
        results = []
        for r in node.ledger.results_for_series(row.series_instance_uid, epoch=row.epoch):
            summary = _summary(r.summary)
            results.append({"id": r.id, "analyzer": r.analyzer, "version": r.version, "kind": r.kind,
                            "status": summary.get("status"), "priority": summary.get("priority"),
                            "error": summary.get("error", ""), "findings": summary.get("findings", []),
                            "sop_instance_uid": r.sop_instance_uid})
        delivered = [j.finished_at for j in jobs if j.kind == JobKind.DELIVER and j.epoch == row.epoch
                     and j.state == JobState.SUCCEEDED and j.finished_at]
        events = [e for e in event_views(node.ledger, 20, row.series_instance_uid) if e["epoch"] == row.epoch]
        told = [n["time_to_notification_s"] for e in events for n in e["notifications"]
                if n["time_to_notification_s"] is not None]
        out.append({
            "series_instance_uid": row.series_instance_uid, "study_instance_uid": row.study_instance_uid,
            "modality": row.modality, "series_description": row.series_description,
            "calling_ae": row.calling_ae, "state": row.state.value, "epoch": row.epoch,
            "instances": row.instance_count, "first_received_at": row.first_received_at,
            "last_received_at": row.last_received_at, "rule": row.rule, "note": row.note,
            "time_to_result_s": round(min(delivered) - row.last_received_at, 3) if delivered else None,
            "time_to_notification_s": min(told) if told else None, "events": events,
            "results": results, "jobs": [_job_dict(j) for j in jobs],
        })
    return out


def dead_letters(node: Node, limit: int = 100) -> list[dict[str, Any]]:
    """Dead deliveries and dead notifications, newest first."""
    out = []
    jobs = [*node.ledger.list_jobs(kind=JobKind.DELIVER, states=[JobState.DEAD], limit=limit),
            *node.ledger.list_jobs(kind=JobKind.NOTIFY, states=[JobState.DEAD], limit=limit)]
    for job in sorted(jobs, key=lambda j: j.id, reverse=True)[:limit]:
        item = _job_dict(job)
        if job.kind == JobKind.NOTIFY:
            event = node.ledger.event(str(job.payload.get("event_id", "")))
            item["event"] = ({"id": event.id, "type": event.type, "analyzer": event.analyzer}
                             if event is not None else None)
        else:
            result = node.ledger.result(int(job.payload.get("result_id", 0)))
            item["result"] = ({"analyzer": result.analyzer, "kind": result.kind,
                               "sop_instance_uid": result.sop_instance_uid} if result is not None else None)
        out.append(item)
    return out


# --- application -------------------------------------------------------------------------------


def create_app(node: Node) -> FastAPI:
    """The admin application for ``node``; the token is read once, here."""
    auth = _Auth(node.config.admin_token)
    app = FastAPI(title="dicomnode admin", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  description="Operate a dicomnode: peers, destinations, series, jobs, dead letters. "
                  "Every route but /healthz needs `Authorization: Bearer <token>` when a token is set.")

    @app.middleware("http")
    async def _headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    @app.get("/healthz", tags=["health"])
    def healthz() -> JSONResponse:
        """Liveness/readiness, open without token: the ledger answers and the DICOM port listens."""
        ledger_ok = True
        try:
            with node.ledger.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except sa.exc.SQLAlchemyError:
            ledger_ok = False
        listening = bool(node.receiver.ports)
        ok = ledger_ok and listening
        return JSONResponse({"status": "ok" if ok else "unhealthy", "ae_title": node.config.node.ae_title,
                             "ledger": ledger_ok, "dicom_listening": listening},
                            status_code=200 if ok else 503)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def console(request: Request) -> HTMLResponse:
        if not auth.allowed(request):
            return HTMLResponse(_login_page(""), status_code=401)
        return HTMLResponse(CONSOLE_HTML)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        fields = parse_qs((await request.body()).decode("utf-8", "replace"))
        given = (fields.get("token") or [""])[0]
        if auth.token is None or not hmac.compare_digest(given.encode(), auth.token.encode()):
            return HTMLResponse(_login_page("Wrong token."), status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, auth.session or "", httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/")
        return response

    @app.post("/logout", include_in_schema=False)
    def logout() -> Response:
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    protected = [Depends(auth)]

    @app.get("/console.js", include_in_schema=False, dependencies=protected)
    def console_js() -> Response:
        return Response(CONSOLE_JS, media_type="text/javascript")

    @app.get("/console.css", include_in_schema=False, dependencies=protected)
    def console_css() -> Response:
        return Response(CONSOLE_CSS, media_type="text/css")

    @app.get("/metrics", tags=["metrics"], dependencies=protected, response_class=PlainTextResponse)
    def metrics() -> Response:
        """Prometheus text exposition (see dicomnode.metrics for the metric names)."""
        return Response(node.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/openapi.json", include_in_schema=False, dependencies=protected)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    app.include_router(_api(node), dependencies=protected)
    return app


def _apply(node: Node, change: Callable[[Path], Config]) -> list[dict[str, Any]]:
    """Run a peer edit on the node's config file and apply the resulting peers at once."""
    if node.config_path is None:
        raise HTTPException(409, "this node runs without a config file; peers cannot be saved")
    try:
        config = change(node.config_path)
    except config_edit.PeerNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except ConfigError as exc:
        raise HTTPException(422, exc.problems) from None
    node.update_peers(list(config.peers))
    node.audit.log("admin.peers_changed", peers=[p.ae_title for p in config.peers])
    return _peers(node)


def _peers(node: Node) -> list[dict[str, Any]]:
    return [p.model_dump() for p in node.config.peers]


def _api(node: Node) -> APIRouter:
    api = APIRouter(prefix="/api")

    @api.get("/overview", tags=["overview"])
    def get_overview() -> dict[str, Any]:
        """Images per second (last minute), queue depth by state, failures, time to result."""
        return overview(node)

    @api.get("/peers", tags=["peers"])
    def list_peers() -> dict[str, Any]:
        """Accepted calling AE titles and the hosts they may call from (empty: any host)."""
        return {"editable": node.config_path is not None, "config_path": str(node.config_path or ""),
                "peers": _peers(node)}

    @api.post("/peers", tags=["peers"], status_code=201)
    def add_peer(peer: PeerBody) -> list[dict[str, Any]]:
        """Add a peer: validated by the config code, written atomically, applied at once."""
        return _apply(node, lambda path: config_edit.add_peer(path, peer.model_dump()))

    @api.put("/peers/{ae_title}", tags=["peers"])
    def replace_peer(ae_title: str, peer: PeerBody) -> list[dict[str, Any]]:
        """Replace a peer (it may be renamed), keeping its place and comments in the file."""
        return _apply(node, lambda path: config_edit.replace_peer(path, ae_title, peer.model_dump()))

    @api.delete("/peers/{ae_title}", tags=["peers"])
    def remove_peer(ae_title: str) -> list[dict[str, Any]]:
        """Remove a peer; its next association is rejected (calling AE title not recognized)."""
        return _apply(node, lambda path: config_edit.remove_peer(path, ae_title))

    @api.post("/peers/reload", tags=["peers"])
    def reload_peers() -> list[dict[str, Any]]:
        """Re-read the peers from the config file (after ``dicomnode peers add`` edited it)."""
        return _apply(node, load_config)

    @api.get("/destinations", tags=["destinations"])
    def list_destinations() -> list[dict[str, Any]]:
        return [{"name": name, "ae_title": d.ae_title, "host": d.host, "port": d.port, "tls": d.tls}
                for name, d in sorted(node.config.destinations.items())]

    @api.post("/destinations/{name}/echo", tags=["destinations"])
    def echo_destination(name: str) -> EchoResult:
        """C-ECHO the destination (Verification SOP Class, PS3.4 Annex A) from our AE title."""
        return echo_named(node, name)

    @api.get("/series", tags=["series"])
    def get_series(limit: int = Query(25, ge=1, le=500)) -> list[dict[str, Any]]:
        """Recent series with QC/triage verdicts, jobs and timings."""
        return recent_series(node, limit)

    @api.get("/jobs", tags=["jobs"])
    def get_jobs(kind: JobKind | None = None, state: list[JobState] = Query(default=[]),  # noqa: B008
                 limit: int = Query(100, ge=1, le=1000)) -> list[dict[str, Any]]:
        return [_job_dict(j) for j in node.ledger.list_jobs(kind=kind, states=state, limit=limit)]

    @api.get("/dead-letters", tags=["jobs"])
    def get_dead_letters(limit: int = Query(100, ge=1, le=1000)) -> list[dict[str, Any]]:
        """Deliveries and notifications that gave up (permanent refusal or attempts exhausted)."""
        return dead_letters(node, limit)

    @api.get("/events", tags=["notify"])
    def get_events(limit: int = Query(50, ge=1, le=1000), series: str | None = None) -> list[dict[str, Any]]:
        """Notify events (finding.critical, ...) with their notifications per channel and the time
        from the last image to each acknowledgement."""
        return event_views(node.ledger, limit, series)

    @api.post("/jobs/{job_id}/retry", tags=["jobs"])
    def retry(job_id: int) -> dict[str, Any]:
        """Replay a dead or failed job now, with a fresh attempt count."""
        job = node.ledger.job(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        if not node.ledger.retry_job(job_id):
            raise HTTPException(409, f"job {job_id} is {job.state.value}, not failed or dead")
        node.audit.log("admin.job_replayed", job=job_id, kind=job.kind)
        node.executor.wake()
        return {"requeued": True, "job": job_id}

    return api


def echo_named(node: Node, name: str) -> EchoResult:
    from dicomnode.sender import echo

    destination = node.config.destinations.get(name)
    if destination is None:
        raise HTTPException(404, f"unknown destination {name!r} "
                                 f"(known: {', '.join(sorted(node.config.destinations)) or 'none'})")
    started = time.perf_counter()
    try:
        status = echo(destination, node.config.node.ae_title)
    except (DicomNodeError, OSError) as exc:
        return EchoResult(name=name, ok=False, status="", seconds=round(time.perf_counter() - started, 3),
                          error=str(exc))
    return EchoResult(name=name, ok=status == 0, status=f"0x{status:04X}" if status >= 0 else "none",
                      seconds=round(time.perf_counter() - started, 3))


# --- server ------------------------------------------------------------------------------------


class AdminServer:
    """uvicorn serving :func:`create_app` in a daemon thread; ``port`` 0 picks a free port."""

    def __init__(self, node: Node, host: str | None = None, port: int | None = None) -> None:
        settings = node.config.admin
        self.node = node
        self.host = bind_host(host if host is not None else settings.host, node.config.admin_token)
        self._wanted_port = port if port is not None else settings.port
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("the admin server is not started")
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Bind (raises OSError if the port is taken), then serve until :meth:`stop`."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self._wanted_port))
        except OSError:
            sock.close()
            raise
        self._socket = sock
        config = uvicorn.Config(create_app(self.node), log_config=None, log_level="warning",
                                access_log=False, lifespan="off", ws="none", server_header=False,
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="admin-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise OSError(f"admin server on {self.host}:{self._wanted_port} did not start")
            time.sleep(0.01)
        LOG.info("admin console on %s", self.url)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = None


# --- console (plain HTML/CSS/JS, no build step, no CDN) ---------------------------------------


def _login_page(message: str) -> str:
    from html import escape

    note = f'<p class="error" id="login-error">{escape(message)}</p>' if message else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dicomnode - sign in</title></head>
<body>
<h1>dicomnode</h1>{note}
<form method="post" action="/login">
<label>Admin token <input type="password" name="token" id="token" autocomplete="current-password"
required autofocus></label>
<button type="submit" id="login">Sign in</button>
</form></body></html>"""


CONSOLE_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dicomnode console</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/console.css"></head>
<body>
<header><h1>dicomnode <span id="ae-title"></span></h1>
<nav>
<a href="#overview" id="nav-overview">Overview</a>
<a href="#peers" id="nav-peers">Peers</a>
<a href="#destinations" id="nav-destinations">Destinations</a>
<a href="#series" id="nav-series">Series &amp; jobs</a>
<a href="#dead" id="nav-dead">Dead letters</a>
<a href="/openapi.json">API schema</a>
</nav>
<form method="post" action="/logout"><button type="submit" id="logout">Sign out</button></form>
</header>
<main>
<section id="overview">
<h2>Overview</h2>
<div class="cards">
<div class="card"><div class="label">Images / s (1 min)</div><div class="value" id="ov-rate">-</div></div>
<div class="card"><div class="label">Instances stored</div><div class="value" id="ov-instances">-</div></div>
<div class="card"><div class="label">Queue depth</div><div class="value" id="ov-queue">-</div></div>
<div class="card"><div class="label">Dead letters</div><div class="value" id="ov-dead">-</div></div>
<div class="card"><div class="label">Failed analyses</div><div class="value" id="ov-failed">-</div></div>
<div class="card"><div class="label">Time to result (median / p90)</div>
<div class="value" id="ov-ttr">-</div></div>
</div>
<h3>Jobs by state</h3>
<table id="ov-jobs"><thead><tr><th>kind</th><th>queued</th><th>running</th><th>failed (retrying)</th>
<th>succeeded</th><th>dead</th></tr></thead><tbody></tbody></table>
</section>

<section id="peers">
<h2>Peers (who may send)</h2>
<p class="hint" id="peers-file"></p>
<table id="peers-table"><thead><tr><th>AE title</th><th>hosts (empty: any)</th><th>description</th>
<th></th></tr></thead><tbody></tbody></table>
<form id="peer-form">
<h3 id="peer-form-title">Add a peer</h3>
<input type="hidden" id="peer-original">
<label>AE title <input id="peer-ae" maxlength="16" required></label>
<label>Hosts (comma separated) <input id="peer-hosts"></label>
<label>Description <input id="peer-description"></label>
<button type="submit" id="peer-save">Add</button>
<button type="button" id="peer-cancel" hidden>Cancel</button>
</form>
<pre class="error" id="peer-error"></pre>
<p class="ok" id="peer-message"></p>
</section>

<section id="destinations">
<h2>Destinations</h2>
<table id="destinations-table"><thead><tr><th>name</th><th>AE title</th><th>host</th><th>port</th>
<th>TLS</th><th>C-ECHO</th><th>result</th></tr></thead><tbody></tbody></table>
</section>

<section id="series">
<h2>Recent series</h2>
<table id="series-table"><thead><tr><th>last image</th><th>from</th><th>mod.</th><th>description</th>
<th>images</th><th>state</th><th>verdicts</th><th>time to result</th><th>notified</th></tr></thead>
<tbody></tbody></table>
<h2>Recent jobs</h2>
<table id="jobs-table"><thead><tr><th>id</th><th>kind</th><th>state</th><th>priority</th><th>tries</th>
<th>seconds</th><th>destination</th><th>error</th></tr></thead><tbody></tbody></table>
</section>

<section id="dead">
<h2>Dead letters</h2>
<p class="hint">Deliveries and notifications that gave up. Fix the destination (C-ECHO it) or the
channel (<code>dicomnode notify test NAME</code>), then replay.</p>
<table id="dead-table"><thead><tr><th>job</th><th>destination / channel</th><th>result / event</th><th>tries</th>
<th>error</th><th></th></tr></thead><tbody></tbody></table>
<p class="ok" id="dead-message"></p>
</section>
</main>
<script src="/console.js"></script>
</body></html>
"""

CONSOLE_CSS = """
body { font-family: system-ui, sans-serif; margin: 0; color: #1d2330; background: #f5f6f8; }
header { display: flex; align-items: center; gap: 2rem; background: #1d2330; color: #fff;
         padding: .5rem 1rem; }
header h1 { font-size: 1.2rem; margin: 0; }
header nav a { color: #cfe0ff; margin-right: 1rem; text-decoration: none; }
header nav a.active { color: #fff; font-weight: bold; border-bottom: 2px solid #fff; }
header form { margin-left: auto; }
main { padding: 1rem 1.5rem; }
section { display: none; }
section.active { display: block; }
.cards { display: flex; flex-wrap: wrap; gap: 1rem; }
.card { background: #fff; border-radius: 6px; padding: .8rem 1rem; min-width: 11rem;
        box-shadow: 0 1px 2px rgba(0,0,0,.15); }
.card .label { font-size: .8rem; color: #5a6170; }
.card .value { font-size: 1.6rem; font-weight: 600; }
table { border-collapse: collapse; background: #fff; margin: .5rem 0 1rem; min-width: 40rem; }
th, td { border-bottom: 1px solid #e1e4ea; padding: .3rem .6rem; text-align: left; font-size: .9rem; }
th { background: #eef0f4; }
form label { display: inline-block; margin-right: 1rem; }
.error { color: #b00020; white-space: pre-wrap; }
.ok { color: #1b7a34; }
.hint { color: #5a6170; }
.verdict { display: inline-block; border-radius: 3px; padding: 0 .3rem; margin: 0 .2rem .1rem 0;
           background: #e6ecf7; }
.verdict.failed, .verdict.stat { background: #fbe0e3; }
.verdict.complete { background: #e2f4e6; }
"""

CONSOLE_JS = r"""
"use strict";
// Built with DOM nodes and textContent only: series descriptions come from DICOM headers.
const HEADERS = {"X-Dicomnode-Console": "1"};

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "onclick") node.addEventListener("click", v); else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}
function when(ts) { return ts ? new Date(ts * 1000).toLocaleString() : "-"; }
function secs(s) { return s === null || s === undefined ? "-" : Number(s).toFixed(1) + " s"; }

async function api(method, path, body) {
  const init = {method, headers: {...HEADERS}, credentials: "same-origin"};
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) { location.reload(); throw new Error("signed out"); }
  const data = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) {
    const detail = data && data.detail;
    const text = d => typeof d === "string" ? d : JSON.stringify(d);
    throw new Error(Array.isArray(detail) ? detail.map(text).join("\n") : (detail || response.statusText));
  }
  return data;
}
function fill(tableId, rows) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(...rows);
}

async function loadOverview() {
  const o = await api("GET", "/api/overview");
  document.getElementById("ae-title").textContent = o.ae_title;
  document.getElementById("ov-rate").textContent = o.images_per_second.toFixed(2);
  document.getElementById("ov-instances").textContent = o.instances;
  document.getElementById("ov-queue").textContent = o.queue_depth;
  document.getElementById("ov-dead").textContent = o.dead_letters;
  document.getElementById("ov-failed").textContent = o.failed_analyses;
  const t = o.time_to_result;
  document.getElementById("ov-ttr").textContent = t.count ? `${secs(t.median_s)} / ${secs(t.p90_s)}` : "-";
  fill("ov-jobs", Object.entries(o.jobs).map(([kind, s]) =>
    el("tr", {}, el("td", {}, kind), el("td", {}, s.queued), el("td", {}, s.running), el("td", {}, s.failed),
       el("td", {}, s.succeeded), el("td", {}, s.dead))));
}

function resetPeerForm() {
  document.getElementById("peer-form").reset();
  document.getElementById("peer-original").value = "";
  document.getElementById("peer-form-title").textContent = "Add a peer";
  document.getElementById("peer-save").textContent = "Add";
  document.getElementById("peer-cancel").hidden = true;
}
function editPeer(p) {
  document.getElementById("peer-original").value = p.ae_title;
  document.getElementById("peer-ae").value = p.ae_title;
  document.getElementById("peer-hosts").value = p.hosts.join(", ");
  document.getElementById("peer-description").value = p.description;
  document.getElementById("peer-form-title").textContent = `Edit ${p.ae_title}`;
  document.getElementById("peer-save").textContent = "Save";
  document.getElementById("peer-cancel").hidden = false;
}
async function removePeer(ae) {
  if (!confirm(`Remove peer ${ae}? Its next association will be rejected.`)) return;
  await peerChange(() => api("DELETE", `/api/peers/${encodeURIComponent(ae)}`), `Removed ${ae}.`);
}
async function peerChange(action, message) {
  const error = document.getElementById("peer-error");
  const done = document.getElementById("peer-message");
  error.textContent = ""; done.textContent = "";
  try { await action(); done.textContent = message; resetPeerForm(); await loadPeers(); }
  catch (e) { error.textContent = e.message; }
}
async function loadPeers() {
  const data = await api("GET", "/api/peers");
  document.getElementById("peers-file").textContent = data.editable
    ? `Saved to ${data.config_path} and applied at once.`
    : "This node runs without a config file: read only.";
  fill("peers-table", data.peers.map(p => el("tr", {"data-ae": p.ae_title},
    el("td", {}, p.ae_title), el("td", {}, p.hosts.join(", ")), el("td", {}, p.description),
    el("td", {},
       el("button", {type: "button", id: `edit-${p.ae_title}`, onclick: () => editPeer(p)}, "Edit"), " ",
       el("button", {type: "button", id: `remove-${p.ae_title}`, onclick: () => removePeer(p.ae_title)},
          "Remove")))));
}
document.getElementById("peer-form").addEventListener("submit", ev => {
  ev.preventDefault();
  const original = document.getElementById("peer-original").value;
  const body = {
    ae_title: document.getElementById("peer-ae").value,
    hosts: document.getElementById("peer-hosts").value.split(",").map(h => h.trim()).filter(h => h),
    description: document.getElementById("peer-description").value,
  };
  peerChange(() => original ? api("PUT", `/api/peers/${encodeURIComponent(original)}`, body)
                            : api("POST", "/api/peers", body),
             original ? `Saved ${body.ae_title}.` : `Added ${body.ae_title}.`);
});
document.getElementById("peer-cancel").addEventListener("click", resetPeerForm);

async function echo(name) {
  const cell = document.getElementById(`echo-result-${name}`);
  cell.textContent = "...";
  try {
    const r = await api("POST", `/api/destinations/${encodeURIComponent(name)}/echo`);
    cell.textContent = r.ok ? `OK ${r.status} in ${secs(r.seconds)}` : `FAILED ${r.status} ${r.error}`;
    cell.className = r.ok ? "ok" : "error";
  } catch (e) { cell.textContent = e.message; cell.className = "error"; }
}
async function loadDestinations() {
  const rows = await api("GET", "/api/destinations");
  fill("destinations-table", rows.map(d => el("tr", {},
    el("td", {}, d.name), el("td", {}, d.ae_title), el("td", {}, d.host), el("td", {}, d.port),
    el("td", {}, d.tls ? "yes" : "no"),
    el("td", {},
       el("button", {type: "button", id: `echo-${d.name}`, onclick: () => echo(d.name)}, "Test (C-ECHO)")),
    el("td", {id: `echo-result-${d.name}`}))));
}

function verdicts(results) {
  const seen = new Map();
  for (const r of results) if (!seen.has(r.analyzer)) seen.set(r.analyzer, r);
  return [...seen.values()].map(r => {
    const found = (r.findings || []).filter(f => f.present).map(f => f.type);
    const text = `${r.analyzer}: ${r.status ?? "?"}` + (r.priority ? ` (${r.priority})` : "")
               + (found.length ? ` - ${found.join(", ")}` : "") + (r.error ? ` - ${r.error}` : "");
    const cls = `verdict ${r.status ?? ""} ${r.priority ?? ""}`;
    return el("span", {class: cls, title: r.sop_instance_uid}, text);
  });
}
function notified(events) {
  // one line per event: its type, then each channel with the time from the last image to its ACK
  return (events || []).map(e => el("div", {class: `event ${e.type.replace(".", "-")}`, title: e.id},
    `${e.type}: ` + e.notifications.map(n => `${n.channel} ` + (n.time_to_notification_s !== null
      ? secs(n.time_to_notification_s) : n.state)).join(", ")));
}
async function loadSeries() {
  const [series, jobs] = await Promise.all([api("GET", "/api/series?limit=25"),
                                            api("GET", "/api/jobs?limit=50")]);
  fill("series-table", series.map(s => el("tr", {title: s.series_instance_uid},
    el("td", {}, when(s.last_received_at)), el("td", {}, s.calling_ae), el("td", {}, s.modality),
    el("td", {}, s.series_description), el("td", {}, s.instances),
    el("td", {}, `${s.state} (epoch ${s.epoch})`),
    el("td", {}, ...verdicts(s.results)), el("td", {}, secs(s.time_to_result_s)),
    el("td", {class: "notified"}, ...notified(s.events)))));
  fill("jobs-table", jobs.map(j => el("tr", {},
    el("td", {}, j.id), el("td", {}, j.kind), el("td", {}, j.state), el("td", {}, j.priority),
    el("td", {}, `${j.attempts}/${j.max_attempts}`), el("td", {}, secs(j.seconds)),
    el("td", {}, j.destination ?? ""), el("td", {}, j.last_error))));
}

async function replay(id) {
  const message = document.getElementById("dead-message");
  try {
    await api("POST", `/api/jobs/${id}/retry`);
    message.className = "ok";
    message.textContent = `Job ${id} requeued.`;
  }
  catch (e) { message.className = "error"; message.textContent = e.message; }
  await loadDead();
}
async function loadDead() {
  const rows = await api("GET", "/api/dead-letters");
  fill("dead-table", rows.map(j => el("tr", {},
    el("td", {}, j.id), el("td", {}, j.destination ?? j.channel ?? ""),
    el("td", {}, j.kind === "notify" ? (j.event ? `${j.event.type} ${j.event.analyzer}` : "(missing)")
                 : (j.result ? `${j.result.kind} ${j.result.analyzer}` : "(missing)")),
    el("td", {}, j.attempts), el("td", {}, j.last_error),
    el("td", {},
       el("button", {type: "button", id: `replay-${j.id}`, onclick: () => replay(j.id)}, "Replay")))));
}

const PAGES = {overview: loadOverview, peers: loadPeers, destinations: loadDestinations, series: loadSeries,
               dead: loadDead};
function show() {
  const page = (location.hash || "#overview").slice(1);
  const name = PAGES[page] ? page : "overview";
  for (const s of document.querySelectorAll("main section")) s.classList.toggle("active", s.id === name);
  for (const a of document.querySelectorAll("header nav a")) {
    a.classList.toggle("active", a.id === `nav-${name}`);
  }
  PAGES[name]().catch(e => console.error(e));
  return name;
}
window.addEventListener("hashchange", show);
show();
loadOverview().catch(() => {});
setInterval(() => {
  const page = (location.hash || "#overview").slice(1);
  if (page === "overview" || page === "series" || page === "dead") PAGES[page]().catch(() => {});
}, 5000);
"""
