"""What is particular to the TCP backend: its handshake, raw frames, IPv6, memlock."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import termios
import textwrap
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from rdmamig.caps import Capability, PrivateData
from rdmamig.errors import TransportError
from rdmamig.pinning import locked_bytes
from rdmamig.populated import pagemap_entries
from rdmamig.testing import connected_pair
from rdmamig.testing.conformance import BackendConformance
from rdmamig.transport import Backend, Endpoint, RemoteWrite
from rdmamig_tcp import TcpBackend, TcpEndpoint, TcpListener, zerocopy
from rdmamig_tcp.frames import EXTENT, LANE_UNIT, MAGIC, PART, Kind, header

MiB = 1 << 20


def _raw_connect(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(header(Kind.CONNECT, length=len(payload)) + payload)
        return sock.recv(4096)


def _accept_after(listener: TcpListener, stranger: Callable[[int], bytes]) -> bytes:
    """What ``stranger`` hears from the listener, after which a real source must
    still be accepted."""
    reply = stranger(listener.address[1])
    source = TcpBackend().connect(host="127.0.0.1", port=listener.address[1],
                                  requested=Capability(0), timeout=5)
    with source, listener.accept(timeout=5):
        pass
    return reply


def test_invalid_version_is_refused_with_the_reason_and_the_listener_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    with TcpBackend().listen(host="127.0.0.1", port=0, supported=Capability.PIN_ALL) as listener:
        reply = _accept_after(listener, lambda port: _raw_connect(port, MAGIC + bytes(8)))
    assert reply[0] == Kind.REJECT
    assert b"invalid protocol version: version=0" in reply
    assert "invalid protocol version" in caplog.text


def test_a_peer_that_is_not_rdmamig_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    with TcpBackend().listen(host="127.0.0.1", port=0, supported=Capability(0)) as listener:
        reply = _accept_after(listener, lambda port: _raw_connect(port, b"GET / HTTP/1.0\r\n"))
    assert reply[0] == Kind.REJECT
    assert "not an rdmamig TCP peer" in caplog.text


def test_a_peer_of_another_framing_version_is_told_which(
        caplog: pytest.LogCaptureFixture) -> None:
    with TcpBackend().listen(host="127.0.0.1", port=0, supported=Capability(0)) as listener:
        reply = _accept_after(listener, lambda port: _raw_connect(
            port, MAGIC[:-1] + bytes([MAGIC[-1] - 1]) + bytes(8)))
    assert reply[0] == Kind.REJECT
    assert f"framing version {MAGIC[-1] - 1}, this end speaks {MAGIC[-1]}" in caplog.text


def _lane_socket(endpoint: Endpoint, lane: int = 0) -> socket.socket:
    assert isinstance(endpoint, TcpEndpoint)
    return endpoint.lane_socket(lane)


def test_peer_closing_mid_frame_breaks_the_connection_cleanly() -> None:
    with connected_pair(TcpBackend()) as (src, dst):
        # Half a SEND frame, then the source vanishes.
        sock = _lane_socket(src)
        sock.sendall(header(Kind.SEND, length=100) + b"x" * 10)
        sock.shutdown(socket.SHUT_RDWR)
        with pytest.raises(TransportError, match="after 10 of 100 bytes"):
            dst.recv_message(timeout=5)


def test_an_unknown_frame_kind_breaks_the_connection() -> None:
    with connected_pair(TcpBackend()) as (src, dst):
        _lane_socket(src).sendall(bytes([99]) + bytes(27))
        with pytest.raises(TransportError, match="kind=99 at offset 0: no such frame on lane 0"):
            dst.recv_message(timeout=5)


def test_an_oversized_send_is_refused_before_allocation() -> None:
    with connected_pair(TcpBackend()) as (src, dst):
        _lane_socket(src).sendall(header(Kind.SEND, length=2**31))
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


def test_deregistration_waits_for_a_write_into_its_region_and_no_other() -> None:
    with connected_pair(TcpBackend()) as (src, dst):
        assert isinstance(dst, TcpEndpoint)
        into, other = mmap.mmap(-1, 1 << 20), mmap.mmap(-1, 1 << 20)
        region = dst.register(buffer=memoryview(into), remote_write=True)
        unrelated = dst.register(buffer=memoryview(other), remote_write=True)
        # Half of a write's payload: the receiver is placing it until the rest comes.
        sock = _lane_socket(src)
        sock.sendall(header(Kind.WRITE, rkey=region.rkey, remote_addr=region.addr,
                            length=8192) + b"x" * 4096)
        deadline = time.monotonic() + 5
        while dst.placing_into(0) is not region:
            assert time.monotonic() < deadline, "the write never started"
            time.sleep(0.001)
        elsewhere = threading.Thread(target=dst.deregister, kwargs={"region": unrelated})
        elsewhere.start()
        elsewhere.join(timeout=5)
        assert not elsewhere.is_alive(), "waited for a write into another region"

        waiting = threading.Thread(target=dst.deregister, kwargs={"region": region})
        waiting.start()
        waiting.join(timeout=0.2)
        assert waiting.is_alive(), "deregistered while a write into the region was placed"
        sock.sendall(b"x" * 4096)
        waiting.join(timeout=5)
        assert not waiting.is_alive()
        assert into[:8192] == b"x" * 8192 and into[8192] == 0


def test_deregistration_waits_for_the_watcher_of_a_placed_write() -> None:
    # The watcher reads what was placed (the destination hashes it): the region
    # must not go, and its memory with it, until the watcher is done.
    with connected_pair(TcpBackend()) as (src, dst):
        local, remote = mmap.mmap(-1, LANE_UNIT), mmap.mmap(-1, LANE_UNIT)
        lregion = src.register(buffer=memoryview(local), remote_write=False)
        region = dst.register(buffer=memoryview(remote), remote_write=True)
        writes = [RemoteWrite(region=lregion, offset=0, length=LANE_UNIT,
                              remote_addr=region.addr, rkey=region.rkey)]
        watching, release = threading.Event(), threading.Event()

        def watcher(addr: int, length: int) -> None:
            watching.set()
            release.wait(5)

        assert dst.watch_placements(watcher)
        src.post_writes(writes=writes)
        assert watching.wait(5)
        waiting = threading.Thread(target=dst.deregister, kwargs={"region": region})
        waiting.start()
        waiting.join(timeout=0.2)
        assert waiting.is_alive(), "deregistered while the watcher read the region"
        release.set()
        waiting.join(timeout=5)
        assert not waiting.is_alive()


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
    assert "cannot pin 16777216 bytes (16 MiB): RLIMIT_MEMLOCK is 8388608 bytes" in (
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


# ---------------------------------------------------------------- several lanes


class TestFourLanes(BackendConformance):
    """The whole conformance suite with writes striped over four connections."""

    @pytest.fixture
    def backend(self) -> Backend:
        return TcpBackend(channels=4)


def _registered_pair(src: Endpoint, dst: Endpoint,
                     size: int) -> tuple[mmap.mmap, mmap.mmap, list[RemoteWrite]]:
    """A local and a remote buffer of ``size`` and one write per lane unit of it."""
    local, remote = mmap.mmap(-1, size), mmap.mmap(-1, size)
    lregion = src.register(buffer=memoryview(local), remote_write=False)
    rregion = dst.register(buffer=memoryview(remote), remote_write=True)
    writes = [RemoteWrite(region=lregion, offset=at, length=LANE_UNIT,
                          remote_addr=rregion.addr + at, rkey=rregion.rkey)
              for at in range(0, size, LANE_UNIT)]
    return local, remote, writes


def test_a_send_waits_for_the_writes_posted_before_it_on_other_lanes() -> None:
    with connected_pair(TcpBackend(channels=4)) as (src, dst):
        local, remote, writes = _registered_pair(src, dst, 4 * LANE_UNIT)
        local[:] = b"\x5A" * len(local)
        assert isinstance(dst, TcpEndpoint)
        # Hold every data lane's receiver before it places anything.
        with dst.stalled(1, 2, 3):
            src.post_writes(writes=writes)
            src.send_message(data=b"after the writes")
            with pytest.raises(TransportError, match="no control message within"):
                dst.recv_message(timeout=0.5)
        assert dst.recv_message(timeout=5) == b"after the writes"
        assert remote[:] == local[:]


@pytest.mark.parametrize("channels", [1, 4])
def test_work_alongside_a_batch_runs_on_its_lane_before_its_data_goes(
        channels: int) -> None:
    # One lane: where the data is read next, by the lane that sends it, which finds
    # it in cache; nothing of the batch has reached the peer when it runs. Several:
    # each carries a share of the batch, so it runs on the caller's thread.
    with connected_pair(TcpBackend(channels=channels)) as (src, dst):
        local, remote, writes = _registered_pair(src, dst, 4 * LANE_UNIT)
        local[:] = b"\x5A" * len(local)
        ran: list[tuple[str, bool]] = []
        assert isinstance(dst, TcpEndpoint)
        with dst.stalled(*range(channels)):  # nothing lands before the posting returns
            ticket = src.post_writes_with(writes=writes, alongside=lambda: ran.append(
                (threading.current_thread().name, remote[:] == bytes(len(remote)))))
        src.wait_writes(ticket=ticket, timeout=5)
        assert ran == [("rdmamig-tcp-tx0" if channels == 1 else "MainThread", True)]
        assert remote[:] == local[:]


def test_work_alongside_a_batch_that_fails_fails_the_endpoint() -> None:
    with connected_pair(TcpBackend()) as (src, dst):
        _local, _remote, writes = _registered_pair(src, dst, LANE_UNIT)

        def broken() -> None:
            raise ValueError("no digest")

        ticket = src.post_writes_with(writes=writes, alongside=broken)
        with pytest.raises(TransportError, match="work beside a batch of writes failed: "
                                                 "ValueError\\('no digest'\\)"):
            src.wait_writes(ticket=ticket, timeout=5)


def test_writes_to_the_same_bytes_keep_their_order_across_lanes() -> None:
    rounds, span, length = 40, 4 * LANE_UNIT, 3 * LANE_UNIT - 8192
    with connected_pair(TcpBackend(channels=4)) as (src, dst):
        local = mmap.mmap(-1, rounds * length)
        remote = mmap.mmap(-1, 2 * span)
        lregion = src.register(buffer=memoryview(local), remote_write=False)
        rregion = dst.register(buffer=memoryview(remote), remote_write=True)
        expected = bytearray(2 * span)
        # Overlapping, unaligned writes that straddle lane units, posted back to back
        # from distinct source bytes: each byte must end as its last writer left it.
        for round_ in range(1, rounds + 1):
            source = (round_ - 1) * length
            local[source:source + length] = bytes([round_]) * length
            at = (round_ * 37 * 4096) % span
            expected[at:at + length] = bytes([round_]) * length
            ticket = src.post_writes(writes=[RemoteWrite(
                region=lregion, offset=source, length=length,
                remote_addr=rregion.addr + at, rkey=rregion.rkey)])
        src.wait_writes(ticket=ticket, timeout=10)
        assert remote[:] == expected


def test_a_write_split_over_lanes_that_ends_outside_its_region_writes_nothing() -> None:
    with connected_pair(TcpBackend(channels=4)) as (src, dst):
        assert isinstance(dst, TcpEndpoint)
        local = mmap.mmap(-1, 8192)
        local[:] = b"\xAA" * 8192
        remote = mmap.mmap(-1, 3 * LANE_UNIT)
        base = ctypes.addressof(ctypes.c_char.from_buffer(remote))
        # The region ends where a lane unit does: the write's second page is the
        # next unit's, on the next lane, and outside.
        end = (base // LANE_UNIT + 1) * LANE_UNIT + LANE_UNIT
        region_view = memoryview(remote)[end - base - MiB:end - base]
        lregion = src.register(buffer=memoryview(local), remote_write=False)
        rregion = dst.register(buffer=region_view, remote_write=True)
        outside_lane = end // LANE_UNIT % 4
        # The outside piece's lane is held: the inside piece's lane decides alone.
        with dst.stalled(outside_lane):
            ticket = src.post_writes(writes=[RemoteWrite(
                region=lregion, offset=0, length=8192,
                remote_addr=rregion.addr + MiB - 4096, rkey=rregion.rkey)])
            with pytest.raises(TransportError, match=r"write of 8192 bytes .* is outside"):
                src.wait_writes(ticket=ticket, timeout=10)
        assert remote[:] == bytes(3 * LANE_UNIT), "the piece inside the region was written"


def test_a_piece_outside_the_write_it_claims_breaks_the_connection() -> None:
    with connected_pair(TcpBackend(channels=4)) as (src, dst):
        remote = mmap.mmap(-1, MiB)
        rregion = dst.register(buffer=memoryview(remote), remote_write=True)
        payload = EXTENT.pack(rregion.addr, 4096) + b"\x01" * 4096
        # A piece claiming the first page as its write, placed on the second page.
        _lane_socket(src).sendall(header(Kind.WRITE, length=len(payload), rkey=rregion.rkey,
                                         remote_addr=rregion.addr + 4096, flags=PART)
                                  + payload)
        with pytest.raises(TransportError, match="outside its write of 4096 bytes"):
            dst.recv_message(timeout=10)
        assert remote[:] == bytes(MiB)


def test_more_lanes_than_allowed_is_refused() -> None:
    with pytest.raises(ValueError, match="channels=17: must be 1 to 16"):
        TcpBackend(channels=17)
    hello = MAGIC + PrivateData().encode()

    def too_many_lanes(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(header(Kind.CONNECT, length=len(hello), rkey=17) + hello)
            return sock.recv(4096)

    with TcpBackend().listen(host="127.0.0.1", port=0, supported=Capability(0)) as listener:
        reply = _accept_after(listener, too_many_lanes)
    assert reply[0] == Kind.REJECT and b"more than 16 lanes" in reply


def _peer_that_never_reads(server: socket.socket, accepted: list[socket.socket]) -> None:
    """Accept one rdmamig source at ``server`` and read nothing more from it."""
    conn, _ = server.accept()
    conn.recv(4096)  # the CONNECT frame
    granted = PrivateData().encode()
    conn.sendall(header(Kind.ACCEPT, length=len(granted), rkey=1) + granted)
    accepted.append(conn)


def _connect_to_a_peer_that_never_reads() -> tuple[TcpEndpoint, socket.socket, socket.socket]:
    """A source endpoint, the listening socket and the peer's end of its lane."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=_peer_that_never_reads, args=(server, accepted))
    thread.start()
    endpoint = TcpBackend().connect(host="127.0.0.1", port=server.getsockname()[1],
                                    requested=Capability(0), timeout=5)
    thread.join(5)
    assert isinstance(endpoint, TcpEndpoint)
    return endpoint, server, accepted[0]


