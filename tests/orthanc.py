"""A real Orthanc PACS for tests: started on loopback high ports with its own config and storage."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ORTHANC = Path("/usr/sbin/Orthanc")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Orthanc:
    folder: Path
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    ae_title: str = "ORTHANC"
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        if not ORTHANC.exists():
            raise AssertionError(f"{ORTHANC} is missing: apt-get install orthanc (see .ci/run)")
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "dicomnode-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "Plugins": [],
            "StableAge": 1,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "OverwriteInstances": False,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115
        # Orthanc's DCMTK leaves Nagle on unless TCP_NODELAY is set: each response would wait ~40 ms.
        self.process = subprocess.Popen([str(ORTHANC), str(path)], stdout=log, stderr=log,
                                        env={**os.environ, "TCP_NODELAY": "1"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return self
            except OSError:
                if self.process.poll() is not None:
                    raise AssertionError((self.folder / "orthanc.log").read_text()[-2000:]) from None
                time.sleep(0.1)
        raise AssertionError("Orthanc did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
            return json.loads(response.read())

    def file(self, instance_id: str) -> bytes:
        url = f"http://127.0.0.1:{self.http_port}/instances/{instance_id}/file"
        with urllib.request.urlopen(url, timeout=30) as response:
            return bytes(response.read())

    def instances(self) -> list[dict[str, Any]]:
        """Every stored instance with its tags (MainDicomTags of instance, series and study)."""
        out = []
        for instance_id in self.get("/instances"):
            info = self.get(f"/instances/{instance_id}")
            series = self.get(f"/series/{info['ParentSeries']}")
            study = self.get(f"/studies/{series['ParentStudy']}")
            out.append({"id": instance_id, "sop_instance_uid": info["MainDicomTags"]["SOPInstanceUID"],
                        "modality": series["MainDicomTags"].get("Modality", ""),
                        "series_uid": series["MainDicomTags"]["SeriesInstanceUID"],
                        "study_uid": study["MainDicomTags"]["StudyInstanceUID"]})
        return out

    def destination(self) -> dict[str, Any]:
        return {"ae_title": self.ae_title, "host": "127.0.0.1", "port": self.dicom_port}
