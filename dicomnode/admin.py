"""The admin server: operator console, REST API and Prometheus metrics, served by the node itself.

A FastAPI application (:func:`create_app`) run by uvicorn in a thread (:class:`AdminServer`), started
and stopped with the :class:`~dicomnode.node.Node`. The REST API lives in :mod:`dicomnode.api` (it
reads the ledger, tests destinations with C-ECHO, replays dead letters and edits the accepted peers);
the console is plain HTML, JavaScript and CSS in ``dicomnode/console/``, served as static files.
This module adds authentication, security headers, ``/healthz``, ``/metrics`` and the server thread.

Security (documented in docs/operate.md):

* A token (``admin.token``, overridden by ``DICOMNODE_ADMIN_TOKEN``) protects everything but
  ``/healthz`` and the login form: API clients send ``Authorization: Bearer <token>``; the console
  logs in with a plain HTML form that sets an HttpOnly, SameSite=Strict session cookie (an HMAC of
  the token, never the token itself). Unsafe requests authenticated by the cookie must also carry
  the ``X-Dicomnode-Console`` header, which a cross-site form cannot send.
* ``/metrics`` is protected like the API: a Prometheus scrape job sends the token with
  ``authorization: {credentials_file: ...}``. Counts of studies and AE titles are operational data.
* Without a token the server binds only to loopback (whatever ``admin.host`` says) and logs so. A
  blank token is no token: the config refuses one, and a blank ``DICOMNODE_ADMIN_TOKEN`` is ignored.
* No CDN, no inline script: the console is served from here with ``Content-Security-Policy:
  default-src 'self'``; FastAPI's Swagger page (which loads from a CDN) is off, the OpenAPI schema
  is at ``/openapi.json``.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.resources
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from html import escape
from urllib.parse import parse_qs

import sqlalchemy as sa
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from dicomnode.api import NodeView, api_router
from dicomnode.metrics import CONTENT_TYPE

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
    if token is not None and not token.strip():
        token = None  # a blank token protects nothing
    if token is None and not is_loopback(host):
        LOG.warning("admin: no token configured (admin.token or DICOMNODE_ADMIN_TOKEN); the console "
                    "listens on 127.0.0.1 only, not on %s", host)
        return "127.0.0.1"
    if token is None:
        LOG.warning("admin: no token configured; the console on %s is open to every local user", host)
    return host


class _Auth:
    def __init__(self, token: str | None) -> None:
        self.token = token if token and token.strip() else None
        self.session = session_value(self.token) if self.token else None

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


class _Protected:
    """An ASGI app (the console's static files) behind the token: mounted apps do not run route
    dependencies, so the check is made here."""

    def __init__(self, app: ASGIApp, auth: _Auth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.auth.allowed(Request(scope)):
            denied = JSONResponse({"detail": "missing or wrong token"}, status_code=401,
                                  headers={"WWW-Authenticate": "Bearer"})
            await denied(scope, receive, send)
            return
        await self.app(scope, receive, send)


# --- console files (plain HTML/CSS/JS in dicomnode/console/: no build step, no CDN) ---------------

CONSOLE_PACKAGE = ("dicomnode", "console")


def console_file(name: str) -> str:
    """A file of the console, read from the installed package."""
    return importlib.resources.files(CONSOLE_PACKAGE[0]).joinpath(CONSOLE_PACKAGE[1], name).read_text("utf-8")


def _login_page(message: str) -> str:
    note = f'<p class="error" id="login-error">{escape(message)}</p>' if message else ""
    return console_file("login.html").replace("<!-- message -->", note)


# --- application -------------------------------------------------------------------------------


def create_app(node: NodeView) -> FastAPI:
    """The admin application for ``node``; the token is read once, here."""
    auth = _Auth(node.config.admin_token)
    console_html = console_file("index.html")
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
        return HTMLResponse(console_html)

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
    app.mount("/console", _Protected(StaticFiles(packages=[CONSOLE_PACKAGE]), auth), name="console")

    @app.get("/metrics", tags=["metrics"], dependencies=protected, response_class=PlainTextResponse)
    def metrics() -> Response:
        """Prometheus text exposition (see dicomnode.metrics for the metric names)."""
        return Response(node.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/openapi.json", include_in_schema=False, dependencies=protected)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    app.include_router(api_router(node), dependencies=protected)
    return app


# --- server ------------------------------------------------------------------------------------


class AdminServer:
    """uvicorn serving :func:`create_app` in a daemon thread; ``port`` 0 picks a free port."""

    def __init__(self, node: NodeView, host: str | None = None, port: int | None = None) -> None:
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
