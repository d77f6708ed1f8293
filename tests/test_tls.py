"""The TCP backend over TLS: the whole conformance suite on mutual TLS with two
lanes, and the refusals (a plain peer, a certificate from another CA, a source
without a certificate where one is required)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from rdmamig.caps import Capability
from rdmamig.errors import TransportError
from rdmamig.testing import connected_pair
from rdmamig.testing.certificates import make_certificates
from rdmamig.testing.conformance import BackendConformance
from rdmamig.transport import Backend
from rdmamig_tcp import TcpBackend

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    directory = tmp_path_factory.mktemp("pki")
    return {name: make_certificates(directory, name) for name in ("ours", "theirs")}


def _mutual(files: dict[str, Path], **options: object) -> TcpBackend:
    return TcpBackend(tls_cert=files["cert"], tls_key=files["key"], tls_ca=files["ca"],
                      **options)  # type: ignore[arg-type]


class TestConformanceOverMutualTls(BackendConformance):
    @pytest.fixture
    def backend_name(self) -> str:
        return "tcp"

    @pytest.fixture
    def backend(self, pki: dict[str, dict[str, Path]]) -> Backend:
        return _mutual(pki["ours"], channels=2)


def test_a_plain_peer_is_refused_and_the_listener_goes_on(
        pki: dict[str, dict[str, Path]], caplog: pytest.LogCaptureFixture) -> None:
    backend = _mutual(pki["ours"])
    with backend.listen(host="127.0.0.1", port=0, supported=Capability(0)) as listener:
        with pytest.raises(TransportError, match="handshake"):
            TcpBackend().connect(host="127.0.0.1", port=listener.address[1],
                                 requested=Capability(0), timeout=5)
        with socket.create_connection(("127.0.0.1", listener.address[1])) as stranger:
            stranger.sendall(b"GET / HTTP/1.0\r\n\r\n")
            stranger.settimeout(15)
            assert stranger.recv(100) == b""  # closed, nothing said in the clear
        with connected_pair(backend) as (src, dst):
            assert src.capabilities == dst.capabilities
    assert "TLS" in caplog.text


def test_a_listener_from_another_ca_is_refused_by_the_source(
        pki: dict[str, dict[str, Path]]) -> None:
    theirs = TcpBackend(tls_cert=pki["theirs"]["cert"], tls_key=pki["theirs"]["key"])
    with (theirs.listen(host="127.0.0.1", port=0, supported=Capability(0)) as listener,
          pytest.raises(TransportError,
                        match=r"^TLS with 127\.0\.0\.1:\d+: CERTIFICATE_VERIFY_FAILED")):
        TcpBackend(tls_ca=pki["ours"]["ca"]).connect(
            host="127.0.0.1", port=listener.address[1], requested=Capability(0), timeout=5)


def test_with_a_ca_the_listener_requires_a_source_certificate(
        pki: dict[str, dict[str, Path]]) -> None:
    with _mutual(pki["ours"]).listen(host="127.0.0.1", port=0,
                                     supported=Capability(0)) as listener:
        port = listener.address[1]
        for source, alert in (
                (TcpBackend(tls_ca=pki["ours"]["ca"]), "CERTIFICATE_REQUIRED"),
                (TcpBackend(tls_cert=pki["theirs"]["cert"], tls_key=pki["theirs"]["key"],
                            tls_ca=pki["ours"]["ca"]), "UNKNOWN_CA")):
            # TLS 1.3 checks the client's certificate after the client has finished
            # its handshake: the alert ends the exchange of CONNECT and ACCEPT.
            with pytest.raises(TransportError, match=alert):
                source.connect(host="127.0.0.1", port=port, requested=Capability(0), timeout=5)


def test_ssl_is_loaded_only_by_a_migration_over_tls() -> None:
    # Importing ssl takes a process 14-31 ms by -X importtime (1-5 ms of loading
    # the plugins, benchmarks/README.md): plugins load it only when TLS is asked for.
    code = ("import sys, numpy, rdmamig\n"
            "from rdmamig.plugins import load_registry\n"
            "backend = load_registry().backend('tcp')\n"
            "plain = 'ssl' in sys.modules\n"
            "backend(tls=True)\n"
            "print(plain, 'ssl' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["False", "True"], done.stderr

