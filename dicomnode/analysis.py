"""The analyze job: spool files of one series epoch -> Volume -> analyzers -> SR/SEG objects.

:func:`run_analysis` runs in a worker process on plain data (paths, names, settings) and returns
encoded result objects; it never touches the ledger. :class:`AnalyzeHandler` runs in the node
process: it prepares the task from the ledger and, when the worker is done, spools the results
durably and records them, their deliveries and the job's end in one transaction.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from dicomnode.audit import Audit
from dicomnode.config import AnalysisSettings
from dicomnode.domain import (
    AnalyzerKind,
    Finding,
    Findings,
    FindingsStatus,
    JobKind,
    JobState,
    ResultObject,
    Volume,
)
from dicomnode.errors import AnalyzerUnavailable, Permanent, Transient
from dicomnode.jobs import JobQueue
from dicomnode.ledger import JobRow, Ledger
from dicomnode.models import Registry, build_registry
from dicomnode.notify import Event, Notifier, reports_from_outcome
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
    uid_root: str | None = None  # [results] uid_root: prefix of every result UID (None: pydicom's)


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
    build_s: float = 0.0  # encoding the findings as SR (and SEG)
    not_for_clinical_use: bool = True


@dataclass(frozen=True)
class AnalysisOutcome:
    results: tuple[ResultObject, ...]
    analyzers: tuple[AnalyzerOutcome, ...]
    volume_problems: tuple[str, ...]
    load_s: float
    instances: int
    worker_s: float = 0.0  # the whole of run_analysis, in the worker


_registry: Registry | None = None
_registry_settings: AnalysisSettings | None = None


def worker_registry(settings: AnalysisSettings) -> Registry:
    """One registry per worker process: each model is loaded once and kept."""
    global _registry, _registry_settings
    if _registry is None or _registry_settings != settings:
        _registry = build_registry(settings)
        _registry_settings = settings
    return _registry


def warm_up(settings: AnalysisSettings) -> None:
    """Run in each new worker process before its first job: import what analysis uses and load
    every available analyzer once (models included), so the first series after start-up is not
    slower than the next ones. Errors are left for the jobs to report."""
    import highdicom  # noqa: F401 - imported for its start-up cost

    from dicomnode import imaging, results  # noqa: F401

    registry = worker_registry(settings)
    for spec in registry.specs():
        if spec.unavailable:
            continue
        try:
            analyzer = registry.get(spec.name)
        except Exception:  # reported by the first job that uses it
            continue
        warm = getattr(analyzer, "warm_up", None)
        if callable(warm):
            warm()


def _failed(name: str, version: str, kind: AnalyzerKind, error: str) -> Findings:
    return Findings(analyzer=name, version=version, kind=kind, status=FindingsStatus.FAILED, error=error)


def _by_instance_number(headers: list[Dataset]) -> list[Dataset]:
    def number(header: Dataset) -> int:
        try:
            return int(header.get("InstanceNumber") or 0)
        except (TypeError, ValueError):
            return 0

    return sorted(headers, key=number)


def header_problem(header: Dataset) -> str:
    """Why ``header`` cannot be used to build results ('' when it can): pydicom decodes values
    lazily, so an element whose bytes make no sense (an unknown VR after a bit flip, a value that
    cannot be converted) raises only when first read. Every element is read here, sequences
    included."""
    try:
        for _element in header.iterall():
            pass
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def without_undecodable(header: Dataset) -> tuple[Dataset, list[str]]:
    """A copy of ``header`` without the elements that cannot be decoded (nested ones included),
    and their tags."""
    fixed = copy.deepcopy(header)
    dropped: list[str] = []

    def clean(ds: Dataset) -> None:
        for tag in list(ds.keys()):
            try:
                element = ds[tag]
            except Exception:
                del ds[tag]
                dropped.append(str(tag))
                continue
            if element.VR == "SQ":
                for item in element.value:
                    clean(item)

    clean(fixed)
    return fixed, dropped


def screen_headers(paths: tuple[str, ...]) -> tuple[list[str], list[Dataset], list[str]]:
    """Split the instances of a series into those whose headers can be used (paths and headers)
    and the others, one sentence each naming the instance and the problem."""
    usable: list[str] = []
    headers: list[Dataset] = []
    excluded: list[str] = []
    for path in paths:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            excluded.append(f"{Path(path).name} excluded: not a readable DICOM file ({type(exc).__name__}: {exc})")
            continue
        problem = header_problem(header)
        if problem:
            excluded.append(f"instance {_identify(header, path)} excluded: its header cannot be used ({problem})")
            continue
        usable.append(path)
        headers.append(header)
    return usable, headers, excluded


def _identify(header: Dataset, path: str) -> str:
    try:
        return str(header.SOPInstanceUID)
    except Exception:  # the SOP Instance UID itself may be what is broken
        return Path(path).name


# Enough of an image's header to build an SR about its series (Patient, General Study, General
# Series, SOP Common, and what the image library of TID 1600 reads when it is there).
_MINIMAL_KEYWORDS = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "Modality", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription", "SeriesNumber",
    "InstanceNumber", "FrameOfReferenceUID", "Rows", "Columns",
)


def minimal_header(header: Dataset) -> Dataset | None:
    """The identifying attributes of ``header`` that can be read, or None without the four UIDs
    an SR about this image needs. Used when the full headers cannot carry even a failure report."""
    minimal = Dataset()
    for keyword in _MINIMAL_KEYWORDS:
        try:
            if keyword in header:
                minimal[keyword] = copy.deepcopy(header[keyword])
        except Exception:  # an element that cannot be decoded is left out
            continue
    needed = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    return minimal if all(k in minimal for k in needed) else None


def _minimal_headers(headers: list[Dataset]) -> list[Dataset]:
    return [m for m in (minimal_header(h) for h in headers) if m is not None]


def _salvaged_headers(paths: tuple[str, ...]) -> list[Dataset]:
    """Minimal headers of instances whose full headers cannot be used (every instance excluded)."""
    out: list[Dataset] = []
    for path in paths:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        minimal = minimal_header(header)
        if minimal is not None:
            out.append(minimal)
    return _by_instance_number(out)


def _with_exclusions(findings: Findings, excluded: tuple[str, ...], total: int) -> Findings:
    """Say in the findings (and so in the SR) which instances were left out and why; findings about
    the rest of the series are PARTIAL (PS3.3: they do not cover the whole series)."""
    if not excluded:
        return findings
    summary = f"{len(excluded)} of {total} instance(s) excluded: their headers cannot be used"
    if findings.status is FindingsStatus.COMPLETE:
        findings = replace(findings, status=FindingsStatus.PARTIAL, error=summary)
    elif findings.status is FindingsStatus.PARTIAL:
        findings = replace(findings, error=f"{findings.error}; {summary}" if findings.error else summary)
    return replace(findings, notes=(*findings.notes, *excluded))


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _analyze(registry: Registry, name: str, volume: Volume | None, load_error: str) -> tuple[Findings, float]:
    """One analyzer on the volume; every failure becomes FAILED findings. Returns its wall time."""
    t0 = time.perf_counter()
    try:
        spec = registry.spec(name)
        version, kind = spec.version, spec.kind
    except AnalyzerUnavailable as exc:
        findings = _failed(name, "unknown", AnalyzerKind.QC, exc.reason)
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
    return replace(findings, duration_s=findings.duration_s or duration), duration


def _preload(registry: Registry, names: tuple[str, ...]) -> None:
    """Load the job's analyzers up front (once per worker process); failures are reported by
    :func:`_analyze` when it runs them."""
    for name in names:
        try:
            registry.get(name)
        except Exception:  # _analyze turns it into FAILED findings when it runs the analyzer
            continue


def _share_cores(parallel: int) -> None:
    """Give a torch model running beside other analyzers the cores they leave free: with one
    intra-op thread per core the OpenMP threads of the model wait at barriers for peers that the
    other analyzers preempted, which made inference several times slower on 2 cores."""
    if "torch" not in sys.modules:
        return  # no model loaded in this process: nothing to tell
    from dicomnode.models import torch_runtime

    torch_runtime.set_cpu_threads(None if parallel <= 1 else max(1, cpu_count() - (parallel - 1)))


def run_analysis(task: AnalysisTask) -> AnalysisOutcome:
    """Worker entry point. Bad input becomes FAILED findings (and an SR that says so), never a
    crash; one failing analyzer does not stop the others.

    The volume is loaded once and shared by every analyzer. With more than one analyzer and more
    than one CPU the analyzers run in threads side by side (numpy, scipy and torch release the GIL
    in their heavy parts), and each analyzer's SR/SEG is encoded in this thread as soon as it is
    done, overlapping the analyzers still running. The result objects keep the order of
    ``task.analyzers``, so a job gives the same bytes however its threads were scheduled.
    """
    from dicomnode import results

    registry = worker_registry(task.settings)
    started = time.perf_counter()
    volume, load_error = _load(task.paths)
    excluded: tuple[str, ...] = ()
    headers: list[Dataset] = []
    if volume is None:
        # A header that cannot be decoded may be why: leave such instances out, analyse the others
        # and say so, rather than lose the whole series' results. (Only on this path: checking
        # every header of every series up front would cost the hot path time.)
        usable, headers, problems = screen_headers(task.paths)
        excluded = tuple(problems)
        if excluded:
            LOG.warning("series %s: %s", task.series_instance_uid, "; ".join(excluded))
            if usable:
                volume, load_error = _load(tuple(usable))
            else:
                volume, load_error = None, "no instance of the series has a usable header"
    load_s = time.perf_counter() - started
    if volume is not None:
        headers = list(volume.headers)
    elif not headers:
        headers = _salvaged_headers(task.paths)  # every header is broken: what identifies them
    else:
        headers = _by_instance_number(headers)
    created = datetime.fromtimestamp(task.created)

    names = task.analyzers
    parallel = min(len(names), cpu_count()) if volume is not None else 1
    _preload(registry, names)
    _share_cores(parallel)
    encoded: dict[int, tuple[list[ResultObject], AnalyzerOutcome]] = {}

    repairs: list[str] = []  # filled by prepare_sources, before the first encode

    def prepare_sources() -> results.Sources | Exception:
        # Headers that cannot be repaired are reported per analyzer below, like any encode failure.
        try:
            return results.prepare_sources(headers)
        except Exception as exc:
            first = exc
        # The volume was built, so the undecodable elements are ones imaging did not need: leave
        # them out of the report's copy of the headers, and say so.
        cleaned = []
        for header in headers:
            fixed, dropped = without_undecodable(header)
            if dropped:
                repairs.append(f"instance {_identify(header, '?')}: element(s) {', '.join(dropped)} cannot be "
                               "decoded and were left out of this report's copy of its header")
            cleaned.append(fixed)
        try:
            return results.prepare_sources(cleaned) if repairs else first
        except Exception as exc:
            LOG.exception("source headers cannot be used for results")
            return exc

    def build(findings: Findings, sources: results.Sources | Exception | list[Dataset],
              previous: tuple[ResultObject, ...]) -> list[ResultObject]:
        if isinstance(sources, Exception):
            raise sources
        if not isinstance(sources, results.Sources) and not sources:
            raise ValueError("no source header can identify the series")
        return results.build_results(findings, sources, epoch=task.epoch, previous=previous,
                                     created=created, uid_prefix=task.uid_root)

    def encode(index: int, findings: Findings, duration: float, sources: results.Sources | Exception) -> None:
        name = names[index]
        previous = tuple(p for p in task.previous if p.analyzer == name)
        findings = _with_exclusions(findings, excluded, len(task.paths))
        if repairs:
            findings = replace(findings, notes=(*findings.notes, *repairs))
        t1 = time.perf_counter()
        try:
            objects = build(findings, sources, previous)
        except Exception as exc:
            # The findings cannot be encoded (e.g. a mask that does not fit): report the failure.
            LOG.exception("results of %s could not be encoded", name)
            findings = _failed(name, findings.version, findings.kind, f"results could not be encoded: {exc}")
            findings = replace(findings, notes=(*excluded, *repairs))
            try:
                objects = build(findings, sources, previous)
            except Exception as again:
                # Headers the full report cannot be built on: fall back to what identifies the
                # images (patient, study, series, SOP), so the PACS still gets a failure SR.
                LOG.exception("the failure report of %s could not be encoded; trying minimal headers", name)
                findings = replace(findings, notes=(*excluded, *repairs, f"source headers reduced to their identifying "
                                                               f"attributes: {type(again).__name__}: {again}"))
                try:
                    objects = build(findings, _minimal_headers(headers), previous)
                except Exception as last:  # nothing can be built on: the outcome still says why
                    LOG.exception("no failure report of %s could be encoded", name)
                    findings = replace(findings, error=f"{findings.error}; no failure SR either: {last}")
                    objects = []
        encoded[index] = (objects, AnalyzerOutcome(
            analyzer=name, version=findings.version, kind=str(findings.kind), status=str(findings.status),
            priority=findings.priority.name.lower() if findings.priority is not None else None,
            error=findings.error, duration_s=round(duration, 3), build_s=round(time.perf_counter() - t1, 3),
            findings=[_finding_summary(f, volume) for f in findings.findings],
            not_for_clinical_use=findings.not_for_clinical_use,
        ))

    if parallel > 1:
        with cf.ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="analyzer") as pool:
            futures = {pool.submit(_analyze, registry, name, volume, load_error): i
                       for i, name in enumerate(names)}
            sources = prepare_sources()  # while the analyzers run
            for future in cf.as_completed(futures):
                encode(futures[future], *future.result(), sources)
    else:
        sources = prepare_sources()
        for i, name in enumerate(names):
            encode(i, *_analyze(registry, name, volume, load_error), sources)

    out = [obj for i in range(len(names)) for obj in encoded[i][0]]
    outcomes = [encoded[i][1] for i in range(len(names))]
    volume_problems = (*excluded, *(volume.problems if volume is not None else (load_error,)))
    return AnalysisOutcome(tuple(out), tuple(outcomes), volume_problems, round(load_s, 3),
                           len(task.paths), round(time.perf_counter() - started, 3))


def _load(paths: tuple[str, ...]) -> tuple[Volume | None, str]:
    """The series' volume, or None and why not: an unreadable series is a finding about the
    series, not a crash."""
    from dicomnode import imaging

    try:
        return imaging.load_volume([Path(p) for p in paths]), ""
    except Permanent as exc:
        return None, exc.reason
    except Exception as exc:
        return None, f"cannot load series: {exc}"


def _finding_summary(finding: Finding, volume: Volume | None) -> dict[str, Any]:
    """What the ledger keeps of a finding: its code and verdict, and the source slices its mask
    touches (SOP Instance UIDs, for a Key Object that flags them)."""
    slices: list[str] = []
    if finding.mask is not None and volume is not None and len(volume.headers) == finding.mask.array.shape[0]:
        import numpy as np

        touched = np.flatnonzero(finding.mask.array.reshape(finding.mask.array.shape[0], -1).any(axis=1))
        slices = [str(volume.headers[int(k)].SOPInstanceUID) for k in touched]
    code = finding.finding_type
    return {"type": code.meaning, "code": [code.value, code.scheme, code.meaning], "present": finding.present,
            "probability": finding.probability, "slices": slices}


class AnalyzeHandler:
    kind = JobKind.ANALYZE
    in_process = False

    def __init__(self, ledger: Ledger, spool: Spool, queue: JobQueue, settings: AnalysisSettings,
                 audit: Audit, *, uid_root: str | None = None, notifier: Notifier | None = None) -> None:
        self.ledger = ledger
        self.spool = spool
        self.queue = queue
        self.settings = settings
        self.audit = audit
        self.uid_root = uid_root  # [results] uid_root
        self.notifier = notifier

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
            created=job.created_at, previous=tuple(previous), uid_root=self.uid_root,
        )

    def worker_warm_up(self) -> tuple[Callable[..., None], tuple[Any, ...]]:
        """What each new worker process runs before its first job (see ``LocalExecutor``)."""
        return warm_up, (self.settings,)

    # The process pool pickles what it is given to run: a module-level function travels by name,
    # whereas a bound method would drag this handler (ledger engine, spool) along and fail.
    run = staticmethod(run_analysis)

    def finish(self, job: JobRow, outcome: AnalysisOutcome) -> None:
        # The results exist from here; the ledger's clock, like every time of the event, so that
        # times recorded by different hosts of a cluster can be subtracted.
        built_at = self.ledger.now()
        destinations: list[str] = list(job.payload.get("destinations", []))
        written: list[tuple[ResultObject, str]] = []
        for obj in outcome.results:
            relative = self.spool.instance_path(obj.study_instance_uid, obj.series_instance_uid,
                                                obj.sop_instance_uid, area="results")
            self.spool.write(relative, obj.data)  # False on a re-run: same UID, first copy kept
            written.append((obj, relative))
        summaries = {o.analyzer: o for o in outcome.analyzers}
        recorded: list[dict[str, Any]] = []
        events: list[Event] = []
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
                recorded.append({"analyzer": obj.analyzer, "kind": obj.kind, "sop_class_uid": obj.sop_class_uid,
                                 "sop_instance_uid": obj.sop_instance_uid,
                                 "series_instance_uid": obj.series_instance_uid})
                for destination in destinations:
                    self.queue.enqueue(
                        conn, JobKind.DELIVER, series_uid=job.series_instance_uid, epoch=job.epoch,
                        payload={"result_id": result_id, "destination": destination},
                        priority=job.priority, dedup_key=f"deliver:{obj.sop_instance_uid}:{destination}",
                    )
            if self.notifier is not None:
                # Same transaction as the results: an event exists exactly when its results do.
                events = self.notifier.record_analysis(conn, job, reports_from_outcome(outcome.analyzers),
                                                       recorded, built_at)
            if not self.queue.complete(conn, job, {
                "analyzers": [o.__dict__ for o in outcome.analyzers],
                "volume_problems": list(outcome.volume_problems),
                "load_s": outcome.load_s,
                "worker_s": outcome.worker_s,
                "instances": outcome.instances,
                "results": len(outcome.results),
            }):
                raise Transient("lease lost while finishing; another worker owns the job")
        for o in outcome.analyzers:
            self.audit.log("analysis.done", job=job.id, series_instance_uid=job.series_instance_uid,
                           epoch=job.epoch, analyzer=o.analyzer, status=o.status, priority=o.priority,
                           seconds=o.duration_s)
        if self.notifier is not None:
            self.notifier.announce(events)
        self.queue.on_enqueued()

    def on_failed(self, job: JobRow) -> None:
        current = self.ledger.job(job.id)
        if self.notifier is not None and current is not None and current.state == JobState.DEAD:
            # No findings at all: silence must not read as "negative".
            with self.ledger.transaction() as conn:
                events = self.notifier.record_dead_analysis(conn, current)
            self.notifier.announce(events)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, default=str, sort_keys=True)
