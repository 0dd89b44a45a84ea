"""Run David Clunie's ``dciodvfy`` (dicom3tools) on a Part 10 object and collect its verdict.

``dciodvfy`` checks an object against the IOD and module tables of PS3.3 and the VR rules of PS3.5.
It writes ``Error - ...`` and ``Warning - ...`` lines to stderr and exits 1 when it found errors.
Tests assert ``report.errors == []`` and ``report.warnings == []`` (after ``IGNORED_WARNINGS``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# Warnings that are not about the object's conformance. Keep this list short and say why.
IGNORED_WARNINGS: tuple[re.Pattern[str], ...] = (
    # A local coding scheme ("99" prefix, PS3.16 8 / PS3.3 8.2) used by an analyzer for its own
    # concepts: dciodvfy knows only the registered designators and warns even when the scheme is
    # declared in the Coding Scheme Identification Sequence (PS3.3 C.12.1.1.3), as we do.
    re.compile(
        r"^Warning - Unrecognized defined term <99[A-Z0-9_]*> for value 1 of attribute "
        r"<Coding Scheme Designator>$"
    ),
)


@dataclass(frozen=True)
class Report:
    """What dciodvfy said: the IOD it recognised, errors and (non-ignored) warnings, one line each."""

    iod: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    returncode: int = 0

    @property
    def clean(self) -> bool:
        return not self.errors and not self.warnings and self.returncode == 0


def dciodvfy(obj: bytes | Path, *, ignore: tuple[re.Pattern[str], ...] = IGNORED_WARNINGS) -> Report:
    """Verify ``obj`` (Part 10 bytes or a file path); raise if dciodvfy is not installed."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        raise RuntimeError("dciodvfy not found on PATH (apt-get install dicom3tools)")
    with tempfile.TemporaryDirectory() as tmp:
        path = obj if isinstance(obj, Path) else Path(tmp) / "object.dcm"
        if not isinstance(obj, Path):
            path.write_bytes(obj)
        proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60, check=False)
    lines = (proc.stderr + proc.stdout).splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = [ln for ln in lines if ln.startswith("Warning") and not any(p.search(ln) for p in ignore)]
    iod = next((ln.strip() for ln in lines if ln.strip() and not ln.startswith(("Error", "Warning"))), "")
    return Report(iod=iod, errors=errors, warnings=warnings, returncode=proc.returncode)
