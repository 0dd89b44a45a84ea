"""Metrics: counters follow the audit log of a real DCMTK send; ledger gauges; latency histograms."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from conftest import NodeFactory, run_dcmtk, store_successes, storescu
from prometheus_client.parser import text_string_to_metric_families
from synthetic import ct_series, write_series
from test_admin import AUTH, AdminNodeFactory, admin_node, storescp  # noqa: F401  (fixture)
from test_recovery import free_port

from dicomnode.metrics import Metrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(exposition: bytes | str) -> Samples:
    text = exposition.decode() if isinstance(exposition, bytes) else exposition
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def audit_lines(node_data: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (node_data / "audit.jsonl").read_text().splitlines()]


def test_real_send_is_counted_and_audited(admin_node: AdminNodeFactory,  # noqa: F811  (fixture)
                                          tmp_path: Path) -> None:
    pacs_port, down_port = free_port(), free_port()
    node = admin_node(destinations={"PACS": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port},
                                    "DOWN": {"ae_title": "DOWN", "host": "127.0.0.1", "port": down_port}},
                      # A retry horizon (0.036 s) shorter than the backoff: one retry, then dead.
                      jobs={"max_attempts": 2, "backoff_base_s": 0.1, "retry_for_h": 0.00001})
    port = node.receiver.ports[0]
    files = write_series(ct_series(5, seed="metrics"), tmp_path / "ct")
    with storescp(pacs_port, tmp_path / "pacs"):
        assert store_successes(storescu(port, *files)) == 5
        assert store_successes(storescu(port, files[0])) == 1  # a duplicate
        assert run_dcmtk("echoscu", "-aet", "STRANGER", "-aec", "DICOMNODE", "127.0.0.1",
                         str(port)).returncode != 0
        node.run_until_idle(timeout=120)

    lines = audit_lines(node.data_dir)
    stored = [line for line in lines if line["event"] == "instance.stored"]
    assert len(stored) == 5
    found = samples(httpx.get(f"{node.admin.url}/metrics", headers=AUTH).content)  # type: ignore[union-attr]
    assert value(found, "dicomnode_associations_total", outcome="accepted") == 2
    assert value(found, "dicomnode_associations_total", outcome="rejected") == 1
    assert value(found, "dicomnode_instances_total", outcome="stored") == 5
    assert value(found, "dicomnode_instances_total", outcome="duplicate") == 1
    assert value(found, "dicomnode_cstore_responses_total", status="0x0000") == 6
    assert value(found, "dicomnode_received_bytes_total") == sum(int(str(s["bytes"])) for s in stored) > 0

    analyses = [line for line in lines if line["event"] == "analysis.done"]
    assert analyses
    for analyzer in {str(a["analyzer"]) for a in analyses}:
        status = next(str(a["status"]) for a in analyses if a["analyzer"] == analyzer)
        count = value(found, "dicomnode_analysis_duration_seconds_count", analyzer=analyzer, status=status)
        assert count >= 1

    delivered = [line for line in lines if line["event"] == "result.delivered"]
    dead = [line for line in lines if line["event"] == "result.dead"]
    assert delivered and len(dead) == len(delivered)  # every result: PACS took it, DOWN never answered
    assert value(found, "dicomnode_deliveries_total", destination="PACS") == len(delivered)
    assert value(found, "dicomnode_delivery_failures_total", destination="DOWN", outcome="dead") == len(dead)
    assert value(found, "dicomnode_delivery_failures_total", destination="DOWN", outcome="retry") == len(dead)
    assert value(found, "dicomnode_time_to_result_seconds_count") == len(delivered)
    latency_sum = value(found, "dicomnode_time_to_result_seconds_sum")
    assert 0 < latency_sum < 120 * len(delivered)
    assert value(found, "dicomnode_jobs", kind="deliver", state="dead") == len(dead)
    assert value(found, "dicomnode_jobs", kind="deliver", state="succeeded") == len(delivered)
    assert value(found, "dicomnode_jobs", kind="analyze", state="succeeded") == 1
    assert 0 < node.metrics.images_per_second() <= 5 / 60  # 5 images in the last minute at most


def test_refusals_are_counted_by_status(make_node: NodeFactory, tmp_path: Path) -> None:
    running = make_node(node={"min_free_mb": 10**9}, admin={"enabled": False})  # disk "full"
    files = write_series(ct_series(2, seed="refused"), tmp_path / "ct")
    for path in files:  # one association each: storescu gives up after a refusal
        assert store_successes(storescu(running.port, path)) == 0
    found = samples(running.node.metrics.exposition())
    assert value(found, "dicomnode_instances_total", outcome="refused") == 2
    assert value(found, "dicomnode_cstore_responses_total", status="0xA700") == 2
    assert value(found, "dicomnode_instances_total", outcome="stored") == 0


def test_metrics_are_per_node_and_a_bad_record_never_raises() -> None:
    a, b = Metrics(), Metrics()
    a.observe({"event": "instance.stored", "bytes": "not a number", "ts": 1.0})
    a.observe({"event": "analysis.done", "analyzer": "qc-ct", "status": "complete", "seconds": 0.2})
    a.observe({"event": "result.delivered", "job": 1})  # no ledger: no latency, still counted
    found_a, found_b = samples(a.exposition()), samples(b.exposition())
    qc = {"analyzer": "qc-ct", "status": "complete"}
    assert value(found_a, "dicomnode_analysis_duration_seconds_count", **qc) == 1
    assert value(found_a, "dicomnode_deliveries_total", destination="") == 1
    assert value(found_a, "dicomnode_time_to_result_seconds_count") == 0
    assert value(found_b, "dicomnode_analysis_duration_seconds_count", **qc) == 0
