"""Command line: ``dicomnode serve | check-config | init | echo | ...``.

Exit codes: 0 success, 1 operation failed, 2 invalid configuration or usage.

Without ``--config`` every command reads ``$DICOMNODE_CONFIG``, else ``./dicomnode.toml``, else the
embedded default (:func:`dicomnode.config.find_config`).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode.config import (
    CONFIG_ENV,
    EMBEDDED_DEFAULT,
    LOCAL_CONFIG_NAME,
    NO_CONFIG_FILE_HINT,
    Config,
    embedded_config_text,
    find_config,
    load_config,
)
from dicomnode.errors import ConfigError

if TYPE_CHECKING:  # the ledger pulls in SQLAlchemy: imported lazily by the commands that need it
    from dicomnode.ledger import Ledger

Command = Callable[[argparse.Namespace], int]


CONFIG_HELP = f"config file (default: ${CONFIG_ENV}, else ./{LOCAL_CONFIG_NAME}, else the {EMBEDDED_DEFAULT})"


def _load(path: str | None) -> Config:
    """The config named by ``--config``, else the one :func:`find_config` finds."""
    return load_config(find_config(path))


def _source(path: Path | None) -> str:
    return str(path) if path is not None else EMBEDDED_DEFAULT


def cmd_check_config(args: argparse.Namespace) -> int:
    path = find_config(args.file)
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{exc.source}: {problem}" if exc.source else problem)
        return 2
    print(f"{_source(path)}: ok ({len(config.peers)} peers, "
          f"{len(config.destinations)} destinations, {len(config.rules)} rules)")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """Write the commented starter config (the embedded default); never overwrite a file."""
    import os

    path = Path(args.path)
    try:
        # O_EXCL: refuse an existing file even if it appears between a check and the write.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    except FileExistsError:
        print(f"{path}: already exists; not overwritten (remove it or choose another PATH)", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{path}: cannot create: {exc.strerror or exc}", file=sys.stderr)
        return 1
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(embedded_config_text())
    print(f"wrote {path}")
    found = find_config(None)
    if found is not None and found.resolve() == path.resolve():
        print("dicomnode commands started in this folder use it (no --config needed)")
    else:
        print(f"use it with --config {path} or {CONFIG_ENV}={path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dicomnode.jobs import StopRequest
    from dicomnode.node import Node

    path = find_config(args.config)
    config = load_config(path)
    try:
        node = Node(config, path)
    except Exception as exc:
        if config.cluster is None:
            raise
        return _ledger_unavailable(config, exc)
    with StopRequest(signal.SIGTERM, signal.SIGINT) as stop:  # a second Ctrl-C while stopping is ignored
        node.start()
        n = config.node
        print(f"dicomnode {n.ae_title} listening on {n.host}:{n.port} (data in {node.data_dir})", flush=True)
        if path is None:
            print(f"config: the {EMBEDDED_DEFAULT} (read only; `dicomnode init` writes a file of your own)",
                  flush=True)
        else:
            print(f"config: {path}", flush=True)
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
    return _open_ledger(_load(args.config))


def _open_ledger(config: Config) -> Ledger:
    """The ledger the node of ``config`` uses: the shared one in cluster mode."""
    from dicomnode.ledger import Ledger

    if config.cluster is None:
        path = config.node.data_dir.resolve() / "ledger.sqlite3"
        if not path.exists():
            raise SystemExit(f"no ledger at {path}: has the node run with this config?")
    from dicomnode.cluster import heartbeat_settings

    try:
        return Ledger(config.ledger_url, dead_after_s=heartbeat_settings(config)[1])
    except Exception as exc:  # unreachable database: one line, not a traceback
        raise SystemExit(f"cannot open the ledger {_safe_url(config.ledger_url)}: {_first_line(exc)}") from None


def _ledger_unavailable(config: Config, exc: BaseException) -> int:
    """The shared ledger is unreachable or cannot be migrated: one line, not a traceback."""
    print(f"cannot open the ledger {_safe_url(config.ledger_url)}: {_first_line(exc)}", file=sys.stderr)
    return 1


def _safe_url(url: str) -> str:
    """The URL without its password, as the operator wrote it (no percent-encoded socket path)."""
    from urllib.parse import unquote

    from sqlalchemy.engine import make_url

    return unquote(make_url(url).render_as_string(hide_password=True))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


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
        try:
            job_id = _job_id(args.target) if args.target else None
        except argparse.ArgumentTypeError as exc:
            print(f"dicomnode notify retry: {exc}", file=sys.stderr)
            return 2
        return _retry(ledger, job_id, "notify", "notification")
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

    path = find_config(args.config)
    if args.action == "list":
        config = load_config(path)
        print(f"{'AE TITLE':16} {'HOSTS':30} DESCRIPTION")
        for peer in config.peers:
            print(f"{peer.ae_title:16} {', '.join(peer.hosts) or '(any)':30} {peer.description}")
        return 0
    if not args.ae_title:
        print(f"usage: dicomnode peers {args.action} AE_TITLE", file=sys.stderr)
        return 2
    if path is None:
        print(f"cannot {args.action} a peer: {NO_CONFIG_FILE_HINT}", file=sys.stderr)
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

    from dicomnode.sender import EVENT_HANDLERS, classify, make_ae, tls_arguments

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
            ae = make_ae(calling, destination)
            for context in sorted({contexts[p] for p in batch}):
                ae.add_requested_context(context[0], [context[1]])
            try:
                assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                                     max_pdu=destination.max_pdu, tls_args=tls_arguments(destination),
                                     evt_handlers=EVENT_HANDLERS)
            except OSError as exc:
                print(f"cannot connect to {destination.host}:{destination.port}: {exc}", file=sys.stderr)
                return 1
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
    if config.cluster is None and not path.exists():
        print(f"no ledger at {path}")
        return 1
    from dicomnode.domain import JobKind, JobState

    ledger = _open_ledger(config)
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


def _bounded_int(text: str, low: int, high: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be a whole number, got {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{what} must be between {low} and {high}, got {text}")
    return value


def _job_id(text: str) -> int:
    from dicomnode.domain import MAX_ID

    return _bounded_int(text, 1, MAX_ID, "ID")


def _limit(text: str) -> int:
    return _bounded_int(text, 1, 100_000, "--limit")


# --- cluster: db, worker, nodes (docs: README "Scaling out") ------------------------------------


def cmd_db(args: argparse.Namespace) -> int:
    """Create or upgrade the ledger schema (Alembic), then say which revision it is at."""
    from dicomnode.ledger import Ledger
    from dicomnode.migrations import head

    config = _load(args.config)
    if config.cluster is None:
        config.node.data_dir.resolve().mkdir(parents=True, exist_ok=True)
    try:
        from dicomnode.migrations import upgrade

        ledger = Ledger(config.ledger_url, migrate=False)
        try:
            before, after = upgrade(ledger.engine)
        finally:
            ledger.close()
    except Exception as exc:
        print(f"cannot upgrade {_safe_url(config.ledger_url)}: {_first_line(exc)}", file=sys.stderr)
        return 1
    where = _safe_url(config.ledger_url)
    if before == after:
        print(f"{where}: at revision {after} (newest: {head()}), nothing to do")
    else:
        print(f"{where}: upgraded from {before or 'an empty database'} to revision {after}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run jobs only: a Procrastinate worker in cluster mode, else local workers on the ledger."""
    config = _load(args.config)
    queues = [q.strip() for q in args.queues.split(",") if q.strip()] if args.queues else None
    if config.cluster is not None:
        from dicomnode.cluster import run_worker

        known = config.cluster.queues.all()
        unknown = [q for q in queues or [] if q not in known]
        if unknown:
            print(f"unknown queue(s) {', '.join(unknown)} (configured: {', '.join(known)})", file=sys.stderr)
            return 2
        import sqlalchemy.exc

        try:
            return run_worker(config, queues, args.concurrency)
        except sqlalchemy.exc.OperationalError as exc:
            return _ledger_unavailable(config, exc)
    from dicomnode.jobs import StopRequest
    from dicomnode.node import Node

    jobs = config.jobs.model_copy(update={"workers": args.concurrency or max(1, config.jobs.workers)})
    node = Node(config.model_copy(update={"jobs": jobs}), receive=False)
    with StopRequest(signal.SIGTERM, signal.SIGINT) as stop:
        node.start()
        print(f"dicomnode worker {node.node_id} ({node.ledger.process_id}): {jobs.workers} local worker(s) "
              f"on {_safe_url(config.ledger_url)}", flush=True)
        stop.wait()
        node.stop()
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    """One line per receiver and worker process: node id, heartbeat, what it is running."""
    import datetime as dt

    ledger = _ledger(args)
    try:
        rows = ledger.processes(recent_s=args.recent_h * 3600)
        now = ledger.now()
    finally:
        ledger.close()
    print(f"{'NODE':24} {'ROLE':7} {'STATE':8} {'PID':>7} {'STARTED':19} {'HEARTBEAT':>9}  RUNNING")
    for p in rows:
        state = "stopped" if p.stopped_at is not None else "alive" if p.alive else "dead"
        started = dt.datetime.fromtimestamp(p.started_at).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{p.node_id[:24]:24} {p.role:7} {state:8} {p.pid:>7} {started:19} "
              f"{now - p.heartbeat_at:>7.1f}s  {p.running}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomnode", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the node")
    p.add_argument("--config", help=CONFIG_HELP)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate a config file; one line per problem")
    p.add_argument("file", nargs="?", help=CONFIG_HELP)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("init", help="write a commented starter config (refuses to overwrite)")
    p.add_argument("path", nargs="?", default=LOCAL_CONFIG_NAME, help=f"where (default: ./{LOCAL_CONFIG_NAME})")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("jobs", help="list jobs, or retry one")
    p.add_argument("action", nargs="?", choices=["list", "retry"], default="list")
    p.add_argument("id", nargs="?", type=_job_id)
    p.add_argument("--state", action="append", choices=["queued", "running", "succeeded", "failed", "dead"])
    p.add_argument("--kind", choices=["analyze", "deliver", "notify"])
    p.add_argument("--limit", type=_limit, default=50)
    p.add_argument("--config")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("series", help="recent series with state and counts")
    p.add_argument("--limit", type=_limit, default=50)
    p.add_argument("--config")
    p.set_defaults(func=cmd_series)

    p = sub.add_parser("results", help="list result deliveries, or retry one")
    p.add_argument("action", nargs="?", choices=["list", "retry"], default="list")
    p.add_argument("id", nargs="?", type=_job_id)
    p.add_argument("--limit", type=_limit, default=50)
    p.add_argument("--config")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("notify", help="events and their notifications; notify retry ID; notify test NAME")
    p.add_argument("action", nargs="?", choices=["list", "retry", "test"], default="list")
    p.add_argument("target", nargs="?", help="retry: the notification's job id; test: the channel name")
    p.add_argument("--limit", type=_limit, default=30)
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

    p = sub.add_parser("db", help="ledger schema: db upgrade creates or upgrades it (Alembic)")
    p.add_argument("action", choices=["upgrade"])
    p.add_argument("--config")
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("worker", help="run jobs only (cluster: a Procrastinate worker)")
    p.add_argument("--config")
    p.add_argument("--queues", help="comma-separated queues (default: all configured)")
    p.add_argument("--concurrency", type=int, help="jobs at once (default: [jobs] workers)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("nodes", help="receivers and workers of this ledger, with their heartbeats")
    p.add_argument("--recent-h", type=float, default=1.0, help="also list processes stopped this recently")
    p.add_argument("--config")
    p.set_defaults(func=cmd_nodes)

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
