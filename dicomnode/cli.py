"""Command line: ``dicomnode serve | check-config | echo | ...``.

Exit codes: 0 success, 1 operation failed, 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from dicomnode.config import DEFAULT_CONFIG_PATH, Config, load_config
from dicomnode.errors import ConfigError

Command = Callable[[argparse.Namespace], int]


def _load(path: str | None) -> Config:
    return load_config(path if path is not None else DEFAULT_CONFIG_PATH)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = _load(args.file)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{exc.source}: {problem}" if exc.source else problem)
        return 2
    print(f"{args.file or DEFAULT_CONFIG_PATH}: ok ({len(config.peers)} peers, "
          f"{len(config.destinations)} destinations, {len(config.rules)} rules)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dicomnode.node import Node

    config = _load(args.config)
    node = Node(config, Path(args.config) if args.config else DEFAULT_CONFIG_PATH)
    stop = threading.Event()

    def _signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    node.start()
    n = config.node
    print(f"dicomnode {n.ae_title} listening on {n.host}:{n.port} (data in {node.data_dir})", flush=True)
    stop.wait()
    node.stop()
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=args.calling_ae)
    ae.add_requested_context(Verification)
    assoc = ae.associate(args.host, args.port, ae_title=args.called_ae)
    if not assoc.is_established:
        print(f"association with {args.called_ae}@{args.host}:{args.port} failed")
        return 1
    status = assoc.send_c_echo()
    assoc.release()
    code = int(status.Status) if status else -1
    print(f"C-ECHO status 0x{code:04X}" if code >= 0 else "no response")
    return 0 if code == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomnode", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the node")
    p.add_argument("--config", help=f"config file (default: {DEFAULT_CONFIG_PATH})")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate a config file; one line per problem")
    p.add_argument("file", nargs="?")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("echo", help="C-ECHO a DICOM node")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--called-ae", default="ANY-SCP")
    p.add_argument("--calling-ae", default="DICOMNODE")
    p.set_defaults(func=cmd_echo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        func: Command = args.func
        return func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{exc.source}: {problem}" if exc.source else problem, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
