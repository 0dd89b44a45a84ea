"""A scripted webhook receiver for tests: a real uvicorn HTTP server in a separate process.

``python tests/webhook_receiver.py --secret S --record FILE --script 200,503:2,429,400,hang`` binds
127.0.0.1 on a free port, prints ``LISTENING <port>``, and for each POST:

1. verifies ``X-Dicomnode-Signature`` (``sha256=`` HMAC-SHA256 of ``timestamp + "." + body`` with the
   shared secret) and that ``X-Dicomnode-Timestamp`` is within ``--window`` seconds of its clock;
   a request failing either is answered 401 and recorded as such;
2. answers with the next behaviour of the script (then ``--default``): a status code (``200``,
   ``429``, ``400`` ...), ``503:N`` (503 with ``Retry-After: N``), or ``hang`` (no answer until the
   client gives up).

Every request is recorded as one JSON line (headers, parsed body, verdicts, answer) in ``--record``
before it is answered. :class:`WebhookReceiver` runs it from a test.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from procs import RecordingReceiver


def make_app(secret: str, record: Path, script: list[str], default: str, window: float) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        timestamp = headers.get("x-dicomnode-timestamp", "")
        expected = "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        signature_ok = hmac.compare_digest(expected, headers.get("x-dicomnode-signature", ""))
        try:
            timestamp_ok = abs(time.time() - int(timestamp)) <= window
        except ValueError:
            timestamp_ok = False
        behaviour = "401" if not (signature_ok and timestamp_ok) else (script.pop(0) if script else default)
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        entry = {"method": scope["method"], "path": scope["path"], "headers": headers, "body": parsed,
                 "raw": body.decode("utf-8", errors="replace"), "signature_ok": signature_ok,
                 "timestamp_ok": timestamp_ok, "answer": behaviour, "at": time.time()}
        with record.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if behaviour == "hang":
            while (await receive())["type"] != "http.disconnect":
                pass
            return
        status, _, retry_after = behaviour.partition(":")
        extra = [(b"retry-after", retry_after.encode())] if retry_after else []
        await send({"type": "http.response.start", "status": int(status),
                    "headers": [(b"content-type", b"text/plain"), *extra]})
        await send({"type": "http.response.body", "body": b"ok" if status.startswith("2") else b"no"})

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--secret", required=True)
    parser.add_argument("--record", required=True)
    parser.add_argument("--script", default="")
    parser.add_argument("--default", default="200")
    parser.add_argument("--window", type=float, default=300.0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(128)  # connections wait in the backlog until uvicorn serves them
    app = make_app(args.secret, Path(args.record), [s for s in args.script.split(",") if s], args.default,
                   args.window)
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    print(f"LISTENING {sock.getsockname()[1]}", flush=True)
    asyncio.run(server.serve(sockets=[sock]))


class WebhookReceiver(RecordingReceiver):
    """The receiver as a child process of a test; ``stop()`` ends it."""

    kind = "webhook receiver"

    def __init__(self, folder: Path, secret: str, script: list[str] = (),  # type: ignore[assignment]
                 default: str = "200", window: float = 300.0, port: int = 0) -> None:
        self.secret = secret
        super().__init__(folder, "webhook", [__file__, "--secret", secret, "--script", ",".join(script),
                                             "--default", default, "--window", str(window), "--port", str(port)])
        self.url = f"http://127.0.0.1:{self.port}/hook"

    def requests(self) -> list[dict[str, Any]]:
        return self.entries()

    def channel(self, **extra: Any) -> dict[str, Any]:
        return {"kind": "webhook", "url": self.url, "secret": self.secret, "timeout_s": 2.0, **extra}


if __name__ == "__main__":
    main()
