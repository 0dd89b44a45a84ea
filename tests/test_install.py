"""A plain wheel install starts from any folder: the embedded default and the console files ship
inside the package, and nothing is written into the installation.

The wheel is built from a copy of this tree (`pip wheel --no-deps`, no build isolation: nothing is
downloaded) and installed with `--no-deps` into a throwaway venv that sees the system's packages
for the dependencies. Every command runs from an unrelated folder without PYTHONPATH, so it can
only import the installed copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import tomlkit
from conftest import run_dcmtk
from test_recovery import free_port

ROOT = Path(__file__).resolve().parent.parent


def clean_environment() -> dict[str, str]:
    drop = {"PYTHONPATH", "DICOMNODE_CONFIG", "DICOMNODE_ADMIN_TOKEN"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                          env=clean_environment(), timeout=300)


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.slow
def test_wheel_install_checks_serves_and_echoes_from_any_folder(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "dicomnode", source / "dicomnode", ignore=shutil.ignore_patterns("__pycache__"))
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                "-w", tmp_path / "wheels", source, cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "wheels").glob("dicomnode-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"dicomnode/dicomnode.toml", "dicomnode/console/index.html", "dicomnode/console/login.html",
            "dicomnode/console/console.js", "dicomnode/console/console.css"} <= names

    venv = tmp_path / "venv"
    created = run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    python, dicomnode = venv / "bin" / "python", venv / "bin" / "dicomnode"
    # The venv has no pip of its own: the system's pip, run by the venv's interpreter, installs there.
    installed = run(python, "-m", "pip", "install", "--no-deps", "-q", wheel, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr

    folder = tmp_path / "somewhere"  # an unrelated folder: no config, no checkout
    folder.mkdir()
    where = run(python, "-c", "import dicomnode; print(dicomnode.__file__)", cwd=folder)
    package = Path(where.stdout.strip()).parent
    assert package.is_relative_to(venv), where.stdout + where.stderr
    before = files_under(package)

    checked = run(dicomnode, "check-config", cwd=folder)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout == "embedded default: ok (2 peers, 1 destinations, 0 rules)\n"
    refused = run(dicomnode, "peers", "add", "NEWSCU", cwd=folder)
    assert refused.returncode == 2 and "dicomnode init" in refused.stderr

    assert run(dicomnode, "init", cwd=folder).returncode == 0
    config_file = folder / "dicomnode.toml"
    document = tomlkit.parse(config_file.read_text())
    dicom_port, admin_port = free_port(), free_port()
    document["node"]["port"] = dicom_port  # type: ignore[index]
    document["admin"]["port"] = admin_port  # type: ignore[index]
    document["jobs"]["workers"] = 0  # type: ignore[index]
    config_file.write_text(tomlkit.dumps(document))

    serving = subprocess.Popen([str(dicomnode), "serve"], cwd=folder, env=clean_environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while run_dcmtk("echoscu", "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1",
                        str(dicom_port)).returncode != 0:
            assert serving.poll() is None, serving.stdout.read() if serving.stdout else ""
            assert time.monotonic() < deadline, "the installed node did not answer C-ECHO"
            time.sleep(0.2)
        # The console starts after the DICOM listener; its files come from the installed package.
        script = b""
        while not script:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/console/console.js", timeout=10) as page:
                    script = page.read()
            except OSError:
                assert serving.poll() is None and time.monotonic() < deadline, "no console"
                time.sleep(0.2)
        assert b"loadOverview" in script
    finally:
        serving.terminate()
        output, _ = serving.communicate(timeout=60)
    assert serving.returncode == 0, output
    assert f"config: {Path('dicomnode.toml')}" in output
    assert (folder / "data" / "audit.jsonl").is_file() and (folder / "data" / "ledger.sqlite3").is_file()
    assert files_under(package) == before, "nothing may be written into the installation"