def _post_one_write(endpoint: Endpoint, buffer: mmap.mmap) -> int:
    region = endpoint.register(buffer=memoryview(buffer), remote_write=False)
    return endpoint.post_writes(writes=[RemoteWrite(region=region, offset=0,
                                                    length=len(buffer), remote_addr=0,
                                                    rkey=1)])


def test_a_peer_that_stops_reading_fails_a_send_instead_of_blocking_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rdmamig_tcp.lanes.FRAME_TIMEOUT", 2.0)
    endpoint, server, peer = _connect_to_a_peer_that_never_reads()
    with endpoint:
        ticket = _post_one_write(endpoint, mmap.mmap(-1, 64 << 20))
        with pytest.raises(TransportError, match="send failed: the peer read nothing"):
            endpoint.wait_writes(ticket=ticket, timeout=60)
    peer.close()
    server.close()


def test_closing_with_writes_not_completed_resets_the_connection() -> None:
    # A write's payload is sent by reference to its memory: once the endpoint is
    # closed none of it may leave (the memory is the caller's again), as a queue
    # pair destroyed with work requests outstanding flushes them.
    endpoint, server, peer = _connect_to_a_peer_that_never_reads()
    with endpoint:
        _post_one_write(endpoint, mmap.mmap(-1, 64 << 20))
    received = 0
    scratch = bytearray(1 << 20)
    peer.settimeout(30)
    with pytest.raises(ConnectionResetError):  # not an orderly end behind the queue
        while count := peer.recv_into(scratch):
            received += count
    assert received < 64 << 20
    peer.close()
    server.close()


