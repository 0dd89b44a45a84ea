"""results: Findings + source headers -> TID 1500 Comprehensive 3D SR and BINARY SEG.

Every emitted object is checked by real peers: dciodvfy (no Error, no Warning), DCMTK dsrdump
(exit 0) and highdicom's readers; all with pydicom's strict writing validation.
"""

from __future__ import annotations

import datetime as dt
import io
import re
import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pixelmed
import pydicom
import pytest
from dciodvfy import IGNORED_WARNINGS, dciodvfy
from pydicom.charset import convert_encodings
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage
from pydicom.valuerep import PersonName
from synthetic import cr_image, ct_series, encoded

from dicomnode import results as results_module
from dicomnode.domain import (
    AnalyzerKind,
    Code,
    Finding,
    Findings,
    FindingsStatus,
    Mask,
    Measurement,
    Priority,
    QualitativeEvaluation,
    ResultObject,
)
from dicomnode.results import (
    NOT_FOR_CLINICAL_USE,
    ResultsError,
    build_results,
    device_observer_uid,
    result_uid,
    sanitized_header,
)

CREATED = dt.datetime(2026, 1, 2, 3, 4, 5)
HEMORRHAGE = Code("50960005", "SCT", "Hemorrhage")
MORPH = Code("49755003", "SCT", "Morphologically Abnormal Structure")
VOLUME = Code("118565006", "SCT", "Volume")
ML = Code("ml", "UCUM", "milliliter")
QUALITY_ASSESSMENT = Code("111050", "DCM", "Quality Assessment")
QUALITY_FINDING = Code("111052", "DCM", "Quality Finding")
IMAGE_QUALITY_RATING = Code("111029", "DCM", "Image Quality Rating")
MOTION = Code("MOTION", "99DICOMNODE", "Motion artifact")


@pytest.fixture(autouse=True)
def strict_writing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.RAISE)


@pytest.fixture
def sources() -> list[Dataset]:
    headers = ct_series(n_slices=12, rows=64, cols=64, seed="results")
    for ds in headers:
        del ds.PixelData
    return headers


def _mask(shape: tuple[int, int, int], filled: bool = True) -> np.ndarray:
    array = np.zeros(shape, dtype=bool)
    if filled:
        array[4:7, 20:30, 24:36] = True
    return array


def _positive(sources: list[Dataset], **kwargs: object) -> Findings:
    mask = Mask(_mask((len(sources), 64, 64)), "Hemorrhage", MORPH, HEMORRHAGE)
    finding = Finding(
        HEMORRHAGE,
        "hemorrhage-1",
        present=True,
        probability=0.91,
        measurements=(Measurement(VOLUME, 1.26, ML),),
        mask=mask,
    )
    return Findings(
        "demo-hyperdense",
        "1.0.0",
        AnalyzerKind.TRIAGE,
        FindingsStatus.COMPLETE,
        findings=(finding,),
        priority=Priority.STAT,
        **kwargs,  # type: ignore[arg-type]
    )


def _read(result: ResultObject) -> Dataset:
    return pydicom.dcmread(io.BytesIO(result.data))


def _assert_valid(result: ResultObject) -> None:
    report = dciodvfy(result.data)
    assert report.errors == [], report.errors
    assert report.warnings == [], report.warnings
    assert report.returncode == 0
    if result.kind == "sr":
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "sr.dcm"
            path.write_bytes(result.data)
            exe = shutil.which("dsrdump")
            assert exe is not None, "DCMTK dsrdump is required"
            # dsrdump prints names in the object's own character set (ISO 2022, GB18030...)
            proc = subprocess.run(
                [exe, str(path)], capture_output=True, text=True, errors="replace", check=False
            )
        assert proc.returncode == 0, proc.stderr
        assert "Imaging Measurement Report" in proc.stdout
        # PixelMed checks the template tree (TID 1500 and below) against its 2022 templates; the
        # warnings it may still give are matched, one pattern each, to docs/conformance.md.
        template = pixelmed.validate(result.data)
        assert template.errors == [], template.text
        assert template.warnings == [], template.warnings


def _by_kind(results: list[ResultObject]) -> dict[str, ResultObject]:
    return {r.kind: r for r in results}


