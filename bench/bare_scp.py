"""A bare pynetdicom Storage SCP, the reference for what pynetdicom itself costs.

``fsync`` mode writes each data set as received to ``<folder>/<SOP Instance UID>``, fsyncs it and
answers Success; ``null`` mode answers Success without writing anything. Nothing else: no header
parsing, no File Meta, no directory fsync, no index, no log line. It has the same free settings as
dicomnode's receiver (pynetdicom's per-PDU event loggers unbound, TCP_NODELAY, a 4 MiB maximum
PDU) so that the difference to dicomnode is dicomnode's own work.

Usage: ``python3 bench/bare_scp.py PORT FOLDER [--mode fsync|null] [--ae BARE]``
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--mode", choices=["fsync", "null"], default="fsync")
    parser.add_argument("--ae", default="BARE")
    args = parser.parse_args(argv)

    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE, AllStoragePresentationContexts, _config, evt

    _config.LOG_HANDLER_LEVEL = "none"
    folder: Path = args.folder
    folder.mkdir(parents=True, exist_ok=True)
    fsync = args.mode == "fsync"

    def on_requested(event: Any) -> None:
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_store(event: Any) -> int:
        if fsync:
            data = event.request.DataSet.getvalue()
            fd = os.open(folder / str(event.request.AffectedSOPInstanceUID),
                         os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        return 0x0000

    ae = AE(ae_title=args.ae)
    ae.maximum_pdu_size = 4_194_304
    ae.maximum_associations = 64
    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
    ae.add_supported_context("1.2.840.10008.1.1", syntaxes)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, syntaxes)
    # Every thread started from here on inherits the block: the main thread takes the stop signals
    # itself (sigwait), rather than a handler setting an Event that a signal handed to another thread
    # never wakes (see dicomnode.jobs.StopRequest, which the bare reference does not import).
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    server = ae.start_server(("127.0.0.1", args.port), block=False,
                             evt_handlers=[(evt.EVT_REQUESTED, on_requested), (evt.EVT_C_STORE, on_store)])
    print(f"bare pynetdicom SCP ({args.mode}) on 127.0.0.1:{args.port}", flush=True)
    signal.sigwait(stop_signals)
    assert server is not None
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
