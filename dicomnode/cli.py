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
from typing import TYPE_CHECKING, Any

from dicomnode.config import DEFAULT_CONFIG_PATH, Config, load_config
from dicomnode.errors import ConfigError

if TYPE_CHECKING:  # the ledger pulls in SQLAlchemy: imported lazily by the commands that need it
    from dicomnode.ledger import Ledger

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
    if node.admin is not None:
        print(f"admin console on {node.admin.url}", flush=True)
    stop.wait()
    node.stop()
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from pynetdicom import AE

    from dicomnode.receiver import VERIFICATION_SOP_CLASS
    
    ae = AE(ae_title=args.calling_ae)
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
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


def _retry(ledger: Ledger, job_id: int | None, command: str, noun: str) -> int:
    """Requeue a failed or dead job (an analysis, or a delivery of one result)."""
    if job_id is None:
        print(f"usage: dicomnode {command} retry ID", file=sys.stderr)
        return 2
    ok = ledger.retry_job(job_id)
    print(f"{noun} {job_id} requeued" if ok else f"{noun} {job_id} is not failed or dead")
    return 0 if ok else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    from dicomnode.domain import JobKind, JobState

    ledger = _ledger(args)
    if args.action == "retry":
        return _retry(ledger, args.id, "jobs", "job")
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
        return _retry(ledger, args.id, "results", "delivery")
    print(f"{'ID':>6} {'STATE':9} {'TRIES':>5} {'DEST':10} {'KIND':4} {'ANALYZER':18} RESULT / ERROR")
    for j in ledger.list_jobs(kind=JobKind.DELIVER, limit=args.limit):
        row = ledger.result(int(j.payload["result_id"]))
        what = f"{row.kind:4} {row.analyzer:18} {row.sop_instance_uid}" if row else "? ? (missing)"
        print(f"{j.id:>6} {j.state:9} {j.attempts:>5} {j.payload['destination']:10} {what}"
              + (f"  {j.last_error}" if j.last_error else ""))
    return 0


def cmd_notify(args: argparse.Namespace) -> int:
    """Events and their notifications per channel, with the time from the last image to each
    acknowledgement; ``retry ID`` requeues a dead notification; ``test NAME`` sends a test event."""
    if args.action == "test":
        return _notify_test(args)
    ledger = _ledger(args)
    if args.action == "retry":
        return _retry(ledger, int(args.target) if args.target and args.target.isdigit() else None, "notify",
                      "notification")
    from dicomnode.notify import event_views

    print(f"{'EVENT':20} {'TYPE':17} {'WHEN':19} {'EPOCH':>5} {'VERDICT':17} {'ANALYZER':18} SERIES")
    for e in event_views(ledger, args.limit):
        change = f" (was {e['previous_verdict']})" if e["verdict_changed"] else ""
        print(f"{e['id']:20} {e['type']:17} {_when(e['created_at']):19} {e['epoch']:>5} "
              f"{(e['verdict'] + change):17} {e['analyzer']:18} {e['series_instance_uid']}")
        for n in e["notifications"]:
            took = n["time_to_notification_s"]
            when = f"{took:.2f} s after last image" if took is not None else "-"
            detail = n["response"] if n["acked_at"] is not None else n["last_error"]
            print(f"{'':20}   job {n['job_id'] or '-':>5} {n['channel']:12} {n['kind']:7} {n['state'] or '-':9} "
                  f"tries {n['attempts'] or 0}  {when}  {detail}")
    return 0


def _notify_test(args: argparse.Namespace) -> int:
    from dicomnode.errors import Permanent, Transient
    from dicomnode.notify import send_test

    config = _load(args.config)
    if not args.target or args.target not in config.notify:
        known = ", ".join(sorted(config.notify)) or "none"
        print(f"usage: dicomnode notify test NAME (channels: {known})", file=sys.stderr)
        return 2
    try:
        event, outcome = send_test(args.target, config)
    except (Transient, Permanent) as exc:
        print(f"{args.target}: test event NOT delivered: {exc}")
        return 1
    if isinstance(outcome, str):
        print(f"{args.target}: {outcome}")
    else:
        print(f"{args.target}: test event {event.id} delivered in {outcome.acked_at - outcome.sent_at:.3f} s "
              f"({outcome.response})")
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


# --- operate: peers, destinations, send, status (docs/operate.md) ------------------------------