def _document_evaluations(sr: hd.sr.Comprehensive3DSR) -> list[Dataset]:
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == "C0034375":
            return list(item.ContentSequence)
    return []


def test_positive_finding_gives_seg_and_sr_that_reference_each_other(sources: list[Dataset]) -> None:
    results = build_results(_positive(sources), sources, epoch=1, created=CREATED)
    assert [r.kind for r in results] == ["seg", "sr"]
    for r in results:
        _assert_valid(r)
        assert r.study_instance_uid == sources[0].StudyInstanceUID
        assert r.series_instance_uid != sources[0].SeriesInstanceUID
    seg_obj, sr_obj = results

    sr = hd.sr.srread(io.BytesIO(sr_obj.data))
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.PatientID == sources[0].PatientID and sr.PatientName == sources[0].PatientName
    assert sr.SeriesDescription.startswith(NOT_FOR_CLINICAL_USE)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 1 and sr.content.get_image_measurement_groups() == []
    group = groups[0]
    assert group.tracking_identifier == "hemorrhage-1"
    assert group.finding_type.value == HEMORRHAGE.value
    [presence] = group.get_qualitative_evaluations()
    assert (presence.name.value, presence.value.value, presence.value.meaning) == (
        HEMORRHAGE.value,
        "52101004",
        "Present",
    )
    measured = {m.name.meaning: (m.value, m.unit.value) for m in group.get_measurements()}
    assert measured == {"Probability": (0.91, "1"), "Volume": (1.26, "ml")}
    assert group.referenced_segment.referenced_sop_instance_uid == seg_obj.sop_instance_uid
    assert group.referenced_segment.referenced_segment_numbers == [1]
    [priority] = [i for i in _document_evaluations(sr) if i.ValueType == "CODE"]
    assert priority.ConceptCodeSequence[0].CodeValue == "103391001"  # STAT -> Urgent Procedure (CID 3414)
    [procedure] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure.ConceptCodeSequence[0].CodeValue == "25045-6"  # CT unspecified body region
    [observer] = sr.content.get_observer_contexts()
    assert observer.observer_identifying_attributes.uid == device_observer_uid("demo-hyperdense", "1.0.0")
    evidence = {
        i.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for r in s.ReferencedSeriesSequence
        for i in r.ReferencedSOPSequence
    }
    assert evidence == {s.SOPInstanceUID for s in sources} | {seg_obj.sop_instance_uid}

    seg = hd.seg.segread(io.BytesIO(seg_obj.data))
    assert seg.SOPClassUID == SegmentationStorage and seg.SegmentationType == "BINARY"
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.ContentDescription.startswith(NOT_FOR_CLINICAL_USE)
    description = seg.get_segment_description(1)
    assert description.tracking_uid == group.tracking_uid
    assert description.tracking_id == "hemorrhage-1"
    assert description.algorithm_identification[0].AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    volume = seg.get_volume(combine_segments=False)
    stored = volume.array[..., 0].astype(bool)
    order = np.argsort([float(s.ImagePositionPatient[2]) for s in sources])
    expected = _mask((len(sources), 64, 64))[order]
    # frames are matched to the source slices they were derived from
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[s.SOPInstanceUID for s in sources[4:7]], segment_numbers=[1]
    )[..., 0]
    assert np.array_equal(frames.astype(bool), expected[4:7])
    assert stored.sum() == expected.sum()


def test_negative_finding_is_explicit_absent_and_no_seg(sources: list[Dataset]) -> None:
    findings = Findings(
        "demo-hyperdense",
        "1.0.0",
        AnalyzerKind.TRIAGE,
        FindingsStatus.COMPLETE,
        findings=(Finding(HEMORRHAGE, "hemorrhage", present=False, probability=0.02),),
        priority=Priority.ROUTINE,
    )
    [sr_obj] = build_results(findings, sources, epoch=1, created=CREATED)
    assert sr_obj.kind == "sr"
    _assert_valid(sr_obj)
    sr = hd.sr.srread(io.BytesIO(sr_obj.data))
    [group] = sr.content.get_image_measurement_groups()
    [presence] = group.get_qualitative_evaluations()
    assert (presence.name.value, presence.value.value, presence.value.meaning) == (
        HEMORRHAGE.value,
        "272519000",
        "Absent",
    )
    [priority] = [i for i in _document_evaluations(sr) if i.ValueType == "CODE"]
    assert priority.ConceptCodeSequence[0].CodeValue == "103390000"  # ROUTINE -> Elective Procedure (CID 3414)


