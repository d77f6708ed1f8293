"""Throwaway certificates for TLS tests and benchmarks, made with ``openssl``."""

from __future__ import annotations

import subprocess
from pathlib import Path


def make_certificates(directory: Path, name: str = "rdmamig") -> dict[str, Path]:
    """A CA named after ``name`` and a certificate it signed for 127.0.0.1 (usable by
    either side), valid for a day: ``{"ca", "cert", "key"}`` paths in ``directory``.

    Raises:
        FileNotFoundError: ``openssl`` is not installed.
        subprocess.CalledProcessError: ``openssl`` failed.
    """
    ca, ca_key = directory / f"{name}-ca.pem", directory / f"{name}-ca.key"
    cert, key, request = (directory / f"{name}.pem", directory / f"{name}.key",
                          directory / f"{name}.csr")
    ext = directory / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for command in (
        ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "1",
         "-subj", f"/CN={name} CA"],
        ["openssl", "req", *ec, "-keyout", key, "-out", request, "-subj", "/CN=127.0.0.1"],
        ["openssl", "x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key,
         "-CAcreateserial", "-out", cert, "-days", "1", "-extfile", ext],
    ):
        subprocess.run([str(part) for part in command], check=True, capture_output=True)
    return {"ca": ca, "cert": cert, "key": key}
