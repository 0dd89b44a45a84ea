"""The job handlers a process runs, built once for every executor.

The embedded node (``LocalExecutor``) and a cluster worker (``dicomnode worker``) run the same
handlers in the same order; building them here keeps the two lists from drifting apart.
"""

from __future__ import annotations

from collections.abc import Callable

from dicomnode.analysis import AnalyzeHandler
from dicomnode.audit import Audit
from dicomnode.config import Config
from dicomnode.errors import AnalyzerUnavailable
from dicomnode.jobs import JobHandler, JobQueue
from dicomnode.ledger import Ledger
from dicomnode.models import Registry
from dicomnode.notify import Notifier, NotifyHandler
from dicomnode.sender import DeliverHandler
from dicomnode.spool import Spool


def analyzer_info(registry: Registry) -> Callable[[str], tuple[str, str] | None]:
    """(kind, version) of an analyzer by name, None when the registry does not know it: what an
    ``analysis.failed`` event needs about a job that produced nothing."""

    def info(name: str) -> tuple[str, str] | None:
        try:
            spec = registry.spec(name)
        except AnalyzerUnavailable:
            return None
        return str(spec.kind), spec.version

    return info


def make_notifier(config: Config, ledger: Ledger, queue: JobQueue, registry: Registry) -> Notifier:
    return Notifier(ledger, queue, config.notify, analyzer_info(registry))


def job_handlers(config: Config, ledger: Ledger, spool: Spool, queue: JobQueue, audit: Audit,
                 notifier: Notifier) -> list[JobHandler]:
    """One handler per job kind. Notify comes before deliver: an executor's I/O threads take
    notifications first, they are the urgent part."""
    return [
        AnalyzeHandler(ledger, spool, queue, config.analysis, audit, uid_root=config.results.uid_root,
                       notifier=notifier),
        NotifyHandler(ledger, spool, queue, config, audit),
        DeliverHandler(ledger, spool, queue, config.destinations, config.node.ae_title, audit),
    ]
