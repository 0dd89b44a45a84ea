"""A throw-away PKI for TLS tests, made with the openssl command-line tool."""

from __future__ import annotations

import subprocess
from pathlib import Path


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate and a client certificate (both for IP 127.0.0.1).

    Keys: ``ca_crt``, ``ca_key``, ``server_crt``, ``server_key``, ``client_crt``, ``client_key``.
    """
    folder.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.crt")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr")
        (folder / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext")
    return {p.stem + p.suffix.replace(".", "_"): p for p in folder.iterdir()}


def tls_node_settings(pki: dict[str, Path], port: int, require_client_certificate: bool = True) -> dict[str, object]:
    """The ``[node.tls]`` table for a node using ``pki``."""
    return {"port": port, "certificate": str(pki["server_crt"]), "private_key": str(pki["server_key"]),
            "ca_certificates": str(pki["ca_crt"]), "require_client_certificate": require_client_certificate}


def dcmtk_tls_args(pki: dict[str, Path]) -> tuple[str, ...]:
    """DCMTK client options: our client certificate, and trust in the test CA."""
    return ("+tls", str(pki["client_key"]), str(pki["client_crt"]), "+cf", str(pki["ca_crt"]))
