"""conformance: docs/conformance.md is what the code generates, and what it states holds for a
running node and for the result objects the analysis pipeline builds.

The statement is parsed back from its Markdown tables, so a table that drifts from the code, or
code that drifts from the committed statement, fails here.
"""

from __future__ import annotations

import copy
import datetime as dt
import difflib
import io
import re
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import NodeFactory, RunningNode
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
)
from pynetdicom import AE
from pynetdicom.association import Association
from synthetic import cr_image, ct_series, mr_series, write_series

from dicomnode import sender
from dicomnode.analysis import AnalysisTask, run_analysis
from dicomnode.config import AnalysisSettings, Destination
from dicomnode.conformance import REGENERATE, render
from dicomnode.domain import (
    AnalyzerKind,
    Finding,
    Findings,
    FindingsStatus,
    Mask,
    Measurement,
    Priority,
    ResultObject,
)
from dicomnode.errors import Permanent
from dicomnode.models import torch_runtime
from dicomnode.receiver import tls_server_context
from dicomnode.results import build_results

DOC = Path(__file__).resolve().parent.parent / "docs" / "conformance.md"
CREATED = dt.datetime(2026, 1, 2, 3, 4, 5)


@pytest.fixture(scope="module")
def statement() -> str:
    return render()


# --- reading the statement back --------------------------------------------------------------------


def section(text: str, heading: str) -> str:
    """The body of the section whose heading line starts with ``heading``, up to the next heading of
    the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    end = next((i for i in range(start + 1, len(lines)) if re.match(rf"#{{1,{level}}} ", lines[i])), len(lines))
    return "\n".join(lines[start + 1 : end])


def tables(text: str) -> Iterator[tuple[str, str, list[dict[str, str]]]]:
    """(caption, header line, rows) of every Markdown table; the caption is the paragraph before it."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            paragraph: list[str] = []
            while j >= 0 and lines[j].strip():
                paragraph.insert(0, lines[j])
                j -= 1
            header = cells(lines[i])
            header_line = lines[i]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(header, cells(lines[i]), strict=True)))
                i += 1
            yield " ".join(paragraph), header_line, rows
        else:
            i += 1


def cells(line: str) -> list[str]:
    parts = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [p.strip().replace("\\|", "|") for p in parts]


def table(text: str, key: str) -> list[dict[str, str]]:
    """The one table whose caption or header line starts with ``key``."""
    found = [rows for caption, header, rows in tables(text) if caption.startswith(key) or header.startswith(key)]
    assert len(found) == 1, f"expected one table for {key!r}, found {len(found)}"
    return found[0]


def uid(cell: str) -> str:
    match = re.search(r"`([0-9.]+)`", cell)
    assert match, cell
    return match.group(1)


def status(cell: str) -> set[int]:
    """'0xA700' -> {0xA700}; '0xA700-0xA7FF' -> the range."""
    lo, _, hi = cell.partition("-")
    return set(range(int(lo, 16), int(hi or lo, 16) + 1))


# --- 1. the committed statement is the generated one ----------------------------------------------


def test_committed_statement_is_generated_from_the_code(statement: str) -> None:
    committed = DOC.read_text(encoding="utf-8")
    if committed != statement:
        diff = "".join(
            list(
                difflib.unified_diff(
                    committed.splitlines(keepends=True),
                    statement.splitlines(keepends=True),
                    "docs/conformance.md (committed)",
                    "render() (from the code)",
                    n=1,
                )
            )[:40]
        )
        pytest.fail(f"docs/conformance.md is out of date; regenerate it with `{REGENERATE}`\n{diff}")


def test_statement_is_deterministic(statement: str) -> None:
    assert render() == statement


# --- 2. the statement describes the running receiver ----------------------------------------------


def _associate(
    port: int, contexts: Sequence[tuple[str, Sequence[str]]], calling: str = "PYNETDICOM", called: str = "DICOMNODE"
) -> Association:
    ae = AE(ae_title=calling)
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    return ae.associate("127.0.0.1", port, ae_title=called)


