"""End to end: storescu -> dicomnode -> a real Orthanc; every emitted object passes dciodvfy."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pixelmed
import pydicom
import pytest
from conftest import NodeFactory, RunningNode, store_successes, storescu
from dciodvfy import dciodvfy
from orthanc import Orthanc
from synthetic import ct_series, write_series

from dicomnode.domain import JobKind, JobState


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path / "orthanc").start()
    yield pacs
    pacs.stop()


def node_with_pacs(make_node: NodeFactory, pacs: Orthanc, **sections: object) -> RunningNode:
    return make_node(destinations={"PACS": pacs.destination()}, **sections)


def dsrdump_ok(data: bytes, folder: Path) -> bool:
    path = folder / "sr.dcm"
    path.write_bytes(data)
    return subprocess.run(["/usr/bin/dsrdump", str(path)], capture_output=True).returncode == 0


def test_ct_series_results_arrive_in_orthanc_same_study_and_validate(
    make_node: NodeFactory, orthanc: Orthanc, tmp_path: Path
) -> None:
    running = node_with_pacs(make_node, orthanc)
    files = write_series(ct_series(16, 96, 96, seed="e2e"), tmp_path / "ct")
    # The scanner also sends the images to the PACS, as it would in practice.
    assert store_successes(storescu(orthanc.dicom_port, *files, called="ORTHANC")) == 16
    assert store_successes(storescu(running.port, *files)) == 16
    running.node.run_until_idle(timeout=120)

    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    stored = orthanc.instances()
    results = [i for i in stored if i["modality"] in ("SR", "SEG")]
    ledger_results = running.ledger.results_for_series(source.SeriesInstanceUID)
    assert {r["sop_instance_uid"] for r in results} == {r.sop_instance_uid for r in ledger_results}
    assert results, "no result object reached Orthanc"
    assert {r["study_uid"] for r in stored} == {source.StudyInstanceUID}, "results must join the study"
    assert all(r["series_uid"] != source.SeriesInstanceUID for r in results)
    for item in results:
        data = orthanc.file(item["id"])
        report = dciodvfy(data)
        assert report.errors == [] and report.warnings == [], (item["modality"], report)
        ds = pydicom.dcmread(BytesIO(data))
        if ds.Modality == "SR":
            assert dsrdump_ok(data, tmp_path)
            template = pixelmed.validate(data)  # TID 1500 template tree (docs/conformance.md 6.3.5)
            assert template.errors == [] and template.warnings == [], template.text
            sr = hd.sr.srread(BytesIO(data))
            assert sr.VerificationFlag == "UNVERIFIED"
            groups = sr.content.get_planar_roi_measurement_groups() + \
                sr.content.get_volumetric_roi_measurement_groups() + \
                sr.content.get_image_measurement_groups()
            assert groups, "the report has no measurement group"
    deliveries = running.ledger.list_jobs(kind=JobKind.DELIVER)
    assert len(deliveries) == len(results)
    assert {d.state for d in deliveries} == {JobState.SUCCEEDED}


def test_qc_failure_reported_as_present_quality_finding(make_node: NodeFactory, orthanc: Orthanc,
                                                        tmp_path: Path) -> None:
    running = node_with_pacs(make_node, orthanc)
    datasets = ct_series(12, 96, 96, seed="e2e-hu")
    for ds in datasets:
        ds.RescaleIntercept = -1324  # air now reads about -1300 HU: wrong calibration
    files = write_series(datasets, tmp_path / "ct")
    assert store_successes(storescu(running.port, *files)) == 12
    running.node.run_until_idle(timeout=120)
    results = running.ledger.results_for_series(datasets[0].SeriesInstanceUID)
    qc = [r for r in results if r.analyzer == "qc-ct" and r.kind == "sr"]
    assert len(qc) == 1
    import json

    summary = json.loads(qc[0].summary)
    flagged = [f for f in summary["findings"] if f["present"]]
    assert flagged, summary
    sr_item = next(i for i in orthanc.instances() if i["sop_instance_uid"] == qc[0].sop_instance_uid)
    data = orthanc.file(sr_item["id"])
    assert dciodvfy(data).clean
    template = pixelmed.validate(data)
    assert template.errors == [] and template.warnings == [], template.text
    text = str(pydicom.dcmread(BytesIO(data)).ContentSequence)
    assert "Present" in text
