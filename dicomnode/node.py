"""Composition root: builds every stage from the config, starts and stops them.

No business logic lives here; only wiring, start-up reconciliation and ``run_until_idle``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from dicomnode.audit import Audit
from dicomnode.config import Config
from dicomnode.domain import StoredInstance
from dicomnode.ledger import Ledger, RecordOutcome
from dicomnode.receiver import Receiver, parse_header, routing_fields
from dicomnode.spool import Spool

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconcileReport:
    debris_removed: int
    orphans_indexed: int
    missing: tuple[str, ...]


class Node:
    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        data_dir = config.node.data_dir.resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.spool = Spool(data_dir / "spool", config.node.min_free_mb * 2**20)
        self.ledger = Ledger.sqlite(str(data_dir / "ledger.sqlite3"))
        self.audit = Audit(data_dir / "audit.log", enabled=config.audit.enabled)
        self.receiver = Receiver(
            config.node,
            config.peers,
            self.spool,
            self.ledger,
            self.audit,
            on_stored=self._on_stored,
        )
        self.last_reconcile: ReconcileReport | None = None
        self._started = False

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.last_reconcile = self.reconcile()
        self.receiver.start()
        self._started = True
        self.audit.log("node.started", ae_title=self.config.node.ae_title, port=self.config.node.port)

    def stop(self) -> None:
        if self._started:
            self.receiver.stop()
            self._started = False
            self.audit.log("node.stopped")
        self.ledger.close()
        self.audit.close()

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- recovery -------------------------------------------------------------------------------

    def reconcile(self) -> ReconcileReport:
        """Make spool and ledger agree after a crash.

        Temporary files are debris (never acknowledged). A spool file without a ledger row was
        linked but not committed: the sender was not answered, but the bytes are good, so they are
        indexed. A ledger row without its file must never happen; it is reported loudly.
        """
        debris = self.spool.remove_debris()
        indexed_paths = self.ledger.instance_paths()
        on_disk = set(self.spool.files("instances"))
        orphans = 0
        for relative in sorted(on_disk - indexed_paths):
            try:
                data = self.spool.read(relative)
                ds = parse_header(data)
                meta = ds.file_meta
                from datetime import UTC, datetime

                item = StoredInstance(
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    series_instance_uid=str(ds.SeriesInstanceUID),
                    study_instance_uid=str(ds.StudyInstanceUID),
                    transfer_syntax_uid=str(meta.TransferSyntaxUID),
                    path=relative,
                    size=len(data),
                    calling_ae=str(meta.get("SourceApplicationEntityTitle", "")).strip(),
                    peer_host="",
                    received_at=datetime.now(UTC),
                    association_id="reconciled",
                    **routing_fields(ds),
                )
                self.ledger.record_instance(item)
                orphans += 1
            except Exception as exc:  # a file we wrote but cannot read back: keep it, say so
                LOG.error("cannot index spool file %s: %s", relative, exc)
        missing = tuple(sorted(indexed_paths - on_disk))
        for relative in missing:
            LOG.error("ledger row without spool file: %s", relative)
            self.audit.log("instance.missing", path=relative)
        report = ReconcileReport(debris, orphans, missing)
        if debris or orphans or missing:
            self.audit.log("node.reconciled", debris_removed=debris, orphans_indexed=orphans,
                           missing=len(missing))
        return report

    # --- stage hooks ----------------------------------------------------------------------------

    def _on_stored(self, item: StoredInstance, outcome: RecordOutcome) -> None:
        pass