def test_qc_failure_encodes_the_analyzers_codes_verbatim(sources: list[Dataset]) -> None:
    finding = Finding(
        QUALITY_ASSESSMENT,
        "qc-motion",
        present=True,
        measurements=(Measurement(IMAGE_QUALITY_RATING, 2.0, Code("1", "UCUM", "no units")),),
        evaluations=(QualitativeEvaluation(QUALITY_FINDING, MOTION),),
    )
    findings = Findings("qc-ct", "0.3", AnalyzerKind.QC, FindingsStatus.COMPLETE, findings=(finding,))
    [sr_obj] = build_results(findings, sources, epoch=3, created=CREATED)
    _assert_valid(sr_obj)
    sr = hd.sr.srread(io.BytesIO(sr_obj.data))
    [group] = sr.content.get_image_measurement_groups()
    assert group.finding_type.value == "111050"
    evaluations = [
        (e.name.value, e.value.value, e.value.scheme_designator) for e in group.get_qualitative_evaluations()
    ]
    assert evaluations == [("111050", "52101004", "SCT"), ("111052", "MOTION", "99DICOMNODE")]
    [rating] = group.get_measurements()
    assert (rating.name.value, rating.value) == ("111029", 2.0)
    assert _document_evaluations(sr)[0].ValueType == "TEXT"  # no priority for QC


def test_empty_mask_keeps_one_empty_frame(sources: list[Dataset]) -> None:
    mask = Mask(_mask((len(sources), 64, 64), filled=False), "Hemorrhage", MORPH, HEMORRHAGE)
    findings = Findings(
        "demo-hyperdense",
        "1.0.0",
        AnalyzerKind.TRIAGE,
        FindingsStatus.COMPLETE,
        findings=(Finding(HEMORRHAGE, "hemorrhage-1", present=False, mask=mask),),
    )
    seg_obj, sr_obj = build_results(findings, sources, epoch=1, created=CREATED)
    _assert_valid(seg_obj)
    _assert_valid(sr_obj)
    seg = hd.seg.segread(io.BytesIO(seg_obj.data))
    assert seg.NumberOfFrames == 1 and seg.number_of_segments == 1
    assert not np.frombuffer(seg.PixelData, dtype=np.uint8).any()
    sr = hd.sr.srread(io.BytesIO(sr_obj.data))
    [group] = sr.content.get_volumetric_roi_measurement_groups()
    assert group.referenced_segment.referenced_sop_instance_uid == seg_obj.sop_instance_uid


def test_failed_analysis_yields_partial_sr_that_says_why(sources: list[Dataset]) -> None:
    findings = Findings(
        "demo-hyperdense",
        "1.0.0",
        AnalyzerKind.TRIAGE,
        FindingsStatus.FAILED,
        error="input has 3 slices, need at least 8",
        notes=("slice gap at 12.5 mm",),
    )
    [sr_obj] = build_results(findings, sources, epoch=1, created=CREATED)
    _assert_valid(sr_obj)
    sr = hd.sr.srread(io.BytesIO(sr_obj.data))
    assert sr.CompletionFlag == "PARTIAL" and sr.PreliminaryFlag == "PRELIMINARY"
    assert "FAILED" in sr.SeriesDescription
    assert sr.content.get_image_measurement_groups() == []
    texts = [i.TextValue for i in _document_evaluations(sr) if i.ValueType == "TEXT"]
    assert "Analysis failed: input has 3 slices, need at least 8" in texts
    assert "slice gap at 12.5 mm" in texts


def test_partial_analysis_is_partial(sources: list[Dataset]) -> None:
    findings = Findings(
        "demo-hyperdense",
        "1.0.0",
        AnalyzerKind.TRIAGE,
        FindingsStatus.PARTIAL,
        findings=(Finding(HEMORRHAGE, "h", present=False),),
        not_for_clinical_use=False,
    )
    [sr_obj] = build_results(findings, sources, epoch=1, created=CREATED)
    _assert_valid(sr_obj)
    sr = _read(sr_obj)
    assert sr.CompletionFlag == "PARTIAL"
    assert NOT_FOR_CLINICAL_USE not in sr.SeriesDescription


