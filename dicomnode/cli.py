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
from typing import Any

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


def _ledger(args: argparse.Namespace) -> Any:
    from dicomnode.ledger import Ledger

    config = _load(args.config)
    path = config.node.data_dir.resolve() / "ledger.sqlite3"
    if not path.exists():
        raise SystemExit(f"no ledger at {path}: has the node run with this config?")
    return Ledger.sqlite(str(path))


def _when(ts: float | None) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def cmd_jobs(args: argparse.Namespace) -> int:
    from dicomnode.domain import JobKind, JobState

    ledger = _ledger(args)
    if args.action == "retry":
        if args.id is None:
            print("usage: dicomnode jobs retry ID", file=sys.stderr)
            return 2
        ok = ledger.retry_job(args.id)
        print(f"job {args.id} requeued" if ok else f"job {args.id} is not failed or dead")
        return 0 if ok else 1
    states = [JobState(s) for s in args.state] if args.state else []
    kind = JobKind(args.kind) if args.kind else None
    rows = ledger.list_jobs(kind=kind, states=states, limit=args.limit)
    print(f"{'ID':>6} {'KIND':8} {'STATE':9} {'PRIO':7} {'TRIES':>5} {'CREATED':19} {'SERIES / ERROR'}")
    for j in rows:
        detail = j.last_error or j.series_instance_uid
        print(f"{j.id:>6} {j.kind:8} {j.state:9} {j.priority.name.lower():7} {j.attempts:>5} "
              f"{_when(j.created_at):19} {detail}")
    return 0


def cmd_series(args: argparse.Namespace) -> int:
    ledger = _ledger(args)
    print(f"{'STATE':9} {'EPOCH':>5} {'IMAGES':>6} {'MOD':4} {'FROM':16} {'LAST IMAGE':19} SERIES")
    for s in ledger.recent_series(args.limit):
        print(f"{s.state:9} {s.epoch:>5} {s.instance_count:>6} {s.modality:4} {s.calling_ae:16} "
              f"{_when(s.last_received_at):19} {s.series_instance_uid} {s.series_description}")
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from dicomnode.domain import JobKind

    ledger = _ledger(args)
    if args.action == "retry":
        if args.id is None:
            print("usage: dicomnode results retry ID", file=sys.stderr)
            return 2
        ok = ledger.retry_job(args.id)
        print(f"delivery {args.id} requeued" if ok else f"delivery {args.id} is not failed or dead")
        return 0 if ok else 1
    print(f"{'ID':>6} {'STATE':9} {'TRIES':>5} {'DEST':10} {'KIND':4} {'ANALYZER':18} RESULT / ERROR")
    for j in ledger.list_jobs(kind=JobKind.DELIVER, limit=args.limit):
        row = ledger.result(int(j.payload["result_id"]))
        what = f"{row.kind:4} {row.analyzer:18} {row.sop_instance_uid}" if row else "? ? (missing)"
        print(f"{j.id:>6} {j.state:9} {j.attempts:>5} {j.payload['destination']:10} {what}"
              + (f"  {j.last_error}" if j.last_error else ""))
    return 0


def cmd_rules_test(args: argparse.Namespace) -> int:
    """Dry-run the rules on DICOM files: which rule matches each series and why."""
    from dicomnode.domain import SeriesSummary
    from dicomnode.models import build_registry
    from dicomnode.receiver import parse_header, routing_fields
    from dicomnode.routing import explain_all, plan_for

    config = _load(args.config)
    registry = build_registry(config.analysis)
    target = Path(args.path)
    files = sorted(p for p in (target.rglob("*") if target.is_dir() else [target]) if p.is_file())
    groups: dict[str, list[Any]] = {}
    for path in files:
        try:
            ds = parse_header(path.read_bytes())
        except Exception as exc:
            print(f"{path}: skipped ({exc})")
            continue
        groups.setdefault(str(ds.get("SeriesInstanceUID", "?")), []).append(ds)
    for series_uid, datasets in groups.items():
        first = datasets[0]
        fields = routing_fields(first)
        summary = SeriesSummary(
            series_instance_uid=series_uid, study_instance_uid=str(first.get("StudyInstanceUID", "")),
            epoch=1, modality=fields["modality"],
            sop_class_uids=tuple(sorted({str(d.SOPClassUID) for d in datasets})),
            body_part=fields["body_part"], series_description=fields["series_description"],
            study_description=fields["study_description"], calling_ae=args.calling_ae,
            instance_count=len(datasets),
            image_types=tuple(sorted({routing_fields(d)["image_type"] for d in datasets} - {""})),
        )
        print(f"series {series_uid} ({summary.modality}, {len(datasets)} images, "
              f"{summary.series_description!r})")
        for name, matched, reasons in explain_all(summary, config):
            print(f"  {'MATCH' if matched else 'no   '} {name}: {'; '.join(reasons)}")
        plan = plan_for(summary, config, registry.default_for)
        if plan is None:
            print("  => not processed: no rule matches")
        else:
            print(f"  => rule {plan.rule}: analyzers {list(plan.analyzers)}, destinations "
                  f"{list(plan.destinations)}, priority {plan.priority.name.lower()}, "
                  f"quiet period {plan.quiet_period_s}s")
    return 0


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

    p = sub.add_parser("jobs", help="list jobs, or retry one")
    p.add_argument("action", nargs="?", choices=["list", "retry"], default="list")
    p.add_argument("id", nargs="?", type=int)
    p.add_argument("--state", action="append", choices=["queued", "running", "succeeded", "failed", "dead"])
    p.add_argument("--kind", choices=["analyze", "deliver"])
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--config")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("series", help="recent series with state and counts")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--config")
    p.set_defaults(func=cmd_series)

    p = sub.add_parser("results", help="list result deliveries, or retry one")
    p.add_argument("action", nargs="?", choices=["list", "retry"], default="list")
    p.add_argument("id", nargs="?", type=int)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--config")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("rules", help="rules tools")
    rules = p.add_subparsers(dest="rules_command", required=True)
    p = rules.add_parser("test", help="dry-run the rules on DICOM files and say which matches and why")
    p.add_argument("path")
    p.add_argument("--calling-ae", default="", help="pretend the files came from this AE title")
    p.add_argument("--config")
    p.set_defaults(func=cmd_rules_test)

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
