"""The backend conformance suite: the semantics every backend must have.

Run it against your backend by subclassing :class:`BackendConformance` in a test
module and providing a ``backend_name`` fixture (or class attribute)::

    import pytest
    from rdmamig.testing.conformance import BackendConformance

    class TestMyBackend(BackendConformance):
        @pytest.fixture
        def backend_name(self):
            return "mybackend"

A backend that cannot run on this machine is skipped with its own reason. Set
``RDMAMIG_TEST_HOST`` to the address to use (a verbs device needs its IP).
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .. import wire
from ..caps import Capability
from ..control import Role
from ..errors import PeerAbortedError, TransportError
from ..plugins import load_registry
from ..session import ControlSession, QemuFileReader, QemuFileWriter
from ..transport import Backend, Endpoint, MemoryRegion, RemoteWrite
from .pairs import connected_pair, default_host

MiB = 1 << 20


def _buffer(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size)


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


class BackendConformance:
    """Tests every backend must pass. Needs a ``backend_name`` fixture."""

    @pytest.fixture
    def backend(self, backend_name: str) -> Backend:
        backend = load_registry().backend(backend_name)()
        reason = backend.unavailable_reason()
        if reason is not None:
            pytest.skip(f"backend {backend_name!r} is not usable here: {reason}")
        return backend

    @pytest.fixture
    def pair(self, backend: Backend) -> Iterator[tuple[Endpoint, Endpoint]]:
        with connected_pair(backend, requested=Capability.BATCH | Capability.VERIFY) as pair:
            yield pair

    # ------------------------------------------------------------ handshake

    def test_negotiation_grants_the_intersection(self, backend: Backend) -> None:
        requested = Capability.PIN_ALL | Capability.BATCH
        with connected_pair(backend, requested=requested | Capability(0x8000_0000),
                            supported=Capability.PIN_ALL | Capability.VERIFY) as (src, dst):
            assert src.capabilities == Capability.PIN_ALL
            assert dst.capabilities == Capability.PIN_ALL

    def test_nothing_requested_nothing_granted(self, backend: Backend) -> None:
        with connected_pair(backend, requested=Capability(0)) as (src, dst):
            assert src.capabilities == Capability(0) == dst.capabilities

    def test_connect_to_a_closed_port_fails_clearly(self, backend: Backend) -> None:
        host = default_host()
        listener = backend.listen(host=host, port=0, supported=Capability(0))
        port = listener.address[1]
        listener.close()
        with pytest.raises(TransportError, match=f"{host}:{port}"):
            backend.connect(host=host, port=port, requested=Capability(0), timeout=5)

    # ------------------------------------------------------------ control channel

    @pytest.mark.parametrize("message", [
        wire.ErrorMessage(), wire.Ready(), wire.QemuFile(data=os.urandom(32 * 1024)),
        wire.RamBlocksRequest(),
        wire.RamBlocksResult(blocks=tuple(
            wire.DestBlock(remote_host_addr=0x7F00_0000_0000 + i * MiB, offset=i * MiB,
                           length=MiB, remote_rkey=i) for i in range(6))),
        wire.Compress(entries=tuple(
            wire.CompressRange(value=0, block_idx=0, offset=i * 4096, length=4096)
            for i in range(wire.MAX_REPEAT))),
        wire.RegisterRequest(entries=tuple(
            wire.Register(key=i * MiB, current_index=1, chunks=1)
            for i in range(wire.MAX_REPEAT))),
        wire.RegisterResult(entries=tuple(
            wire.RegisterKey(rkey=i + 1, host_addr=0x7F00_0000_0000)
            for i in range(wire.MAX_REPEAT))),
        wire.RegisterFinished(),
        wire.UnregisterRequest(entries=(wire.Register(key=3, current_index=0, chunks=1),)),
        wire.UnregisterFinished(),
        wire.QemuFile(data=os.urandom(wire.MAX_DATA)),
    ], ids=lambda m: type(m).__name__)
    def test_every_message_arrives_intact(self, pair: tuple[Endpoint, Endpoint],
                                          message: wire.Message) -> None:
        src, dst = pair
        for sender, receiver in ((src, dst), (dst, src)):
            data = wire.encode(message)
            sender.send_message(data=data)
            received = receiver.recv_message(timeout=10)
            assert received == data
            assert wire.decode_untrusted(received, extensions=receiver.capabilities) == message

    def test_messages_keep_their_order(self, pair: tuple[Endpoint, Endpoint]) -> None:
        # Two messages in flight at a time: what the protocol ever needs (a request
        # and a READY); more than the posted receives would be a receiver-not-ready
        # error on RDMA, as the protocol's READY flow control exists to prevent.
        src, dst = pair
        for i in range(0, 200, 2):
            for j in (i, i + 1):
                src.send_message(data=wire.encode(wire.QemuFile(data=j.to_bytes(4, "big"))))
            for j in (i, i + 1):
                assert dst.recv_message(timeout=10)[16:] == j.to_bytes(4, "big")

    def test_recv_times_out(self, pair: tuple[Endpoint, Endpoint]) -> None:
        with pytest.raises(TransportError) as info:
            pair[1].recv_message(timeout=0.2)
        assert info.value.errno == errno.ETIMEDOUT

    def test_ready_flow_control_and_qemu_file_stream(
            self, pair: tuple[Endpoint, Endpoint]) -> None:
        src, dst = pair
        payload = os.urandom(100_000)  # four pieces: 3 x 32 KiB and the rest
        source = ControlSession(src, role=Role.SOURCE, capabilities=src.capabilities)
        destination = ControlSession(dst, role=Role.DESTINATION, capabilities=dst.capabilities)

        def fill() -> bytes:
            message = destination.exchange_recv({wire.Command.QEMU_FILE})
            assert isinstance(message, wire.QemuFile)
            assert len(message.data) <= wire.QEMU_FILE_PIECE
            return message.data

        reader = QemuFileReader(fill)
        thread, out = _in_thread(lambda: reader.read_exact(len(payload)))
        writer = QemuFileWriter(source)
        writer.write(payload)
        writer.flush()
        thread.join(10)
        assert out == [payload]

    def test_request_and_reply(self, pair: tuple[Endpoint, Endpoint]) -> None:
        src, dst = pair
        source = ControlSession(src, role=Role.SOURCE, capabilities=src.capabilities)
        destination = ControlSession(dst, role=Role.DESTINATION, capabilities=dst.capabilities)
        request = wire.RegisterRequest(entries=(wire.Register(key=0, current_index=0,
                                                              chunks=1),))
        reply = wire.RegisterResult(entries=(wire.RegisterKey(rkey=7, host_addr=4096),))

        def serve() -> wire.Message:
            message = destination.exchange_recv()
            destination.send(reply)
            return message

        thread, out = _in_thread(serve)
        assert source.exchange_send(request, reply=wire.Command.REGISTER_RESULT) == reply
        thread.join(10)
        assert out == [request]

    def test_error_propagates(self, pair: tuple[Endpoint, Endpoint]) -> None:
        src, dst = pair
        source = ControlSession(src, role=Role.SOURCE, capabilities=src.capabilities)
        destination = ControlSession(dst, role=Role.DESTINATION, capabilities=dst.capabilities)
        destination.send(wire.Ready())
        source.abort()
        with pytest.raises(PeerAbortedError, match="source sent ERROR"):
            destination.recv()

    def test_peer_closing_is_a_transport_error(self, pair: tuple[Endpoint, Endpoint]) -> None:
        src, dst = pair
        thread, out = _in_thread(lambda: dst.recv_message(timeout=10))
        src.close()
        thread.join(10)
        assert isinstance(out[0], TransportError)

    # ------------------------------------------------------------ memory

    def _registered(self, endpoint: Endpoint, size: int, *, offset: int = 0,
                    remote_write: bool = True) -> tuple[mmap.mmap, MemoryRegion]:
        buffer = _buffer(size)
        view = memoryview(buffer)
        region = endpoint.register(buffer=view[offset:size - offset], remote_write=remote_write)
        return buffer, region

    def test_register_write_and_verify(self, pair: tuple[Endpoint, Endpoint]) -> None:
        src, dst = pair
        local, lregion = self._registered(src, 4 * MiB, remote_write=False)
        remote, rregion = self._registered(dst, 4 * MiB)
        local[:] = os.urandom(4 * MiB)
        assert dst.pinned_bytes == 4 * MiB and src.pinned_bytes == 4 * MiB
        sizes = [4096, 64 * 1024, MiB, 2 * MiB - 4096 - 64 * 1024 - 4096, 4096, MiB]
        writes, at = [], 0
        for size in sizes:
            writes.append(RemoteWrite(region=lregion, offset=at, length=size,
                                      remote_addr=rregion.addr + at, rkey=rregion.rkey))
            at += size
        ticket = src.post_writes(writes=writes)
        src.wait_writes(ticket=ticket, timeout=10)
        assert remote[:at] == local[:at]
        assert remote[at:] == bytes(4 * MiB - at)
        src.deregister(region=lregion)
        dst.deregister(region=rregion)
        assert dst.pinned_bytes == 0 == src.pinned_bytes
        assert dst.pinned_peak_bytes == 4 * MiB

    def test_work_alongside_a_batch_runs_once_before_it_completes(
            self, pair: tuple[Endpoint, Endpoint]) -> None:
        src, dst = pair
        local, lregion = self._registered(src, 2 * MiB, remote_write=False)
        remote, rregion = self._registered(dst, 2 * MiB)
        local[:] = os.urandom(2 * MiB)
        ran: list[str] = []
        ticket = src.post_writes_with(
            writes=[RemoteWrite(region=lregion, offset=at, length=MiB,
                                remote_addr=rregion.addr + at, rkey=rregion.rkey)
                    for at in (0, MiB)],
            alongside=lambda: ran.append("ran"))
        src.wait_writes(ticket=ticket, timeout=10)
        assert len(ran) == 1
        assert remote[:] == local[:]

    def test_a_watched_destination_reports_each_write_as_it_lands(
            self, pair: tuple[Endpoint, Endpoint]) -> None:
        # Whether an endpoint can is its own (RDMA cannot); one that says it can
        # reports every byte written, each range with its bytes in place (a write
        # whole or the pieces it was split into), before the batch completes.
        src, dst = pair
        local, lregion = self._registered(src, 2 * MiB, remote_write=False)
        remote, rregion = self._registered(dst, 2 * MiB)
        local[:] = os.urandom(2 * MiB)
        seen: list[tuple[int, int, bool]] = []

        def placed(addr: int, length: int) -> None:
            start = addr - rregion.addr
            landed = remote[start:start + length] == local[start:start + length]
            seen.append((start, length, landed))

        if not dst.watch_placements(placed):
            pytest.skip("this backend's writes land without a CPU of the destination")
        sizes = [4096, MiB - 4096, MiB]
        writes, at = [], 0
        for size in sizes:
            writes.append(RemoteWrite(region=lregion, offset=at, length=size,
                                      remote_addr=rregion.addr + at, rkey=rregion.rkey))
            at += size
        src.wait_writes(ticket=src.post_writes(writes=writes), timeout=10)
        assert all(landed for _start, _length, landed in seen)
        ranges = sorted((start, length) for start, length, _landed in seen)
        assert [start for start, _length in ranges] == list(itertools.accumulate(
            [0] + [length for _start, length in ranges[:-1]]))
        assert sum(length for _start, length in ranges) == at

    def test_a_write_source_may_be_read_only_memory(
            self, pair: tuple[Endpoint, Endpoint]) -> None:
        # A write's source is only read: registered for reading only, it may be a
        # read-only mapping (a registration for writing is refused there). A private
        # one: Linux before 6.2 pins a read-only verbs registration with FOLL_FORCE,
        # which a private mapping allows and a shared read-only one does not.
        src, dst = pair
        data = os.urandom(2 * MiB)
        with tempfile.TemporaryFile() as file:
            file.write(data)
            file.flush()
            local = mmap.mmap(file.fileno(), 2 * MiB, flags=mmap.MAP_PRIVATE,
                              prot=mmap.PROT_READ)
        region = src.register(buffer=memoryview(local), remote_write=False)
        remote, rregion = self._registered(dst, 2 * MiB)
        ticket = src.post_writes(writes=[RemoteWrite(
            region=region, offset=0, length=2 * MiB, remote_addr=rregion.addr,
            rkey=rregion.rkey)])
        src.wait_writes(ticket=ticket, timeout=10)
        assert remote[:] == data
        src.deregister(region=region)

    def test_more_writes_in_flight_than_a_send_queue_holds(
            self, pair: tuple[Endpoint, Endpoint]) -> None:
        # Before anything is waited for: 48 batches of 16 writes (768 work requests),
        # then 600 batches of one write (600 signalled completions) – more than a
        # send queue or a completion queue of a few hundred entries holds. The
        # backend makes room (or has no such limit); every write lands.
        src, dst = pair
        size, page = 6 * MiB, 4096
        local, lregion = self._registered(src, size, remote_write=False)
        remote, rregion = self._registered(dst, size)
        local[:] = os.urandom(size)
        batches = [list(range(at, at + 16 * page, page)) for at in range(0, 48 * 16 * page,
                                                                         16 * page)]
        batches += [[at] for at in range(48 * 16 * page, (48 * 16 + 600) * page, page)]
        tickets = [src.post_writes(writes=[
            RemoteWrite(region=lregion, offset=at, length=page, remote_addr=rregion.addr + at,
                        rkey=rregion.rkey) for at in batch]) for batch in batches]
        assert tickets == sorted(set(tickets))
        src.wait_writes(ticket=tickets[-1], timeout=60)
        end = (48 * 16 + 600) * page
        assert remote[:end] == local[:end]
        assert remote[end:] == bytes(size - end)

    def test_one_batch_longer_than_a_send_queue(self, pair: tuple[Endpoint, Endpoint]
                                                ) -> None:
        # A pass over memory another process dirtied page by page gives a window
        # thousands of separate writes: one batch of 1500, every other page, more
        # than a send queue of a few hundred holds. Its ticket covers all of it.
        src, dst = pair
        size, page = 12 * MiB, 4096
        local, lregion = self._registered(src, size, remote_write=False)
        remote, rregion = self._registered(dst, size)
        local[:] = os.urandom(size)
        ticket = src.post_writes(writes=[
            RemoteWrite(region=lregion, offset=at, length=page, remote_addr=rregion.addr + at,
                        rkey=rregion.rkey) for at in range(0, 3000 * page, 2 * page)])
        src.wait_writes(ticket=ticket, timeout=60)
        for at in range(0, 3000 * page, page):
            expected = local[at:at + page] if at % (2 * page) == 0 else bytes(page)
            assert remote[at:at + page] == expected, f"page {at // page}"

    def test_keys_are_distinct(self, pair: tuple[Endpoint, Endpoint]) -> None:
        dst = pair[1]
        buffer = _buffer(64 * 4096)
        view = memoryview(buffer)
        keys = [dst.register(buffer=view[i * 4096:(i + 1) * 4096], remote_write=True).rkey
                for i in range(64)]
        assert len(set(keys)) == 64 and 0 not in keys

    def _expect_access_error(self, pair: tuple[Endpoint, Endpoint], *, rkey_of: str,
                             remote_offset: int, length: int) -> None:
        src, dst = pair
        local, lregion = self._registered(src, 2 * MiB, remote_write=False)
        local[:] = b"\xAA" * (2 * MiB)
        # The region is the middle MiB of a 3 MiB mapping: guards on either side.
        remote, rregion = self._registered(dst, 3 * MiB, offset=MiB)
        rkey = rregion.rkey
        if rkey_of == "never":
            rkey = (rkey + 1) & 0xFFFF_FFFF or 1
        elif rkey_of == "deregistered":
            dst.deregister(region=rregion)
        ticket = src.post_writes(writes=[RemoteWrite(
            region=lregion, offset=0, length=length,
            remote_addr=rregion.addr + remote_offset, rkey=rkey)])
        with pytest.raises(TransportError, match="remote access error"):
            src.wait_writes(ticket=ticket, timeout=10)
        assert remote[:] == bytes(3 * MiB), "memory was written by a rejected write"
        with pytest.raises(TransportError):
            dst.recv_message(timeout=10)
        with pytest.raises(TransportError):
            src.send_message(data=wire.encode(wire.Ready()))

    def test_write_with_a_key_never_granted_is_rejected(
            self, pair: tuple[Endpoint, Endpoint]) -> None:
        self._expect_access_error(pair, rkey_of="never", remote_offset=0, length=4096)

    def test_write_with_a_deregistered_key_is_rejected(
            self, pair: tuple[Endpoint, Endpoint]) -> None:
        self._expect_access_error(pair, rkey_of="deregistered", remote_offset=0, length=4096)

    def test_write_past_the_region_is_rejected(self, pair: tuple[Endpoint, Endpoint]) -> None:
        self._expect_access_error(pair, rkey_of="valid", remote_offset=MiB - 4096,
                                  length=8192)

    def test_write_before_the_region_is_rejected(self, pair: tuple[Endpoint, Endpoint]) -> None:
        self._expect_access_error(pair, rkey_of="valid", remote_offset=-4096, length=4096)

    def test_close_releases_every_registration(self, backend: Backend) -> None:
        with connected_pair(backend) as (src, dst):
            buffers = [_buffer(MiB) for _ in range(4)]
            for buffer in buffers:
                dst.register(buffer=memoryview(buffer), remote_write=True)
                src.register(buffer=memoryview(buffer), remote_write=False)
            assert dst.pinned_bytes == 4 * MiB
        assert dst.pinned_bytes == 0 == src.pinned_bytes
        src.close()  # idempotent
        dst.close()