def test_invalid_scanner_header_values_are_repaired(
    sources: list[Dataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = pydicom.config.settings
    monkeypatch.setattr(settings, "reading_validation_mode", pydicom.config.IGNORE)
    monkeypatch.setattr(settings, "writing_validation_mode", pydicom.config.IGNORE)
    bad = {
        "PatientName": "D" * 70 + "^" + "J" * 70,
        "StudyDescription": "VERY LONG STUDY DESCRIPTION " * 5,
        "InstitutionName": "Institution\\With Backslash",
        "AccessionNumber": "ACC-0123456789-0123456789",
        "StudyDate": "2024-01-31",
        "StudyTime": "12:30:00",
        "PatientBirthDate": "19700231",  # not a real date
        "PatientSex": "MALE",
        "StudyID": "STUDY-ID-FAR-TOO-LONG",
        "ReferringPhysicianName": "Dr. Who",  # single component: written as family name "Dr. Who^"
        "SliceThickness": "2.50000000000000001",  # DS over 16 characters
    }
    for ds in sources:
        for keyword, value in bad.items():
            del ds[keyword]  # a new element takes the current (IGNORE) validation mode
            setattr(ds, keyword, value)
    monkeypatch.setattr(settings, "reading_validation_mode", pydicom.config.RAISE)
    monkeypatch.setattr(settings, "writing_validation_mode", pydicom.config.RAISE)
    results = build_results(_positive(sources), sources, epoch=1, created=CREATED)
    for r in results:
        _assert_valid(r)
        ds = _read(r)
        assert len(str(ds.PatientName)) == 64
        family, given = ds.PatientName.family_name, ds.PatientName.given_name
        assert set(family) == {"D"} and set(given) == {"J"} and abs(len(family) - len(given)) <= 1
        assert len(ds.AccessionNumber) == 16 and ds.AccessionNumber == "ACC-0123456789-0"
        assert ds.StudyDate == "20240131" and ds.StudyTime == "123000"
        assert ds.PatientBirthDate == "" and ds.PatientSex == ""
        assert len(ds.StudyDescription) <= 64 and ds.StudyID == "STUDY-ID-FAR-TOO"
        assert ds.ReferringPhysicianName == "Dr. Who^"
    repaired = sanitized_header(sources[0])
    assert repaired.InstitutionName == "Institution With Backslash"  # VM 1: backslash is not a delimiter
    assert repaired.SliceThickness == 2.5 and sources[0].PatientSex == "MALE"  # the input is untouched


def test_missing_type_2_patient_and_study_attributes_are_written_empty(sources: list[Dataset]) -> None:
    for ds in sources:
        for keyword in (
            "PatientID",
            "PatientBirthDate",
            "StudyDate",
            "StudyTime",
            "StudyID",
            "AccessionNumber",
        ):
            del ds[keyword]
    results = build_results(_positive(sources), sources, epoch=1, created=CREATED)
    # The source lacks them, so dciodvfy rightly notes that a DICOMDIR could not be built; nothing
    # else may be reported. (Inventing a Patient ID would be worse.)
    dicomdir = re.compile(r"^Warning - Missing attribute or value that would be needed to build DICOMDIR")
    for r in results:
        report = dciodvfy(r.data, ignore=(*IGNORED_WARNINGS, dicomdir))
        assert report.errors == [] and report.warnings == [] and report.returncode == 0
        ds = _read(r)
        assert ds.PatientID == "" and ds.StudyDate == "" and ds.AccessionNumber == ""


def test_uids_are_deterministic_per_epoch(sources: list[Dataset]) -> None:
    first = build_results(_positive(sources), sources, epoch=1, created=CREATED)
    again = build_results(_positive(sources), sources, epoch=1, created=CREATED)
    other = build_results(_positive(sources), sources, epoch=2, created=CREATED)
    assert [r.sop_instance_uid for r in first] == [r.sop_instance_uid for r in again]
    assert [r.data for r in first] == [r.data for r in again]
    assert {r.sop_instance_uid for r in first}.isdisjoint(r.sop_instance_uid for r in other)
    assert {r.series_instance_uid for r in first}.isdisjoint(r.series_instance_uid for r in other)
    series = sources[0].SeriesInstanceUID
    assert first[1].sop_instance_uid == result_uid(series, 1, "demo-hyperdense", "1.0.0", "sr", "instance")
    assert result_uid(series, 1, "a", "1", "sr", "instance", prefix="1.2.3.").startswith("1.2.3.")
    assert result_uid(series, 1, "a", "1", "sr") != result_uid(series, 1, "a", "2", "sr")


def test_reprocessed_epoch_references_previous_report(sources: list[Dataset]) -> None:
    previous = build_results(_positive(sources), sources, epoch=1, created=CREATED)
    current = build_results(_positive(sources), sources, epoch=2, previous=previous, created=CREATED)
    sr_obj = _by_kind(current)["sr"]
    _assert_valid(sr_obj)
    sr = _read(sr_obj)
    [study] = sr.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == sources[0].StudyInstanceUID
    [series] = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == _by_kind(previous)["sr"].series_instance_uid
    [instance] = series.ReferencedSOPSequence
    assert instance.ReferencedSOPInstanceUID == _by_kind(previous)["sr"].sop_instance_uid
    assert "PredecessorDocumentsSequence" not in _read(_by_kind(previous)["sr"])


def test_bad_findings_are_refused_with_the_culprit_named(sources: list[Dataset]) -> None:
    wrong = Mask(np.zeros((3, 64, 64), dtype=bool), "x", MORPH, HEMORRHAGE)
    bad_mask = Findings(
        "a",
        "1",
        AnalyzerKind.TRIAGE,
        FindingsStatus.COMPLETE,
        findings=(Finding(HEMORRHAGE, "t", mask=wrong),),
    )
    with pytest.raises(ValueError, match=r"findings\[0\]\.mask: shape \(3, 64, 64\)"):
        build_results(bad_mask, sources, epoch=1)
    bad_p = Findings(
        "a",
        "1",
        AnalyzerKind.TRIAGE,
        FindingsStatus.COMPLETE,
        findings=(Finding(HEMORRHAGE, "t", probability=91),),
    )
    with pytest.raises(ValueError, match=r"findings\[0\]\.probability"):
        build_results(bad_p, sources, epoch=1)
    with pytest.raises(ValueError, match="sources"):
        build_results(bad_p, [], epoch=1)
    twice = Findings(
        "a",
        "1",
        AnalyzerKind.TRIAGE,
        FindingsStatus.COMPLETE,
        findings=(Finding(HEMORRHAGE, "t"), Finding(VOLUME, "t")),
    )
    with pytest.raises(ValueError, match=r"findings\[1\]\.tracking_id: 't' is already findings\[0\]"):
        build_results(twice, sources, epoch=1)


def test_several_masks_become_numbered_segments_with_empty_frames_omitted(sources: list[Dataset]) -> None:
    shape = (len(sources), 64, 64)
    edema = Code("267038008", "SCT", "Edema")
    findings = Findings(
        "demo-hyperdense",
        "1.0.0",
        AnalyzerKind.TRIAGE,
        FindingsStatus.COMPLETE,
        findings=(
            Finding(HEMORRHAGE, "h", present=False, mask=Mask(_mask(shape, False), "H", MORPH, HEMORRHAGE)),
            Finding(edema, "e", present=True, mask=Mask(_mask(shape), "E", MORPH, edema)),
        ),
    )
    seg_obj, sr_obj = build_results(findings, sources, epoch=1, created=CREATED)
    _assert_valid(seg_obj)
    _assert_valid(sr_obj)
    seg = hd.seg.segread(io.BytesIO(seg_obj.data))
    assert seg.number_of_segments == 2 and seg.NumberOfFrames == 3  # only slices 4..6 of segment 2
    assert [seg.get_segment_description(n).tracking_id for n in (1, 2)] == ["h", "e"]
    sr = hd.sr.srread(io.BytesIO(sr_obj.data))
    volumetric = sr.content.get_volumetric_roi_measurement_groups()
    assert [(g.tracking_identifier, g.referenced_segment.referenced_segment_numbers) for g in volumetric] == [
        ("h", [1]),
        ("e", [2]),
    ]
    assert sr.content.get_image_measurement_groups() == []


def test_a_plain_measurement_group_claims_no_presence(sources: list[Dataset]) -> None:
    findings = Findings(
        "demo-hyperdense",
        "1.0.0",
        AnalyzerKind.TRIAGE,
        FindingsStatus.COMPLETE,
        findings=(Finding(VOLUME, "plain", present=None, measurements=(Measurement(VOLUME, 3.0, ML),)),),
    )
    [sr_obj] = build_results(findings, sources, epoch=1, created=CREATED)
    _assert_valid(sr_obj)
    [plain] = hd.sr.srread(io.BytesIO(sr_obj.data)).content.get_image_measurement_groups()
    assert plain.get_qualitative_evaluations() == []  # presence None: not applicable, nothing claimed


# --- projection sources with missing descriptors, unexpected failures, character sets -----------


def _cr(**changes: object) -> Dataset:
    """A CR header (no pixels) with Patient Orientation; ``changes`` None deletes an attribute."""
    ds = cr_image(64, 64, seed="results-cr")
    del ds.PixelData
    ds.PatientOrientation = ["P", "F"]
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def _cr_positive(source: Dataset) -> Findings:
    array = np.zeros((1, 64, 64), dtype=bool)
    array[0, 20:30, 24:36] = True
    finding = Finding(
        HEMORRHAGE, "opacity-1", present=True, probability=0.8, mask=Mask(array, "Opacity", MORPH, HEMORRHAGE)
    )
    return Findings("demo-cr", "1.0.0", AnalyzerKind.TRIAGE, FindingsStatus.COMPLETE, findings=(finding,))


def _failed() -> Findings:
    return Findings(
        "demo-cr", "1.0.0", AnalyzerKind.TRIAGE, FindingsStatus.FAILED, error="results could not be encoded"
    )


def _library_descriptors(sr: Dataset) -> dict[str, object]:
    """Concept meaning -> value of the Image Library Group's descriptors (TID 1602-1604)."""
    [library] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028"]
    group = library.ContentSequence[0]
    out: dict[str, object] = {}
    for item in group.ContentSequence:
        meaning = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "NUM":
            out[meaning] = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "TEXT":
            out[meaning] = item.TextValue
        elif item.ValueType == "CODE":
            out[meaning] = item.ConceptCodeSequence[0].CodeValue
    return out


@pytest.mark.parametrize(
    ("changes", "expected", "lost"),
    [
        (
            {},
            {"Patient Orientation Row": "P", "Patient Orientation Column": "F",
             "Horizontal Pixel Spacing": 0.2, "Vertical Pixel Spacing": 0.2},
            [],
        ),
        (
            {"PatientOrientation": None},
            {"Horizontal Pixel Spacing": 0.2, "Vertical Pixel Spacing": 0.2},
            ["Patient Orientation (0020,0020) -> Patient Orientation Row",
             "Patient Orientation (0020,0020) -> Patient Orientation Column"],
        ),
        (
            {"PatientOrientation": ""},  # Type 2C: present but empty
            {"Horizontal Pixel Spacing": 0.2, "Vertical Pixel Spacing": 0.2},
            ["Patient Orientation (0020,0020) -> Patient Orientation Row",
             "Patient Orientation (0020,0020) -> Patient Orientation Column"],
        ),
        (
            {"ImagerPixelSpacing": None},
            {"Patient Orientation Row": "P", "Patient Orientation Column": "F"},
            ["Imager Pixel Spacing (0018,1164) -> Horizontal Pixel Spacing",
             "Imager Pixel Spacing (0018,1164) -> Vertical Pixel Spacing"],
        ),
        (
            {"ImagerPixelSpacing": None, "PixelSpacing": [0.15, 0.1]},  # older CR: Pixel Spacing only
            {"Patient Orientation Row": "P", "Patient Orientation Column": "F",
             "Horizontal Pixel Spacing": 0.1, "Vertical Pixel Spacing": 0.15},
            [],
        ),
        (
            {"PatientOrientation": None, "ImagerPixelSpacing": None},
            {},
            ["Patient Orientation (0020,0020) -> Patient Orientation Row",
             "Patient Orientation (0020,0020) -> Patient Orientation Column",
             "Imager Pixel Spacing (0018,1164) -> Horizontal Pixel Spacing",
             "Imager Pixel Spacing (0018,1164) -> Vertical Pixel Spacing"],
        ),
    ],
    ids=["complete", "no-orientation", "empty-orientation", "no-spacing", "pixel-spacing", "neither"],
)
def test_projection_source_without_orientation_or_spacing_still_gives_seg_and_sr(
    changes: dict[str, object], expected: dict[str, object], lost: list[str]
) -> None:
    source = _cr(**changes)
    for findings in (_cr_positive(source), _failed()):
        results = build_results(findings, [source], epoch=0, created=CREATED)
        assert [r.kind for r in results] == (["seg", "sr"] if findings.findings else ["sr"])
        for r in results:
            _assert_valid(r)
        sr = hd.sr.srread(io.BytesIO(results[-1].data))
        descriptors = _library_descriptors(sr)
        assert descriptors.pop("Modality") == source.Modality
        assert (descriptors.pop("Pixel Data Rows"), descriptors.pop("Pixel Data Columns")) == (64.0, 64.0)
        assert descriptors == expected
        notes = [i.TextValue for i in _document_evaluations(sr) if i.ValueType == "TEXT"]
        assert [n for n in notes if n.startswith("Image Library:")] == [
            f"Image Library: the source image has no value for {m}; that descriptor is omitted."
            for m in lost
        ]
        if findings.findings:
            # pydicom, not hd.seg.segread: highdicom 0.28 refuses to read a Pixel Measures item
            # without Slice Thickness, which its own writer emits for a projection image with
            # Pixel Spacing (valid: dciodvfy accepts it above).
            seg = _read(results[0])
            assert seg.SegmentSequence[0].TrackingID == "opacity-1"
            assert seg.PatientName == source.PatientName
            # General Image: Type 2C without a frame of reference; the source's, or empty
            assert seg.PatientOrientation == (["P", "F"] if "Patient Orientation Row" in expected else "")


def test_unexpected_failure_while_building_is_a_results_error_naming_analyzer_and_series(
    sources: list[Dataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise AttributeError("'Dataset' object has no attribute 'Something'")

    monkeypatch.setattr(results_module, "_build_sr", broken)
    with pytest.raises(ResultsError) as caught:
        build_results(_positive(sources), sources, epoch=1, created=CREATED)
    assert isinstance(caught.value, ValueError)  # what analysis.run_analysis catches
    message = str(caught.value)
    assert "demo-hyperdense 1.0.0" in message and str(sources[0].SeriesInstanceUID) in message
    assert "AttributeError: 'Dataset' object has no attribute 'Something'" in message
    assert isinstance(caught.value.__cause__, AttributeError)


def _charset_file(name: str) -> Dataset:
    [path] = get_charset_files(name)
    return pydicom.dcmread(path)


def _gb2312_person_name() -> PersonName:
    # PS3.5 K.2: ISO 2022 IR 58 is designated to G1 by ESC $ ) A before the GB 2312 bytes. pydicom
    # writes this charset without the escape, so the value is given as received.
    raw = b"Wang^XiaoDong=" + b"\x1b$)A" + "王^小东".encode("gb2312")
    return PersonName(raw, convert_encodings(["", "ISO 2022 IR 58"]))


@pytest.mark.parametrize(
    ("character_set", "name", "written_as"),
    [
        # unsupported by highdicom: re-declared as UTF-8
        (["", "ISO 2022 IR 87"], "chrH31.dcm", "ISO_IR 192"),
        (["", "ISO 2022 IR 87"], "chrJapMulti.dcm", "ISO_IR 192"),
        (["", "ISO 2022 IR 149"], "chrI2.dcm", "ISO_IR 192"),
        (["", "ISO 2022 IR 58"], "gb2312", "ISO_IR 192"),
        ("ISO 2022 IR 100", "Buc^Jérôme", "ISO_IR 192"),
        ("", "Doe^John", "ISO_IR 192"),
        (None, "Doe^Jöhn", "ISO_IR 192"),  # non-ASCII without a character set: declared UTF-8
        # supported: kept
        (None, "Doe^John", None),
        (["ISO 2022 IR 13", "ISO 2022 IR 87"], "chrH32.dcm", ["ISO 2022 IR 13", "ISO 2022 IR 87"]),
        (["ISO 2022 IR 6", "ISO 2022 IR 87"], "chrJapMultiExplicitIR6.dcm", ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
        ("ISO_IR 100", "chrFren.dcm", "ISO_IR 100"),
        ("ISO_IR 144", "chrRuss.dcm", "ISO_IR 144"),
        ("ISO_IR 192", "chrX1.dcm", "ISO_IR 192"),
        ("GB18030", "chrX2.dcm", "GB18030"),
    ],
)
def test_source_character_sets_give_valid_objects_with_the_same_names(
    character_set: str | list[str] | None, name: str, written_as: str | list[str] | None
) -> None:
    if name.endswith(".dcm"):
        original = _charset_file(name)
        assert original.SpecificCharacterSet == character_set
        patient_name: object = original.PatientName
        expected = str(original.PatientName)
    elif name == "gb2312":
        patient_name, expected = _gb2312_person_name(), "Wang^XiaoDong=王^小东"
    else:
        patient_name = expected = name
    source = encoded(_cr(), character_set, PatientName=patient_name)
    if name.endswith(".dcm") or name == "gb2312":
        assert "PatientName" in source and isinstance(source.get_item("PatientName").value, bytes)
    for findings in (_cr_positive(source), _failed()):
        results = build_results(findings, [source], epoch=0, created=CREATED)
        for r in results:
            _assert_valid(r)
            ds = _read(r)
            assert ds.get("SpecificCharacterSet") == written_as
            # a family-name-only group is written "Family^" (sanitized_header): the same name
            assert str(ds.PatientName) in (expected, expected + "^")
            assert ds.PatientID == source.PatientID
        hd.sr.srread(io.BytesIO(results[-1].data))


def _code_items(ds: Dataset) -> list[Dataset]:
    return [
        item
        for elem in ds.iterall()
        if elem.VR == "SQ"
        for item in elem.value
        if "CodeValue" in item and "CodingSchemeDesignator" in item and "CodeMeaning" in item
    ]


def test_code_meanings_are_the_standards_and_findings_sit_in_their_template_rows(sources: list[Dataset]) -> None:
    """Every code PS3.16 knows carries PS3.16's meaning (pydicom's dictionary), including those
    highdicom writes itself; a group's finding is the value of Finding (121071, TID 1501/1411 row
    3b); a TID 1411 group carries no TID 4019 rows (the SEG and the device observer name the
    algorithm); projection radiographs report the generic CID 100 procedure."""
    from pydicom.sr._concepts_dict import concepts

    known: dict[tuple[str, str], set[str]] = {}
    for scheme, entries in concepts.items():
        for by_value in entries.values():
            for value, (meaning, _cids) in by_value.items():
                known.setdefault((scheme, value), set()).add(meaning)
    objects = build_results(_positive(sources), sources, epoch=1, created=CREATED)
    cr = cr_image(64, 64, seed="meanings")
    del cr.PixelData
    plain = replace(_positive([cr]).findings[0], mask=None)
    objects += build_results(replace(_positive([cr]), findings=(plain,)), [cr], epoch=1, created=CREATED)
    seen = set()
    for obj in objects:
        for item in _code_items(_read(obj)):
            key = (str(item.CodingSchemeDesignator), str(item.CodeValue))
            if key in known:
                terms = known[key] | {re.sub(r"\s*\([^()]*\)$", "", m) for m in known[key]}  # FSN without tag
                assert item.CodeMeaning in terms, (key, item.CodeMeaning)
                seen.add(key)
    assert ("DCM", "121232") in seen and ("DCM", "121071") in seen and ("SCT", "103391001") in seen
    sr = _read(objects[1])
    [container] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    [group] = container.ContentSequence
    names = [i.ConceptNameCodeSequence[0].CodeValue for i in group.ContentSequence]
    assert "111001" not in names and "111003" not in names and "121191" in names
    [finding] = [i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121071"]
    assert finding.ConceptCodeSequence[0].CodeValue == HEMORRHAGE.value
    [source_series] = [i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121232"]
    assert source_series.ConceptNameCodeSequence[0].CodeMeaning == "Source series for segmentation"
    cr_sr = _read(objects[-1])
    [procedure] = [i for i in cr_sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert (procedure.ConceptCodeSequence[0].CodeValue, procedure.ConceptCodeSequence[0].CodingSchemeDesignator) == (
        "363679005",
        "SCT",
    )
