"""Encode one analyzer's :class:`~dicomnode.domain.Findings` as DICOM result objects.

Pure: findings + the source series headers in, Part 10 bytes out (no disk, no network, no clock
unless ``created`` is left out). Two objects are produced (see ``docs/results.md`` for every
template and code emitted):

* always a **Comprehensive 3D SR** (PS3.3 A.35.13) holding a TID 1500 Measurement Report, laid out
  as in the IHE AI Results (AIR) profile: a DEVICE observer (TID 1004), one TID 1501 group per
  finding without mask and one TID 1411 group per finding with a mask, and a document-level
  "Qualitative Evaluations" container (TID 1500 rows 12-14) for the triage priority, the failure
  reason and the analyzer's notes;
* a **Segmentation** (PS3.3 A.51, BINARY) when any finding carries a :class:`~dicomnode.domain.Mask`;
  each TID 1411 group points at its segment (Referenced Segment, TID 1411 row 8) and the segment
  carries the same Tracking ID / Tracking UID as the group.

Every UID is derived from (series, epoch, analyzer, version, kind, part) so that re-running the
same epoch re-creates the same SOP Instances (GUIDE principle 4) and a new epoch creates new ones
that reference the previous report through the Predecessor Documents Sequence (PS3.3 C.17.2.3).

Values copied from scanner headers (Patient and Study modules, geometry) are repaired first
(:func:`sanitized_header`) because scanners emit over-long LO, four-component dates and the like
that a strict writer (``pydicom.config.settings.writing_validation_mode = RAISE``) refuses.
"""

from __future__ import annotations

import copy
import datetime as dt
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import highdicom as hd
import numpy as np
from highdicom.valuerep import _check_specific_character_set
from pydicom import config
from pydicom.datadict import dictionary_VM
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, DT, MAX_VALUE_LEN, TM, DSfloat, validate_value

from dicomnode.domain import Code, Finding, Findings, FindingsStatus, Priority, ResultObject

__all__ = [
    "NOT_FOR_CLINICAL_USE",
    "standard_meaning",
    "ResultsError",
    "Sources",
    "build_key_object",
    "build_results",
    "device_observer_uid",
    "prepare_sources",
    "result_uid",
    "sanitized_header",
]

NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"

SR_SERIES_NUMBER = 9901
SEG_SERIES_NUMBER = 9902

# --- codes (verified against PS3.16 as shipped in pydicom's concept dictionary; see docs/results.md)
_PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")  # CID 240 Present-Absent
_ABSENT = hd.sr.CodedConcept("272519000", "SCT", "Absent")  # CID 240 Present-Absent
_PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
_UNITLESS = hd.sr.CodedConcept("1", "UCUM", "no units")
_PRIORITY = hd.sr.CodedConcept("260870009", "SCT", "Priority")
# CID 3414 "Procedure Urgency": the standard's values for how soon the study is to be acted on.
_URGENT = hd.sr.CodedConcept("103391001", "SCT", "Urgent Procedure")
_ELECTIVE = hd.sr.CodedConcept("103390000", "SCT", "Elective Procedure")
_PRIORITY_VALUE = {Priority.STAT: _URGENT, Priority.ROUTINE: _ELECTIVE}
_QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
_COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")
# Procedure Reported (TID 1500 row 4), from CID 100 "Quantitative Diagnostic Imaging Procedure".
# Projection radiography gets the generic (363679005, SCT): (43468-8, LN, "XR unspecified body
# region") joined CID 100 after the 2022 edition, and validators built on that edition (PixelMed)
# reject it as outside CID 100.
_PROCEDURES = {
    "CT": hd.sr.CodedConcept("25045-6", "LN", "CT unspecified body region"),
    "MR": hd.sr.CodedConcept("25056-3", "LN", "MRI unspecified body region"),
    "PT": hd.sr.CodedConcept("44136-0", "LN", "PET unspecified body region"),
    "NM": hd.sr.CodedConcept("49118-3", "LN", "NM unspecified body region"),
}
_IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")


def result_uid(
    series_uid: str,
    epoch: int,
    analyzer: str,
    version: str,
    kind: str,
    part: str = "",
    *,
    prefix: str | None = None,
) -> str:
    """A UID that depends only on its arguments (GUIDE principle 4: idempotent results).

    ``kind`` is the object ("sr", "seg", "tracking") and ``part`` what inside it ("series",
    "instance", a tracking identifier). Built with ``pydicom.uid.generate_uid(prefix,
    entropy_srcs)``, i.e. a SHA-512 of the inputs below the given root (PS3.5 9.1); ``prefix`` None
    uses pydicom's root.
    """
    sources = ["dicomnode", series_uid, str(epoch), analyzer, version, kind, part]
    return _uid(prefix, sources)


def device_observer_uid(analyzer: str, version: str, *, prefix: str | None = None) -> str:
    """Device Observer UID (TID 1004 row 1): stable for one model name + version on every node."""
    return _uid(prefix, ["dicomnode-device", analyzer, version])


def _uid(prefix: str | None, sources: list[str]) -> str:
    if prefix is None:
        return str(generate_uid(entropy_srcs=sources))
    return str(generate_uid(prefix, entropy_srcs=sources))


# --- header repair ---------------------------------------------------------------------------

# Patient (C.7.1.1) and General Study (C.7.2.1) Type 2 attributes highdicom copies unconditionally.
_TYPE_2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_TEXT_VRS = {"AE", "CS", "LO", "SH", "LT", "ST", "UT", "UC", "PN", "DA", "TM", "DT", "DS", "IS", "AS"}
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")


