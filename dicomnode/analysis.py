"""The analyze job: spool files of one series epoch -> Volume -> analyzers -> SR/SEG objects.

:func:`run_analysis` runs in a worker process on plain data (paths, names, settings) and returns
encoded result objects; it never touches the ledger. :class:`AnalyzeHandler` runs in the node
process: it prepares the task from the ledger and, when the worker is done, spools the results
durably and records them, their deliveries and the job's end in one transaction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from dicomnode.assembly import close_epoch_if_done
from dicomnode.audit import Audit
from dicomnode.config import AnalysisSettings
from dicomnode.domain import AnalyzerKind, Findings, FindingsStatus, JobKind, ResultObject
from dicomnode.errors import AnalyzerUnavailable, Permanent, Transient
from dicomnode.jobs import JobQueue
from dicomnode.ledger import JobRow, Ledger
from dicomnode.models import Registry, build_registry
from dicomnode.spool import Spool

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalysisTask:
    job_id: int
    series_instance_uid: str
    epoch: int
    analyzers: tuple[str, ...]
    paths: tuple[str, ...]  # absolute paths of the epoch's instances
    settings: AnalysisSettings
    created: float  # job creation time: fixes result dates, so a re-run re-creates the same bytes
    previous: tuple[ResultObject, ...] = ()


@dataclass(frozen=True)
class AnalyzerOutcome:
    analyzer: str
    version: str
    kind: str
    status: str
    priority: str | None
    error: str
    duration_s: float
    findings: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class AnalysisOutcome:
    results: tuple[ResultObject, ...]
    analyzers: tuple[AnalyzerOutcome, ...]
    volume_problems: tuple[str, ...]
    load_s: float
    instances: int


_registry: Registry | None = None
_registry_settings: AnalysisSettings | None = None


def worker_registry(settings: AnalysisSettings) -> Registry:
    """One registry per worker process: each model is loaded once and kept."""
    global _registry, _registry_settings
    if _registry is None or _registry_settings != settings:
        _registry = build_registry(settings)
        _registry_settings = settings
    return _registry


def _failed(name: str, version: str, kind: AnalyzerKind, error: str) -> Findings:
    return Findings(analyzer=name, version=version, kind=kind, status=FindingsStatus.FAILED, error=error)


def _headers_only(paths: tuple[str, ...]) -> list[Dataset]:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return sorted(headers, key=lambda d: int(d.get("InstanceNumber") or 0))


def run_analysis(task: AnalysisTask) -> AnalysisOutcome:
    """Worker entry point. Bad input becomes FAILED findings (and an SR that says so), never a
    crash; one failing analyzer does not stop the others."""
    from dicomnode import imaging, results

    registry = worker_registry(task.settings)
    started = time.perf_counter()
    volume = None
    load_error = ""
    try:
        volume = imaging.load_volume([Path(p) for p in task.paths])
    except Permanent as exc:
        load_error = exc.reason
    except Exception as exc:  # an unreadable series is a finding about the series, not a crash
        load_error = f"cannot load series: {exc}"
    load_s = time.perf_counter() - started
    headers = list(volume.headers) if volume is not None else _headers_only(task.paths)
    created = datetime.fromtimestamp(task.created)

    out: list[ResultObject] = []
    outcomes: list[AnalyzerOutcome] = []
    for name in task.analyzers:
        t0 = time.perf_counter()
        try:
            spec = registry.spec(name)
            version, kind = spec.version, spec.kind
        except AnalyzerUnavailable as exc:
            version, kind = "unknown", AnalyzerKind.QC
            findings = _failed(name, version, kind, exc.reason)
        else:
            if volume is None:
                findings = _failed(name, version, kind, load_error)
            else:
                try:
                    findings = registry.get(name).analyze(volume)
                except AnalyzerUnavailable as exc:
                    findings = _failed(name, version, kind, exc.reason)
                except Exception as exc:
                    LOG.exception("analyzer %s raised", name)
                    findings = _failed(name, version, kind, f"analyzer error: {type(exc).__name__}: {exc}")
        duration = time.perf_counter() - t0
        findings = replace(findings, duration_s=findings.duration_s or duration)
        previous = tuple(p for p in task.previous if p.analyzer == name)
        try:
            objects = results.build_results(findings, headers, epoch=task.epoch, previous=previous,
                                            created=created)
        except ValueError as exc:
            # The findings cannot be encoded (e.g. a mask that does not fit): report the failure.
            findings = _failed(name, version, kind, f"results could not be encoded: {exc}")
            objects = results.build_results(findings, headers, epoch=task.epoch, previous=previous,
                                            created=created)
        out.extend(objects)
        outcomes.append(AnalyzerOutcome(
            analyzer=name, version=findings.version, kind=str(findings.kind), status=str(findings.status),
            priority=findings.priority.name.lower() if findings.priority is not None else None,
            error=findings.error, duration_s=round(duration, 3),
            findings=[{"type": f.finding_type.meaning, "present": f.present,
                       "probability": f.probability} for f in findings.findings],
        ))
    return AnalysisOutcome(tuple(out), tuple(outcomes),
                           tuple(volume.problems) if volume is not None else (load_error,), round(load_s, 3),
                           len(task.paths))


class AnalyzeHandler:
    kind = JobKind.ANALYZE
    in_process = False

    def __init__(self, ledger: Ledger, spool: Spool, queue: JobQueue, settings: AnalysisSettings,
                 audit: Audit) -> None:
        self.ledger = ledger
        self.spool = spool
        self.queue = queue
        self.settings = settings
        self.audit = audit

    def prepare(self, job: JobRow) -> AnalysisTask:
        rows = self.ledger.instance_rows(job.series_instance_uid, max_epoch=job.epoch)
        if not rows:
            raise Permanent("series has no instances in the ledger")
        paths = tuple(str(self.spool.path(r.path)) for r in rows)
        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            raise Permanent(f"{len(missing)} instance file(s) missing from the spool")
        previous: list[ResultObject] = []
        earlier = [r for r in self.ledger.results_for_series(job.series_instance_uid)
                   if r.epoch < job.epoch and r.kind == "sr"]
        if earlier:
            last_epoch = max(r.epoch for r in earlier)
            previous = [ResultObject(analyzer=r.analyzer, version=r.version, kind=r.kind,
                                     sop_class_uid=r.sop_class_uid, sop_instance_uid=r.sop_instance_uid,
                                     series_instance_uid=r.result_series_uid,
                                     study_instance_uid=r.study_instance_uid, transfer_syntax_uid="",
                                     data=b"")
                        for r in earlier if r.epoch == last_epoch]
        return AnalysisTask(
            job_id=job.id, series_instance_uid=job.series_instance_uid, epoch=job.epoch,
            analyzers=tuple(job.payload["analyzers"]), paths=paths, settings=self.settings,
            created=job.created_at, previous=tuple(previous),
        )

    def run(self, task: AnalysisTask) -> AnalysisOutcome:
        return run_analysis(task)

    def finish(self, job: JobRow, outcome: AnalysisOutcome) -> None:
        destinations: list[str] = list(job.payload.get("destinations", []))
        written: list[tuple[ResultObject, str]] = []
        for obj in outcome.results:
            relative = self.spool.instance_path(obj.study_instance_uid, obj.series_instance_uid,
                                                obj.sop_instance_uid, area="results")
            self.spool.write(relative, obj.data)  # False on a re-run: same UID, first copy kept
            written.append((obj, relative))
        summaries = {o.analyzer: o for o in outcome.analyzers}
        with self.ledger.transaction() as conn:
            for obj, relative in written:
                o = summaries.get(obj.analyzer)
                result_id = self.ledger.add_result(
                    conn, job_id=job.id, series_instance_uid=job.series_instance_uid,
                    study_instance_uid=obj.study_instance_uid, epoch=job.epoch, analyzer=obj.analyzer,
                    version=obj.version, kind=obj.kind, sop_class_uid=obj.sop_class_uid,
                    sop_instance_uid=obj.sop_instance_uid, result_series_uid=obj.series_instance_uid,
                    path=relative,
                    summary=_json({"status": o.status, "priority": o.priority, "error": o.error,
                                   "findings": o.findings} if o else {}),
                )
                for destination in destinations:
                    self.queue.enqueue(
                        conn, JobKind.DELIVER, series_uid=job.series_instance_uid, epoch=job.epoch,
                        payload={"result_id": result_id, "destination": destination},
                        priority=job.priority, dedup_key=f"deliver:{obj.sop_instance_uid}:{destination}",
                    )
            if not self.queue.complete(conn, job, {
                "analyzers": [o.__dict__ for o in outcome.analyzers],
                "volume_problems": list(outcome.volume_problems),
                "load_s": outcome.load_s,
                "instances": outcome.instances,
                "results": len(outcome.results),
            }):
                raise Transient("lease lost while finishing; another worker owns the job")
        for o in outcome.analyzers:
            self.audit.log("analysis.done", job=job.id, series_instance_uid=job.series_instance_uid,
                           epoch=job.epoch, analyzer=o.analyzer, status=o.status, priority=o.priority,
                           seconds=o.duration_s)
        close_epoch_if_done(self.ledger, job.series_instance_uid, job.epoch)
        self.queue.on_enqueued()

    def on_failed(self, job: JobRow) -> None:
        close_epoch_if_done(self.ledger, job.series_instance_uid, job.epoch)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, default=str, sort_keys=True)