def test_statement_lists_exactly_the_contexts_of_the_running_receiver(
    running_node: RunningNode, statement: str
) -> None:
    running = {
        str(cx.abstract_syntax): [str(ts) for ts in cx.transfer_syntax]
        for cx in running_node.node.receiver.ae.supported_contexts
    }
    # What the listening servers negotiate with must be what the AE reports.
    for server in running_node.node.receiver._servers:
        assert {str(cx.abstract_syntax): [str(ts) for ts in cx.transfer_syntax] for cx in server.contexts} == running
    scp = section(statement, "#### 2.2.1 Storage SCP")
    sop_rows = table(scp, "Table 2.")
    listed = [uid(row["SOP Class UID"]) for row in sop_rows]
    assert len(listed) == len(set(listed))
    assert set(listed) == set(running)
    assert {row["SCP"] for row in sop_rows} == {"Yes"}
    syntax_rows = table(scp, "Table 3.")
    syntaxes = [uid(row["UID"]) for row in syntax_rows]
    assert all(offered == syntaxes for offered in running.values())
    assert [int(row["Preference"]) for row in syntax_rows] == list(range(1, len(syntaxes) + 1))

    # Some classes and syntaxes a site relies on, independent of pynetdicom's list.
    assert {CTImageStorage, "1.2.840.10008.1.1", "1.2.840.10008.5.1.4.1.1.4"} <= set(listed)
    assert {JPEG2000Lossless, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian} <= set(syntaxes)

    # "The SCP accepts the first one in the order of Table 3 that was proposed."
    proposed = [JPEG2000Lossless, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian]
    assoc = _associate(running_node.port, [(CTImageStorage, proposed)])
    assert assoc.is_established
    [accepted] = assoc.accepted_contexts
    assoc.release()
    assert accepted.transfer_syntax[0] == min(proposed, key=syntaxes.index)
    for only in (JPEG2000Lossless, DeflatedExplicitVRLittleEndian):
        assoc = _associate(running_node.port, [(CTImageStorage, [only])])
        assert [cx.transfer_syntax[0] for cx in assoc.accepted_contexts] == [only]
        assoc.release()


def test_stated_parameters_and_identification_are_those_of_the_running_receiver(
    running_node: RunningNode, statement: str
) -> None:
    ae = running_node.node.receiver.ae
    scp = section(statement, "#### 2.2.1 Storage SCP")
    assert f"| Implementation Class UID | `{ae.implementation_class_uid}` |" in scp
    assert f"| Implementation Version Name | `{ae.implementation_version_name}` |" in scp
    # The fixture's node runs on the defaults for these two, so the statement's values must match.
    assert f"{ae.maximum_pdu_size} bytes (`node.max_pdu`)" in scp
    assert f"At most {running_node.node.receiver.settings.max_associations} concurrent associations" in scp


def test_stated_rejections_are_what_the_running_receiver_sends(make_node: NodeFactory, statement: str) -> None:
    node = make_node(node={"max_associations": 1})
    rows = table(section(statement, "##### 2.2.1.4"), "Table 4.")

    def stated(first_cell: str) -> tuple[int, int, int]:
        [row] = [r for r in rows if first_cell in r["Association request"]]
        result, source, reason = (int(row[k].split()[0]) for k in ("Result", "Source", "Reason/Diagnosis"))
        return result, source, reason

    def rejection(assoc: Association) -> tuple[int, int, int]:
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert rj is not None
        return (int(rj.result or 0), int(rj.result_source or 0), int(rj.diagnostic or 0))

    contexts = [("1.2.840.10008.1.1", [ExplicitVRLittleEndian])]
    assert rejection(_associate(node.port, contexts, calling="NOSUCHAE")) == stated("`UNKNOWN`")
    assert rejection(_associate(node.port, contexts, called="SOMEONEELSE")) == stated("called AE title")
    # A rejected association's thread lingers briefly and counts against the limit: wait it out.
    deadline = time.monotonic() + 10
    while node.node.receiver.ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.01)
    first = _associate(node.port, contexts)
    try:
        assert first.is_established
        assert rejection(_associate(node.port, contexts)) == stated("association number")
    finally:
        first.release()


