"""Notify: events, HL7 v2 over MLLP, signed webhooks and Key Objects, against real peers.

Peers: an MLLP listener from the ``hl7`` library and a uvicorn webhook receiver, each a separate
process scripted per message (``tests/mllp_listener.py``, ``tests/webhook_receiver.py``), a real
Orthanc for the Key Object, dciodvfy and dsrdump. The node-level tests use ``test-bleed``
(``tests/notify_fixtures.py``), a model whose verdict late images change by a computable amount.
"""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from io import BytesIO
from pathlib import Path

import hl7
import pydicom
import pytest
from dciodvfy import dciodvfy
from mllp_listener import MllpListener
from notify_fixtures import head_ct
from synthetic import ct_series
from webhook_receiver import WebhookReceiver

from dicomnode import notify as n
from dicomnode.config import Hl7Channel, WebhookChannel, parse_config
from dicomnode.domain import ResultObject
from dicomnode.errors import Permanent, Transient
from dicomnode.results import KOS_SERIES_NUMBER, build_key_object, result_uid

SECRET = "a-test-secret-of-32-characters!!"
CREATED = 1767268800.0  # 2026-01-01T12:00:00Z


def report(status: str = "complete", priority: str | None = "stat", present: bool | None = True,
           probability: float = 0.97) -> n.AnalyzerReport:
    finding = n.FindingSummary(n.Code("50960005", "SCT", "Hemorrhage"), present, probability, ("1.2.3.3",))
    return n.AnalyzerReport("test-bleed", "1.0.0", status, priority, "boom" if status == "failed" else "",
                            (finding,) if status != "failed" else ())


CRITICAL = report()
NEGATIVE = report(priority="routine", present=False, probability=0.01)
POSITIVE = report(priority="routine", present=True, probability=0.7)
FAILED = report(status="failed", priority=None)


def event_for(now: n.AnalyzerReport, *, epoch: int = 1, previous: n.Verdict | None = None,
              told: n.PriorEvent | None = None, notify_at: str = "urgent") -> n.Event | None:
    return n.derive_event(now, series_uid="1.2.3", study_uid="1.2", epoch=epoch, notify_at=notify_at,
                          previous=previous, last_event=told, created_at=CREATED,
                          detail={"results": [{"kind": "sr", "sop_instance_uid": "1.9"}]})


# --- events ----------------------------------------------------------------------------------------


def prior(verdict: n.Verdict, kind: str = "finding.critical", epoch: int = 1) -> n.PriorEvent:
    return n.PriorEvent(n.event_id("1.2.3", epoch, "test-bleed", "1.0.0", kind), kind, verdict, epoch)


@pytest.mark.parametrize(("now", "previous", "told", "expected"), [
    # first epoch: only a critical verdict or a failure is told; negatives notify nobody
    (CRITICAL, None, None, "finding.critical"),
    (FAILED, None, None, "analysis.failed"),
    (NEGATIVE, None, None, None),
    (POSITIVE, None, None, None),
    # late images after a critical event
    (CRITICAL, n.Verdict.CRITICAL, prior(n.Verdict.CRITICAL), "finding.updated"),
    (NEGATIVE, n.Verdict.CRITICAL, prior(n.Verdict.CRITICAL), "finding.retracted"),
    (POSITIVE, n.Verdict.CRITICAL, prior(n.Verdict.CRITICAL), "finding.retracted"),
    (FAILED, n.Verdict.CRITICAL, prior(n.Verdict.CRITICAL), "analysis.failed"),
    # late images after a failure: whoever heard of it hears of the result
    (NEGATIVE, n.Verdict.FAILED, prior(n.Verdict.FAILED, "analysis.failed"), "finding.updated"),
    (CRITICAL, n.Verdict.FAILED, prior(n.Verdict.FAILED, "analysis.failed"), "finding.critical"),
    # after a retraction, or a negative nobody heard of
    (CRITICAL, n.Verdict.NEGATIVE, prior(n.Verdict.NEGATIVE, "finding.retracted"), "finding.critical"),
    (NEGATIVE, n.Verdict.NEGATIVE, prior(n.Verdict.NEGATIVE, "finding.retracted"), None),
    (CRITICAL, n.Verdict.NEGATIVE, None, "finding.critical"),
    (NEGATIVE, n.Verdict.POSITIVE, None, None),
])
def test_event_derivation(now: n.AnalyzerReport, previous: n.Verdict | None, told: n.PriorEvent | None,
                          expected: str | None) -> None:
    epoch = 1 if previous is None else 2
    event = event_for(now, epoch=epoch, previous=previous, told=told)
    if expected is None:
        assert event is None
        return
    assert event is not None and event.type == expected
    assert event.id == n.event_id("1.2.3", epoch, "test-bleed", "1.0.0", expected)
    assert len(event.id) == 20 and event.id == event_for(now, epoch=epoch, previous=previous, told=told).id
    assert event.supersedes == (told.id if told else None)
    assert event.verdict_changed == (None if previous is None else previous is not event.verdict)