def sanitized_header(header: Dataset) -> Dataset:
    """A deep copy of ``header`` in which every invalid string value is repaired or emptied.

    Scanners send values that PS3.5 6.2 forbids (LO over 64 characters, ``2024-01-31`` in a DA,
    over-long DS, lower-case CS, control characters). Copied as-is they make the result objects
    unwritable under strict validation. Repairs keep as much as possible: truncate to the VR's
    maximum length, reformat numbers and dates, upper-case code strings; a value that still fails
    is replaced by an empty value (allowed for the Type 2 Patient/Study attributes we copy).
    UIDs are never altered: a changed UID would point at a different object.
    """
    ds = copy.deepcopy(header)
    _repair(ds)  # also decodes every text value with the source's Specific Character Set
    for keyword in _TYPE_2_COPIED:
        if keyword not in ds:
            setattr(ds, keyword, "")  # highdicom reads these; absent is as good as empty (Type 2)
    _choose_character_set(ds)
    return ds


UTF8 = "ISO_IR 192"


def _choose_character_set(ds: Dataset) -> None:
    """Give ``ds`` a Specific Character Set (0008,0005) that highdicom and pydicom both write.

    highdicom copies the source's Specific Character Set into the SR and SEG and refuses values
    PS3.3 C.12.1.1.2 allows or that scanners send anyway: an empty first value with ISO 2022 code
    extensions (``\\ISO 2022 IR 87``, ``\\ISO 2022 IR 149``, ``\\ISO 2022 IR 58``), a single
    ISO 2022 value (``ISO 2022 IR 100``), an empty value. pydicom has already decoded every text
    value of ``ds`` (:func:`_repair` read them all), so such a source is re-declared as UTF-8
    (``ISO_IR 192``), which holds every character of every DICOM character set, and the copied
    values are written in UTF-8: the same names, other bytes. A source without the attribute
    (default repertoire) that nevertheless holds non-ASCII text is declared UTF-8 too, because
    the default repertoire cannot write it. A character set highdicom accepts is kept as is.
    """
    if "SpecificCharacterSet" not in ds:
        if _has_non_ascii(ds):
            ds.SpecificCharacterSet = UTF8
        return
    value = ds.SpecificCharacterSet
    values = [str(v) for v in value] if isinstance(value, (list, tuple, MultiValue)) else [value]
    if values == [None]:
        values = []
    try:
        if any(v is None or not str(v).strip() for v in values) or not values:
            raise ValueError("empty value")
        _check_specific_character_set(values if len(values) > 1 else values[0])
    except ValueError:
        ds.SpecificCharacterSet = UTF8
        _drop_escapes(ds)


# An ISO 2022 escape sequence (ESC, intermediate bytes, final byte; ISO/IEC 2022 13.2).
_ESCAPE = re.compile(r"\x1b[\x20-\x2f]+[\x30-\x7e]")


