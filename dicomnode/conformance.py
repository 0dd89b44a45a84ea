"""DICOM Conformance Statement (PS3.2 Annex N), generated from the code that implements it.

:func:`render` writes the statement as Markdown. What the code can state is read from it rather than
typed:

* the Storage SCP's SOP classes, transfer syntaxes, roles and association parameters are read from
  the pynetdicom ``AE`` of a real :class:`~dicomnode.receiver.Receiver` built from the settings;
* the access-control table is produced by calling the receiver's :class:`~dicomnode.receiver.PeerTable`
  on example callers, and the C-STORE refusals come from the :class:`~dicomnode.errors.StoreRefused`
  family the receiver raises;
* the Storage SCU's status table is :func:`dicomnode.sender.classify` applied to every status
  pynetdicom knows for the Storage Service Class (PS3.4 B.2.3) and the general statuses (PS3.7 C);
* the annex of templates and codes is collected by building result objects with
  :func:`dicomnode.results.build_results` for representative findings and walking every code
  sequence of the SR content tree and the SEG, plus the code constants of the analyzers;
* the character-set table is the outcome of building a result from a source in each defined term.

``tests/test_conformance.py`` checks that ``docs/conformance.md`` equals ``render()`` and compares
the statement with a running node and with result objects built by the analysis pipeline.
"""

from __future__ import annotations

import datetime as dt
import io
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pydicom
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
from pynetdicom import AE
from pynetdicom._globals import APPLICATION_CONTEXT_NAME
from pynetdicom.pdu_primitives import A_ASSOCIATE

from dicomnode import __version__, results, sender
from dicomnode.audit import Audit
from dicomnode.config import Config, Destination, NodeSettings, Peer, TlsSettings
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
from dicomnode.errors import Permanent, StoreRefused, Transient
from dicomnode.ledger import Ledger
from dicomnode.receiver import (
    _MODALITY_OF_SOP_CLASS,
    REJECT_CALLING_AE,
    VERIFICATION_SOP_CLASS,
    PeerTable,
    Receiver,
    edge_limits,
)
from dicomnode.spool import Spool
from dicomnode.transport import CONTROL_PDU_LIMIT

__all__ = ["REGENERATE", "CodeUse", "render", "representative_key_object", "representative_results", "result_codes"]

REGENERATE = "dicomnode conformance -o docs/conformance.md"

#: The analyzer-supplied codes of the representative findings use this scheme, so that the codes
#: the templates themselves emit can be told apart from those an analyzer chooses.
_PLACEHOLDER = "99ANALYZER"
_CREATED = dt.datetime(2000, 1, 1, 0, 0, 0)

# A-ASSOCIATE-RJ (PS3.8 9.3.4) that pynetdicom sends itself (pynetdicom.acse, acceptor negotiation).
_REJECT_CALLED_AE = (0x01, 0x01, 0x07)
_REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)


# --- small Markdown helpers ----------------------------------------------------------------------


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _code(value: str) -> str:
    return f"`{value}`"


def _hex(status: int) -> str:
    return f"0x{status:04X}"


def _reject_row(rsd: tuple[int, int, int]) -> tuple[str, str, str]:
    primitive = A_ASSOCIATE()
    primitive.result, primitive.result_source, primitive.diagnostic = rsd
    return (
        f"{rsd[0]} ({primitive.result_str.lower()})",
        f"{rsd[1]} ({primitive.source_str.lower()})",
        f"{rsd[2]} ({primitive.reason_str.lower()})",
    )


# --- facts: the Storage SCP ----------------------------------------------------------------------


def _receiver_ae(settings: NodeSettings) -> AE:
    """The pynetdicom AE of a real Receiver built from ``settings`` (not started)."""
    with tempfile.TemporaryDirectory(prefix="dicomnode-conformance-") as tmp:
        root = Path(tmp)
        ledger = Ledger.sqlite(str(root / "ledger.sqlite3"))
        try:
            receiver = Receiver(settings, [], Spool(root / "spool"), ledger, Audit(None, enabled=False))
        finally:
            ledger.close()
    return receiver.ae


# --- facts: result objects and their codes -------------------------------------------------------


@dataclass(frozen=True, order=True)
class CodeUse:
    """One coded entry found in an emitted object: the code, and where it sits."""

    value: str
    scheme: str
    meaning: str
    used_as: str
    kind: str  # "SR" or "SEG"


def _coded_items(ds: Dataset, kind: str) -> Iterator[CodeUse]:
    for elem in ds:
        if elem.VR != "SQ":
            continue
        for item in elem.value:
            value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue")
            if value is not None and "CodingSchemeDesignator" in item:
                yield CodeUse(str(value), str(item.CodingSchemeDesignator), str(item.get("CodeMeaning", "")),
                              _role(elem.keyword, ds), kind)
            yield from _coded_items(item, kind)


def _role(keyword: str, parent: Dataset) -> str:
    value_type = str(parent.get("ValueType", ""))
    if keyword == "ConceptNameCodeSequence":
        return f"concept name ({value_type})" if value_type else "concept name"
    if keyword == "ConceptCodeSequence":
        return f"value ({value_type})" if value_type else "value"
    if keyword == "MeasurementUnitsCodeSequence":
        return "units (NUM)"
    return pydicom.datadict.dictionary_description(keyword).removesuffix(" Sequence")


def result_codes(objects: Iterable[ResultObject]) -> set[CodeUse]:
    """Every coded entry (Code Value, Coding Scheme Designator, Code Meaning) in the objects."""
    found: set[CodeUse] = set()
    for obj in objects:
        ds = pydicom.dcmread(io.BytesIO(obj.data))
        found.update(_coded_items(ds, obj.kind.upper()))
    return found