def _file_pages(mapping: mmap.mmap) -> int:
    """How many pages of ``mapping`` are present and a file's, by this process's
    pagemap (bits 63 and 61)."""
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        entries = pagemap_entries(fd, address // 4096, len(mapping) // 4096)
    finally:
        os.close(fd)
    both = np.uint64(0xA000_0000_0000_0000)
    return int(np.count_nonzero(entries & both == both))


def test_a_write_source_is_locked_without_copying_its_pages() -> None:
    # Locking a private writable mapping at once (mlock) breaks copy-on-write: a
    # file's pages (or KSM-merged ones) are replaced by copies, holes are filled.
    # A write's source is locked as it is read instead (MLOCK_ONFAULT).
    data = os.urandom(2 << 20)
    with tempfile.TemporaryFile() as file:
        file.write(data)
        file.flush()
        local = mmap.mmap(file.fileno(), len(data), flags=mmap.MAP_PRIVATE)
    with connected_pair(TcpBackend(), requested=Capability(0)) as (src, _dst):
        assert local[:] == data and _file_pages(local) == 512  # read: the file's pages
        region = src.register(buffer=memoryview(local), remote_write=False)
        assert _file_pages(local) == 512
        src.deregister(region=region)


def _wait_until_queued(sock: socket.socket, count: int) -> None:
    """Wait until at least ``count`` bytes wait unread in ``sock``'s receive queue."""
    queued = bytearray(4)
    deadline = time.monotonic() + 30
    while fcntl.ioctl(sock, termios.FIONREAD, queued, True) == 0 and (
            int.from_bytes(queued, sys.byteorder) < count):
        assert time.monotonic() < deadline, "the write never reached the peer's socket"
        time.sleep(0.01)


@pytest.mark.parametrize("by_reference", [True, False], ids=["vmsplice", "copied"])
def test_a_write_payload_is_read_from_its_memory_when_the_peer_takes_it(
        by_reference: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # As a NIC reads a WRITE's source itself, the lane hands the kernel the pages of
    # a payload, not a copy: bytes changed after posting, before the peer took
    # them, arrive changed (which RDMA allows until the completion). Where the
    # kernel cannot lend pages, the bytes are copied as they are sent.
    if not by_reference:
        monkeypatch.setattr(zerocopy, "_vmsplice", None)
    with connected_pair(TcpBackend(), requested=Capability(0)) as (src, dst):
        assert isinstance(dst, TcpEndpoint)
        local, remote, writes = _registered_pair(src, dst, LANE_UNIT)
        local[:] = b"\x01" * len(local)
        with dst.stalled(0):  # the peer takes nothing of the write yet
            ticket = src.post_writes(writes=writes)
            _wait_until_queued(dst.lane_socket(0), 64 << 10)
            local[:] = b"\x02" * len(local)
        src.wait_writes(ticket=ticket, timeout=30)
        if by_reference:
            assert remote[:] == local[:]
        else:  # at least its first bytes were copied before the change
            assert remote[:4096] == b"\x01" * 4096


def test_a_payload_the_kernel_stops_lending_goes_on_copied(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # vmsplice lends the first 256 KiB of a payload, then refuses (EFAULT: a
    # mapping whose pages it cannot take): the rest is copied behind them.
    real = zerocopy._vmsplice
    assert real is not None
    calls = []

    def lend_once(fd: int, vector: ctypes._Pointer, count: int, flags: int) -> int:
        calls.append(fd)
        if len(calls) > 1:
            ctypes.set_errno(errno.EFAULT)
            return -1
        vector._obj.length = 256 << 10
        return int(real(fd, vector, count, flags))

    monkeypatch.setattr(zerocopy, "_vmsplice", lend_once)
    with connected_pair(TcpBackend(), requested=Capability(0)) as (src, dst):
        local, remote, writes = _registered_pair(src, dst, LANE_UNIT)
        local[:] = np.random.default_rng(3).integers(0, 256, len(local), np.uint8).tobytes()
        src.wait_writes(ticket=src.post_writes(writes=writes), timeout=30)
        assert remote[:] == local[:]
    assert len(calls) == 2