def _drop_escapes(ds: Dataset) -> None:
    """Remove the ISO 2022 escape sequences pydicom leaves in text it decoded without knowing them
    (``ISO 2022 IR 58`` designates GB 2312 with ``ESC $ ) A``, which pydicom decodes but keeps):
    in UTF-8 they are meaningless control characters."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _drop_escapes(item)
        elif elem.VR in _TEXT_VRS and elem.value not in (None, ""):
            values = list(elem.value) if elem.VM > 1 else [elem.value]
            if any("\x1b" in str(v) for v in values):
                fixed = [_ESCAPE.sub("", str(v)).replace("\x1b", "") for v in values]
                elem.value = fixed if len(fixed) > 1 else fixed[0]


def _has_non_ascii(ds: Dataset) -> bool:
    for elem in ds:
        if elem.VR == "SQ":
            if any(_has_non_ascii(item) for item in elem.value):
                return True
        elif elem.VR in _TEXT_VRS and elem.value not in (None, ""):
            values = list(elem.value) if elem.VM > 1 else [elem.value]
            if any(not str(v).isascii() for v in values):
                return True
    return False


@dataclass(frozen=True)
class Sources:
    """Source headers already repaired by :func:`sanitized_header` (see :func:`prepare_sources`)."""

    headers: tuple[Dataset, ...]


def prepare_sources(sources: Sequence[Dataset]) -> Sources:
    """Repair the source headers once, for several :func:`build_results` calls on one series
    (one per analyzer); the objects built are the same as when each call repairs them itself."""
    return Sources(tuple(sanitized_header(s) for s in sources))


def _repair(ds: Dataset) -> None:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _repair(item)
            continue
        if elem.VR not in _TEXT_VRS or elem.value is None or elem.value == "":
            continue
        values = list(elem.value) if elem.VM > 1 else [elem.value]
        if len(values) > 1 and _single_valued(elem.tag):
            values = [" ".join(str(v) for v in values)]  # a backslash inside a VM 1 text value
        fixed = [_repair_value(elem.VR, v) for v in values]
        if fixed != values or len(fixed) != elem.VM:
            elem.value = fixed if len(fixed) > 1 else fixed[0]
    if "PatientSex" in ds and ds.PatientSex not in ("M", "F", "O", ""):
        ds.PatientSex = ""  # C.7.1.1: enumerated M/F/O, Type 2


def _single_valued(tag: Any) -> bool:
    try:
        return bool(dictionary_VM(tag) == "1")
    except KeyError:
        return False


def _fit_person_name_group(group: str, limit: int = 64) -> str:
    """A PN component group within 64 characters, with at least one ``^`` (PS3.5 6.2.1.1).

    The longest components are shortened first so family and given names both survive. A group
    without ``^`` ("ANONYMOUS", "Dr. Who") is all family name; writing it as "ANONYMOUS^" says the
    same (trailing empty components may be omitted or not) and avoids dciodvfy's "Retired Person
    Name form" warning.
    """
    components = group.split("^")[:5]
    if group.strip() and len(components) == 1:
        components.append("")
    while len("^".join(components)) > limit:
        longest = max(range(len(components)), key=lambda i: len(components[i]))
        components[longest] = components[longest][:-1]
    return "^".join(components)


_TEMPORAL = {"DA": DA, "TM": TM, "DT": DT}


def _is_valid(vr: str, value: Any) -> bool:
    """PS3.5 6.2 validity as pydicom checks it, plus a real calendar date/time for DA, TM, DT."""
    try:
        # pydicom checks a PersonName object's type only; the component group limit needs the text
        validate_value(vr, str(value) if vr == "PN" else value, validation_mode=config.RAISE)
        if vr in _TEMPORAL and value not in ("", None):
            _TEMPORAL[vr](value)
    except (ValueError, TypeError, OverflowError):
        return False
    return True


_UNCHANGED = object()
_REPAIRED: dict[tuple[str, type, str], Any] = {}
_REPAIRED_MAX = 65536


def _repair_value(vr: str, value: Any) -> Any:
    """:func:`_repair_value_uncached`, remembered per (VR, type, text): the headers of one series
    repeat most values (patient, study, geometry), so each distinct value is checked once."""
    key = (vr, type(value), str(value))
    fixed = _REPAIRED.get(key)
    if fixed is None:
        repaired = _repair_value_uncached(vr, value)
        fixed = _UNCHANGED if repaired is value else repaired
        if len(_REPAIRED) >= _REPAIRED_MAX:
            _REPAIRED.clear()
        _REPAIRED[key] = fixed
    return value if fixed is _UNCHANGED else fixed


def _repair_value_uncached(vr: str, value: Any) -> Any:
    if vr == "PN" and not _is_valid(vr, value) or vr == "PN" and "^" not in str(value):
        groups = _CONTROL.sub("", str(value)).split("=")
        return "=".join(_fit_person_name_group(g) for g in groups[:3])
    if _is_valid(vr, value):
        return value
    fixed: Any
    if vr in ("DS", "IS"):
        try:
            number = float(str(value))
            fixed = str(DSfloat(number, auto_format=True)) if vr == "DS" else str(int(round(number)))
        except (ValueError, OverflowError):
            fixed = ""
    elif vr == "DA":
        digits = re.sub(r"[-./ ]", "", str(value).strip())
        fixed = digits[:8]
    elif vr == "TM":
        fixed = re.sub(r"[: ]", "", str(value).strip())
    elif vr == "CS":
        fixed = re.sub(r"[^A-Z0-9 _]", "_", str(value).strip().upper())[:16]
    else:
        text = _CONTROL.sub("", str(value))
        if vr in ("AE", "CS", "LO", "SH", "UC", "AS"):
            text = text.replace("\\", " ").replace("\n", " ").replace("\r", " ")
        fixed = text[: MAX_VALUE_LEN.get(vr, len(text))].rstrip()
    return fixed if _is_valid(vr, fixed) else ""


# --- coded concepts ----------------------------------------------------------------------------


def _concept(code: Code) -> hd.sr.CodedConcept:
    """A highdicom concept with the standard's Code Meaning (:func:`standard_meaning`); Code Meaning
    is LO (PS3.3 8.3): longer meanings are cut at 64."""
    return hd.sr.CodedConcept(code.value, code.scheme, standard_meaning(code.scheme, code.value, code.meaning)[:64])


_MEANINGS: dict[tuple[str, str], list[tuple[str, bool]]] = {}


def standard_meaning(scheme: str, value: str, meaning: str) -> str:
    """The Code Meaning PS3.16 gives (``scheme``, ``value``), as pydicom's copy of its dictionary
    holds it; ``meaning`` when the code is not there (a private or unlisted code).

    A code may have several meanings there (SNOMED CT synonyms used by different context groups,
    plus the fully specified name): the one equal to ``meaning`` apart from case is kept, else the
    first one a context group uses, else the first one listed. So (121232, DCM, "Source Series for
    Segmentation"), as highdicom writes it, becomes "Source series for segmentation". For SNOMED
    codes no context group uses, the fully specified name without its semantic tag ("Source" for
    "Source (attribute)") is the template's wording and is kept.
    """
    if not _MEANINGS:
        from pydicom.sr._concepts_dict import concepts

        dictionary = cast(dict[str, dict[str, dict[str, tuple[str, list[int]]]]], concepts)
        for scheme_name, entries in dictionary.items():
            for codes_of_keyword in entries.values():
                for code_value, (text, cids) in codes_of_keyword.items():
                    _MEANINGS.setdefault((scheme_name, code_value), []).append((text, bool(cids)))
    known = _MEANINGS.get((scheme, value))
    if not known:
        return meaning
    used = [text for text, in_group in known if in_group]
    for text in used + [text for text, _ in known]:
        if text.lower() == meaning.lower():
            return text
    if not used:
        # A code no context group lists (a template's concept name, e.g. (260753009, SCT,
        # "Source") of TID 1601): the dictionary has only SNOMED's fully specified name, and
        # the templates write its term without the semantic tag.
        for text, _ in known:
            term = re.sub(r"\s*\([^()]*\)$", "", text)
            if term.lower() == meaning.lower():
                return term
    return (used or [known[0][0]])[0]


def standardize_meanings(ds: Dataset) -> None:
    """Rewrite, in place, every Code Meaning in ``ds`` (items of any code sequence, at any depth)
    to :func:`standard_meaning`, including the template codes highdicom writes itself."""
    for elem in ds.iterall():
        if elem.VR != "SQ":
            continue
        for item in elem.value:
            if "CodeMeaning" in item and "CodingSchemeDesignator" in item and "CodeValue" in item:
                meaning = standard_meaning(str(item.CodingSchemeDesignator), str(item.CodeValue), str(item.CodeMeaning))
                if meaning != item.CodeMeaning:
                    item.CodeMeaning = meaning[:64]


def _short(text: str, limit: int = 64) -> str:
    return _CONTROL.sub("", text).replace("\\", " ")[:limit].strip() or "-"


# --- public entry point ------------------------------------------------------------------------


def build_results(
    findings: Findings,
    sources: Sequence[Dataset] | Sources,
    *,
    epoch: int,
    uid_prefix: str | None = None,
    previous: Sequence[ResultObject] = (),
    manufacturer: str = "dicomnode",
    institution_name: str | None = None,
    created: dt.datetime | None = None,
) -> list[ResultObject]:
    """Encode ``findings`` about the series whose headers are ``sources`` (sorted as the volume).

    Returns the SEG first (when any finding has a mask) and the SR last, because the SR
    references the SEG. ``previous`` are the result objects of an earlier epoch of the same series
    and analyzer: their SR is listed in the new SR's Predecessor Documents Sequence.
    ``created`` fixes Content/Series Date and Time (default: now), which makes the bytes
    reproducible as well as the UIDs. ``sources`` may come from :func:`prepare_sources`, which
    saves repairing the same headers again for each analyzer of a series.

    Raises ValueError naming the culprit for findings or sources that cannot be encoded, and
    :class:`ResultsError` (a ValueError) naming the analyzer and series when building or writing
    the objects fails in any other way, so that a caller catching ValueError never sees a crash.
    """
    if isinstance(sources, Sources):
        headers = list(sources.headers)
        sources = headers  # repairs never change the UIDs, Rows or Columns checked below
    else:
        headers = []
    if not sources:
        raise ValueError("sources: at least one source header is required")
    if epoch < 0:
        raise ValueError(f"epoch: must be >= 0, got {epoch}")
    series_uids = {s.SeriesInstanceUID for s in sources}
    if len(series_uids) != 1:
        raise ValueError(f"sources: expected one series, got {len(series_uids)}")
    seen: dict[str, int] = {}
    for i, finding in enumerate(findings.findings):
        _check_finding(i, finding, sources)
        if finding.tracking_id in seen:
            first = seen[finding.tracking_id]
            raise ValueError(
                f"findings[{i}].tracking_id: {finding.tracking_id!r} is already findings[{first}]"
            )
        seen[finding.tracking_id] = i
    if institution_name is not None:
        institution_name = _short(institution_name)

    try:
        headers = headers or [sanitized_header(s) for s in sources]
        series_uid = str(sources[0].SeriesInstanceUID)
        created = created or dt.datetime.now()

        def uid(kind: str, part: str) -> str:
            return result_uid(
                series_uid, epoch, findings.analyzer, findings.version, kind, part, prefix=uid_prefix
            )

        description = _series_description(findings)
        out: list[ResultObject] = []
        seg: hd.seg.Segmentation | None = None
        if any(f.mask is not None for f in findings.findings):
            seg = _build_seg(findings, headers, uid, description, manufacturer, institution_name, created)
            out.append(_result(findings, "seg", seg))
        sr = _build_sr(
            findings, headers, uid, seg, previous, description, manufacturer, institution_name, created
        )
        out.append(_result(findings, "sr", sr))
    except Exception as exc:  # a source header highdicom cannot use, a library bug: say which
        raise ResultsError(
            f"cannot encode {findings.analyzer} {findings.version} results for series "
            f"{sources[0].SeriesInstanceUID}: {type(exc).__name__}: {exc}"
        ) from exc
    return out


class ResultsError(ValueError):
    """The findings passed the checks but the objects could not be built or written (raised by
    :func:`build_results` for any exception highdicom or pydicom raise while doing so)."""


def _check_finding(i: int, finding: Finding, sources: Sequence[Dataset]) -> None:
    if finding.probability is not None and not 0.0 <= finding.probability <= 1.0:
        raise ValueError(f"findings[{i}].probability: must be within [0, 1], got {finding.probability}")
    if not finding.tracking_id.strip():
        raise ValueError(f"findings[{i}].tracking_id: must not be empty")
    if finding.mask is not None:
        expected = (len(sources), int(sources[0].get("Rows") or 0), int(sources[0].get("Columns") or 0))
        if tuple(finding.mask.array.shape) != expected:
            raise ValueError(
                f"findings[{i}].mask: shape {tuple(finding.mask.array.shape)} does not match the "
                f"source series {expected} (slices, rows, columns)"
            )


def _series_description(findings: Findings) -> str:
    text = f"{findings.analyzer} {findings.version}"
    if findings.status is not FindingsStatus.COMPLETE:
        text += f" {findings.status.value.upper()}"
    if findings.not_for_clinical_use:
        text = f"{NOT_FOR_CLINICAL_USE} {text}"
    return _short(text)


def _result(findings: Findings, kind: str, ds: Dataset) -> ResultObject:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return ResultObject(
        analyzer=findings.analyzer,
        version=findings.version,
        kind=kind,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        data=buffer.getvalue(),
    )


def _dates(created: dt.datetime) -> dict[str, Any]:
    return {
        "content_date": created.date(),
        "content_time": created.time().replace(microsecond=0),
        "series_date": created.date(),
        "series_time": created.time().replace(microsecond=0),
    }


# Coding schemes PS3.16 8 lists as standard; others used by an analyzer are declared (PS3.3 C.12.1.1.3).
_STANDARD_SCHEMES = {"DCM", "SCT", "UCUM", "LN", "RADLEX", "NCIt", "UMLS", "FMA", "MDC", "SRT"}


def _coding_schemes(findings: Findings) -> list[Any]:
    """Coding Scheme Identification items for every non-standard scheme the analyzer used."""
    from highdicom.coding_schemes import CodingSchemeIdentificationItem

    used: set[str] = set()
    for f in findings.findings:
        used.update(c.scheme for c in (f.finding_type, *[m.name for m in f.measurements]))
        used.update(m.unit.scheme for m in f.measurements)
        used.update(c.scheme for e in f.evaluations for c in (e.name, e.value))
        if f.mask is not None:
            used.update((f.mask.category.scheme, f.mask.type.scheme))
    return [
        CodingSchemeIdentificationItem(designator=d, name=f"{d} (defined by {findings.analyzer})"[:64])
        for d in sorted(used - _STANDARD_SCHEMES)
    ]


def _pin(ds: Dataset, created: dt.datetime, organization_uid: str = "") -> None:
    """Replace the wall-clock and random values highdicom adds, so one input gives one byte string.

    Instance Creation Date/Time (C.12.1), Contribution DateTime (C.7.5.1 Contributing Equipment)
    and Dimension Organization UID (C.7.6.17) are otherwise taken from the clock / a random UID.
    """
    stamp = created.replace(microsecond=0)
    ds.InstanceCreationDate = stamp.strftime("%Y%m%d")
    ds.InstanceCreationTime = stamp.strftime("%H%M%S")
    for elem in ds.iterall():
        if elem.keyword == "ContributionDateTime":
            elem.value = stamp.strftime("%Y%m%d%H%M%S")
        elif elem.keyword == "DimensionOrganizationUID" and organization_uid:
            elem.value = organization_uid


# --- SEG -------------------------------------------------------------------------------------


def _build_seg(
    findings: Findings,
    headers: list[Dataset],
    uid: Any,
    description: str,
    manufacturer: str,
    institution_name: str | None,
    created: dt.datetime,
) -> hd.seg.Segmentation:
    """One BINARY segment per finding with a mask, numbered 1.. in finding order (PS3.3 C.8.20.2).

    Empty frames are omitted; when every mask is empty a single empty frame on the first source
    slice is kept, because a Segmentation needs at least one frame (PS3.3 C.8.20.2, Number of
    Frames >= 1) and the empty segments must still exist for the SR to reference them.
    """
    masked = [f for f in findings.findings if f.mask is not None]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_short(findings.analyzer),
        family=codes.cid7162.ArtificialIntelligence,
        version=_short(findings.version),
    )
    descriptions = []
    for number, finding in enumerate(masked, start=1):
        assert finding.mask is not None
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=_short(finding.mask.label),
                segmented_property_category=_concept(finding.mask.category),
                segmented_property_type=_concept(finding.mask.type),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=uid("tracking", finding.tracking_id),
                tracking_id=_short(finding.tracking_id),
            )
        )
    pixels = np.stack([f.mask.array.astype(bool) for f in masked if f.mask is not None], axis=-1)
    images: Sequence[Dataset] = headers
    if not pixels.any():
        pixels, images = pixels[:1], headers[:1]
    content_description = _short(
        (f"{NOT_FOR_CLINICAL_USE} " if findings.not_for_clinical_use else "")
        + f"{findings.analyzer} {findings.version} segmentation"
    )
    seg = hd.seg.Segmentation(
        source_images=images,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uid("seg", "series"),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=uid("seg", "instance"),
        instance_number=1,
        manufacturer=_short(manufacturer),
        manufacturer_model_name=_short(findings.analyzer),
        software_versions=_short(findings.version),
        device_serial_number=_short(device_observer_uid(findings.analyzer, findings.version)),
        content_description=content_description,
        content_label="AI_RESULT",
        content_creator_name=None,
        omit_empty_frames=True,
        series_description=description,
        institution_name=institution_name,
        coding_schemes=_coding_schemes(findings) or None,
        **_dates(created),
    )
    if "FrameOfReferenceUID" not in seg:
        # General Image (PS3.3 C.7.6.1): Patient Orientation is Type 2C, required when the image
        # has no Image Orientation/Position (Patient), as a SEG of a projection image has not.
        # The frames lie on the source pixels, so the source's orientation holds; unknown (the
        # source has none) is written empty, as Type 2 allows.
        orientation = [_value(headers[0], "PatientOrientation", i, numeric=False) for i in (0, 1)]
        seg.PatientOrientation = orientation if None not in orientation else ""
    _pin(seg, created, uid("seg", "dimension-organization"))
    standardize_meanings(seg)
    return seg


# --- SR --------------------------------------------------------------------------------------


def _build_sr(
    findings: Findings,
    headers: list[Dataset],
    uid: Any,
    seg: hd.seg.Segmentation | None,
    previous: Sequence[ResultObject],
    description: str,
    manufacturer: str,
    institution_name: str | None,
    created: dt.datetime,
) -> hd.sr.Comprehensive3DSR:
    """Comprehensive 3D SR with a TID 1500 Measurement Report (PS3.16 A, TID 1500)."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(findings.analyzer, findings.version),
            name=_short(findings.analyzer),
            manufacturer_name=_short(manufacturer),
            model_name=_short(f"{findings.analyzer} {findings.version}"),
        ),
    )
    algorithm = hd.sr.AlgorithmIdentification(
        name=_short(findings.analyzer), version=_short(findings.version)
    )
    groups: list[Any] = []
    segment_number = 0
    for finding in findings.findings:
        tracking = hd.sr.TrackingIdentifier(
            uid=uid("tracking", finding.tracking_id), identifier=_short(finding.tracking_id)
        )
        kwargs: dict[str, Any] = {
            "tracking_identifier": tracking,
            "finding_type": _concept(finding.finding_type),
            "algorithm_id": algorithm,
            "measurements": _measurements(finding) or None,
            "qualitative_evaluations": _evaluations(finding) or None,
        }
        if finding.mask is not None and seg is not None:
            segment_number += 1
            referenced = hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID,
                sop_instance_uid=seg.SOPInstanceUID,
                segment_number=segment_number,
                source_series=hd.sr.SourceSeriesForSegmentation(str(headers[0].SeriesInstanceUID)),
            )
            # No TID 4019 here: the segment's Segmentation Algorithm Identification and the
            # document's device observer (TID 1004) name the algorithm, and TID 1411 as
            # validators know it (PixelMed, 2022 edition) has no row for it.
            kwargs.pop("algorithm_id")
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    referenced_segment=referenced, **kwargs
                )
            )
        else:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(**kwargs))

    modality = str(headers[0].get("Modality", "")).upper()
    procedure = _PROCEDURES.get(modality, _IMAGING_PROCEDURE)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure,
        # TID 1500 needs rows 6, 8 or 12; highdicom insists on row 6, so an empty report gets a
        # placeholder group that is removed again below.
        imaging_measurements=groups
        or [
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=uid("tracking", ""), identifier="none")
            )
        ],
    )
    root = report[0]
    library, library_notes = _image_library(headers)
    root.ContentSequence.insert(_after_procedure(root), library)
    if not groups:
        root.ContentSequence = [
            item
            for item in root.ContentSequence
            if item.ConceptNameCodeSequence[0].CodeValue != codes.DCM.ImagingMeasurements.value
        ]
    evaluations = _document_evaluations(findings, library_notes)
    if evaluations:
        container = hd.sr.ContainerContentItem(
            name=_QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        container.ContentSequence = hd.sr.ContentSequence(evaluations)
        root.ContentSequence.append(container)

    evidence: list[Dataset] = list(headers)
    if seg is not None:
        evidence.append(seg)
    predecessors = [_reference(r) for r in previous if r.kind == "sr"]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uid("sr", "series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uid("sr", "instance"),
        instance_number=1,
        manufacturer=_short(manufacturer),
        is_complete=findings.status is FindingsStatus.COMPLETE,
        is_final=findings.status is FindingsStatus.COMPLETE,
        is_verified=False,
        institution_name=institution_name,
        previous_versions=predecessors or None,
        series_description=description,
        manufacturer_model_name=_short(findings.analyzer),
        software_versions=_short(findings.version),
        coding_schemes=_coding_schemes(findings) or None,
        **_dates(created),
    )
    _pin(sr, created)
    standardize_meanings(sr)
    return sr


def _image_library(headers: list[Dataset]) -> tuple[Dataset, list[str]]:
    """TID 1600 Image Library: one group for the series, descriptors shared at group level.

    TID 1601 allows the TID 1602 descriptors either per entry or once for the group; the source is
    one series, so modality, frame of reference, matrix, spacing and orientation are stated once
    (from the first image) and each entry is a bare IMAGE reference. highdicom's per-entry form
    writes ~16 items per slice and made a 200-slice SR about ten times slower to build and write.
    Image Position (Patient), which differs per slice, is therefore not repeated here.

    Returns the library and one note per descriptor left out because the source lacks the
    attribute it comes from (see :func:`_modality_descriptors`).
    """
    first = headers[0]
    # highdicom writes the TID 1602 rows every image has (modality from the SOP Class, frame of
    # reference, rows, columns). Its TID 1603/1604 rows read attributes a source may lack or leave
    # empty (Patient Orientation is Type 2C, Slice Thickness Type 2), so they are built here from
    # what is present, and highdicom gets a copy that asks for none of them.
    common = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID"):
        if keyword in first:
            setattr(common, keyword, first[keyword].value)
    common.Modality = ""  # neither cross-sectional nor projection to highdicom
    library = hd.sr.ImageLibrary([common])[0]
    group = library.ContentSequence[0]
    image = next(item for item in group.ContentSequence if item.ValueType == "IMAGE")
    specific, notes = _modality_descriptors(first)
    entries = [
        hd.sr.ImageContentItem(
            name=image.ConceptNameCodeSequence[0],
            referenced_sop_class_uid=h.SOPClassUID,
            referenced_sop_instance_uid=h.SOPInstanceUID,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        for h in headers
    ]
    group.ContentSequence = [
        *[item for item in group.ContentSequence if item.ValueType != "IMAGE"],
        *image.ContentSequence,
        *specific,
        *entries,
    ]
    return library, notes


# Modalities highdicom describes with TID 1604 (cross-sectional) and TID 1603 (projection).
_CROSS_SECTIONAL = {"CT", "MR", "PT"}
_PROJECTION = {"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"}
_MM = codes.UCUM.Millimeter
_DIRECTION = hd.sr.CodedConcept("{-1:1}", "UCUM", "{-1:1}")


def _modality_descriptors(ds: Dataset) -> tuple[list[hd.sr.ContentItem], list[str]]:
    """TID 1603 / TID 1604 rows of the first source image, in highdicom's order and form.

    Each row is written only when the attribute it comes from holds a value: a projection image
    without Patient Orientation (0020,0020), or a slice without Slice Thickness, loses that row
    and nothing else, and a note says so. For projection images the spacing is Imager Pixel
    Spacing (0018,1164) or, when a CR/DX source has none, Pixel Spacing (0028,0030), which such
    sources use for the same detector spacing (older CR); with neither the spacing rows are
    omitted. Image Position (Patient) differs per slice and is not written (see
    :func:`_image_library`).
    """
    acq = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    modality = str(ds.get("Modality", "") or "").upper()
    items: list[hd.sr.ContentItem] = []
    missing: list[str] = []

    def number(name: Any, keyword: str, index: int, unit: Any) -> None:
        value = _value(ds, keyword, index)
        if value is None:
            missing.append(f"{_ATTRIBUTE_NAMES[keyword]} -> {name.meaning}")
            return
        items.append(hd.sr.NumContentItem(name=name, value=value, relationship_type=acq, unit=unit))

    if modality in _CROSS_SECTIONAL:
        number(codes.DCM.HorizontalPixelSpacing, "PixelSpacing", 1, _MM)
        number(codes.DCM.VerticalPixelSpacing, "PixelSpacing", 0, _MM)
        number(codes.DCM.SliceThickness, "SliceThickness", 0, _MM)
        for i, name in enumerate(
            (
                codes.DCM.ImageOrientationPatientRowX,
                codes.DCM.ImageOrientationPatientRowY,
                codes.DCM.ImageOrientationPatientRowZ,
                codes.DCM.ImageOrientationPatientColumnX,
                codes.DCM.ImageOrientationPatientColumnY,
                codes.DCM.ImageOrientationPatientColumnZ,
            )
        ):
            number(name, "ImageOrientationPatient", i, _DIRECTION)
        if _value(ds, "SpacingBetweenSlices", 0) is not None:  # optional in the image too
            number(codes.DCM.SpacingBetweenSlices, "SpacingBetweenSlices", 0, _MM)
    elif modality in _PROJECTION:
        for i, name in enumerate((codes.DCM.PatientOrientationRow, codes.DCM.PatientOrientationColumn)):
            text = _value(ds, "PatientOrientation", i, numeric=False)
            if text is None:
                missing.append(f"{_ATTRIBUTE_NAMES['PatientOrientation']} -> {name.meaning}")
            else:
                items.append(hd.sr.TextContentItem(name=name, value=text, relationship_type=acq))
        spacing = "ImagerPixelSpacing"
        if _value(ds, spacing, 1) is None and _value(ds, "PixelSpacing", 1) is not None:
            spacing = "PixelSpacing"
        number(codes.DCM.HorizontalPixelSpacing, spacing, 1, _MM)
        number(codes.DCM.VerticalPixelSpacing, spacing, 0, _MM)
    notes = [
        f"Image Library: the source image has no value for {m}; that descriptor is omitted."
        for m in missing
    ]
    return items, notes


_ATTRIBUTE_NAMES = {
    "PixelSpacing": "Pixel Spacing (0028,0030)",
    "ImagerPixelSpacing": "Imager Pixel Spacing (0018,1164)",
    "SliceThickness": "Slice Thickness (0018,0050)",
    "ImageOrientationPatient": "Image Orientation (Patient) (0020,0037)",
    "SpacingBetweenSlices": "Spacing Between Slices (0018,0088)",
    "PatientOrientation": "Patient Orientation (0020,0020)",
}


def _value(ds: Dataset, keyword: str, index: int, *, numeric: bool = True) -> Any:
    """Value ``index`` of ``keyword`` in ``ds``, or None when absent, empty or (``numeric``) not a
    finite number. Returned as stored (a DSfloat keeps its text), so the descriptor writes the
    source's own digits."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    if index >= len(values) or values[index] is None or str(values[index]).strip() == "":
        return None
    item = values[index]
    if numeric:
        try:
            if not np.isfinite(float(item)):
                return None
        except (TypeError, ValueError):
            return None
    return item


def _after_procedure(root: Dataset) -> int:
    names = [item.ConceptNameCodeSequence[0].CodeValue for item in root.ContentSequence]
    return max(i for i, code in enumerate(names) if code == codes.DCM.ProcedureReported.value) + 1


def _measurements(finding: Finding) -> list[hd.sr.Measurement]:
    out = []
    if finding.probability is not None:
        out.append(hd.sr.Measurement(name=_PROBABILITY, value=finding.probability, unit=_UNITLESS))
    for m in finding.measurements:
        out.append(hd.sr.Measurement(name=_concept(m.name), value=m.value, unit=_concept(m.unit)))
    return out


def _evaluations(finding: Finding) -> list[hd.sr.QualitativeEvaluation]:
    """Presence first (never omitted when known), then the analyzer's own coded verdicts."""
    out = []
    if finding.present is not None:
        value = _PRESENT if finding.present else _ABSENT
        out.append(hd.sr.QualitativeEvaluation(name=_concept(finding.finding_type), value=value))
    for e in finding.evaluations:
        out.append(hd.sr.QualitativeEvaluation(name=_concept(e.name), value=_concept(e.value)))
    return out


def _document_evaluations(findings: Findings, notes: Sequence[str] = ()) -> list[hd.sr.ContentItem]:
    """TID 1500 rows 13-14: the triage priority (CODE) and free-text comments (TEXT).

    ``notes`` say what the SR could not record about the source (after the analyzer's notes)."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    items: list[hd.sr.ContentItem] = []
    if findings.priority is not None:
        items.append(
            hd.sr.CodeContentItem(
                name=_PRIORITY, value=_PRIORITY_VALUE[findings.priority], relationship_type=contains
            )
        )
    texts = []
    if findings.not_for_clinical_use:
        texts.append(f"{NOT_FOR_CLINICAL_USE}: produced by {findings.analyzer} {findings.version}.")
    if findings.status is FindingsStatus.FAILED:
        texts.append(f"Analysis failed: {findings.error or 'no reason given'}")
    elif findings.status is FindingsStatus.PARTIAL:
        texts.append("Analysis partial" + (f": {findings.error}" if findings.error else "."))
    texts.extend(findings.notes)
    texts.extend(notes)
    for text in texts:
        items.append(
            hd.sr.TextContentItem(name=_COMMENT, value=_CONTROL.sub("", text), relationship_type=contains)
        )
    return items


def _reference(result: ResultObject) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = result.sop_class_uid
    ds.SOPInstanceUID = result.sop_instance_uid
    ds.SeriesInstanceUID = result.series_instance_uid
    ds.StudyInstanceUID = result.study_instance_uid
    return ds


# --- Key Object Selection (notify channel "kos") -------------------------------------------------

KOS_SERIES_NUMBER = 9903


def build_key_object(
    source: Dataset,
    images: Sequence[Dataset],
    documents: Sequence[ResultObject],
    *,
    analyzer: str,
    version: str,
    epoch: int,
    description: str,
    not_for_clinical_use: bool = True,
    uid_prefix: str | None = None,
    manufacturer: str = "dicomnode",
    created: dt.datetime,
) -> ResultObject:
    """A Key Object Selection Document (PS3.3 A.35.4, TID 2010) titled (113000, DCM, "Of Interest")
    that flags ``images`` (the source slices of a critical finding) and references the analysis'
    SR and SEG (``documents``), with a Key Object Description (113012, DCM) naming the finding.

    Pure, like :func:`build_results`: ``source`` gives the Patient and Study modules (repaired by
    :func:`sanitized_header`); ``images`` need only their SOP Class, SOP Instance, Series and Study
    Instance UIDs. The UIDs of the Key Object derive from (series, epoch, analyzer, version, "kos"), so a
    retried notification re-creates the same SOP Instance and, with the same ``created``, the same
    bytes. The device that selected the objects is the analyzer (TID 1002 observer context with the
    same Device Observer UID as its SR). The SEG is referenced as an IMAGE item, the SR as COMPOSITE.
    """
    if not images and not documents:
        raise ValueError("images, documents: a Key Object needs at least one object to reference")
    header = sanitized_header(source)
    series_uid = str(source.SeriesInstanceUID)
    study_uid = str(source.StudyInstanceUID)
    for i, image in enumerate(images):
        if str(image.StudyInstanceUID) != study_uid:
            raise ValueError(f"images[{i}]: belongs to study {image.StudyInstanceUID}, not {study_uid}")

    def uid(part: str) -> str:
        return result_uid(series_uid, epoch, analyzer, version, "kos", part, prefix=uid_prefix)

    referenced: list[Dataset] = []
    for image in images:
        ref = Dataset()
        for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
            setattr(ref, keyword, image[keyword].value)
        ref.Rows = ref.Columns = 1  # highdicom writes an IMAGE item (not COMPOSITE) when it sees a matrix
        referenced.append(ref)
    for document in documents:
        ref = Dataset()
        ref.SOPClassUID = document.sop_class_uid
        ref.SOPInstanceUID = document.sop_instance_uid
        ref.SeriesInstanceUID = document.series_instance_uid
        ref.StudyInstanceUID = document.study_instance_uid
        if document.kind == "seg":  # an image IOD: highdicom writes an IMAGE item when it sees a matrix
            ref.Rows = ref.Columns = 1
        referenced.append(ref)
    # highdicom copies the Patient and Study modules from the first evidence item; the evidence
    # list itself must hold exactly the referenced objects (PS3.3 C.17.2.3).
    evidence = [copy.copy(r) for r in referenced]
    for keyword in (*_TYPE_2_COPIED, "SpecificCharacterSet"):
        if keyword in header:
            setattr(evidence[0], keyword, header[keyword].value)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(analyzer, version),  # the model's one identity, as in its SR
            name=_short(analyzer),
            manufacturer_name=_short(manufacturer),
            model_name=_short(f"{analyzer} {version}"),
        ),
    )
    text = _CONTROL.sub("", description).strip() or "-"
    series_description = f"{analyzer} {version} KEY OBJECTS"
    if not_for_clinical_use:
        series_description = f"{NOT_FOR_CLINICAL_USE} {series_description}"
    try:
        content = hd.ko.KeyObjectSelection(
            document_title=codes.DCM.OfInterest,
            referenced_objects=referenced,
            observer_device_context=observer,
            description=text,
        )
        stamp = created.replace(microsecond=0)
        kos = hd.ko.KeyObjectSelectionDocument(
            evidence=evidence,
            content=content,
            series_instance_uid=uid("series"),
            series_number=KOS_SERIES_NUMBER,
            sop_instance_uid=uid("instance"),
            instance_number=1,
            manufacturer=_short(manufacturer),
            series_description=_short(series_description),
            content_date=stamp.date(),
            content_time=stamp.time(),
            series_date=stamp.date(),
            series_time=stamp.time(),
        )
        # highdicom names every reference "Source" (260753009, SCT); TID 2010 rows 8-10 give the
        # IMAGE and COMPOSITE items no concept name, and template validators refuse one there.
        for item in kos.ContentSequence:
            if item.ValueType in ("IMAGE", "COMPOSITE") and "ConceptNameCodeSequence" in item:
                del item.ConceptNameCodeSequence
        _pin(kos, created)
        buffer = io.BytesIO()
        kos.save_as(buffer, enforce_file_format=True)
    except Exception as exc:
        raise ResultsError(f"cannot encode the Key Object of {analyzer} {version} for series {series_uid}: "
                           f"{type(exc).__name__}: {exc}") from exc
    return ResultObject(
        analyzer=analyzer,
        version=version,
        kind="kos",
        sop_class_uid=str(kos.SOPClassUID),
        sop_instance_uid=str(kos.SOPInstanceUID),
        series_instance_uid=str(kos.SeriesInstanceUID),
        study_instance_uid=str(kos.StudyInstanceUID),
        transfer_syntax_uid=str(kos.file_meta.TransferSyntaxUID),
        data=buffer.getvalue(),
    )