def _admin_call(config: Config, method: str, path: str) -> tuple[int, Any]:
    """Call the running node's admin API (loopback when it listens on every address). Returns
    (HTTP status, parsed JSON); raises OSError when no node answers."""
    import json
    import urllib.error
    import urllib.request

    host = config.admin.host
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{'[' + host + ']' if ':' in host else host}:{config.admin.port}{path}"
    request = urllib.request.Request(url, method=method, data=b"" if method != "GET" else None)
    if config.admin_token:
        request.add_header("Authorization", f"Bearer {config.admin_token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, None
    except urllib.error.URLError as exc:
        raise OSError(str(exc.reason)) from None


def cmd_peers(args: argparse.Namespace) -> int:
    """List, add or remove accepted peers; a running node is told to reload them at once."""
    from dicomnode import config_edit

    path = Path(args.config) if args.config else DEFAULT_CONFIG_PATH
    if args.action == "list":
        config = load_config(path)
        print(f"{'AE TITLE':16} {'HOSTS':30} DESCRIPTION")
        for peer in config.peers:
            print(f"{peer.ae_title:16} {', '.join(peer.hosts) or '(any)':30} {peer.description}")
        return 0
    if not args.ae_title:
        print(f"usage: dicomnode peers {args.action} AE_TITLE", file=sys.stderr)
        return 2
    try:
        if args.action == "add":
            config = config_edit.add_peer(path, {"ae_title": args.ae_title, "hosts": args.host or [],
                                                 "description": args.description or ""})
        else:
            config = config_edit.remove_peer(path, args.ae_title)
    except config_edit.PeerNotFound as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    print(f"{path}: {'added' if args.action == 'add' else 'removed'} {args.ae_title.strip()} "
          f"({len(config.peers)} peers)")
    try:
        status, body = _admin_call(config, "POST", "/api/peers/reload")
    except OSError:
        print("node not running (admin API not reachable): the change applies when it starts")
        return 0
    if status != 200:
        print(f"the running node did not reload its peers (HTTP {status}): {body}", file=sys.stderr)
        return 1
    print("applied to the running node")
    return 0


def cmd_destinations(args: argparse.Namespace) -> int:
    """List destinations, or C-ECHO one (PS3.7 9.1.5) from our AE title."""
    import time

    from dicomnode.errors import DicomNodeError
    from dicomnode.sender import echo

    config = _load(args.config)
    if args.action == "list" or not args.name:
        for name, d in sorted(config.destinations.items()):
            print(f"{name:12} {d.ae_title}@{d.host}:{d.port}{' (TLS)' if d.tls else ''}")
        return 0
    destination = config.destinations.get(args.name)
    if destination is None:
        known = ", ".join(sorted(config.destinations)) or "none"
        print(f"unknown destination {args.name!r} (known: {known})", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        status = echo(destination, config.node.ae_title)
    except (DicomNodeError, OSError) as exc:
        print(f"{args.name}: C-ECHO failed: {exc}")
        return 1
    print(f"{args.name}: C-ECHO status 0x{status:04X} in {time.perf_counter() - started:.3f} s")
    return 0 if status == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    """C-STORE every DICOM file under FOLDER to a configured destination, one association per set
    of at most 128 presentation contexts (PS3.8 9.3.2.2), with a progress bar."""
    import pydicom
    from tqdm import tqdm

    from dicomnode.sender import classify, make_ae

    config = _load(args.config)
    destination = config.destinations.get(args.to)
    if destination is None:
        print(f"unknown destination {args.to!r} (known: {', '.join(sorted(config.destinations)) or 'none'})",
              file=sys.stderr)
        return 2
    folder = Path(args.folder)
    files = sorted(p for p in (folder.rglob("*") if folder.is_dir() else [folder]) if p.is_file())
    contexts: dict[Path, tuple[str, str]] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            contexts[path] = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        except Exception as exc:  # not a Part 10 file: say so and go on with the others
            print(f"{path}: skipped ({exc})", file=sys.stderr)
    batches: list[list[Path]] = []
    seen: set[tuple[str, str]] = set()
    for path, context in contexts.items():
        if not batches or (context not in seen and len(seen) >= 128):
            batches.append([])
            seen = set()
        seen.add(context)
        batches[-1].append(path)
    sent = failed = 0
    calling = args.calling_ae or config.node.ae_title
    with tqdm(total=len(contexts), unit="file", disable=None) as progress:
        for batch in batches:
            ae = make_ae(calling)
            for context in sorted({contexts[p] for p in batch}):
                ae.add_requested_context(context[0], [context[1]])
            assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
            if not assoc.is_established:
                print(f"no association with {destination.ae_title}@{destination.host}:{destination.port}",
                      file=sys.stderr)
                failed += len(batch)
                progress.update(len(batch))
                continue
            try:
                for path in batch:
                    reason = _store_one(assoc, path, destination, classify)
                    if reason:
                        failed += 1
                        tqdm.write(f"{path}: {reason}", file=sys.stderr)
                    else:
                        sent += 1
                    progress.update(1)
            finally:
                if assoc.is_established:
                    assoc.release()
    print(f"sent {sent} of {len(contexts)} files to {args.to} ({destination.ae_title}@{destination.host}:"
          f"{destination.port}){f', {failed} failed' if failed else ''}")
    return 0 if failed == 0 and sent else 1


def _store_one(assoc: Any, path: Path, destination: Any, classify: Callable[..., Exception | None]) -> str:
    """Send one file on an open association; returns why it was not delivered, or ''."""
    try:
        response = assoc.send_c_store(path)
    except (OSError, ValueError, AttributeError) as exc:
        return f"C-STORE failed: {exc}"
    if not response or "Status" not in response:
        return "no C-STORE response (timeout or abort)"
    error = classify(int(response.Status), destination)
    return str(error) if error is not None else ""


def cmd_status(args: argparse.Namespace) -> int:
    """Node health (admin /healthz), queue depth by kind and state, dead letters (from the ledger)."""
    config = _load(args.config)
    exit_code = 0
    try:
        status, body = _admin_call(config, "GET", "/healthz")
        health = body.get("status", "?") if isinstance(body, dict) else "?"
        print(f"node {config.node.ae_title}: {health} (admin HTTP {status})")
        exit_code = 0 if status == 200 else 1
    except OSError as exc:
        print(f"node {config.node.ae_title}: not reachable on admin port {config.admin.port} ({exc})")
        exit_code = 1
    path = config.node.data_dir.resolve() / "ledger.sqlite3"
    if not path.exists():
        print(f"no ledger at {path}")
        return 1
    from dicomnode.domain import JobKind, JobState
    from dicomnode.ledger import Ledger

    ledger = Ledger.sqlite(str(path))
    try:
        counts = ledger.job_counts()
        print(f"instances stored: {ledger.count_instances()}")
        for kind in JobKind:
            line = ", ".join(f"{state.value} {counts.get((kind.value, state.value), 0)}"
                             for state in JobState)
            print(f"{kind.value:8} jobs: {line}")
        open_jobs = sum(n for (_k, s), n in counts.items() if s in ("queued", "running", "failed"))
        dead = counts.get((JobKind.DELIVER.value, JobState.DEAD.value), 0)
        print(f"queue depth: {open_jobs}")
        hint = "  (dicomnode results list; dicomnode results retry ID)" if dead else ""
        print(f"dead letters: {dead}{hint}")
        dead_notify = counts.get((JobKind.NOTIFY.value, JobState.DEAD.value), 0)
        if dead_notify:
            print(f"dead notifications: {dead_notify}  (dicomnode notify; dicomnode notify retry ID)")
    finally:
        ledger.close()
    return exit_code


def cmd_conformance(args: argparse.Namespace) -> int:
    """Print or write the DICOM Conformance Statement (PS3.2 Annex N) generated from the code."""
    from dicomnode.conformance import render

    text = render(load_config(args.config) if args.config else None)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
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
    p.add_argument("--kind", choices=["analyze", "deliver", "notify"])
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

    p = sub.add_parser("notify", help="events and their notifications; notify retry ID; notify test NAME")
    p.add_argument("action", nargs="?", choices=["list", "retry", "test"], default="list")
    p.add_argument("target", nargs="?", help="retry: the notification's job id; test: the channel name")
    p.add_argument("--limit", type=int, default=30)
    p.add_argument("--config")
    p.set_defaults(func=cmd_notify)

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

    p = sub.add_parser("peers", help="list, add or remove accepted peers (applied to a running node)")
    p.add_argument("action", nargs="?", choices=["list", "add", "remove"], default="list")
    p.add_argument("ae_title", nargs="?")
    p.add_argument("--host", action="append", help="host the peer may call from (repeat; none: any)")
    p.add_argument("--description")
    p.add_argument("--config")
    p.set_defaults(func=cmd_peers)

    p = sub.add_parser("destinations", help="list destinations, or C-ECHO one: destinations echo NAME")
    p.add_argument("action", nargs="?", choices=["list", "echo"], default="list")
    p.add_argument("name", nargs="?")
    p.add_argument("--config")
    p.set_defaults(func=cmd_destinations)

    p = sub.add_parser("send", help="send the DICOM files of a folder to a destination")
    p.add_argument("folder")
    p.add_argument("--to", required=True, help="destination name from the config")
    p.add_argument("--calling-ae", help="calling AE title (default: node.ae_title)")
    p.add_argument("--config")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("status", help="node health, queue depth, dead letters")
    p.add_argument("--config")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("conformance", help="print the DICOM Conformance Statement generated from the code")
    p.add_argument("--config", help="config file whose values to state (default: the built-in defaults)")
    p.add_argument("-o", "--output", help="write to this file instead of standard output")
    p.set_defaults(func=cmd_conformance)
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
