"""What is particular to the TCP backend: its handshake, raw frames, IPv6, memlock."""

from __future__ import annotations

import mmap
import shutil
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
from rdmamig.caps import Capability
from rdmamig.errors import RemoteProtocolError, TransportError
from rdmamig.pinning import locked_bytes
from rdmamig.testing import connected_pair
from rdmamig_tcp import TcpBackend
from rdmamig_tcp.frames import MAGIC, Kind, header


def _raw_connect(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(header(Kind.CONNECT, length=len(payload)) + payload)
        return sock.recv(4096)


def test_invalid_version_is_refused_with_the_reason() -> None:
    listener = TcpBackend().listen(host="127.0.0.1", port=0, supported=Capability.PIN_ALL)
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _accept_into(listener, errors))
    thread.start()
    reply = _raw_connect(listener.address[1], MAGIC + bytes(8))
    thread.join(5)
    listener.close()
    assert reply[0] == Kind.REJECT
    assert b"invalid protocol version: version=0" in reply
    assert isinstance(errors[0], RemoteProtocolError)


def _accept_into(listener: object, errors: list[BaseException]) -> None:
    try:
        listener.accept(timeout=5)  # type: ignore[attr-defined]
    except BaseException as exc:
        errors.append(exc)


def test_a_peer_that_is_not_rdmamig_is_refused() -> None:
    listener = TcpBackend().listen(host="127.0.0.1", port=0, supported=Capability(0))
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _accept_into(listener, errors))
    thread.start()
    _raw_connect(listener.address[1], b"GET / HTTP/1.0\r\n")
    thread.join(5)
    listener.close()
    assert "not an rdmamig TCP peer" in str(errors[0])


def test_peer_closing_mid_frame_breaks_the_connection_cleanly() -> None:
    with connected_pair(TcpBackend()) as (src, dst):
        # Half a SEND frame, then the source vanishes.
        src._sock.sendall(header(Kind.SEND, length=100) + b"x" * 10)  # type: ignore[attr-defined]
        src._sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]
        with pytest.raises(TransportError, match="after 10 of 100 bytes"):
            dst.recv_message(timeout=5)


def test_an_unknown_frame_kind_breaks_the_connection() -> None:
    with connected_pair(TcpBackend()) as (src, dst):
        src._sock.sendall(bytes([99]) + bytes(27))  # type: ignore[attr-defined]
        with pytest.raises(TransportError, match="kind=99 at offset 0: unknown TCP frame"):
            dst.recv_message(timeout=5)


def test_an_oversized_send_is_refused_before_allocation() -> None:
    with connected_pair(TcpBackend()) as (src, dst):
        src._sock.sendall(header(Kind.SEND, length=2**31))  # type: ignore[attr-defined]
        with pytest.raises(TransportError, match="length=2147483648 at offset 24"):
            dst.recv_message(timeout=5)


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("this Python has no IPv6")
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    with connected_pair(TcpBackend(), host="::1") as (src, dst):
        src.send_message(data=b"\0\0\0\0\0\0\0\x02\0\0\0\x01\0\0\0\0")
        assert dst.recv_message(timeout=5)[7] == 2


def test_registration_really_pins() -> None:
    with connected_pair(TcpBackend()) as (_src, dst):
        before = locked_bytes()
        buffer = mmap.mmap(-1, 4 << 20)
        region = dst.register(buffer=memoryview(buffer), remote_write=True)
        assert locked_bytes() - before == 4 << 20
        dst.deregister(region=region)
        assert locked_bytes() == before


MEMLOCK_SCRIPT = textwrap.dedent("""
    import mmap, sys
    from rdmamig.errors import MemlockLimitError
    from rdmamig.testing import connected_pair
    from rdmamig_tcp import TcpBackend
    with connected_pair(TcpBackend()) as (src, dst):
        buffer = mmap.mmap(-1, 16 << 20)
        try:
            dst.register(buffer=memoryview(buffer), remote_write=True)
        except MemlockLimitError as exc:
            print(exc)
            assert dst.pinned_bytes == 0
            sys.exit(0)
    sys.exit("registration beyond RLIMIT_MEMLOCK succeeded")
""")


def test_memlock_limit_gives_a_clear_error() -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    # Root has CAP_IPC_LOCK, which lets mlock ignore the limit: drop it.
    result = subprocess.run(
        ["setpriv", "--bounding-set", "-ipc_lock", "--inh-caps", "-ipc_lock",
         "prlimit", "--memlock=8388608:8388608", sys.executable, "-c", MEMLOCK_SCRIPT],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "cannot pin 16777216 bytes (16.0 MiB): RLIMIT_MEMLOCK is 8388608 bytes" in (
        result.stdout)
    assert "ulimit -l" in result.stdout


def test_rkeys_are_random_not_a_counter() -> None:
    with connected_pair(TcpBackend()) as (_src, dst):
        buffer = mmap.mmap(-1, 64 * 4096)
        view = memoryview(buffer)
        keys = [dst.register(buffer=view[i * 4096:(i + 1) * 4096], remote_write=True).rkey
                for i in range(64)]
        assert keys != sorted(keys) and len(set(keys)) == 64
        # 32 random bits each: consecutive keys share no structure a peer could use.
        assert len({key >> 24 for key in keys}) > 16
