"""The REST API of the admin server: ledger views, peer edits, destination C-ECHO, job replay.

Every route is under ``/api`` and behind the admin token (:mod:`dicomnode.admin` adds the
dependency). Handlers get the node through :class:`NodeView`, the few things the API reads and
calls on it, so this module does not import :mod:`dicomnode.node` (the node imports the admin
server, not the other way round).

No input may produce a 500: ids in paths are bounded to the ledger's BIGINT range
(:data:`~dicomnode.domain.MAX_ID`) and ``limit`` parameters to a page size, so FastAPI answers 422
before any query; unknown ids are 404.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol

from fastapi import APIRouter, HTTPException, Query
from fastapi import Path as PathParameter
from pydantic import BaseModel, Field

from dicomnode import config_edit
from dicomnode.config import NO_CONFIG_FILE_HINT, Config, Peer, load_config
from dicomnode.domain import MAX_ID, JobKind, JobState
from dicomnode.errors import ConfigError, DicomNodeError
from dicomnode.notify import event_views

if TYPE_CHECKING:
    from dicomnode.audit import Audit
    from dicomnode.ledger import JobRow, Ledger
    from dicomnode.metrics import Metrics

JobId = Annotated[int, PathParameter(ge=1, le=MAX_ID, description="a job id from the ledger")]


class _Listening(Protocol):
    @property
    def ports(self) -> list[int]: ...


class _Executor(Protocol):
    def wake(self) -> None: ...


class NodeView(Protocol):
    """What the admin server uses of a running :class:`~dicomnode.node.Node`."""

    @property
    def config(self) -> Config: ...

    @property
    def config_path(self) -> Path | None: ...

    @property
    def ledger(self) -> Ledger: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def audit(self) -> Audit: ...

    @property
    def receiver(self) -> _Listening: ...

    @property
    def executor(self) -> _Executor: ...

    def update_peers(self, peers: list[Peer]) -> None: ...


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
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _time_to_result(node: NodeView, limit: int = 100) -> dict[str, Any]:
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


def overview(node: NodeView) -> dict[str, Any]:
    """NodeView health at a glance: throughput, queue depth by state, failures, time to result."""
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


def recent_series(node: NodeView, limit: int) -> list[dict[str, Any]]:
    """Recent series with their verdicts (results ``summary``: status, priority, findings), jobs,
    time to result, and the notify events of the current epoch with their time to notification."""
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


def dead_letters(node: NodeView, limit: int = 100) -> list[dict[str, Any]]:
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


# --- routes -----------------------------------------------------------------------------------


def _apply(node: NodeView, change: Callable[[Path], Config]) -> list[dict[str, Any]]:
    """Run a peer edit on the node's config file and apply the resulting peers at once."""
    if node.config_path is None:
        raise HTTPException(409, f"peers cannot be saved: {NO_CONFIG_FILE_HINT}")
    try:
        config = change(node.config_path)
    except config_edit.PeerNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except ConfigError as exc:
        raise HTTPException(422, exc.problems) from None
    node.update_peers(list(config.peers))
    node.audit.log("admin.peers_changed", peers=[p.ae_title for p in config.peers])
    return _peers(node)


def _peers(node: NodeView) -> list[dict[str, Any]]:
    return [p.model_dump() for p in node.config.peers]


def api_router(node: NodeView) -> APIRouter:
    """The ``/api`` routes for ``node``."""
    api = APIRouter(prefix="/api")

    @api.get("/overview", tags=["overview"])
    def get_overview() -> dict[str, Any]:
        """Images per second (last minute), queue depth by state, failures, time to result."""
        return overview(node)

    @api.get("/peers", tags=["peers"])
    def list_peers() -> dict[str, Any]:
        """Accepted calling AE titles and the hosts they may call from (empty: any host)."""
        editable = node.config_path is not None
        return {"editable": editable, "config_path": str(node.config_path or ""),
                "read_only_reason": "" if editable else NO_CONFIG_FILE_HINT, "peers": _peers(node)}

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
    def get_events(limit: int = Query(50, ge=1, le=1000),
                   series: str | None = Query(None, max_length=64)) -> list[dict[str, Any]]:
        """Notify events (finding.critical, ...) with their notifications per channel and the time
        from the last image to each acknowledgement."""
        return event_views(node.ledger, limit, series)

    @api.post("/jobs/{job_id}/retry", tags=["jobs"])
    def retry(job_id: JobId) -> dict[str, Any]:
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


def echo_named(node: NodeView, name: str) -> EchoResult:
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
