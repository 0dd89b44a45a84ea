"""A scripted HL7 MLLP listener for tests, built on the ``hl7`` library's asyncio MLLP server.

Run as a separate process (``python tests/mllp_listener.py --record FILE --script AA,none,...``): it
binds 127.0.0.1 on a free port, prints ``LISTENING <port>``, and answers each complete message with
the next behaviour of the script (then ``--default``):

``AA`` ``AE`` ``AR`` ``CA`` ``CE`` ``CR``  an ACK with that MSA-1 code (MSA-2 = the message's MSH-10)
``none``                                    no answer: the connection is held until the client goes
``close``                                   half an ACK frame (no end block), then the connection closes
``wrongid``                                 an ``AA`` that answers another MSH-10

Every message is recorded as one JSON line in ``--record`` (MSH-10, MSH-9, MSH-11, the raw text, the
answer), before the answer is sent. :class:`MllpListener` runs it from a test and reads the record.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import time
from pathlib import Path
from typing import Any

from procs import RecordingReceiver

ACK_CODES = ("AA", "AE", "AR", "CA", "CE", "CR")


def _record(path: Path, entry: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


async def _serve(args: argparse.Namespace) -> None:
    import hl7
    from hl7.mllp import start_hl7_server

    script = [s for s in args.script.split(",") if s]
    record = Path(args.record)
    tls = None
    if args.cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.cert, args.key)
        if args.ca:
            tls.load_verify_locations(args.ca)
            tls.verify_mode = ssl.CERT_REQUIRED

    async def client(reader: Any, writer: Any) -> None:
        try:
            while True:
                try:
                    message = await reader.readmessage()
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                behaviour = script.pop(0) if script else args.default
                msh = message.segment("MSH")
                control_id = str(msh(10))
                _record(record, {"control_id": control_id, "type": str(msh(9)), "processing_id": str(msh(11)),
                                 "text": str(message), "answer": behaviour, "at": time.time()})
                if behaviour in ACK_CODES:
                    writer.writemessage(message.create_ack(behaviour, message_id=f"ACK{control_id}"[:20]))
                elif behaviour == "wrongid":
                    ack = message.create_ack("AA", message_id="ACKX")
                    ack.segment("MSA")[2] = "SOMETHING-ELSE"
                    writer.writemessage(ack)
                elif behaviour == "close":
                    writer.write(b"\x0bMSH|^~\\&|LISTENER||||20260101||ACK^R01^ACK|X|P|2.5.1\rMSA|A")
                    await writer.drain()
                    writer.close()
                    return
                elif behaviour == "none":
                    await reader.read()  # hold until the client closes or gives up
                    return
                else:
                    raise SystemExit(f"unknown behaviour {behaviour!r}")
                await writer.drain()
        finally:
            writer.close()

    server = await start_hl7_server(client, "127.0.0.1", args.port, encoding="utf-8", ssl=tls)
    port = server.sockets[0].getsockname()[1]
    print(f"LISTENING {port}", flush=True)
    _ = hl7  # imported for the parser the streams use
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--record", required=True)
    parser.add_argument("--script", default="")
    parser.add_argument("--default", default="AA")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--ca")
    asyncio.run(_serve(parser.parse_args()))


class MllpListener(RecordingReceiver):
    """The listener as a child process of a test; ``stop()`` ends it (and it ends with the test)."""

    kind = "MLLP listener"

    def __init__(self, folder: Path, script: list[str] = (), default: str = "AA",  # type: ignore[assignment]
                 tls: tuple[Path, Path, Path | None] | None = None, port: int = 0) -> None:
        command = [__file__, "--script", ",".join(script), "--default", default, "--port", str(port)]
        if tls is not None:
            command += ["--cert", str(tls[0]), "--key", str(tls[1])]
            if tls[2] is not None:
                command += ["--ca", str(tls[2])]
        super().__init__(folder, "mllp", command)

    def messages(self) -> list[dict[str, Any]]:
        return self.entries()

    def channel(self, **extra: Any) -> dict[str, Any]:
        return {"kind": "hl7", "host": "127.0.0.1", "port": self.port, "timeout_s": 2.0, **extra}


if __name__ == "__main__":
    main()