def test_stated_store_statuses_and_duplicates_hold(running_node: RunningNode, statement: str) -> None:
    rows = table(section(statement, "###### SOP Specific Conformance: Storage"), "Table 5.")
    stated = {code for row in rows for code in status(row["Status"])}
    first, second = ct_series(2, seed="conformance-store")
    wrong = copy.deepcopy(first)
    wrong.Modality = "MR"  # CT Image Storage with another modality: does not match its SOP class
    wrong.SOPInstanceUID = wrong.file_meta.MediaStorageSOPInstanceUID = second.SOPInstanceUID
    assoc = _associate(running_node.port, [(CTImageStorage, [ExplicitVRLittleEndian])])
    try:
        statuses = [int(assoc.send_c_store(ds).Status) for ds in (first, first, wrong)]
    finally:
        assoc.release()
    assert statuses == [0x0000, 0x0000, 0xA900]
    assert set(statuses) <= stated
    # "a duplicate ... is answered with Success ... the ledger keeps one row"
    assert running_node.ledger.count_instances() == 1
    assert "0xA900" in [row["Status"] for row in rows]


def test_stated_tls_client_certificate_policy_is_the_receivers(tmp_path: Path, statement: str) -> None:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=conformance",
        "-keyout",
        "node.key",
        "-out",
        "node.crt",
    )
    security = section(statement, "### 5.1 Security Profiles")
    assert "TLS 1.2 or newer" in " ".join(security.split())
    rows = table(security, "Table 10.")
    assert len(rows) == 3
    for row in rows:
        ca = tmp_path / "node.crt" if row["`ca_certificates`"] == "set" else None
        for require in (True, False):
            if f"`{str(require).lower()}`" not in row["`require_client_certificate`"]:
                continue
            context = tls_server_context(tmp_path / "node.crt", tmp_path / "node.key", ca, require)
            assert context.minimum_version == ssl.TLSVersion.TLSv1_2
            assert f"({context.verify_mode.name})" in row["Client certificate"], (row, require)


# --- 3. the annex lists exactly the codes of objects the pipeline builds --------------------------


def coded_entries(ds: Dataset) -> Iterator[tuple[str, str, str]]:
    """(Code Value, Coding Scheme Designator, Code Meaning) of every code sequence item, anywhere."""
    for elem in ds.iterall():
        if elem.VR == "SQ":
            for item in elem.value:
                if "CodeValue" in item:
                    yield (str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning))


def annex_codes(statement: str, caption: str) -> set[tuple[str, str, str]]:
    rows = table(section(statement, "### 6.3 Coded Terminology"), caption)
    return {(r["Code Value"].strip("`"), r["Coding Scheme"], r["Code Meaning"]) for r in rows}


def _headers(modality: str, sop_class: str) -> list[Dataset]:
    datasets = ct_series(2, 16, 16, seed=f"conformance-{modality}")
    for ds in datasets:
        ds.Modality = modality
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
        del ds.PixelData
    return datasets


@pytest.fixture(scope="module")
def built_objects(tmp_path_factory: pytest.TempPathFactory) -> list[ResultObject]:
    """Result objects of real analyzers run by the analysis job on synthetic series, plus the
    branches those runs do not take (a mask, a STAT priority, other modalities)."""
    root = tmp_path_factory.mktemp("conformance")
    cr = cr_image(seed="conformance")
    cr.PatientOrientation = ["L", "F"]  # Type 2C; results need it for the projection descriptors
    series = [
        (write_series(ct_series(12, seed="conformance"), root / "ct"), ("qc-ct", "demo-hyperdense")),
        (write_series(mr_series(8, seed="conformance"), root / "mr"), ("qc-mr",)),
        (write_series([cr], root / "cr"), ("qc-xr",)),
    ]
    settings = AnalysisSettings(device="cpu")
    objects: list[ResultObject] = []
    for paths, analyzers in series:
        task = AnalysisTask(
            job_id=1,
            series_instance_uid="",
            epoch=1,
            analyzers=analyzers,
            paths=tuple(str(p) for p in paths),
            settings=settings,
            created=CREATED.timestamp(),
        )
        outcome = run_analysis(task)
        assert all(o.status != "failed" for o in outcome.analyzers), outcome.analyzers
        objects.extend(outcome.results)

    manifest = torch_runtime.load_manifest(torch_runtime.SHIPPED_DIR / "demo_hyperdense")
    label = manifest.output.labels[0]
    assert label.category is not None and label.type is not None
    headers = _headers("CT", CTImageStorage)
    array = np.zeros((2, 16, 16), dtype=bool)
    array[1, 4:8, 4:8] = True
    finding = Finding(
        label.code.code(),
        "lesion-1",
        present=True,
        probability=0.9,
        measurements=(Measurement(torch_runtime.VOLUME_CODE, 0.1, torch_runtime.MILLILITER),),
        mask=Mask(array, label.name, label.category.code(), label.type.code()),
    )
    stat = Findings(
        manifest.name,
        manifest.version,
        AnalyzerKind.TRIAGE,
        FindingsStatus.COMPLETE,
        findings=(finding,),
        priority=Priority.STAT,
    )
    objects.extend(build_results(stat, headers, epoch=1, created=CREATED))
    for modality, sop_class in [
        ("PT", "1.2.840.10008.5.1.4.1.1.128"),
        ("NM", "1.2.840.10008.5.1.4.1.1.20"),
        ("OT", "1.2.840.10008.5.1.4.1.1.7"),
    ]:
        failed = Findings("qc-ct", "1.0.0", AnalyzerKind.QC, FindingsStatus.FAILED, error="wrong modality")
        objects.extend(build_results(failed, _headers(modality, sop_class), epoch=1, created=CREATED))
    dx = copy.deepcopy(cr)
    del dx.PixelData
    dx.Modality, dx.SOPClassUID = "DX", "1.2.840.10008.5.1.4.1.1.1.1"
    failed = Findings("qc-xr", "1.0.0", AnalyzerKind.QC, FindingsStatus.FAILED, error="example")
    objects.extend(build_results(failed, [dx], epoch=1, created=CREATED))
    return objects


