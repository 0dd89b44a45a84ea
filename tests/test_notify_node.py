"""Notify through a running node: storescu -> dicomnode -> HL7 listener, webhook receiver, Orthanc.

The series are small synthetic head CTs with a bleed-like block, analysed by ``test-bleed``
(``tests/notify_fixtures.py``): positive on the first 8 slices, negative once a ninth slice arrives
late, so a late-image retraction can be tested end to end. ``qc-ct`` runs beside it (the embedded
default route) and, being QC, notifies nobody.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import hl7
import pixelmed
import pydicom
import pytest
import tomlkit
from conftest import NodeFactory, base_config, store_successes, storescu
from dciodvfy import dciodvfy
from mllp_listener import MllpListener
from notify_fixtures import LESION_SLICE, head_ct, write_model
from orthanc import Orthanc, free_port
from synthetic import ct_series, paint_blob, write_series
from webhook_receiver import WebhookReceiver

from dicomnode.domain import JobKind, JobState
from dicomnode.ledger import Ledger
from dicomnode.results import device_observer_uid

SECRET = "a-test-secret-of-32-characters!!"


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path / "orthanc").start()
    yield pacs
    pacs.stop()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[MllpListener]:
    peer = MllpListener(tmp_path / "mllp")
    yield peer
    peer.stop()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[WebhookReceiver]:
    peer = WebhookReceiver(tmp_path / "webhook", SECRET)
    yield peer
    peer.stop()


def models(tmp_path: Path, *, broken: bool = False) -> dict[str, Any]:
    write_model(tmp_path / "models" / "test-bleed")
    if broken:
        write_model(tmp_path / "models" / "test-broken", broken=True, name="test-broken")
    return {"shipped_models": False, "model_dirs": [str(tmp_path / "models")]}


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomnode.cli", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=120)


def write_config(tmp_path: Path, **sections: Any) -> Path:
    path = tmp_path / "dicomnode.toml"
    path.write_text(tomlkit.dumps(base_config(tmp_path, **sections)))
    return path


def events(ledger: Ledger) -> list[Any]:
    return sorted(ledger.list_events(limit=100), key=lambda e: (e.epoch, e.created_at))


def notifications(ledger: Ledger, event_id: str) -> dict[str, Any]:
    return {row.channel: row for row in ledger.notifications_of([event_id])}


@pytest.mark.slow
def test_positive_head_ct_reaches_ris_webhook_and_pacs_then_a_late_image_retracts(
    make_node: NodeFactory, orthanc: Orthanc, listener: MllpListener, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    running = make_node(
        destinations={"PACS": orthanc.destination()}, analysis=models(tmp_path),
        notify={"RIS": listener.channel(request_priority=True), "HOOK": receiver.channel(),
                "KEY": {"kind": "kos", "destination": "PACS"}},
    )
    datasets = head_ct("e2e-notify")
    files = write_series(datasets, tmp_path / "ct")
    series_uid, study_uid = datasets[0].SeriesInstanceUID, datasets[0].StudyInstanceUID
    assert store_successes(storescu(running.port, *files[:8])) == 8
    running.node.run_until_idle(timeout=180)
    ledger = running.ledger

    # --- epoch 1: one critical event, told to every channel (no rules: every channel) -----------------
    (critical,) = events(ledger)
    assert critical.type == "finding.critical" and critical.analyzer == "test-bleed" and critical.epoch == 1
    assert critical.verdict == "critical" and critical.verdict_changed is None and critical.supersedes is None
    sent = notifications(ledger, critical.id)
    assert set(sent) == {"RIS", "HOOK", "KEY"} and {n.state for n in sent.values()} == {JobState.SUCCEEDED}
    for n in sent.values():  # time to notification, per event and channel, in the ledger
        assert critical.last_image_at <= critical.series_complete_at <= critical.result_built_at
        assert critical.result_built_at <= n.sent_at <= n.acked_at

    oru, omi = listener.wait_for(2)
    assert (oru["control_id"], oru["answer"], oru["processing_id"]) == (critical.id, "AA", "P")
    message = hl7.parse(oru["text"])
    assert message.unescape(str(message.segment("OBR")(3))) == datasets[0].AccessionNumber
    assert str(message.segment("PID")(3)).split("^")[0] == datasets[0].PatientID
    assert str(message.segment("OBX")(3)) == "50960005^Hemorrhage^SCT" and str(message.segment("OBX")(8)) == "AA"
    assert omi["type"] == "OMI^O23^OMI_O23" and "|XO|" in omi["text"]

    (hook,) = receiver.wait_for(1)
    assert hook["signature_ok"] and hook["timestamp_ok"] and hook["answer"] == "200"
    assert hook["body"]["id"] == critical.id and hook["body"]["type"] == "dicomnode.finding.critical"
    assert hook["body"]["subject"] == study_uid and "patient" not in hook["body"]["data"]
    results = {r.kind: r for r in ledger.results_for_series(series_uid, epoch=1) if r.analyzer == "test-bleed"}
    assert {r["sop_instance_uid"] for r in hook["body"]["data"]["results"]} == {
        results["sr"].sop_instance_uid, results["seg"].sop_instance_uid}
    assert datasets[0].PatientID not in hook["raw"]

    stored = {i["sop_instance_uid"]: i for i in orthanc.instances()}
    kos_uid = sent["KEY"].response.split()[-1]
    assert results["sr"].sop_instance_uid in stored and results["seg"].sop_instance_uid in stored
    kos_bytes = orthanc.file(stored[kos_uid]["id"])
    assert dciodvfy(kos_bytes).clean, dciodvfy(kos_bytes)
    template = pixelmed.validate(kos_bytes)  # TID 2010 against PixelMed's templates
    assert template.errors == [] and template.warnings == [], template.text
    kos = pydicom.dcmread(BytesIO(kos_bytes))
    assert kos.Modality == "KO" and kos.StudyInstanceUID == study_uid
    stated = _stated_key_object_codes()
    emitted = {(i.CodeValue, i.CodingSchemeDesignator, i.CodeMeaning) for e in kos.iterall() if e.VR == "SQ"
               for i in e.value if "CodeValue" in i}
    assert emitted == stated, "docs/conformance.md lists other Key Object codes than the node sends"
    referenced = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in kos.ContentSequence
                  if "ReferencedSOPSequence" in i}
    assert referenced == {datasets[LESION_SLICE].SOPInstanceUID, results["sr"].sop_instance_uid,
                          results["seg"].sop_instance_uid}

    metrics = running.node.metrics.exposition().decode()
    assert 'dicomnode_time_to_notification_seconds_count{channel="RIS",event="finding.critical"} 1.0' in metrics
    assert 'dicomnode_notify_attempts_total{channel="HOOK",outcome="delivered"} 1.0' in metrics

    # --- epoch 2: a late image removes the finding: a revised SR and a retraction ---------------------
    assert store_successes(storescu(running.port, files[8])) == 1
    running.node.run_until_idle(timeout=180)
    first, retracted = events(ledger)
    assert first.id == critical.id
    assert retracted.type == "finding.retracted" and retracted.epoch == 2 and retracted.supersedes == critical.id
    assert retracted.verdict == "negative" and retracted.previous_verdict == "critical" and retracted.verdict_changed
    revised = next(r for r in ledger.results_for_series(series_uid, epoch=2)
                   if r.analyzer == "test-bleed" and r.kind == "sr")
    sr = pydicom.dcmread(BytesIO(orthanc.file(next(i["id"] for i in orthanc.instances()
                                                   if i["sop_instance_uid"] == revised.sop_instance_uid))))
    predecessor = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == results["sr"].sop_instance_uid
    assert "Absent" in str(sr.ContentSequence)
    assert set(notifications(ledger, retracted.id)) == {"RIS", "HOOK"}  # a Key Object flags critical findings only
    correction = listener.wait_for(3)[2]
    assert correction["control_id"] == retracted.id and correction["type"] == "ORU^R01^ORU_R01"
    assert "|C\r" in correction["text"] or "|C|" in correction["text"]
    assert "verdict changed from critical to negative" in correction["text"]
    hook = receiver.wait_for(2)[1]["body"]
    assert hook["type"] == "dicomnode.finding.retracted" and hook["data"]["supersedes"] == critical.id
    assert hook["data"]["verdict_changed"] is True and hook["data"]["previous_verdict"] == "critical"

    # --- the CLI lists both events and their deliveries --------------------------------------------
    config = write_config(tmp_path, destinations={"PACS": orthanc.destination()}, analysis=models(tmp_path),
                          notify={"RIS": listener.channel(), "HOOK": receiver.channel()})
    listing = cli(config, "notify")
    assert listing.returncode == 0, listing.stderr
    assert critical.id in listing.stdout and retracted.id in listing.stdout
    assert "finding.retracted" in listing.stdout and "(was critical)" in listing.stdout
    assert listing.stdout.count("succeeded") == 5 and "s after last image" in listing.stdout


@pytest.mark.slow
def test_positive_head_ct_on_the_embedded_defaults_notifies_with_no_manual_step(
    make_node: NodeFactory, orthanc: Orthanc, listener: MllpListener, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    """The shipped demo model (NOT FOR CLINICAL USE) on a head CT with a painted 70 HU bleed-like
    blob (the series of ``bench_latency.py e2e``), embedded default route: SR, SEG and a Key Object
    in Orthanc, an acknowledged ORU at the listener and a verified webhook. The Key Object's UIDs are
    under ``[results] uid_root`` like the SR's and SEG's, and it names the model as the SR does."""
    running = make_node(destinations={"PACS": orthanc.destination()}, results={"uid_root": "1.2.3.4.5"},
                        notify={"RIS": listener.channel(), "HOOK": receiver.channel(),
                                "KEY": {"kind": "kos", "destination": "PACS"}})
    datasets = paint_blob(ct_series(24, 128, 128, seed="demo-notify", slice_thickness=1.0))
    assert store_successes(storescu(running.port, *write_series(datasets, tmp_path / "ct"))) == 24
    running.node.run_until_idle(timeout=180)
    (event,) = events(running.ledger)
    assert (event.type, event.analyzer) == ("finding.critical", "demo-hyperdense")
    results = {r.kind: r.sop_instance_uid for r in running.ledger.results_for_series(datasets[0].SeriesInstanceUID)
               if r.analyzer == "demo-hyperdense"}
    kos_uid = notifications(running.ledger, event.id)["KEY"].response.split()[-1]
    stored = {i["sop_instance_uid"] for i in orthanc.instances()}
    assert {results["sr"], results["seg"], kos_uid} <= stored
    assert all(uid.startswith("1.2.3.4.5.") for uid in (results["sr"], results["seg"], kos_uid))
    kos = pydicom.dcmread(BytesIO(orthanc.file(next(i["id"] for i in orthanc.instances()
                                                    if i["sop_instance_uid"] == kos_uid))))
    assert kos.SeriesInstanceUID.startswith("1.2.3.4.5.")
    observer = {e.value for e in kos.iterall() if e.keyword == "UID"}
    assert observer == {device_observer_uid("demo-hyperdense", event.version)}
    (oru,) = listener.wait_for(1)
    assert oru["control_id"] == event.id and oru["answer"] == "AA" and "NOT FOR CLINICAL USE" in oru["text"]
    (hook,) = receiver.wait_for(1)
    assert hook["signature_ok"] and hook["timestamp_ok"] and hook["body"]["id"] == event.id


@pytest.mark.slow
def test_failures_retry_dead_letters_and_replay(make_node: NodeFactory, tmp_path: Path) -> None:
    """A webhook's 503 with Retry-After is retried; an HL7 AE is a dead letter that `notify retry`
    replays; a failing triage analyzer and a dead analyze job both give ``analysis.failed``;
    a negative series and a QC-only series notify nobody."""
    listener = MllpListener(tmp_path / "mllp", ["AE", "AE"])
    receiver = WebhookReceiver(tmp_path / "webhook", SECRET, ["503:1"])
    try:
        sections: dict[str, Any] = {
            "admin": {"enabled": True, "port": free_port()},
            "analysis": models(tmp_path, broken=True),
            "notify": {"RIS": listener.channel(), "HOOK": receiver.channel()},
            "rules": [
                {"name": "broken", "match": {"series_description": "BROKEN*"}, "then": {"analyzers": ["test-broken"]}},
                {"name": "qc", "match": {"series_description": "QC*"}, "then": {"analyzers": ["qc-ct"]}},
                {"name": "head", "match": {"body_part": "HEAD"},
                 "then": {"analyzers": ["test-bleed"], "notify": ["RIS", "HOOK"]}},
            ],
        }
        running = make_node(**sections)
        ledger = running.ledger
        positive = write_series(head_ct("retry")[:8], tmp_path / "positive")
        assert store_successes(storescu(running.port, *positive)) == 8
        running.node.run_until_idle(timeout=120)
        (event,) = events(ledger)
        sent = notifications(ledger, event.id)
        assert sent["HOOK"].state == JobState.SUCCEEDED and sent["HOOK"].attempts == 2
        hooks = receiver.wait_for(2)
        assert [h["answer"] for h in hooks] == ["503:1", "200"] and hooks[1]["at"] - hooks[0]["at"] >= 0.9
        assert sent["RIS"].state == JobState.DEAD and "HL7 AE" in sent["RIS"].last_error
        metrics = running.node.metrics.exposition().decode()
        assert 'dicomnode_notify_attempts_total{channel="HOOK",outcome="retry"} 1.0' in metrics
        assert 'dicomnode_notify_attempts_total{channel="RIS",outcome="dead"} 1.0' in metrics

        # The console's dead letters list the notification; its replay button hits the AE again ...
        api = f"http://127.0.0.1:{running.node.config.admin.port}/api"
        (letter,) = _get(f"{api}/dead-letters")
        assert letter["kind"] == "notify" and letter["channel"] == "RIS" and letter["event"]["id"] == event.id
        assert _get(f"{api}/overview")["dead_letters"] == 1
        assert _post(f"{api}/jobs/{letter['id']}/retry")["requeued"] is True
        running.node.run_until_idle(timeout=60)
        assert notifications(ledger, event.id)["RIS"].state == JobState.DEAD
        # ... and once the RIS is fixed, `dicomnode notify retry ID` delivers it.
        config = write_config(tmp_path, **sections)
        replay = cli(config, "notify", "retry", str(sent["RIS"].job_id))
        assert replay.returncode == 0 and "requeued" in replay.stdout
        running.node.run_until_idle(timeout=60)
        assert notifications(ledger, event.id)["RIS"].state == JobState.SUCCEEDED
        assert [m["answer"] for m in listener.wait_for(3)] == ["AE", "AE", "AA"]
        assert {m["control_id"] for m in listener.messages()} == {event.id}
        assert _get(f"{api}/dead-letters") == []
        (view,) = _get(f"{api}/events?series={event.series_instance_uid}")
        assert {n["channel"]: n["state"] for n in view["notifications"]} == {"RIS": "succeeded", "HOOK": "succeeded"}
        (shown,) = [s for s in _get(f"{api}/series") if s["series_instance_uid"] == event.series_instance_uid]
        ris = next(n for n in shown["events"][0]["notifications"] if n["channel"] == "RIS")
        assert shown["time_to_notification_s"] is not None and ris["time_to_notification_s"] >= 0

        # A failing triage analyzer: analysis.failed, so that silence never reads as negative.
        for name, datasets in (("negative", head_ct("negative", lesion=False)[:8]),
                               ("broken", head_ct("broken")[:8]), ("qc", head_ct("qc")[:8])):
            for ds in datasets:
                ds.SeriesDescription = {"negative": "HEAD", "broken": "BROKEN HEAD", "qc": "QC HEAD"}[name]
            assert store_successes(storescu(running.port, *write_series(datasets, tmp_path / name))) == 8
        running.node.run_until_idle(timeout=120)
        failed = [e for e in events(ledger) if e.type == "analysis.failed"]
        assert len(failed) == 1 and failed[0].analyzer == "test-broken" and len(events(ledger)) == 2
        assert "inference failed" in json.loads(failed[0].payload)["error"]
        assert receiver.wait_for(3)[2]["body"]["type"] == "dicomnode.analysis.failed"

        # An analyze job that goes dead (its images vanished from the spool): analysis.failed too.
        lost = head_ct("lost")[:8]
        running.node.scheduler.pause()  # hold completion until the spool file is gone
        assert store_successes(storescu(running.port, *write_series(lost, tmp_path / "lost"))) == 8
        row = ledger.instance(lost[0].SOPInstanceUID)
        running.node.spool.path(row.path).unlink()
        running.node.scheduler.resume()
        running.node.run_until_idle(timeout=120)
        dead = [e for e in events(ledger) if e.series_instance_uid == lost[0].SeriesInstanceUID]
        assert [(e.type, e.analyzer) for e in dead] == [("analysis.failed", "test-bleed")]
        assert json.loads(dead[0].payload)["job_dead"] is True
        analyze = ledger.list_jobs(kind=JobKind.ANALYZE, series_uid=lost[0].SeriesInstanceUID)
        assert analyze[0].state == JobState.DEAD and "missing" in json.loads(dead[0].payload)["error"]
        bodies = [h["body"] for h in receiver.wait_for(4)]
        assert bodies[3]["id"] == dead[0].id and bodies[3]["data"]["verdict"] == "failed"
    finally:
        listener.stop()
        receiver.stop()


def test_notify_test_command_sends_clearly_marked_messages(tmp_path: Path, listener: MllpListener,
                                                           receiver: WebhookReceiver) -> None:
    refusing = MllpListener(tmp_path / "refusing", default="AE")
    try:
        config = write_config(tmp_path, notify={"RIS": listener.channel(), "HOOK": receiver.channel(),
                                                "OLD": refusing.channel()})
        result = cli(config, "notify", "test", "RIS")
        assert result.returncode == 0 and "delivered" in result.stdout, result.stdout + result.stderr
        (message,) = listener.wait_for(1)
        assert message["processing_id"] == "T" and "TEST MESSAGE" in message["text"]
        assert "DICOMNODE-TEST" in message["text"]
        result = cli(config, "notify", "test", "HOOK")
        assert result.returncode == 0, result.stdout + result.stderr
        (hook,) = receiver.wait_for(1)
        assert hook["signature_ok"] and hook["body"]["type"] == "dicomnode.test" and hook["body"]["data"]["test"]
        result = cli(config, "notify", "test", "OLD")
        assert result.returncode == 1 and "NOT delivered" in result.stdout and "HL7 AE" in result.stdout
        result = cli(config, "notify", "test", "NOPE")
        assert result.returncode == 2 and "HOOK, OLD, RIS" in result.stderr
    finally:
        refusing.stop()


@pytest.mark.slow
def test_kill_9_between_send_and_ack_gives_one_logical_message_per_receiver(tmp_path: Path) -> None:
    """The node is killed while the RIS holds its ACK and the webhook holds its answer; after the
    restart the same event is sent again, so each receiver de-duplicating by MSH-10 / event id has
    exactly one logical message, and the ledger shows one event delivered once per channel."""
    port = free_port()
    listener = MllpListener(tmp_path / "mllp", ["none"])
    receiver = WebhookReceiver(tmp_path / "webhook", SECRET, ["hang"])
    proc: subprocess.Popen[bytes] | None = None
    try:
        config = write_config(tmp_path, node={"port": port}, analysis=models(tmp_path),
                              notify={"RIS": listener.channel(timeout_s=120), "HOOK": receiver.channel(timeout_s=120)})
        proc = _serve(config, tmp_path / "serve-1.log")
        files = write_series(head_ct("kill")[:8], tmp_path / "ct")
        assert store_successes(storescu(port, *files)) == 8
        listener.wait_for(1, timeout=120)
        receiver.wait_for(1, timeout=120)
        os.kill(proc.pid, signal.SIGKILL)  # between send and acknowledgement, on both channels
        proc.wait(timeout=30)
        proc = _serve(config, tmp_path / "serve-2.log")
        messages = listener.wait_for(2, timeout=120)
        requests = receiver.wait_for(2, timeout=120)
        ledger = Ledger.sqlite(str(tmp_path / "data" / "ledger.sqlite3"))
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                (event,) = ledger.list_events()
                sent = notifications(ledger, event.id)
                if all(n.state == JobState.SUCCEEDED for n in sent.values()):
                    break
                time.sleep(0.2)
            assert {n.state for n in sent.values()} == {JobState.SUCCEEDED} and set(sent) == {"RIS", "HOOK"}
            assert len(ledger.list_events()) == 1
        finally:
            ledger.close()
        assert [m["answer"] for m in messages] == ["none", "AA"]
        assert {m["control_id"] for m in messages} == {event.id}  # one logical message at the RIS
        assert [r["answer"] for r in requests] == ["hang", "200"]
        assert {r["body"]["id"] for r in requests} == {event.id}  # one logical event at the webhook
        assert {r["headers"]["idempotency-key"] for r in requests} == {event.id}
        assert len({r["raw"] for r in requests}) == 1  # byte-identical bodies
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        listener.stop()
        receiver.stop()


def _serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT)
    data = tomlkit.parse(config.read_text())
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assoc = ae.associate("127.0.0.1", int(data["node"]["port"]), ae_title="DICOMNODE")  # type: ignore[index, arg-type]
        if assoc.is_established:
            assoc.release()
            return proc
        if proc.poll() is not None:
            raise AssertionError(log.read_text())
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"node did not start: {log.read_text()}")


def _stated_key_object_codes() -> set[tuple[str, str, str]]:
    """The code table of the Key Object in docs/conformance.md (section 6.3.2)."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "conformance.md").read_text(encoding="utf-8")
    table = text.split("| Code Value | Coding Scheme | Code Meaning | Used in the Key Object as |")[1]
    table = table.strip().split("\n\n")[0]  # up to the blank line that ends the table
    rows = [line.split("|")[1:4] for line in table.splitlines()[1:]]
    return {(value.strip().strip("`"), scheme.strip(), meaning.strip()) for value, scheme, meaning in rows}


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _post(url: str) -> Any:
    with urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=30) as response:
        return json.loads(response.read())