def test_notify_at_routine_makes_any_present_finding_critical_and_ids_differ_per_input() -> None:
    assert n.verdict_of(POSITIVE, "urgent") is n.Verdict.POSITIVE
    assert n.verdict_of(POSITIVE, "routine") is n.Verdict.CRITICAL
    assert n.verdict_of(NEGATIVE, "routine") is n.Verdict.NEGATIVE
    ids = {n.event_id("1.2.3", 1, "a", "1", "finding.critical"), n.event_id("1.2.3", 2, "a", "1", "finding.critical"),
           n.event_id("1.2.3", 1, "a", "2", "finding.critical"), n.event_id("1.2.3", 1, "b", "1", "finding.critical"),
           n.event_id("1.2.4", 1, "a", "1", "finding.critical"), n.event_id("1.2.3", 1, "a", "1", "analysis.failed")}
    assert len(ids) == 6
    # the same failure told twice (a dead job, then its replay failing too) is one event
    told = prior(n.Verdict.FAILED, "analysis.failed", epoch=1)
    assert event_for(FAILED, epoch=1, told=told) is None


def test_channels_for_follow_the_plan_the_event_types_and_kos_only_when_critical() -> None:
    config = parse_config({
        "destinations": {"PACS": {"ae_title": "P", "host": "127.0.0.1", "port": 104}},
        "notify": {"RIS": {"kind": "hl7", "host": "127.0.0.1", "port": 2575},
                   "PAGER": {"kind": "webhook", "url": "https://pager.example/x", "secret": SECRET,
                             "events": ["finding.critical"]},
                   "KOS": {"kind": "kos", "destination": "PACS"}}})
    critical = event_for(CRITICAL)
    retracted = event_for(NEGATIVE, epoch=2, previous=n.Verdict.CRITICAL, told=prior(n.Verdict.CRITICAL))
    assert critical is not None and retracted is not None
    assert n.channels_for(critical, None, config.notify) == ["KOS", "PAGER", "RIS"]
    assert n.channels_for(retracted, None, config.notify) == ["RIS"]
    assert n.channels_for(critical, ["RIS", "GONE"], config.notify) == ["RIS"]
    assert n.channels_for(critical, [], config.notify) == []


# --- HL7 messages ----------------------------------------------------------------------------------

SUBJECT = n.Subject(accession_number="ACC|42", patient_id="PAT^1", issuer_of_patient_id="HOSP",
                    patient_name=("Müller", "Anna", "", "Dr", ""), birth_date="19700101", sex="F",
                    study_date="20260101", study_time="120000", modality="CT", requested_procedure_id="RP1",
                    scheduled_step_id="SPS1")


def parsed(message: n.Hl7Message) -> hl7.Message:
    return hl7.parse(message.text)


