"""PixelMed's DicomSRValidator (Debian ``libpixelmed-java``) as a second SR validator.

``com.pixelmed.validate.DicomSRValidator`` checks an SR against the IOD and, from the document's
root template, against PS3.16 templates and context groups (its compiled templates come from a
2022 edition of the standard). It prints ``Error: ...`` and ``Warning: ...`` lines. Starting the
JVM and compiling the templates takes seconds, so one JVM validates every SR of a test session:
a tiny Java program (run from source, ``java File.java``) reads file paths from stdin and answers
each with the validator's output followed by an end marker.

On the JDK 17 of Debian 12 the validator's XPath expressions exceed the JDK's default limits;
``-Djdk.xml.xpath*Limit=0`` lifts them.

Tests assert ``report.errors == []`` and that every warning matches one of
:data:`EXPLAINED_WARNINGS`, each of which docs/conformance.md explains.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from dicomnode.conformance import PIXELMED_WARNINGS

JAR = Path("/usr/share/java/pixelmed.jar")
_END = "@@dicomnode-pixelmed-end@@"
_SOURCE = (
    """
import java.io.*;
public class ValidateMany {
    public static void main(String[] args) throws Exception {
        com.pixelmed.validate.DicomSRValidator validator = new com.pixelmed.validate.DicomSRValidator();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, "UTF-8"));
        PrintStream out = new PrintStream(System.out, true, "UTF-8");
        String path;
        while ((path = in.readLine()) != null) {
            try {
                out.print(validator.validate(path));
            } catch (Exception e) {
                out.println("Error: validator failed: " + e);
            }
            out.println();
            out.println("END_MARKER");
            out.flush();
        }
    }
}
"""
).replace("END_MARKER", _END)

#: Warnings the validator gives for our SRs that are not defects of the objects: the patterns of
#: dicomnode.conformance.PIXELMED_WARNINGS, which docs/conformance.md (6.3.5) explains one by one.
EXPLAINED_WARNINGS: tuple[re.Pattern[str], ...] = tuple(re.compile(pattern) for pattern, _, _ in PIXELMED_WARNINGS)


@dataclass(frozen=True)
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # not matching EXPLAINED_WARNINGS
    explained: list[str] = field(default_factory=list)
    text: str = ""


class PixelMed:
    """One validator JVM; :meth:`validate` is thread-safe (one object at a time)."""

    def __init__(self) -> None:
        java = shutil.which("java")
        if java is None:
            raise RuntimeError("java not found (apt-get install default-jre-headless libpixelmed-java)")
        if not JAR.is_file():
            raise RuntimeError(f"{JAR} not found (apt-get install libpixelmed-java)")
        self._tmp = tempfile.TemporaryDirectory(prefix="pixelmed-")
        source = Path(self._tmp.name) / "ValidateMany.java"
        source.write_text(_SOURCE, encoding="utf-8")
        self._process = subprocess.Popen(
            [
                java,
                "-Djdk.xml.xpathExprOpLimit=0",
                "-Djdk.xml.xpathExprGrpLimit=0",
                "-Djdk.xml.xpathTotalOpLimit=0",
                "-cp",
                str(JAR),
                str(source),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
        )
        self._lock = threading.Lock()

    def validate(self, obj: bytes | Path) -> Report:
        with self._lock, tempfile.TemporaryDirectory(dir=self._tmp.name) as tmp:
            path = obj if isinstance(obj, Path) else Path(tmp) / "sr.dcm"
            if not isinstance(obj, Path):
                path.write_bytes(obj)
            assert self._process.stdin is not None and self._process.stdout is not None
            self._process.stdin.write(f"{path.resolve()}\n")
            self._process.stdin.flush()
            lines = []
            for line in self._process.stdout:
                if line.rstrip("\n") == _END:
                    break
                lines.append(line.rstrip("\n"))
            else:
                raise RuntimeError("the PixelMed validator stopped: " + "\n".join(lines[-5:]))
        errors = [ln for ln in lines if ln.startswith("Error")]
        warnings = [ln for ln in lines if ln.startswith("Warning")]
        explained = [ln for ln in warnings if any(p.search(ln) for p in EXPLAINED_WARNINGS)]
        return Report(
            errors=errors,
            warnings=[ln for ln in warnings if ln not in explained],
            explained=explained,
            text="\n".join(lines),
        )

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._tmp.cleanup()


_SHARED: PixelMed | None = None
_SHARED_LOCK = threading.Lock()


def validate(obj: bytes | Path) -> Report:
    """Validate with the session's one validator JVM, started on first use and stopped when the
    test process exits."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            import atexit

            _SHARED = PixelMed()
            atexit.register(_SHARED.close)
        shared = _SHARED
    return shared.validate(obj)