# SOP class of a synthetic source image for each modality results.py knows a procedure code for.
_SOURCE_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
    "NM": "1.2.840.10008.5.1.4.1.1.20",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _source_headers(modality: str, slices: int = 3, size: int = 8) -> list[Dataset]:
    """Headers of a small synthetic source series (what imaging keeps: no Pixel Data)."""

    def uid(*parts: str) -> str:
        return str(generate_uid(entropy_srcs=["dicomnode-conformance", modality, *parts]))

    headers = []
    for i in range(slices):
        ds = Dataset()
        ds.SOPClassUID = _SOURCE_CLASS.get(modality, _SECONDARY_CAPTURE)
        ds.SOPInstanceUID = uid("instance", str(i))
        ds.PatientName = "CONFORMANCE^EXAMPLE"
        ds.PatientID = "EXAMPLE"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = uid("study")
        ds.StudyDate = "20000101"
        ds.StudyTime = "000000"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.Modality = modality
        ds.Manufacturer = "EXAMPLE"  # highdicom then records the acquisition equipment (109101)
        ds.SeriesInstanceUID = uid("series")
        ds.SeriesNumber = 1
        ds.InstanceNumber = i + 1
        ds.FrameOfReferenceUID = uid("frame")
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 2.0
        # what highdicom's TID 1603 (projection radiography) descriptors read instead
        ds.PatientOrientation = ["L", "F"]
        ds.ImagerPixelSpacing = [1.0, 1.0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        headers.append(ds)
    return headers


def _placeholder(name: str) -> Code:
    return Code(name.upper().replace(" ", "-"), _PLACEHOLDER, name)


def _representative_findings(slices: int, size: int) -> list[Findings]:
    """Findings that take every branch of results.build_results (see docs/results.md)."""
    mask = np.zeros((slices, size, size), dtype=bool)
    mask[1, 2:5, 2:5] = True
    with_mask = Finding(
        _placeholder("finding type"),
        "finding-1",
        present=True,
        probability=0.9,
        measurements=(Measurement(_placeholder("measurement"), 1.0, _placeholder("unit")),),
        evaluations=(QualitativeEvaluation(_placeholder("evaluation"), _placeholder("evaluation value")),),
        mask=Mask(mask, "label", _placeholder("segmented category"), _placeholder("segmented type")),
    )
    absent = Finding(_placeholder("finding type"), "finding-2", present=False, probability=0.1)
    plain = Finding(_placeholder("finding type"), "finding-3",
                    measurements=(Measurement(_placeholder("measurement"), 2.0, _placeholder("unit")),))

    def findings(status: FindingsStatus, items: tuple[Finding, ...], priority: Priority | None) -> Findings:
        return Findings("example", "1.0", AnalyzerKind.TRIAGE, status, findings=items, priority=priority,
                        error="example" if status is not FindingsStatus.COMPLETE else "",
                        notes=("example note",))

    return [
        findings(FindingsStatus.COMPLETE, (with_mask, absent, plain), Priority.STAT),
        findings(FindingsStatus.PARTIAL, (absent,), Priority.ROUTINE),
        findings(FindingsStatus.FAILED, (), None),
    ]


def representative_results() -> list[ResultObject]:
    """Result objects for representative findings on a CT series, and a failed analysis on every
    modality that results.py maps to its own Procedure Reported code (plus one it does not)."""
    modalities = list(dict.fromkeys([*results._PROCEDURES, "CR", "DX", "OT"]))
    out: list[ResultObject] = []
    for modality in modalities:
        headers = _source_headers(modality)
        batches = _representative_findings(len(headers), int(headers[0].Rows))
        for findings in batches if modality == "CT" else batches[-1:]:
            out.extend(results.build_results(findings, headers, epoch=1, created=_CREATED))
    return out


def representative_key_object(objects: Sequence[ResultObject]) -> ResultObject:
    """The Key Object a ``kos`` notify channel sends for a critical finding: the flagged slice of
    the representative CT findings, their SR and SEG (see :func:`dicomnode.results.build_key_object`)."""
    headers = _source_headers("CT")
    study = str(headers[0].StudyInstanceUID)
    documents = [o for o in objects if o.study_instance_uid == study and o.kind in ("sr", "seg")][:2]
    return results.build_key_object(headers[0], headers[1:2], documents, analyzer="example", version="1.0", epoch=1,
                                    description="Example finding present (probability 0.90), priority urgent. "
                                                "NOT FOR CLINICAL USE: produced by example 1.0.",
                                    created=_CREATED)


def _key_object_codes(kos: ResultObject) -> list[tuple[str, str, str, str]]:
    uses: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for use in result_codes([kos]):
        uses[(use.value, use.scheme, use.meaning)].add(use.used_as)
    return sorted(((*key, "; ".join(sorted(u))) for key, u in uses.items()), key=lambda r: (r[1], r[0]))


def _template_codes(objects: Sequence[ResultObject]) -> list[tuple[str, str, str, str, str]]:
    """(value, scheme, meaning, objects, uses) of every code the templates emit by themselves."""
    uses: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    kinds: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for use in result_codes(objects):
        if use.scheme == _PLACEHOLDER:
            continue
        key = (use.value, use.scheme, use.meaning)
        uses[key].add(use.used_as)
        kinds[key].add(use.kind)
    rows = [(*key, ", ".join(sorted(kinds[key], reverse=True)), "; ".join(sorted(uses[key])))
            for key in uses]
    return sorted(rows, key=lambda r: (r[1], r[0], r[2]))


# Templates (PS3.16 Annex A), each recognised in an emitted SR by a concept it alone introduces.
_TEMPLATES: list[tuple[str, str, Callable[[set[tuple[str, str]], Dataset], bool]]] = [
    ("TID 1500", "Measurement Report",
     lambda c, sr: any(str(t.TemplateIdentifier) == "1500" for t in sr.get("ContentTemplateSequence", []))),
    ("TID 1204", "Language of Content Item and Descendants", lambda c, sr: ("121049", "DCM") in c),
    ("TID 1001", "Observation Context", lambda c, sr: ("121005", "DCM") in c),
    ("TID 1002", "Observer Context", lambda c, sr: ("121005", "DCM") in c),
    ("TID 1004", "Device Observer Identifying Attributes", lambda c, sr: ("121012", "DCM") in c),
    ("TID 1600", "Image Library", lambda c, sr: ("111028", "DCM") in c),
    ("TID 1601", "Image Library Entry", lambda c, sr: ("260753009", "SCT") in c),
    ("TID 1602", "Image Library Entry Descriptors", lambda c, sr: ("121139", "DCM") in c),
    ("TID 1603", "Image Library Entry Descriptors for Projection Radiography",
     lambda c, sr: ("111044", "DCM") in c),
    ("TID 1604", "Image Library Entry Descriptors for Cross-Sectional Modalities",
     lambda c, sr: ("110904", "DCM") in c),
    ("TID 1501", "Measurement and Qualitative Evaluation Group", lambda c, sr: _groups(sr, segment=False)),
    ("TID 1411", "Volumetric ROI Measurements and Qualitative Evaluations",
     lambda c, sr: _groups(sr, segment=True)),
    ("TID 4019", "Algorithm Identification", lambda c, sr: ("111001", "DCM") in c),
    ("TID 300", "Measurement", lambda c, sr: _groups(sr, segment=None, value_type="NUM")),
]


def _content_items(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def _groups(sr: Dataset, segment: bool | None, value_type: str = "") -> bool:
    """True when a Measurement Group (125007) exists with (or without) a Referenced Segment and,
    with ``value_type``, a child of that type."""
    for item in _content_items(sr):
        if item.get("ValueType") != "CONTAINER" or item.ConceptNameCodeSequence[0].CodeValue != "125007":
            continue
        children = list(item.get("ContentSequence", []))
        has_segment = any(c.ConceptNameCodeSequence[0].CodeValue == "121191" for c in children)
        if segment is not None and has_segment != segment:
            continue
        if not value_type or any(c.ValueType == value_type for c in children):
            return True
    return False


def _templates_used(objects: Sequence[ResultObject]) -> list[tuple[str, str]]:
    used: list[tuple[str, str]] = []
    srs = [pydicom.dcmread(io.BytesIO(o.data)) for o in objects if o.kind == "sr"]
    for tid, title, present in _TEMPLATES:
        for sr in srs:
            concepts = {(u.value, u.scheme) for u in _coded_items(sr, "SR")}
            if present(concepts, sr):
                used.append((tid, title))
                break
    return used


# --- facts: analyzers ----------------------------------------------------------------------------


def _module_codes(module: ModuleType) -> list[tuple[str, Code]]:
    return [(name, value) for name, value in vars(module).items() if isinstance(value, Code)]


def _analyzer_codes(config: Config) -> list[tuple[str, str, str, str, str]]:
    """(value, scheme, meaning, analyzers, where defined) of every code an analyzer can emit."""
    from dicomnode.models import deepbet, qc, torch_runtime

    found: dict[tuple[str, str, str], tuple[set[str], set[str]]] = defaultdict(lambda: (set(), set()))

    def add(code: Code, analyzer: str, where: str) -> None:
        names, places = found[(code.value, code.scheme, code.meaning)]
        names.add(analyzer)
        places.add(where)

    qc_names = ", ".join(sorted(spec.name for spec in qc.specs(qc.QcSettings())))
    for name, code in _module_codes(qc):
        add(code, qc_names, f"models.qc.{name}")
    for name, code in _module_codes(deepbet):
        add(code, deepbet.NAME, f"models.deepbet.{name}")
    for folder in torch_runtime.model_folders(config.analysis):
        try:
            manifest = torch_runtime.load_manifest(folder)
        except torch_runtime.ManifestError:
            continue  # an unusable model emits nothing; the registry reports why
        for name, code in _module_codes(torch_runtime):
            add(code, manifest.name, f"models.torch_runtime.{name}")
        where = f"{folder.name}/manifest.toml"
        for label in manifest.output.labels:
            for spec in (label.code, label.category, label.type):
                if spec is not None:
                    add(spec.code(), manifest.name, where)
    rows = [(*key, ", ".join(sorted(names)), ", ".join(sorted(places))) for key, (names, places) in found.items()]
    return sorted(rows, key=lambda r: (r[1], r[0], r[2]))


def _private_codes() -> list[tuple[str, str, str]]:
    """(value, meaning, reason) of every private code the shipped analyzers define."""
    from dicomnode.models import PRIVATE_CODES, deepbet, qc  # noqa: F401 - importing registers their codes

    return sorted((code.value, code.meaning, reason) for code, reason in PRIVATE_CODES.items())


#: What PixelMed's DicomSRValidator (Debian libpixelmed-java 20220618) still says about the SRs,
#: and why: (regular expression of the message, explanation, due to the validator's 2022 templates).
#: tests/pixelmed.py accepts exactly these warnings, and no error.
PIXELMED_WARNINGS: tuple[tuple[str, str, bool], ...] = (
    (
        r'^Warning: [0-9.]+: /CONTAINER \(126000,DCM,"Imaging Measurement Report"\)'
        r'/CONTAINER \(126010,DCM,"Imaging Measurements"\)/CONTAINER \(125007,DCM,"Measurement Group"\)'
        r"/CODE \([^)]*\): Content Item not in template$",
        "A qualitative evaluation (a CODE content item, e.g. the finding type = Present/Absent, or "
        "Quality Finding / Quality Assessment / Quality Control Standard) inside a measurement group. "
        "TID 1501 rows 11-12 and the matching rows of TID 1411 allow them with any concept name (DCMTK's "
        "dcmsr/cmr implements them as 'TID 1501 - Row 11'); the validator's compiled TID 1501/1411 stop "
        "before those rows, so it reports every such item.",
        True,
    ),
)

#: Choices made so that the validators give no error, with the reason.
VALIDATOR_CHOICES: tuple[tuple[str, str], ...] = (
    (
        "Procedure Reported for CR/DX is (363679005, SCT, \"Imaging procedure\")",
        "(43468-8, LN, \"XR unspecified body region\") joined CID 100 after 2022; PixelMed rejects it "
        "as outside CID 100 (an error), the generic code is in both editions.",
    ),
    (
        "No Algorithm Identification (TID 4019) in TID 1411 groups",
        "PixelMed's TID 1411 has no row for it (a warning). The segment's Segmentation Algorithm "
        "Identification and the device observer (TID 1004) name the same algorithm and version.",
    ),
    (
        "A report never mixes TID 1411 and TID 1501 groups from the shipped analyzers",
        "PixelMed decides between TID 1411 and TID 1501 over the whole Imaging Measurements container "
        "(any Referenced Segment makes every group a TID 1411 one) and then reports the groups without "
        "a segment as errors. A segmentation model gives every label a segment (empty when absent) once "
        "it writes a SEG; deepbet-brain reports coverage in its brain segment's group.",
    ),
    (
        "Code meanings are those of PS3.16, including template codes highdicom writes",
        "e.g. (121232, DCM, \"Source series for segmentation\"), which highdicom writes capitalised; "
        "results.standard_meaning takes them from pydicom's copy of the PS3.16 dictionary.",
    ),
)


# --- facts: IOD modules --------------------------------------------------------------------------


def _module_rows(ds: Dataset) -> list[tuple[str, str, str, str]]:
    """(IE, module, usage, present) for the IOD of ``ds`` (PS3.3 Annex A, as highdicom ships it)."""
    from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map

    iod = get_sop_class_iod_map()[str(ds.SOPClassUID)]
    attributes = get_module_attribute_map()
    rows = []
    for module in get_iod_module_map()[iod]:
        top = [a["keyword"] for a in attributes[module["key"]] if not a["path"]]
        present = any(keyword in ds for keyword in top)
        name = module["key"].replace("-", " ").title()
        for old, new in (("Sr ", "SR "), ("Sop ", "SOP "), ("Icc ", "ICC "), (" Of ", " of "),
                         ("Multi Frame", "Multi-frame"), ("Multi Resolution", "Multi-Resolution")):
            name = name.replace(old, new)
        rows.append((module["ie"], name, module["usage"], "Yes" if present else "No"))
    return rows


# --- facts: character sets -----------------------------------------------------------------------


# Values of Specific Character Set (0008,0005) defined in PS3.3 C.12.1.1.2, in the forms PS3.3 uses
# them (multi-byte sets with code extensions follow an empty or single-byte first value).
# None: the attribute is absent (default repertoire); "": present but empty (not allowed, seen).
_CHARACTER_SETS: tuple[str | list[str] | None, ...] = (
    None,
    "",
    *(f"ISO_IR {n}" for n in (100, 101, 109, 110, 144, 127, 126, 138, 148, 203, 166, 13)),
    *(f"ISO 2022 IR {n}" for n in (6, 100, 101, 109, 110, 144, 127, 126, 138, 148, 203, 166, 13)),
    ["", "ISO 2022 IR 87"],
    ["ISO 2022 IR 13", "ISO 2022 IR 87"],
    ["", "ISO 2022 IR 87", "ISO 2022 IR 159"],
    ["", "ISO 2022 IR 149"],
    ["", "ISO 2022 IR 58"],
    "ISO_IR 192",
    "GB18030",
    "GBK",
)


def _charset_outcomes() -> list[tuple[str, str]]:
    """(Specific Character Set of the source, outcome of building a result from it)."""
    rows = []
    for value in _CHARACTER_SETS:
        terms = [value] if isinstance(value, str) else value or []
        if any(term and term not in python_encoding for term in terms):
            continue  # pydicom cannot decode it: a source in it is unreadable before results
        headers = _source_headers("OT", slices=1)
        for ds in headers:
            if value is not None:
                ds.SpecificCharacterSet = value
        empty = Findings("example", "1.0", AnalyzerKind.QC, FindingsStatus.COMPLETE)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                [sr] = results.build_results(empty, headers, epoch=1, created=_CREATED)
            except Exception as exc:  # the outcome is what the table reports
                outcome = f"**not built**: {type(exc).__name__}: {exc}"
            else:
                written = pydicom.dcmread(io.BytesIO(sr.data)).get("SpecificCharacterSet")
                outcome = f"built, written as {_charset_text(written)}"
        if caught:
            outcome += f" (warning: {caught[0].message})"
        rows.append((_charset_text(value), outcome))
    return rows


def _charset_text(value: Any) -> str:
    if value is None:
        return "(absent)"
    if isinstance(value, (list, pydicom.multival.MultiValue)):
        return "`" + "\\".join(str(v) for v in value) + "`"
    return f"`{value}`" if value else "(empty)"


# --- facts: the Storage SCU ----------------------------------------------------------------------


def _scu_status_rows(destination: Destination) -> list[tuple[str, str, str]]:
    """sender.classify on every C-STORE status pynetdicom knows, runs of equal rows merged."""
    from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS

    known: dict[int, tuple[str, str]] = {**GENERAL_STATUS, **STORAGE_SERVICE_CLASS_STATUS}
    known.setdefault(0xB001, ("Warning", "any other warning status"))
    rows: list[tuple[int, int, str, str]] = []
    for status in sorted(known):
        category, meaning = known[status]
        error = sender.classify(status, destination)
        if error is None:
            outcome = "delivered"
        elif isinstance(error, Transient):
            outcome = "retried (Transient)"
        elif isinstance(error, Permanent):
            outcome = "dead letter (Permanent)"
        else:  # pragma: no cover - classify returns only these
            outcome = type(error).__name__
        label = f"{category}: {meaning}" if meaning else category
        if rows and rows[-1][2:] == (label, outcome) and rows[-1][1] == status - 1:
            rows[-1] = (rows[-1][0], status, label, outcome)
        else:
            rows.append((status, status, label, outcome))
    return [(_hex(lo) if lo == hi else f"{_hex(lo)}-{_hex(hi)}", label, outcome) for lo, hi, label, outcome in rows]


# --- the document --------------------------------------------------------------------------------


@dataclass
class _Facts:
    config: Config
    scp: AE
    scu: AE
    contexts: list[tuple[str, tuple[str, ...]]]
    objects: list[ResultObject]
    key_object: ResultObject  # what a notify channel of kind "kos" sends


def _gather(config: Config) -> _Facts:
    scp = _receiver_ae(config.node)
    contexts = [(str(cx.abstract_syntax), tuple(str(ts) for ts in cx.transfer_syntax))
                for cx in scp.supported_contexts]
    objects = representative_results()
    return _Facts(config, scp, sender.make_ae(config.node.ae_title), contexts, objects,
                  representative_key_object(objects))


def render(config: Config | None = None) -> str:
    """The conformance statement as Markdown; ``None``: the defaults of :mod:`dicomnode.config`."""
    facts = _gather(config if config is not None else Config())
    parts = [
        _overview(facts),
        _introduction(facts),
        _networking(facts),
        _media(),
        _charsets(facts),
        _security(facts),
        _annexes(facts),
    ]
    return "\n\n".join(p.strip() for p in parts) + "\n"


def _sop_name(uid: str) -> str:
    return str(UID(uid).name)


def _result_classes(facts: _Facts) -> list[tuple[str, str]]:
    return sorted({(o.sop_class_uid, o.transfer_syntax_uid) for o in [*facts.objects, facts.key_object]})


def _overview(facts: _Facts) -> str:
    storage = [uid for uid, _ in facts.contexts if uid != VERIFICATION_SOP_CLASS]
    sent = {uid for uid, _ in _result_classes(facts)}
    rows = [
        (f"Storage SOP classes ({len(storage)}, section 2.2.1.1)", "No (see below)", "Yes"),
        *[(f"{_sop_name(uid)} (`{uid}`)", "Yes", "Yes" if uid in storage else "No") for uid in sorted(sent)],
        (f"{_sop_name(VERIFICATION_SOP_CLASS)} (`{VERIFICATION_SOP_CLASS}`)", "Yes",
         "Yes" if any(uid == VERIFICATION_SOP_CLASS for uid, _ in facts.contexts) else "No"),
    ]
    return f"""
# DICOM Conformance Statement: dicomnode {__version__}

<!-- Generated by `{REGENERATE}` from the code (dicomnode/conformance.py). Do not edit by hand:
     tests/test_conformance.py fails when this file and the code disagree. -->

> **NOT FOR CLINICAL USE.** The shipped analyzers are demonstrations; their results are not
> validated for diagnosis or triage.

## Conformance Statement Overview

dicomnode is a DICOM network node between image sources and a PACS. Its Storage SCP receives
images with C-STORE and keeps them byte for byte. For each complete series it runs image-quality
checks and AI models and sends the findings back with C-STORE as a Comprehensive 3D SR (TID 1500)
and, when a finding has a mask, a Segmentation. For a critical finding a notify channel of kind `kos`
sends a Key Object Selection Document ("Of Interest") flagging its images. It answers C-ECHO. It has
no query/retrieve, worklist, print or media services.

Table 1. Network services

{_table(["SOP Classes", "User of Service (SCU)", "Provider of Service (SCP)"], rows)}

The SCU sends only the SOP classes of the objects it creates. The `dicomnode send` command can send
any Part 10 file as an operator tool; it is not part of the node's automatic behaviour.

Media services: none.

## Table of Contents

1. Introduction
2. Networking: implementation model, AE specifications, network interfaces, configuration
3. Media Interchange
4. Support of Character Sets
5. Security
6. Annexes: IOD contents, data dictionary of private attributes, coded terminology and templates
"""


def _introduction(facts: _Facts) -> str:
    return f"""
## 1 Introduction

### 1.1 Revision History

| Document version | Software version | Note |
|---|---|---|
| {__version__} | dicomnode {__version__} | generated from the software it describes |

### 1.2 Audience

Integrators and PACS administrators who connect modalities and archives to dicomnode. Readers are
assumed to know DICOM PS3.2, PS3.4, PS3.7 and PS3.8.

### 1.3 Remarks

The statement is generated from the code: SOP classes, transfer syntaxes and parameters are read
from the objects the node builds at start-up; statuses from the functions that produce or classify
them; templates and codes from result objects built by the result encoder. Values of
configuration parameters are the defaults of `dicomnode/config.py`; run
`dicomnode conformance --config FILE` for a site's values. Conformance to this statement does not
guarantee interoperability; test with the actual peers.

### 1.4 Terms and Definitions

| Term | Meaning |
|---|---|
| spool | the directory in which received and created objects are stored durably |
| ledger | the database (SQLite by default) recording every instance, series, job and delivery |
| epoch | one processing of a series; images arriving after processing start a new epoch |
| dead letter | a delivery that is not retried automatically (`dicomnode results retry ID` retries it) |
| analyzer | an image-quality check or AI model run on a series |

### 1.5 Abbreviations

AE Application Entity; CID Context Group Identifier; DIMSE DICOM Message Service Element;
IOD Information Object Definition; PDU Protocol Data Unit; SCP Service Class Provider;
SCU Service Class User; SEG Segmentation; SR Structured Report; TID Template Identifier;
TLS Transport Layer Security; UID Unique Identifier.

### 1.6 References

NEMA PS3 (DICOM), in particular PS3.2 Annex N, PS3.3 (IODs), PS3.4 Annex B (Storage Service
Class), PS3.7 Annex C (status), PS3.8 (association, A-ASSOCIATE-RJ), PS3.15 (security),
PS3.16 (templates and context groups).
"""


def _networking(facts: _Facts) -> str:
    parts = [_implementation_model(facts), _scp_specification(facts), _scu_specification(facts),
             _network_interfaces(facts), _configuration(facts)]
    return "\n\n".join(["## 2 Networking", *(p.strip() for p in parts)])


def _implementation_model(facts: _Facts) -> str:
    c = facts.config
    ae_title = c.node.ae_title
    return f"""
### 2.1 Implementation Model

#### 2.1.1 Application Data Flow

```
image source --C-STORE--> [{ae_title} Storage SCP] --> spool + ledger --> series complete
        --> analyzers (QC, AI) --> results (SR, SEG) --> [{ae_title} Storage SCU] --C-STORE--> PACS
verifier --C-ECHO--> [{ae_title} Storage SCP]
```

One application entity title, `{ae_title}` (`node.ae_title`), is used for both roles: the
Storage SCP accepts associations addressed to it, and the Storage SCU calls destinations with it
as the calling AE title.

#### 2.1.2 Functional Definition of AEs

* **Storage SCP** (`dicomnode/receiver.py`). Accepts or rejects each association (section
  2.2.1.4). For each C-STORE it writes the data set bytes exactly as received behind a File Meta
  Information header of its own, fsyncs the file, commits a ledger row, and only then answers
  Success. It never decodes pixel data and never waits for analysis.
* **Storage SCU** (`dicomnode/sender.py`). Delivers each created object to each destination the
  routing rules name, as a durable job in the ledger: one association per object and destination,
  retried with backoff on transient failures.

#### 2.1.3 Sequencing of Real-World Activities

1. An image source sends a series; every instance is stored and acknowledged independently.
2. A series is complete at the first of: the number of images its headers announce (Images in
   Acquisition x Number of Temporal Positions) has arrived; `assembly.release_grace_s`
   ({c.assembly.release_grace_s:g} s) after the association that carried its latest image was
   released; `assembly.quiet_period_s` ({c.assembly.quiet_period_s:g} s, or a rule's own) without a
   new image. DICOM has no "series complete" message, so this is inferred.
3. The routing rules select analyzers and destinations; an analysis job runs them.
4. The results (one SR per analyzer, plus a SEG when a finding has a mask) are stored in the spool
   and one delivery job per destination sends them.
5. New images of a series that was already handed on start a new epoch
   (`assembly.late_policy` = `{c.assembly.late_policy}`): the series is processed again and the new
   SR lists the previous one in its Predecessor Documents Sequence. With `ignore`, images later than
   `assembly.late_window_min` ({c.assembly.late_window_min:g} min) are kept but not processed.
   Re-sent duplicates never start processing.
"""


def _scp_specification(facts: _Facts) -> str:
    ae, s = facts.scp, facts.config.node
    handshake = edge_limits(s).handshake_timeout
    storage = [(uid, ts) for uid, ts in facts.contexts if uid != VERIFICATION_SOP_CLASS]
    sop_rows = [(_sop_name(uid), f"`{uid}`", "No", "Yes") for uid, _ in facts.contexts]
    by_syntaxes: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for uid, syntaxes in facts.contexts:
        by_syntaxes[syntaxes].append(uid)
    syntax_tables = []
    for n, (syntaxes, uids) in enumerate(by_syntaxes.items(), start=1):
        label = "Table 3" if len(by_syntaxes) == 1 else f"Table 3.{n}"
        applies = ("every SOP class in Table 2" if len(uids) == len(facts.contexts)
                   else ", ".join(_sop_name(u) for u in uids))
        rows = [(i, UID(ts).name, f"`{ts}`", _ts_encoding(UID(ts)), _ts_note(UID(ts)))
                for i, ts in enumerate(syntaxes, start=1)]
        syntax_tables.append(
            f"{label}. Transfer syntaxes accepted for {applies} (role SCP, no extended negotiation), "
            "in the SCP's order of preference\n\n"
            + _table(["Preference", "Transfer Syntax", "UID", "Encoding", "Note"], rows)
        )
    same = ("each with the same transfer syntaxes (Table 3)" if len(by_syntaxes) == 1
            else f"with the transfer syntaxes of Tables 3.1 to 3.{len(by_syntaxes)}")
    roles = {(cx.scu_role, cx.scp_role) for cx in ae.supported_contexts}
    role_text = ("No SCP/SCU Role Selection is negotiated; the node acts as SCP only."
                 if roles == {(None, None)} else f"Role selection values offered: {sorted(map(str, roles))}.")
    return f"""
### 2.2 AE Specifications

#### 2.2.1 Storage SCP

##### 2.2.1.1 SOP Classes

The Storage SCP offers the Verification SOP class and every storage SOP class of PS3.4 Table B.5-1
that pynetdicom defines ({len(storage)} classes), {same}.
Private SOP classes are not supported.

Table 2. SOP classes of the Storage SCP

{_table(["SOP Class Name", "SOP Class UID", "SCU", "SCP"], sop_rows)}

##### 2.2.1.2 Association Policies

###### General

| Parameter | Value |
|---|---|
| Application Context Name | `{APPLICATION_CONTEXT_NAME}` |
| Maximum PDU size received | {_pdu(ae.maximum_pdu_size)} (`node.max_pdu`) |
| Called AE title required | {"yes: `" + s.ae_title + "`" if ae.require_called_aet else "no"} |
| ACSE / DIMSE / network timeout | {ae.acse_timeout:g} s / {ae.dimse_timeout:g} s / {ae.network_timeout:g} s |
| Handshake deadline (TLS and A-ASSOCIATE-RQ) | {handshake:g} s (`node.handshake_timeout`, at most the ACSE timeout) |

###### Number of Associations

At most {s.max_associations} concurrent associations (`node.max_associations`); each runs in its own
thread. The node never initiates an association from the SCP. Only negotiated associations count:
a TCP connection that has not yet sent its whole A-ASSOCIATE-RQ is *negotiating*, in a separate
pool of {s.negotiation_slots} connections (`node.negotiation_slots`), at most {s.negotiation_per_host} from one peer
address (`node.negotiation_per_host`). A connection over either bound is reset at once; a
negotiating connection has the handshake deadline above to finish TLS and its A-ASSOCIATE-RQ, then
it is closed. A PDU longer than the Maximum Length the node announced (P-DATA-TF) or than
{CONTROL_PDU_LIMIT // 2**20} MiB (any other PDU) ends its association with an A-ABORT (source service provider,
reason invalid PDU parameter value) before its body is read; so does a data set that streams past
`node.max_instance_mb` ({s.max_instance_mb} MiB), at the fragment that crosses it.

###### Asynchronous Nature

Asynchronous operations are not supported (maximum one outstanding operation, no Asynchronous
Operations Window negotiation). User Identity negotiation is ignored (accepted without a response);
no other extended negotiation is supported.

###### Implementation Identifying Information

| Parameter | Value |
|---|---|
| Implementation Class UID | `{ae.implementation_class_uid}` |
| Implementation Version Name | `{ae.implementation_version_name}` |

The same values are written into the File Meta Information of every stored instance, with Source
Application Entity Title set to the calling AE title.

##### 2.2.1.3 Association Initiation Policy

The Storage SCP does not initiate associations (see section 2.2.2 for the Storage SCU).

##### 2.2.1.4 Association Acceptance Policy

###### Presentation Contexts

{role_text} When a presentation context proposes several transfer syntaxes, the SCP accepts the
first one in the order of Table 3 that was proposed (not the proposer's order). A context whose
abstract syntax is not in Table 2 is rejected with result 3 (abstract syntax not supported); one
with no transfer syntax in Table 3 with result 4 (transfer syntaxes not supported).

{chr(10).join(syntax_tables)}

###### Access Control

{_acceptance_policy(facts).strip()}

###### SOP Specific Conformance: Verification

C-ECHO is answered with status 0x0000 (Success) on any accepted association.

###### SOP Specific Conformance: Storage

{_storage_conformance(facts).strip()}
"""


def _pdu(size: int) -> str:
    return "unlimited" if size == 0 else f"{size} bytes"


def _ts_encoding(ts: UID) -> str:
    vr = "implicit VR" if ts.is_implicit_VR else "explicit VR"
    text = f"{vr} {'little' if ts.is_little_endian else 'big'} endian"
    return text + (", deflated" if ts.is_deflated else "")


def _ts_note(ts: UID) -> str:
    notes = ["retired"] if ts.is_retired else []
    if "JPIP" in ts.name:
        notes.append("pixel data by reference: refused with 0xA900 for the image SOP classes whose "
                     "pixel data is checked (section 2.2.1.4)")
    if ts.name.startswith("SMPTE ST 2110"):
        notes.append("defined for DICOM Real-Time Video (PS3.22), not for C-STORE")
    return "; ".join(notes)


def _acceptance_policy(facts: _Facts) -> str:
    examples = [Peer(ae_title="SCANNER1", hosts=["192.0.2.10"]), Peer(ae_title="ANYWHERE")]
    table = PeerTable(examples)
    cases = [("SCANNER1", "192.0.2.10"), ("ANYWHERE", "198.51.100.7"), ("SCANNER1", "192.0.2.99"),
             ("UNKNOWN", "192.0.2.10")]
    rows = []
    for calling, host in cases:
        decision = table.decide(calling, host)
        if decision.accepted:
            rows.append((f"`{calling}` from {host}", "accepted", "", "", ""))
        else:
            rows.append((f"`{calling}` from {host}", f"A-ASSOCIATE-RJ: {decision.reason}",
                         *_reject_row(REJECT_CALLING_AE)))
    limit = facts.config.node.max_associations
    rows.append((f"association number {limit + 1} while {limit} are open", "A-ASSOCIATE-RJ",
                 *_reject_row(_REJECT_LOCAL_LIMIT)))
    rows.append((f"called AE title other than `{facts.config.node.ae_title}`", "A-ASSOCIATE-RJ",
                 *_reject_row(_REJECT_CALLED_AE)))
    return f"""
Associations are accepted only from configured peers (`[[peers]]`): the calling AE title must be
listed, and when the peer lists `hosts`, the TCP peer address must be one of them. The check runs on
every association request, before presentation contexts are negotiated, against the peer list in
force at that moment (an edit through the console or `dicomnode peers` applies to the next
association). When several checks fail, the first rejecting row of Table 4 that applies is the one
reported. The peer check writes `association.requested` or `association.rejected` to the audit log;
the last two rows are decided after an `association.requested` entry (the association limit by the
node's transport layer, counting live associations only; the called AE title by pynetdicom) and are
audited as `association.rejected` with their reason; an association that is finally accepted is
audited as `association.accepted`.

Table 4. Association acceptance, for the example peers `SCANNER1` (hosts 192.0.2.10) and
`ANYWHERE` (any host)

{_table(["Association request", "Outcome", "Result", "Source", "Reason/Diagnosis"], rows)}
"""


def _storage_conformance(facts: _Facts) -> str:
    checked = ", ".join(f"{_sop_name(uid)} ({'/'.join(modalities)})"
                        for uid, modalities in _MODALITY_OF_SOP_CLASS.items())
    refusals = sorted(_store_refusals(), key=lambda r: r[0])
    rows = [("0x0000", "Success", "the data set bytes are fsynced in the spool and the ledger row is committed; "
             "also for a duplicate SOP Instance UID (see below)")]
    rows += [(_hex(status), name, when) for status, name, when in refusals]
    internal = "any unexpected error while storing (the association stays up)"
    if any(status == 0xC000 for status, _, _ in refusals):
        rows = [(s, n, f"{w}; {internal}" if s == "0xC000" else w) for s, n, w in rows]
    else:
        rows.append(("0xC000", "Error: Cannot understand", internal))
    return f"""
**Storage level 2 (full).** The data set is stored exactly as it was received, in the accepted
transfer syntax: no element is added, removed or coerced, so digital signatures, private elements
and pixel data are preserved. Only the File Meta Information header is the node's own. Stored
objects are kept until an operator removes them; there is no automatic deletion.

**Checks before Success.** The C-STORE must come on the presentation context negotiated for its
Affected SOP Class; the Affected SOP Class and Instance UIDs must be valid UIDs; the data set must
parse, every top-level element with a VR of PS3.5 6.2 (pixel data is skipped, never decoded), and a
deflated data set may inflate to at most `node.max_instance_mb`; its SOP Class UID and SOP Instance
UID must equal those of the C-STORE request; Study and Series Instance UID must be present; these
four UIDs must be valid as received (PS3.5 9.1, at most one trailing pad byte: no leading, inner or
extra spaces); for {checked} the Modality must be the one the IOD requires and pixel data must be
present. Nothing else of the IOD is validated.

**Duplicates.** A SOP Instance UID already in the ledger is answered with Success. The first copy is
kept, the ledger keeps one row, and the duplicate neither changes the series nor starts any
processing (audit event `instance.duplicate`).

**Warnings.** No warning status is returned (nothing is coerced or discarded).

Table 5. C-STORE response statuses of the Storage SCP (Error Comment (0000,0902) carries the
reason, at most 64 characters)

{_table(["Status", "Meaning", "When"], rows)}
"""


def _store_refusals() -> list[tuple[int, str, str]]:
    """(status, meaning, condition) of every StoreRefused subclass the receiver may raise."""
    out = []
    pending = list(StoreRefused.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        doc = " ".join((cls.__doc__ or cls.__name__).split())
        meaning, _, when = doc.partition(" (")
        out.append((cls.status, meaning.rstrip(".").strip(),
                    when.rstrip(").") or "a check listed above fails"))
    return out


def _scu_specification(facts: _Facts) -> str:
    ae = facts.scu
    destination = Destination(ae_title="PACS", host="127.0.0.1", port=104)
    objects = _result_classes(facts)
    cx_rows = [(_sop_name(uid), f"`{uid}`", f"{UID(ts).name} (`{ts}`)", "SCU", "None") for uid, ts in objects]
    warnings = ", ".join(_hex(w) for w in destination.warning_is_success)
    jobs = facts.config.jobs
    return f"""
#### 2.2.2 Storage SCU

##### 2.2.2.1 SOP Classes

Table 6. SOP classes of the Storage SCU

{_table(["SOP Class Name", "SOP Class UID", "SCU", "SCP"],
        [(_sop_name(uid), f"`{uid}`", "Yes", "No") for uid in sorted({u for u, _ in objects})]
        + [(_sop_name(VERIFICATION_SOP_CLASS), f"`{VERIFICATION_SOP_CLASS}`", "Yes", "No")])}

Verification is used only by the operator command `dicomnode destinations echo NAME`.

##### 2.2.2.2 Association Policies

| Parameter | Value |
|---|---|
| Application Context Name | `{APPLICATION_CONTEXT_NAME}` |
| Calling AE title | `{ae.ae_title}` (`node.ae_title`) |
| Maximum PDU size received | {_pdu(ae.maximum_pdu_size)} (per destination: `max_pdu`) |
| ACSE / DIMSE / network timeout | {_timeouts(ae)} {_PER_DESTINATION} |
| Implementation Class UID | `{ae.implementation_class_uid}` |
| Implementation Version Name | `{ae.implementation_version_name}` |

One association per object and destination. Deliveries run in threads of the node process, a few at
a time (the local executor runs at most 4 in-process jobs at once), so several associations to one
destination may be open together. Asynchronous operations and extended negotiation are not used.

##### 2.2.2.3 Association Initiation Policy

**Activity: deliver a result.** Triggered when an analysis job has stored its results. The
association proposes exactly one presentation context: the object's SOP class with the one transfer
syntax it is encoded in. Objects are never converted.

Table 7. Proposed presentation contexts

{_table(["Abstract Syntax", "UID", "Transfer Syntax", "Role", "Extended Negotiation"], cx_rows)}

Association-level outcomes: a connection failure, timeout, abort or A-ASSOCIATE-RJ with result 2
(transient) is retried; an A-ASSOCIATE-RJ with result 1 (permanent) or an association on which the
destination accepted no presentation context for the object's SOP class makes the delivery a dead
letter. Retries use exponential backoff from `jobs.backoff_base_s` ({jobs.backoff_base_s:g} s) up
to `jobs.backoff_max_s` ({jobs.backoff_max_s:g} s) for `jobs.retry_for_h` ({jobs.retry_for_h:g} h)
after the first failure; then the delivery becomes a dead letter. The association is released after
the C-STORE response.

Table 8. Handling of C-STORE response statuses (`sender.classify`; warnings counted as success by
default: {warnings}, configurable per destination as `warning_is_success`)

{_table(["Status", "Meaning (PS3.4 B.2.3, PS3.7 C)", "Behaviour"], _scu_status_rows(destination))}

##### 2.2.2.4 Association Acceptance Policy

The Storage SCU does not accept associations.
"""


def _network_interfaces(facts: _Facts) -> str:
    s = facts.config.node
    tls_port = f"{s.tls.port} (`node.tls.port`, TLS)" if s.tls is not None else "none unless `[node.tls]` is set"
    return f"""
### 2.3 Network Interfaces

#### 2.3.1 Physical Network Interface

Any interface of the host operating system; the DICOM Upper Layer runs over TCP/IP (PS3.8).

#### 2.3.2 Additional Protocols

None (no DHCP, DNS-based service discovery or LDAP). Destination host names are resolved by the
operating system.

#### 2.3.3 IPv4 and IPv6 Support

The listen address is `node.host` (default `{NodeSettings().host}`; `0.0.0.0` for every IPv4
interface). IPv6 addresses are accepted by the configuration and by pynetdicom but are not tested.

| Listener | Port |
|---|---|
| DICOM | {s.port} (`node.port`) |
| DICOM over TLS | {tls_port} |
"""


def _configuration(facts: _Facts) -> str:
    c = facts.config
    peers = [(f"`{p.ae_title}`", ", ".join(p.hosts) or "any", p.description) for p in c.peers]
    peer_text = (_table(["Calling AE title", "Hosts", "Description"], peers) if peers
                 else "No peers are configured: every association is rejected until `[[peers]]` entries are added.")
    destinations = [(name, f"`{d.ae_title}`", d.host, d.port, "yes" if d.tls else "no",
                     ", ".join(_hex(w) for w in d.warning_is_success))
                    for name, d in sorted(c.destinations.items())]
    destination_text = (_table(["Name", "AE title", "Host", "Port", "TLS", "Warnings counted as success"],
                               destinations) if destinations else "No destinations are configured.")
    params = [(f"`node.{name}`", _value(getattr(c.node, name)), _constraints(field.metadata),
               " ".join((field.description or "").split()))
              for name, field in NodeSettings.model_fields.items() if name != "tls"]
    return f"""
### 2.4 Configuration

Configuration is one TOML file, validated at start-up (`dicomnode check-config FILE`). Peers can also
be edited at run time (`dicomnode peers add|remove`, or the admin console).

#### 2.4.1 AE Title/Presentation Address Mapping

##### 2.4.1.1 Local AE Titles

| AE | AE title | Port |
|---|---|---|
| Storage SCP and SCU | `{c.node.ae_title}` | {c.node.port} |

##### 2.4.1.2 Remote AE Titles

Peers allowed to call (`[[peers]]`):

{peer_text}

Destinations of results (`[destinations.NAME]`):

{destination_text}

#### 2.4.2 Parameters

{_table(["Parameter", "Value", "Allowed", "Description"], params)}
"""


def _value(value: object) -> str:
    return f"`{value}`"


def _constraints(metadata: list[Any]) -> str:
    """The annotated-types bounds of a pydantic field, e.g. ">= 1, <= 1024"."""
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    out = []
    for item in metadata:
        for attribute, symbol in symbols.items():
            bound = getattr(item, attribute, None)
            if bound is not None:
                out.append(f"{symbol} {bound}")
    return ", ".join(out)


def _media() -> str:
    return """
## 3 Media Interchange

Not supported: dicomnode reads and writes no DICOM media (PS3.10 file sets, DICOMDIR).
"""


def _charsets(facts: _Facts) -> str:
    outcomes = _charset_outcomes()
    rows = outcomes
    return f"""
## 4 Support of Character Sets

**Received objects** are stored as received, whatever their Specific Character Set (0008,0005).
The node reads only the few header fields it checks and routes on (UIDs, Modality, Body Part
Examined, Series and Study Description, Image Type, Instance Number); nothing is re-encoded.

**Created objects** copy Specific Character Set and the Patient and Study attributes from the first
source image; text the node adds (descriptions, comments, analyzer names) is encoded in that
character set. Table 9 is the outcome of building an SR from a
source image with each value of PS3.3 C.12.1.1.2 that pydicom supports (multi-byte sets with code
extensions after an empty or single-byte first value, as PS3.3 uses them). Where no object can be built, the analysis
of that series produces no result.

Table 9. Specific Character Set of the source and the created SR

{_table(["Source Specific Character Set", "Created SR"], rows)}
"""


def _security(facts: _Facts) -> str:
    fields = [(f"`node.tls.{name}`", _value(field.default) if not field.is_required() else "(required)",
               " ".join((field.description or "").split()))
              for name, field in TlsSettings.model_fields.items()]
    context_and_host = sender.tls_arguments(Destination(ae_title="PACS", host="pacs.example", port=2762, tls=True))
    assert context_and_host is not None
    client = context_and_host[0]
    return f"""
## 5 Security

### 5.1 Security Profiles

**TLS on the Storage SCP** (optional, `[node.tls]`): a second listener beside the plain one, TLS 1.2
or newer with the Python/OpenSSL default cipher suites (`receiver.tls_server_context`). A client
certificate is not mapped to an AE title: access control (section 2.2.1.4) applies on top of TLS.
The profile follows the intent of the BCP 195 TLS profile (PS3.15 B.9); conformance to it is not
claimed.

Table 10. Client certificates on the TLS listener

| `ca_certificates` | `require_client_certificate` | Client certificate |
|---|---|---|
| set | `true` | required and verified (CERT_REQUIRED) |
| set | `false` | verified when presented (CERT_OPTIONAL) |
| not set | `true` or `false` | not requested (CERT_NONE) |

`require_client_certificate = true` has no effect without `ca_certificates`; set both.

| Parameter | Default | Description |
|---|---|---|
{chr(10).join("| " + " | ".join(_cell(v) for v in row) + " |" for row in fields)}

**TLS on the Storage SCU** (per destination, `tls = true`): minimum version
{_tls_version(client.minimum_version)}; the server certificate is verified against the
destination's `ca_certificates` or the system store ({client.verify_mode.name}); the host name is
{"checked" if client.check_hostname else "not checked"}. A destination that requires a client
certificate gets the one named by its `certificate` and `private_key` (PEM); without them the SCU
presents none.

### 5.2 Association Level Security

Calling AE title and peer address are checked on every association (Table 4); the called AE title
must be `{facts.config.node.ae_title}`.

### 5.3 Application Level Security

An audit log (`data_dir/audit.jsonl`, JSON lines: one object per line) records association requests,
rejections, releases and aborts, every stored, duplicate and refused instance, analysis and delivery
outcomes. It carries identifiers only (AE titles, hosts, UIDs, statuses); patient names only with
`audit.include_patient_names`. It is not a DICOM Audit Trail (PS3.15 Annex A.5) and is not sent to
an audit record repository.

The admin console and API (`admin.host`, default `{facts.config.admin.host}`) require a bearer token
when `admin.token` or `DICOMNODE_ADMIN_TOKEN` is set, except `/healthz`; without a token they listen
on loopback only, open to every local user.
"""


def _timeouts(ae: Any) -> str:
    return f"{ae.acse_timeout:g} s / {ae.dimse_timeout:g} s / {ae.network_timeout:g} s"


_PER_DESTINATION = "(per destination: `acse_timeout`, `dimse_timeout`, `network_timeout`)"


def _tls_version(version: Any) -> str:
    return str(version.name).replace("TLSv1_", "TLS 1.").replace("TLSv1", "TLS 1.0")


def _annexes(facts: _Facts) -> str:
    objects = facts.objects
    first = {kind: next(o for o in objects if o.kind == kind) for kind in ("sr", "seg")}
    datasets = {kind: pydicom.dcmread(io.BytesIO(o.data)) for kind, o in first.items()}
    private = sorted({str(e.tag) for o in objects for e in pydicom.dcmread(io.BytesIO(o.data)).iterall()
                      if e.tag.is_private})
    templates = _templates_used(objects)
    template_rows = _template_codes(objects)
    analyzer_rows = _analyzer_codes(facts.config)
    sr, seg = datasets["sr"], datasets["seg"]
    kos = pydicom.dcmread(io.BytesIO(facts.key_object.data))
    created = [
        ("SR", f"{_sop_name(sr.SOPClassUID)} (`{sr.SOPClassUID}`)", UID(first["sr"].transfer_syntax_uid).name,
         sr.SeriesNumber, "for every analyzer run, also when it failed"),
        ("SEG", f"{_sop_name(seg.SOPClassUID)} (`{seg.SOPClassUID}`), {seg.SegmentationType}",
         UID(first["seg"].transfer_syntax_uid).name, seg.SeriesNumber, "when a finding carries a mask"),
        ("KO", f"{_sop_name(kos.SOPClassUID)} (`{kos.SOPClassUID}`)", UID(facts.key_object.transfer_syntax_uid).name,
         kos.SeriesNumber, "for an event with a critical verdict, by a notify channel of kind `kos`"),
    ]
    return f"""
## 6 Annexes

### 6.1 IOD Contents

#### 6.1.1 Created SOP Instances

{_table(["Object", "SOP Class", "Transfer Syntax", "Series Number", "Created"], created)}

All are in the study of the source series (Patient and General Study modules copied from the first
source image after repair of invalid values) and in a new series each. SOP Instance UIDs are derived
from (series, epoch, analyzer, version, object), so a re-run re-creates the same instances.
Series Description starts with `NOT FOR CLINICAL USE` for analyzers marked so. Details:
`docs/results.md`.

The Key Object Selection Document (TID 2010, document title (113000, DCM, "Of Interest")) references,
as IMAGE items, the source slices that the finding's mask touches and the Segmentation, and the SR
as a COMPOSITE item; a TEXT (113012, DCM, "Key Object Description") names the finding, its
probability and priority, and carries the NOT FOR CLINICAL USE disclaimer; the observer context is
the analyzer as a device (same Device Observer UID as in its SR). A finding without a mask gives a
Key Object that references the SR (and SEG) only. It is sent only to the channel's destination, not
to every destination, and only for `finding.critical` and a `finding.updated` that stays critical:
a retraction sends no Key Object, and an earlier Key Object is not withdrawn (the revised SR
names its predecessor).

Table 11. Modules of the Comprehensive 3D SR (PS3.3 A.35.13); "Present" means the created objects
contain attributes of the module

{_table(["IE", "Module", "Usage", "Present"], _module_rows(sr))}

Table 12. Modules of the Segmentation (PS3.3 A.51)

{_table(["IE", "Module", "Usage", "Present"], _module_rows(seg))}

Table 13. Modules of the Key Object Selection Document (PS3.3 A.35.4)

{_table(["IE", "Module", "Usage", "Present"], _module_rows(kos))}

#### 6.1.2 Usage of Attributes from Received IODs

Received instances are not modified. For created objects the node uses, from the source images:
the Patient and General Study modules, Study/Series/SOP Instance UIDs and SOP Class UIDs (evidence
and references), Frame of Reference UID, Image Position/Orientation (Patient), Pixel Spacing, Slice
Thickness, Rows and Columns (image library and segmentation geometry), and Modality (Procedure
Reported).

#### 6.1.3 Attribute Mapping

Not applicable: no worklist or MPPS is used.

#### 6.1.4 Coerced/Modified Fields

None in received objects (storage level 2). In created objects, invalid values copied from source
headers are repaired (text cut to the VR's maximum length, dates and numbers reformatted; see
`docs/results.md`, "Header repair"); UIDs are never changed.

### 6.2 Data Dictionary of Private Attributes

{"None: the created objects contain no private attributes." if not private else "Private tags: " + ", ".join(private)}

### 6.3 Coded Terminology and Templates

#### 6.3.1 Templates

The SR content follows these PS3.16 templates, as found in the created objects (mapping resource
DCMR):

{_table(["Template", "Title"], templates)}

The Segmentation uses Segmented Property Category and Type codes supplied by the analyzer (CID 7150,
CID 7151) and Segmentation Algorithm Family (123110, DCM, "Artificial Intelligence") from CID 7162.

#### 6.3.2 Codes Emitted by the Templates

Every code the result encoder writes by itself, collected from the created objects. Procedure
Reported and the Modality descriptor depend on the source modality.

{_table(["Code Value", "Coding Scheme", "Code Meaning", "Object", "Used as"],
        [(_code(v), s, m, k, u) for v, s, m, k, u in template_rows])}

The Key Object Selection Document follows TID 2010 "Key Object Selection" with TID 1002 "Observer
Context" (device). Codes it emits:

{_table(["Code Value", "Coding Scheme", "Code Meaning", "Used in the Key Object as"],
        [(_code(v), s, m, u) for v, s, m, u in _key_object_codes(facts.key_object)])}

#### 6.3.3 Codes Supplied by the Analyzers

Finding types, measurement names and units, qualitative evaluations and segment properties are
chosen by the analyzers (the code constants of their modules and the model manifests). A finding's
presence is encoded as the finding type with the value (52101004, SCT, "Present") or (272519000,
SCT, "Absent"). Codes in a scheme beginning with `99` are private (PS3.16 section 8) and are declared
in the Coding Scheme Identification Sequence of the created objects.

{_table(["Code Value", "Coding Scheme", "Code Meaning", "Analyzers", "Defined in"],
        [(_code(v), s, m, a, d) for v, s, m, a, d in analyzer_rows])}

#### 6.3.4 Private Codes and Why

Standard codes (DCM, SCT, LOINC, RadLex, UCUM, with the meanings PS3.16 gives them) are used
wherever one fits. Each code of the private scheme `99DCMNODE` below has no standard counterpart,
for the reason given. dciodvfy warns "Unrecognized defined term <99DCMNODE> for value 1 of
attribute <Coding Scheme Designator>" for each of them; that is its only warning.

{_table(["Code Value", "Code Meaning", "Why no standard code"], [(_code(v), m, r) for v, m, r in _private_codes()])}

#### 6.3.5 Validation of the SR

Every SR the tests create passes `dciodvfy` (dicom3tools) with no error and no warning other than
the one above, DCMTK `dsrdump`, and PixelMed's `DicomSRValidator` (Debian `libpixelmed-java`,
templates of the 2022 edition of PS3.16) with no error. The PixelMed warnings that remain:

{_table(["Warning (regular expression)", "Why", "Due to the validator's 2022 templates"],
        [(f"`{pattern}`", why, "yes" if old else "no") for pattern, why, old in PIXELMED_WARNINGS])}

Encoding choices made so that neither validator reports an error:

{_table(["Choice", "Reason"], VALIDATOR_CHOICES)}

### 6.4 Grayscale Image Consistency

Not applicable: the node displays no images.

### 6.5 Standard Extended / Specialized / Private SOP Classes

None.

### 6.6 Private Transfer Syntaxes

None.
"""