def test_oru_r01_carries_ids_finding_code_probability_and_disclaimer() -> None:
    event = event_for(CRITICAL)
    assert event is not None
    channel = Hl7Channel(kind="hl7", host="127.0.0.1", port=2575, receiving_application="RIS")
    message = parsed(n.oru_r01(event, SUBJECT, channel, "DICOMNODE"))
    msh, pid, obr = message.segment("MSH"), message.segment("PID"), message.segment("OBR")
    assert str(msh(9)) == "ORU^R01^ORU_R01" and str(msh(10)) == event.id and str(msh(11)) == "P"
    assert str(msh(12)) == "2.5.1" and str(msh(3)) == "DICOMNODE" and str(msh(5)) == "RIS"
    assert str(msh(18)) == "UNICODE UTF-8"
    assert message.unescape(str(pid(3)(1)(1))) == "PAT^1" and str(pid(3)(1)(4)) == "HOSP"
    assert str(pid(5)) == "Müller^Anna^^^Dr" and str(pid(7)) == "19700101" and str(pid(8)) == "F"
    assert message.unescape(str(obr(3))) == "ACC|42" and str(obr(25)) == "P"
    assert str(obr(4)) == "25045-6^CT unspecified body region^LN"
    finding, probability = message.segments("OBX")
    assert str(finding(2)) == "CWE" and str(finding(3)) == "50960005^Hemorrhage^SCT"
    assert str(finding(5)) == "52101004^Present^SCT" and str(finding(8)) == "AA" and str(finding(11)) == "P"
    assert str(probability(2)) == "NM" and str(probability(3)) == "122157^Probability^DCM"
    assert str(probability(5)) == "0.97" and str(probability(6)) == "1^no units^UCUM"
    notes = " ".join(str(s(3)) for s in message.segments("NTE"))
    assert "NOT FOR CLINICAL USE" in notes and "Hemorrhage present" in notes


def test_revision_and_failure_messages_say_what_changed() -> None:
    channel = Hl7Channel(kind="hl7", host="127.0.0.1", port=2575, request_priority=True)
    first = prior(n.Verdict.CRITICAL)
    retracted = event_for(NEGATIVE, epoch=2, previous=n.Verdict.CRITICAL, told=first)
    assert retracted is not None
    messages = n.hl7_messages(retracted, SUBJECT, channel, "DN")
    assert [m.type for m in messages] == ["ORU^R01"]  # no priority request for a retraction
    message = parsed(messages[0])
    assert str(message.segment("OBR")(25)) == "C"
    obx = message.segments("OBX")[0]
    assert str(obx(5)) == "272519000^Absent^SCT" and str(obx(8)) == "N" and str(obx(11)) == "C"
    notes = " ".join(str(s(3)) for s in message.segments("NTE"))
    assert "verdict changed from critical to negative" in notes and first.id in notes

    failed = event_for(FAILED)
    assert failed is not None
    obx = parsed(n.oru_r01(failed, SUBJECT, channel, "DN")).segments("OBX")[0]
    assert str(obx(2)) == "ST" and str(obx(11)) == "X" and "Analysis failed: boom" in str(obx(5))

    critical = event_for(CRITICAL)
    assert critical is not None
    oru, omi = n.hl7_messages(critical, SUBJECT, channel, "DN")
    request = parsed(omi)
    assert omi.type == "OMI^O23" and omi.control_id != oru.control_id and len(omi.control_id) == 20
    assert str(request.segment("MSH")(9)) == "OMI^O23^OMI_O23"
    assert str(request.segment("ORC")(1)) == "XO" and request.unescape(str(request.segment("ORC")(3))) == "ACC|42"
    assert str(request.segment("TQ1")(9)) == "S"
    ipc = request.segment("IPC")
    assert str(ipc(2)) == "RP1" and str(ipc(3)) == "1.2" and str(ipc(4)) == "SPS1"


# --- MLLP against the scripted listener ------------------------------------------------------------