def test_every_code_in_built_objects_is_in_the_annex(statement: str, built_objects: list[ResultObject]) -> None:
    assert {o.kind for o in built_objects} == {"sr", "seg"}
    found = {code for o in built_objects for code in coded_entries(pydicom.dcmread(io.BytesIO(o.data)))}
    listed = annex_codes(statement, "| Code Value | Coding Scheme | Code Meaning | Object") | annex_codes(
        statement, "| Code Value | Coding Scheme | Code Meaning | Analyzers"
    )
    assert found - listed == set(), "codes emitted but not in the annex of docs/conformance.md"


def test_every_template_code_in_the_annex_is_in_built_objects(
    statement: str, built_objects: list[ResultObject]
) -> None:
    found = {code for o in built_objects for code in coded_entries(pydicom.dcmread(io.BytesIO(o.data)))}
    template_codes = annex_codes(statement, "| Code Value | Coding Scheme | Code Meaning | Object")
    assert len(template_codes) > 40
    assert template_codes - found == set(), "annex lists codes that no built object contains"


def test_stated_scu_behaviour_holds_against_a_real_scp(
    running_node: RunningNode, statement: str, built_objects: list[ResultObject], tmp_path: Path
) -> None:
    scu = section(statement, "#### 2.2.2 Storage SCU")
    proposed = {uid(row["UID"]): uid(row["Transfer Syntax"]) for row in table(scu, "Table 7.")}
    behaviour = {code: row["Behaviour"] for row in table(scu, "Table 8.") for code in status(row["Status"])}
    destination = Destination(ae_title="DICOMNODE", host="127.0.0.1", port=running_node.port)
    for obj in {o.kind: o for o in built_objects}.values():
        path = tmp_path / f"{obj.kind}.dcm"
        path.write_bytes(obj.data)
        code = sender.store(path, destination, "PYNETDICOM")
        assert code == 0x0000 and behaviour[code] == "delivered"
        stored = running_node.ledger.instance(obj.sop_instance_uid)
        assert proposed[obj.sop_class_uid] == stored.transfer_syntax_uid == obj.transfer_syntax_uid
    # "an A-ASSOCIATE-RJ with result 1 (permanent) ... makes the delivery a dead letter"
    assert "A-ASSOCIATE-RJ with result 1 (permanent)" in " ".join(scu.split())
    with pytest.raises(Permanent, match="association rejected"):
        sender.store(path, destination, "NOSUCHAE")


def test_annex_templates_include_the_root_template_of_built_reports(
    statement: str, built_objects: list[ResultObject]
) -> None:
    rows = table(section(statement, "#### 6.3.1 Templates"), "| Template")
    stated = {row["Template"] for row in rows}
    for obj in built_objects:
        if obj.kind == "sr":
            ds = pydicom.dcmread(io.BytesIO(obj.data))
            assert {f"TID {t.TemplateIdentifier}" for t in ds.ContentTemplateSequence} <= stated
            groups = [
                item
                for item in ds.iterall()
                if item.keyword == "ConceptNameCodeSequence" and item.value[0].CodeValue == "121191"
            ]
            if groups:
                assert "TID 1411" in stated
