"""Series completeness: when has the scanner finished sending a series epoch?

DICOM has no "series complete" message, so completeness is inferred from evidence, strongest
first:

1. expected count: Images in Acquisition (0020,1002) x Number of Temporal Positions (0020,0105),
   when the headers carry them, is reached;
2. association release: the association that carried the series' latest instance was released
   normally (scanners send a series and release) - then wait ``release_grace_s``;
3. quiet period: no new instance for ``quiet_period_s`` (global, or per rule).

The ledger holds the truth (last arrival, release time, counts); this module only reads it and
asks for transitions, so after a restart every pending series is simply evaluated again. The
scheduler calls :meth:`Assembly.sweep`; nothing here sleeps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from dicomnode.config import Config
from dicomnode.domain import JobKind, SeriesState, SeriesSummary
from dicomnode.jobs import JobQueue
from dicomnode.ledger import Ledger, SeriesRow, series
from dicomnode.routing import Plan, plan_for

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    series_instance_uid: str
    epoch: int
    outcome: str  # "queued", "ignored", "done"
    rule: str
    job_id: int | None = None


def due_time(row: SeriesRow, quiet_period_s: float, release_grace_s: float) -> float:
    """When ``row`` counts as complete on the evidence seen so far (may be in the past)."""
    due = row.last_received_at + quiet_period_s
    if row.released_at is not None:
        due = min(due, row.released_at + release_grace_s)
    if row.expected_count and row.instance_count >= row.expected_count:
        due = min(due, row.last_received_at)
    return due


def analyze_dedup_key(series_uid: str, epoch: int, analyzers: tuple[str, ...]) -> str:
    return f"analyze:{series_uid}:{epoch}:{','.join(sorted(analyzers))}"


class Assembly:
    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        queue: JobQueue,
        default_analyzers: Callable[[SeriesSummary], list[str]],
        wants_gpu: Callable[[str], bool] = lambda _name: False,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.queue = queue
        self.default_analyzers = default_analyzers
        self.wants_gpu = wants_gpu

    def _plan(self, row: SeriesRow) -> tuple[SeriesSummary, Plan | None]:
        summary = self.ledger.series_summary(row)
        return summary, plan_for(summary, self.config, self.default_analyzers)

    def sweep(self, now: float | None = None) -> tuple[list[Completion], float | None]:
        """Complete every receiving series that is due; return what was done and the next due time.

        Every receiver may sweep at the same time: each transition is a conditional update on the
        evidence that was evaluated (epoch, state, instance count), so exactly one sweeper wins it.
        ``now`` defaults to the ledger's clock, the one the evidence was recorded with."""
        now = self.ledger.now() if now is None else now
        done: list[Completion] = []
        next_due: float | None = None
        for row in self.ledger.series_in_state(SeriesState.RECEIVING):
            summary, plan = self._plan(row)
            quiet = plan.quiet_period_s if plan else self.config.assembly.quiet_period_s
            due = due_time(row, quiet, self.config.assembly.release_grace_s)
            if due > now:
                next_due = due if next_due is None else min(next_due, due)
                continue
            completion = self._complete(row, summary, plan, now)
            if completion is not None:
                done.append(completion)
        return done, next_due

    def _complete(self, row: SeriesRow, summary: SeriesSummary, plan: Plan | None,
                  now: float) -> Completion | None:
        uid, epoch = row.series_instance_uid, row.epoch
        if plan is None:
            return self._transition(row, SeriesState.IGNORED, "", "no rule matches this series")
        if epoch > 1 and plan.late_policy == "ignore" and row.processed_at is not None:
            late_by_s = self.ledger.epoch_started_at(uid, epoch) - row.processed_at
            if late_by_s / 60 > plan.late_window_min:
                return self._transition(row, SeriesState.IGNORED, plan.rule,
                                        f"late images ignored by policy (rule {plan.rule})")
        if not plan.analyzers:
            return self._transition(row, SeriesState.DONE, plan.rule, "no analyzer applies")
        payload = {
            "analyzers": list(plan.analyzers),
            "destinations": list(plan.destinations),
            "rule": plan.rule,
            "modality": summary.modality,
            "calling_ae": summary.calling_ae,
            "notify": list(plan.notify),
            "notify_at": plan.notify_at,
        }
        with self.ledger.transaction() as conn:
            moved = conn.execute(
                series.update()
                .where(series.c.series_instance_uid == uid)
                .where(series.c.epoch == epoch)
                .where(series.c.state == SeriesState.RECEIVING)
                .where(series.c.instance_count == row.instance_count)
                .values(state=SeriesState.QUEUED, processed_at=now, rule=plan.rule[:100], note="")
            ).rowcount
            if not moved:
                # Another sweeper won, or a new instance arrived meanwhile: the next sweep decides.
                return None
            job_ids = [
                self.queue.enqueue(
                    conn, JobKind.ANALYZE, series_uid=uid, epoch=epoch,
                    payload={**payload, "analyzers": list(names), **({"gpu": True} if gpu else {})},
                    priority=plan.priority, dedup_key=analyze_dedup_key(uid, epoch, names),
                )
                for names, gpu in self._split_for_queues(plan.analyzers)
            ]
        job_id = job_ids[0]
        self.queue.audit.log("series.complete", series_instance_uid=uid, epoch=epoch, rule=plan.rule,
                             instances=row.instance_count, job=job_id,
                             **({"jobs": job_ids} if len(job_ids) > 1 else {}))
        self.queue.on_enqueued()
        return Completion(uid, epoch, "queued", plan.rule, job_id)

    def _split_for_queues(self, analyzers: tuple[str, ...]) -> list[tuple[tuple[str, ...], bool]]:
        """One analyze job, or, in a cluster with a GPU queue, one for the analyzers whose manifest
        asks for a GPU and one for the others, so that CPU work does not wait for a GPU."""
        queues = self.queue.queues
        if queues is None or not queues.analyze_gpu:
            return [(analyzers, False)]
        gpu = tuple(name for name in analyzers if self.wants_gpu(name))
        cpu = tuple(name for name in analyzers if name not in gpu)
        return [(names, on_gpu) for names, on_gpu in ((cpu, False), (gpu, True)) if names]

    def _transition(self, row: SeriesRow, state: SeriesState, rule: str, note: str) -> Completion | None:
        if not self.ledger.mark_series(row.series_instance_uid, row.epoch, state, rule=rule, note=note,
                                       instance_count=row.instance_count):
            return None
        self.queue.audit.log("series." + state.value, series_instance_uid=row.series_instance_uid,
                             epoch=row.epoch, note=note)
        return Completion(row.series_instance_uid, row.epoch, state.value, rule)
