"""The analyze job: a series never loses its results silently.

Instances are placed in the spool and the ledger directly (bypassing the receiver, which may refuse
such headers at the door), as a disk bit flip or an older release that accepted them would leave
them. The series must still produce SRs in the PACS that name the problem.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from conftest import NodeFactory
from dciodvfy import dciodvfy
from orthanc import Orthanc
from pydicom.dataset import Dataset
from synthetic import ct_series

from dicomnode.domain import JobKind, JobState, StoredInstance
from dicomnode.node import Node
from dicomnode.receiver import routing_fields
from dicomnode.results import device_observer_uid

IOP_EXPLICIT_LE = b"\x20\x00\x37\x00DS"  # (0020,0037) Image Orientation (Patient), VR DS


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path / "orthanc").start()
    yield pacs
    pacs.stop()


def part10(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def flip_iop_vr(data: bytes) -> bytes:
    """One bit flipped: the VR of Image Orientation (Patient) reads DW instead of DS (0x53 -> 0x57)."""
    assert data.count(IOP_EXPLICIT_LE) == 1
    return data.replace(IOP_EXPLICIT_LE, b"\x20\x00\x37\x00DW")


def sr_texts(sr: Dataset) -> list[str]:
    """Every TEXT content item value of an SR, nested ones included."""
    texts: list[str] = []

    def walk(items: list[Dataset]) -> None:
        for item in items:
            if "TextValue" in item:
                texts.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return texts


def place(node: Node, ds: Dataset, data: bytes) -> None:
    """Spool the bytes and commit the ledger row, as the receiver would after Success."""
    relative = node.spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert node.spool.write(relative, data)
    node.ledger.record_instance(StoredInstance(
        sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
        series_instance_uid=ds.SeriesInstanceUID, study_instance_uid=ds.StudyInstanceUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, path=relative, size=len(data),
        calling_ae="STORESCU", peer_host="127.0.0.1", received_at=datetime.now(UTC),
        association_id="placed-by-test", **routing_fields(ds)))


def test_one_corrupt_instance_still_gives_srs_that_name_it(make_node: NodeFactory, orthanc: Orthanc) -> None:
    running = make_node(destinations={"PACS": orthanc.destination()},
                        rules=[{"then": {"analyzers": ["qc-ct"]}}])
    datasets = ct_series(11, 64, 64, seed="corrupt-iop")
    corrupt = datasets[5]
    for ds in datasets:
        data = part10(ds)
        place(running.node, ds, flip_iop_vr(data) if ds is corrupt else data)
    running.node.run_until_idle(timeout=120)

    analyses = running.ledger.list_jobs(kind=JobKind.ANALYZE)
    assert [j.state for j in analyses] == [JobState.SUCCEEDED]
    results = running.ledger.results_for_series(corrupt.SeriesInstanceUID)
    assert [r.kind for r in results] == ["sr"], "the series must not end without an SR"
    deliveries = running.ledger.list_jobs(kind=JobKind.DELIVER)
    assert deliveries and {d.state for d in deliveries} == {JobState.SUCCEEDED}

    [item] = [i for i in orthanc.instances() if i["modality"] == "SR"]
    data = orthanc.file(item["id"])
    report = dciodvfy(data)
    assert report.clean, report
    sr = pydicom.dcmread(BytesIO(data))
    [note] = [t for t in sr_texts(sr) if corrupt.SOPInstanceUID in t]  # names the excluded instance
    assert "Unknown Value Representation 'DW' in tag (0020,0037)" in note, note  # and what is wrong
    assert any(t.startswith("Analysis partial: 1 of 11 instance(s) excluded") for t in sr_texts(sr))
    assert sr.SeriesDescription.endswith("PARTIAL")
    # The instance is excluded from the SR's evidence; the ten good ones stay referenced.
    referenced = {ref.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                  for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert referenced == {ds.SOPInstanceUID for ds in datasets} - {corrupt.SOPInstanceUID}


def test_a_series_of_only_corrupt_instances_gets_a_failure_sr(make_node: NodeFactory, orthanc: Orthanc) -> None:
    running = make_node(destinations={"PACS": orthanc.destination()},
                        rules=[{"then": {"analyzers": ["qc-ct"]}}])
    datasets = ct_series(3, 32, 32, seed="all-corrupt")
    for ds in datasets:
        place(running.node, ds, flip_iop_vr(part10(ds)))
    running.node.run_until_idle(timeout=120)

    results = running.ledger.results_for_series(datasets[0].SeriesInstanceUID)
    assert [r.kind for r in results] == ["sr"]
    [item] = [i for i in orthanc.instances() if i["modality"] == "SR"]
    assert item["study_uid"] == datasets[0].StudyInstanceUID  # it joins the study of the images
    data = orthanc.file(item["id"])
    report = dciodvfy(data)
    assert report.clean, report
    sr = pydicom.dcmread(BytesIO(data))
    assert sr.SeriesDescription.endswith("FAILED")
    texts = sr_texts(sr)
    assert "Analysis failed: no instance of the series has a usable header" in texts
    for ds in datasets:
        assert any(ds.SOPInstanceUID in t and "'DW'" in t for t in texts), ds.SOPInstanceUID
    assert sr.PatientID == datasets[0].PatientID


def test_results_uid_root_prefixes_every_result_uid(make_node: NodeFactory) -> None:
    from pydicom._uid_dict import UID_dictionary

    running = make_node(results={"uid_root": "1.2.3.4.5"}, rules=[{"then": {"analyzers": ["qc-ct"]}}])
    datasets = ct_series(6, 32, 32, seed="uid-root")
    for ds in datasets:
        place(running.node, ds, part10(ds))
    running.node.run_until_idle(timeout=120)
    [row] = running.ledger.results_for_series(datasets[0].SeriesInstanceUID)
    assert row.sop_instance_uid.startswith("1.2.3.4.5.") and row.result_series_uid.startswith("1.2.3.4.5.")

    sr = pydicom.dcmread(running.node.spool.path(row.path))
    from_sources = {str(e.value) for ds in datasets for e in ds.iterall() if e.VR == "UI"}
    # Not results: the implementation, and the model (TID 1004 Device Observer UID), which keeps
    # one identity on every node.
    not_results = {str(sr.file_meta.ImplementationClassUID), device_observer_uid(row.analyzer, row.version)}
    minted: dict[str, str] = {}
    for element in [*sr.file_meta, *sr.iterall()]:
        if element.VR == "UI":
            for value in element.value if element.VM > 1 else [element.value]:
                if str(value) not in from_sources | not_results | set(UID_dictionary):
                    minted[str(value)] = element.keyword
    # SOP instance, series, and the tracking UID of the report (a content item's UID)
    assert {"SOPInstanceUID", "SeriesInstanceUID", "UID"} <= set(minted.values()), minted
    assert all(uid.startswith("1.2.3.4.5.") and len(uid) <= 64 for uid in minted), minted


def test_an_undecodable_element_imaging_does_not_need_is_left_out_of_the_report(make_node: NodeFactory) -> None:
    """Content Date of one image reads VR 'DW': the volume does not need it, so every image is
    analysed, and the SR is built on headers without that element, saying so."""
    running = make_node(rules=[{"then": {"analyzers": ["qc-ct"]}}])
    datasets = ct_series(6, 32, 32, seed="content-date")
    content_date = b"\x08\x00\x23\x00DA"
    for i, ds in enumerate(datasets):
        data = part10(ds)
        assert data.count(content_date) == 1
        place(running.node, ds, data.replace(content_date, b"\x08\x00\x23\x00DW") if i == 2 else data)
    running.node.run_until_idle(timeout=120)
    [row] = running.ledger.results_for_series(datasets[0].SeriesInstanceUID)
    sr = pydicom.dcmread(running.node.spool.path(row.path))
    assert dciodvfy(running.node.spool.path(row.path)).clean
    assert not sr.SeriesDescription.endswith("FAILED")
    assert not any("excluded" in t for t in sr_texts(sr)), "no image was left out of the analysis"
    [note] = [t for t in sr_texts(sr) if datasets[2].SOPInstanceUID in t]
    assert "(0008,0023)" in note and "left out" in note
    referenced = {ref.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                  for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert referenced == {ds.SOPInstanceUID for ds in datasets}