def test_mllp_ack_handling_against_a_scripted_listener(tmp_path: Path) -> None:
    event = event_for(CRITICAL)
    assert event is not None
    listener = MllpListener(tmp_path, ["AA", "AE", "AR", "none", "close", "wrongid", "CA"])
    try:
        channel = Hl7Channel.model_validate(listener.channel(timeout_s=1.0))
        messages = n.hl7_messages(event, SUBJECT, channel, "DN")
        exchange = n.mllp_send(channel, messages)
        assert exchange.response == f"ORU^R01 {event.id}: AA" and exchange.acked_at >= exchange.sent_at > 0
        with pytest.raises(Permanent, match="AE"):
            n.mllp_send(channel, messages)
        with pytest.raises(Transient, match="AR"):
            n.mllp_send(channel, messages)
        started = time.monotonic()
        with pytest.raises(Transient, match="no ACK .* within 1 s"):
            n.mllp_send(channel, messages)
        assert time.monotonic() - started < 5
        with pytest.raises(Transient, match="closed the connection before a complete ACK"):
            n.mllp_send(channel, messages)
        with pytest.raises(Transient, match="ACK answers message 'SOMETHING-ELSE'"):
            n.mllp_send(channel, messages)
        assert n.mllp_send(channel, messages).response.endswith(": CA")  # enhanced mode commit accept
        got = listener.wait_for(7)
        # every attempt re-sent the same message: one logical message for a receiver de-duplicating by MSH-10
        assert {m["control_id"] for m in got} == {event.id} and {m["text"] for m in got} == {messages[0].text}
    finally:
        listener.stop()
    with pytest.raises(Transient, match="MLLP connect"):
        n.mllp_send(channel, messages)  # nobody listens any more


def test_mllp_over_tls_needs_the_client_certificate(tmp_path: Path) -> None:
    from pki import make_pki

    pki = make_pki(tmp_path / "pki")
    event = event_for(CRITICAL)
    assert event is not None
    listener = MllpListener(tmp_path, tls=(pki["server_crt"], pki["server_key"], pki["ca_crt"]))
    try:
        channel = Hl7Channel.model_validate(listener.channel(
            tls=True, ca_certificates=str(pki["ca_crt"]), certificate=str(pki["client_crt"]),
            private_key=str(pki["client_key"])))
        assert n.mllp_send(channel, n.hl7_messages(event, SUBJECT, channel, "DN")).response.endswith(": AA")
        anonymous = Hl7Channel.model_validate(listener.channel(tls=True, ca_certificates=str(pki["ca_crt"])))
        with pytest.raises(Transient):
            n.mllp_send(anonymous, n.hl7_messages(event, SUBJECT, anonymous, "DN"))
        untrusting = Hl7Channel.model_validate(listener.channel(tls=True))  # system CAs: not ours
        with pytest.raises(Transient, match="CERTIFICATE_VERIFY_FAILED"):
            n.mllp_send(untrusting, n.hl7_messages(event, SUBJECT, untrusting, "DN"))
        assert len(listener.messages()) == 1
    finally:
        listener.stop()


# --- webhook against the uvicorn receiver ----------------------------------------------------------


