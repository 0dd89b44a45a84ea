"""A small exception family. Each error knows its DICOM status or its retry class."""

from __future__ import annotations


class DicomNodeError(Exception):
    """Base of every error dicomnode raises on purpose."""


class ConfigError(DicomNodeError):
    """A configuration file is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(problems))


# --- C-STORE refusals (PS3.4 Annex B.2.3, Table B.2-1) -------------------------------------------


class StoreRefused(DicomNodeError):
    """The receiver refuses an instance; ``status`` is the C-STORE response status."""

    status: int = 0xC000

    def __init__(self, comment: str) -> None:
        self.comment = comment
        super().__init__(comment)


class OutOfResources(StoreRefused):
    """Refused: Out of Resources (disk full, below the free-space floor, ledger unavailable, a
    deflated data set that inflates past `node.max_instance_mb`)."""

    status = 0xA700


class SopClassNotSupported(StoreRefused):
    """Refused: SOP Class not supported (the C-STORE came on a presentation context negotiated for
    another SOP class, e.g. CT Image Storage on the Verification or MR Image Storage context)."""

    status = 0x0122


class DataSetMismatch(StoreRefused):
    """Error: Data Set does not match SOP Class."""

    status = 0xA900


class CannotUnderstand(StoreRefused):
    """Error: Cannot understand (unparseable data set, an element with an unknown VR, missing or
    invalid UIDs)."""

    status = 0xC000


# --- jobs ------------------------------------------------------------------------------------------


class Transient(DicomNodeError):
    """Try again later; ``defer`` seconds is a hint (``None``: use the queue's backoff)."""

    def __init__(self, reason: str, defer: float | None = None) -> None:
        self.reason = reason
        self.defer = defer
        super().__init__(reason)


class Permanent(DicomNodeError):
    """Retrying cannot help; the job goes to ``dead`` with this reason."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class AnalyzerUnavailable(DicomNodeError):
    """An analyzer cannot be used here; ``reason`` says exactly what is missing."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"analyzer {name!r}: {reason}")
