"""Test certificates: a throw-away CA, a server certificate for ``localhost`` / ``127.0.0.1``
and a client certificate, made with the ``openssl`` command line (P-256 keys, valid one day).

Usage: ``paths = make_certs(tmp_path)``; ``paths["ca"]``, ``paths["server_cert"]``, ...
Tests that need it should skip when :func:`have_openssl` is false.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

__all__ = ["have_openssl", "make_certs"]

_SERVER_EXT = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
"""

_CLIENT_EXT = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
"""


def have_openssl() -> bool:
    """Whether the ``openssl`` command is on PATH."""
    return shutil.which("openssl") is not None


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _leaf(name: str, cn: str, ext: str, d: Path) -> None:
    """Key + certificate ``<name>.key`` / ``<name>.pem`` signed by ``ca.pem``."""
    (d / f"{name}.ext").write_text(ext)
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-sha256", "-extfile", f"{name}.ext",
        "-out", f"{name}.pem", cwd=d,
    )  # fmt: skip


def make_certs(tmp_path: Path) -> dict[str, Path]:
    """Write a CA, a server and a client certificate under ``tmp_path / "certs"``.

    Returns the paths ``ca``, ``server_cert``, ``server_key``, ``client_cert``, ``client_key``.
    """
    d = tmp_path / "certs"
    d.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-sha256",
        "-subj", "/CN=xai-serve test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d,
    )  # fmt: skip
    _leaf("server", "localhost", _SERVER_EXT, d)
    _leaf("client", "xai-serve test client", _CLIENT_EXT, d)
    return {
        "ca": d / "ca.pem",
        "server_cert": d / "server.pem",
        "server_key": d / "server.key",
        "client_cert": d / "client.pem",
        "client_key": d / "client.key",
    }