def test_webhook_statuses_signature_retry_after_and_no_phi(tmp_path: Path) -> None:
    event = event_for(CRITICAL)
    assert event is not None
    receiver = WebhookReceiver(tmp_path, SECRET, ["200", "503:7", "429", "400", "hang", "301"])
    try:
        channel = WebhookChannel.model_validate(receiver.channel(timeout_s=1.0))
        body = n.cloudevent(event, SUBJECT, channel, "dicomnode://DN")
        assert n.post_webhook(channel, body, event.id, 900).response == "HTTP 200"
        with pytest.raises(Transient, match="HTTP 503") as busy:
            n.post_webhook(channel, body, event.id, 900)
        assert busy.value.defer == 7.0
        with pytest.raises(Transient, match="HTTP 429"):
            n.post_webhook(channel, body, event.id, 5)
        with pytest.raises(Permanent, match="HTTP 400"):
            n.post_webhook(channel, body, event.id, 900)
        with pytest.raises(Transient, match="no answer within 1 s"):
            n.post_webhook(channel, body, event.id, 900)
        with pytest.raises(Permanent, match="HTTP 301"):
            n.post_webhook(channel, body, event.id, 900)
        wrong = WebhookChannel.model_validate(receiver.channel(secret="not-the-shared-secret!"))
        with pytest.raises(Permanent, match="HTTP 401"):
            n.post_webhook(wrong, body, event.id, 900)
        phi = WebhookChannel.model_validate(receiver.channel(include_phi=True))
        assert n.post_webhook(phi, n.cloudevent(event, SUBJECT, phi, "dicomnode://DN"), event.id, 900)
        # the receiver's own check: a replayed request with an old timestamp is refused
        stale = str(int(time.time()) - 3600)
        request = urllib.request.Request(receiver.url, data=body, method="POST", headers={
            "X-Dicomnode-Timestamp": stale, "X-Dicomnode-Signature": n.signature(SECRET, stale, body)})
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(request, timeout=10)
        got = receiver.wait_for(9)
    finally:
        receiver.stop()
    signed = got[:6]
    assert all(r["signature_ok"] and r["timestamp_ok"] for r in signed)
    assert {r["headers"]["idempotency-key"] for r in signed} == {event.id}
    assert got[6]["signature_ok"] is False and got[8]["timestamp_ok"] is False
    cloud = signed[0]["body"]
    assert signed[0]["headers"]["content-type"].startswith("application/cloudevents+json")
    assert cloud["specversion"] == "1.0" and cloud["id"] == event.id and cloud["type"] == "dicomnode.finding.critical"
    assert cloud["subject"] == "1.2" and cloud["time"] == "2026-01-01T12:00:00.000Z"
    data = cloud["data"]
    assert data["finding"] == {"code": {"value": "50960005", "scheme": "SCT", "meaning": "Hemorrhage"},
                               "present": True, "probability": 0.97}
    assert data["priority"] == "urgent" and data["accession_number"] == "ACC|42" and data["epoch"] == 1
    assert data["results"] == [{"kind": "sr", "sop_instance_uid": "1.9"}]
    assert "NOT FOR CLINICAL USE" in data["disclaimer"]
    for secret in ("PAT^1", "Müller", "19700101"):
        assert secret not in signed[0]["raw"]
    assert got[7]["body"]["data"]["patient"] == {"id": "PAT^1", "issuer": "HOSP", "name": "Müller^Anna^^Dr",
                                                 "birth_date": "19700101", "sex": "F"}


def test_retry_after_forms_and_cap() -> None:
    assert n.retry_after_s("120") == 120.0
    when = dt.datetime(2026, 1, 1, 12, 0, 30, tzinfo=dt.UTC)
    assert n.retry_after_s("Thu, 01 Jan 2026 12:00:30 GMT", now=when.timestamp() - 30) == 30.0
    assert n.retry_after_s("soon") is None and n.retry_after_s(None) is None
    error = n.classify_http(503, 7200.0, 900.0)
    assert isinstance(error, Transient) and error.defer == 900.0
    assert n.classify_http(204, None, 900.0) is None
    assert isinstance(n.classify_http(404, None, 900.0), Permanent)
    assert isinstance(n.classify_http(408, None, 900.0), Transient)
    assert isinstance(n.classify_http(425, None, 900.0), Transient)


# --- configuration ---------------------------------------------------------------------------------


def test_check_config_reports_bad_notify_configuration_with_paths(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[destinations.PACS]\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = 4242\n'
        '[notify.RIS]\nkind = "hl7"\nhost = "127.0.0.1"\nport = 2575\n'
        '[notify.HOOK]\nkind = "webhook"\nurl = "htp://example.org/hook"\n'
        '[notify.KEY]\nkind = "kos"\ndestination = "PACS2"\n'
        '[notify.PAGER]\nkind = "sms"\n'
        '[[rules]]\nthen.notify = ["RIS", "EMAIL"]\nthen.notify_at = "whenever"\n'
    )
    result = subprocess.run([sys.executable, "-m", "dicomnode.cli", "check-config", str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    lines = sorted(line.removeprefix(f"{bad}: ") for line in result.stdout.splitlines())
    assert lines == sorted([
        "notify.HOOK.url: 'htp://example.org/hook' is not an http:// or https:// URL",
        "notify.HOOK.secret: Field required",
        "notify.PAGER.kind: unknown kind 'sms' (known: hl7, kos, webhook)",
        "rules[0].then.notify_at: Input should be 'urgent' or 'routine'",
    ]), result.stdout
    bad.write_text(bad.read_text().replace('url = "htp://example.org/hook"',
                                           f'url = "http://127.0.0.1:9/hook"\nsecret = "{SECRET}"')
                   .replace('[notify.PAGER]\nkind = "sms"\n', "").replace('"whenever"', '"urgent"'))
    result = subprocess.run([sys.executable, "-m", "dicomnode.cli", "check-config", str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert sorted(line.removeprefix(f"{bad}: ") for line in result.stdout.splitlines()) == [
        "notify.KEY.destination: unknown destination 'PACS2' (known: PACS)",
        "rules[0].then.notify[1]: unknown notify channel 'EMAIL' (known: HOOK, KEY, RIS)",
    ]


@pytest.mark.parametrize(("channel", "problem"), [
    ({"kind": "webhook", "url": "http://10.1.1.1/x", "secret": SECRET, "include_phi": True},
     "notify.X: include_phi needs an https:// URL (patient data would cross the network in clear)"),
    ({"kind": "webhook", "url": "https://user:pw@example.org/x", "secret": SECRET},
     "notify.X.url: 'https://user:pw@example.org/x': no fragment or credentials in the URL (the signature "
     "authenticates)"),
    ({"kind": "webhook", "url": "https://example.org/x", "secret": "short"},
     "notify.X.secret: String should have at least 16 characters"),
    ({"kind": "hl7", "host": "127.0.0.1", "port": 2575, "certificate": "c.pem"},
     "notify.X: certificate and private_key go together"),
    ({"kind": "hl7", "host": "127.0.0.1", "port": 2575, "events": []},
     "notify.X.events: must name at least one event type (leave the key out for all of them)"),
    ({"kind": "kos", "destination": "PACS", "events": ["finding.retracted"]},
     "notify.X.events[0]: a Key Object flags images of a critical finding; 'finding.retracted' has none"),
])
def test_channel_problems_name_their_path(channel: dict[str, object], problem: str) -> None:
    from dicomnode.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config({"destinations": {"PACS": {"ae_title": "P", "host": "127.0.0.1", "port": 104}},
                      "notify": {"X": channel}})
    assert info.value.problems == [problem]


# --- the Key Object ---------------------------------------------------------------------------------


def test_key_object_flags_the_slices_and_references_sr_and_seg(tmp_path: Path) -> None:
    sources = ct_series(6, seed="kos")
    study, series = sources[0].StudyInstanceUID, sources[0].SeriesInstanceUID
    sr = ResultObject("test-bleed", "1.0.0", "sr", "1.2.840.10008.5.1.4.1.1.88.34",
                      result_uid(series, 1, "test-bleed", "1.0.0", "sr", "instance"),
                      result_uid(series, 1, "test-bleed", "1.0.0", "sr", "series"), study, "", b"")
    seg = ResultObject("test-bleed", "1.0.0", "seg", "1.2.840.10008.5.1.4.1.1.66.4",
                       result_uid(series, 1, "test-bleed", "1.0.0", "seg", "instance"),
                       result_uid(series, 1, "test-bleed", "1.0.0", "seg", "series"), study, "", b"")

    def build() -> ResultObject:
        return build_key_object(sources[0], sources[2:4], [seg, sr], analyzer="test-bleed", version="1.0.0",
                                epoch=1, description="Hemorrhage present (probability 0.97). NOT FOR CLINICAL USE",
                                created=dt.datetime(2026, 1, 1, 12))

    kos = build()
    assert kos.data == build().data  # a retried notification re-sends the same bytes
    assert kos.sop_instance_uid == result_uid(series, 1, "test-bleed", "1.0.0", "kos", "instance")
    report = dciodvfy(kos.data)
    assert report.iod == "KeyObjectSelectionDocument" and report.clean, report
    path = tmp_path / "kos.dcm"
    path.write_bytes(kos.data)
    dump = subprocess.run(["/usr/bin/dsrdump", str(path)], capture_output=True, text=True)
    assert dump.returncode == 0 and "Of Interest" in dump.stdout
    ds = pydicom.dcmread(BytesIO(kos.data))
    assert ds.Modality == "KO" and ds.SeriesNumber == KOS_SERIES_NUMBER and ds.StudyInstanceUID == study
    assert ds.PatientID == sources[0].PatientID and ds.SeriesDescription.startswith("NOT FOR CLINICAL USE")
    title = ds.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113000", "DCM")
    items = {(i.ValueType, i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
             for i in ds.ContentSequence if "ReferencedSOPSequence" in i}
    assert items == {("IMAGE", sources[2].SOPInstanceUID), ("IMAGE", sources[3].SOPInstanceUID),
                     ("IMAGE", seg.sop_instance_uid), ("COMPOSITE", sr.sop_instance_uid)}
    text = next(i for i in ds.ContentSequence if i.ValueType == "TEXT" and i.RelationshipType == "CONTAINS")
    assert text.ConceptNameCodeSequence[0].CodeValue == "113012" and "NOT FOR CLINICAL USE" in text.TextValue
    evidence = {s.SeriesInstanceUID: {r.ReferencedSOPInstanceUID for r in s.ReferencedSOPSequence}
                for s in ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence}
    assert evidence == {series: {sources[2].SOPInstanceUID, sources[3].SOPInstanceUID},
                        sr.series_instance_uid: {sr.sop_instance_uid},
                        seg.series_instance_uid: {seg.sop_instance_uid}}
    with pytest.raises(ValueError, match="images\\[0\\]: belongs to study"):
        build_key_object(sources[0], ct_series(1, seed="other"), [sr], analyzer="a", version="1", epoch=1,
                         description="x", created=dt.datetime(2026, 1, 1))


def test_positive_fixture_is_positive_and_negative_after_one_late_image(tmp_path: Path) -> None:
    """The premise of the node tests, pinned on the real runtime (no node, no network)."""
    from notify_fixtures import write_model
    from synthetic import write_series

    from dicomnode.imaging import load_volume
    from dicomnode.models.torch_runtime import load_model

    model = load_model(write_model(tmp_path / "model"))
    files = write_series(head_ct("premise"), tmp_path / "ct")
    first = model.analyze(load_volume(files[:8]))
    assert first.priority is not None and first.priority.name == "STAT" and first.findings[0].present
    assert first.findings[0].mask is not None
    assert [int(k) for k in first.findings[0].mask.array.any(axis=(1, 2)).nonzero()[0]] == [3]
    both = model.analyze(load_volume(files))
    assert both.findings[0].present is False and both.priority is not None and both.priority.name == "ROUTINE"
    clean = model.analyze(load_volume(write_series(head_ct("clean", lesion=False), tmp_path / "clean")[:8]))
    assert clean.findings[0].present is False


def test_the_commented_channel_examples_of_the_shipped_config_are_valid() -> None:
    """The shipped config shows a rule's notify keys and [notify.*] commented out; uncommented, the
    rule and the channels must validate together."""
    import tomllib

    from dicomnode.config import embedded_config_text

    text = embedded_config_text()
    block = text[text.index("# [[rules]]"):]
    # the commented-out TOML lines (a table header or `key = value`), not the prose between them
    lines = [line[2:] for line in block.splitlines() if re.match(r"# (\[|\w+ = )", line)]
    config = parse_config({"destinations": {"PACS": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}},
                           **tomllib.loads("\n".join(lines))})
    assert {name: c.kind for name, c in config.notify.items()} == {"RIS": "hl7", "PAGER": "webhook",
                                                                 "KEYIMAGES": "kos"}
    assert config.rules[0].then.notify == ["RIS", "PAGER"] and config.rules[0].then.notify_at == "urgent"
