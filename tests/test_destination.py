"""The destination against a hand-driven source over a real TCP pair: every range
a peer names is checked before memory is touched, and a refusal writes nothing."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from rdmamig import wire
from rdmamig.caps import SOURCE_DEFAULTS
from rdmamig.control import Role
from rdmamig.engine import Destination, RamBlock, Source, SourceConfig, stream
from rdmamig.errors import MigrationError, PeerAbortedError, RemoteProtocolError
from rdmamig.policy import PolicyOptions
from rdmamig.session import ControlSession, QemuFileWriter
from rdmamig.testing import connected_pair
from rdmamig_policies.pin_until_done import PinUntilDone
from rdmamig_tcp import TcpBackend

MiB = 1 << 20
PAGE = wire.PAGE_BYTES


class HandSource:
    """The source's side of a control session, driven one message at a time."""

    def __init__(self, session: ControlSession, blocks: list[RamBlock]) -> None:
        self.session = session
        writer = QemuFileWriter(session)
        writer.write(stream.MAGIC)
        stream.write_record(writer, stream.Tag.BLOCKS,
                            stream.encode_blocks([(b.name, b.length) for b in blocks]))
        writer.flush()
        reply = session.exchange_send(wire.RamBlocksRequest(),
                                      reply=wire.Command.RAM_BLOCKS_RESULT)
        assert isinstance(reply, wire.RamBlocksResult)
        self.remote = list(reply.blocks)

    def send(self, message: wire.Message, reply: wire.Command | None = None) -> None:
        self.session.exchange_send(message, reply=reply)


@contextmanager
def against_a_destination(*sizes: int) -> Iterator[tuple[HandSource, Destination,
                                                         list[RamBlock]]]:
    """A destination receiving into zeroed blocks of ``sizes`` in a thread, and a
    hand source that has exchanged the blocks with it."""
    blocks = [RamBlock.anonymous(f"ram{i}", size) for i, size in enumerate(sizes)]
    with connected_pair(TcpBackend(), requested=SOURCE_DEFAULTS) as (src, dst):
        destination = Destination(dst, blocks=blocks, timeout=10)
        failures: list[MigrationError] = []

        def receive() -> None:
            try:
                destination.run()
            except MigrationError as exc:
                failures.append(exc)

        thread = threading.Thread(target=receive)
        thread.start()
        session = ControlSession(src, role=Role.SOURCE, capabilities=src.capabilities,
                                 timeout=10)
        try:
            yield HandSource(session, blocks), destination, blocks
        finally:
            src.close()
            thread.join(20)
        assert dst.pinned_bytes == 0


def refused(destination: Destination, source: HandSource, message: wire.Message) -> str:
    """Send ``message``; the destination must fail with a reason, which is returned."""
    with pytest.raises(PeerAbortedError, match="destination gave up"):
        source.send(message)
        source.session.wait_ready()  # the answer to a message that was taken
    return str(destination.result.error)


@pytest.mark.parametrize(("key_at", "chunks", "error"), [
    (2 * MiB, 1, "outside RAM block 1 (ram1)"),  # just past the end
    (-1, 1, "outside RAM block 1 (ram1)"),  # in the block before
    # QEMU's meaning of chunks: the chunks after the first (1 is a pair).
    (MiB, 1, "chunks=1: chunks 1..2 run past block ram1 (2 chunks)"),
    (0, 2, "chunks=2: chunks 0..2 run past block ram1 (2 chunks)"),
])
def test_a_register_request_outside_its_block_is_refused(key_at: int, chunks: int,
                                                         error: str) -> None:
    with against_a_destination(MiB, 2 * MiB) as (source, destination, _blocks):
        key = source.remote[1].offset + key_at
        reason = refused(destination, source, wire.RegisterRequest(entries=(
            wire.Register(key=key, current_index=1, chunks=chunks),)))
        assert error in reason
        assert destination.result.registrations == 0


@pytest.mark.parametrize(("key_at", "chunks", "pinned"), [
    (MiB, 0, 1),  # QEMU's source for one chunk (every request of the capture)
    (0, 1, 2),  # QEMU's source for a write of two chunks: length / 1 MiB - 1
])
def test_a_register_request_pins_the_chunks_qemu_means(key_at: int, chunks: int,
                                                       pinned: int) -> None:
    with against_a_destination(MiB, 2 * MiB) as (source, destination, _blocks):
        source.session.wait_ready()
        source.session.send(wire.RegisterRequest(entries=(wire.Register(
            key=source.remote[1].offset + key_at, current_index=1, chunks=chunks),)))
        reply = source.session.recv_reply(wire.Command.REGISTER_RESULT)
        assert isinstance(reply, wire.RegisterResult) and reply.entries[0].rkey != 0
        assert destination.result.registrations == pinned
        assert destination.endpoint.pinned_bytes == pinned * MiB


@pytest.mark.parametrize(("offset", "length"), [
    (2 * MiB - PAGE, 2 * PAGE),  # runs past the end
    (-PAGE, PAGE),  # starts in the block before
])
def test_a_compress_outside_its_block_is_refused_and_writes_nothing(offset: int,
                                                                     length: int) -> None:
    with against_a_destination(MiB, 2 * MiB) as (source, destination, blocks):
        blocks[0].array[:] = 1
        blocks[1].array[:] = 1
        reason = refused(destination, source, wire.Compress(entries=(wire.CompressRange(
            value=0, block_idx=1, offset=source.remote[1].offset + offset, length=length),)))
        assert f"COMPRESS of {length} bytes is outside RAM block 1" in reason
        assert blocks[0].array.min() == 1 and blocks[1].array.min() == 1


def test_a_compress_naming_no_block_is_refused() -> None:
    with against_a_destination(MiB) as (source, destination, _blocks):
        reason = refused(destination, source, wire.Compress(entries=(wire.CompressRange(
            value=0, block_idx=1, offset=0, length=PAGE),)))
        assert "block_idx=1: no such RAM block (there are 1)" in reason


@pytest.mark.parametrize("offset", [2 * MiB, PAGE + 8, -PAGE, 2**63])
def test_a_pages_entry_that_is_not_a_page_of_its_block_is_refused(offset: int) -> None:
    with against_a_destination(MiB, 2 * MiB) as (source, destination, blocks):
        reason = refused(destination, source, wire.Pages(entries=(wire.InlinePage(
            block_idx=1, offset=(source.remote[1].offset + offset) % 2**64,
            data=bytes([7]) * PAGE),)))
        assert "PAGES entry is not a page of RAM block 1" in reason
        assert blocks[0].reads_zero(0, MiB) and blocks[1].reads_zero(0, 2 * MiB)


def test_a_pages_entry_inside_its_block_is_written() -> None:
    with against_a_destination(MiB, 2 * MiB) as (source, destination, blocks):
        source.send(wire.Pages(entries=(wire.InlinePage(
            block_idx=1, offset=source.remote[1].offset + PAGE, data=bytes([7]) * PAGE),)))
        source.session.wait_ready()
        assert blocks[1].array[PAGE:2 * PAGE].tolist() == [7] * PAGE
        assert blocks[1].reads_zero(0, PAGE) and blocks[0].reads_zero(0, MiB)
        assert destination.result.inline_pages == 1


QEMU_ORIGIN = {"machine": "pc-i440fx-7.2", "configuration": "AAAA", "ram_section_id": 2}


@pytest.mark.parametrize(("origin", "error"), [
    ({"origin": "vmware"}, "ORIGIN origin='vmware': neither 'qemu' nor 'rdmamig'"),
    ({"origin": "qemu", "addrs": [0]}, "ORIGIN addrs: not one address or null per block (2)"),
    ({"origin": "qemu", "addrs": [0, -1]}, "ORIGIN addrs: not one address"),
    ({"origin": "qemu", "qemu": {"machine": "pc"}}, "ORIGIN qemu: "),
    ({"origin": "qemu", "qemu": {**QEMU_ORIGIN, "ram_section_id": 2**40}},
     "ORIGIN qemu: qemu ram_section_id=1099511627776: not a u32"),
    ({"origin": "qemu", "qemu": {**QEMU_ORIGIN, "machine": "pc\x1b]0;owned\x07"}},
     "ORIGIN qemu: qemu machine='pc\\x1b]0;owned\\x07': not 1 to 256 printable ASCII"),
    ({"origin": "qemu", "qemu": {**QEMU_ORIGIN, "devices": ["timer/0", "\x1b[2J"]}},
     "ORIGIN qemu: qemu device '\\x1b[2J': not 1 to 256 printable"),
    ([1, 2], "ORIGIN record is not a JSON object"),
])
def test_an_origin_record_is_checked_whole_by_the_stream_codec(origin: object,
                                                               error: str) -> None:
    with pytest.raises(RemoteProtocolError, match=re.escape(error)):
        stream.decode_origin_untrusted(json.dumps(origin).encode(), blocks=2)
    for good in ({"origin": "rdmamig", "addrs": [None, 4096]},
                 {"origin": "qemu", "qemu": QEMU_ORIGIN}):
        assert stream.decode_origin_untrusted(json.dumps(good).encode(), blocks=2) == good


@pytest.mark.parametrize("hashes", [[0], [0, 0], []], ids=["one missing", "one twice",
                                                          "none"])
def test_a_block_the_source_sent_no_hash_for_is_a_mismatch(hashes: list[int]) -> None:
    # Two identical zero blocks: any digest sent matches; a block with no digest of
    # its own must count as a mismatch, not as a match.
    with against_a_destination(MiB, MiB) as (source, destination, blocks):
        writer = QemuFileWriter(source.session)
        stream.write_record(writer, stream.Tag.END)
        writer.flush()
        source.session.wait_ready()  # everything before END is in place
        digest = blocks[0].digest()
        reply = source.session.send_request(wire.BlockHashes(entries=tuple(
            wire.BlockHash(block_idx=index, digest=digest) for index in hashes)) if hashes
            else wire.BlockHashes(entries=(wire.BlockHash(block_idx=7, digest=digest),)),
            reply=wire.Command.VERIFY_RESULT)
        assert isinstance(reply, wire.VerifyResult)
        assert reply.mismatched == 2 - len(set(hashes)) and reply.matched == len(set(hashes))
    assert destination.result.mismatched_blocks and not destination.result.committed


class _RecordsDeregistrations:
    """Wraps the destination's endpoint; notes each deregistration in ``events``."""

    def __init__(self, inner: Any, events: list[str]) -> None:
        self._inner, self._events = inner, events

    def deregister(self, *, region: Any) -> None:
        self._events.append("deregister")
        self._inner.deregister(region=region)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_the_destination_revokes_every_write_before_it_compares_hashes() -> None:
    # Once the hashes are compared, no write may land: every registration is gone
    # before the first block is hashed.
    events: list[str] = []
    source_blocks = [RamBlock.anonymous("ram0", 8 * MiB)]
    source_blocks[0].array[:] = 3
    blocks = [RamBlock.anonymous("ram0", 8 * MiB)]
    hash_block = blocks[0].digest
    blocks[0].digest = (  # type: ignore[method-assign]
        lambda *args: (events.append("digest"), hash_block(*args))[1])
    with connected_pair(TcpBackend(), requested=SOURCE_DEFAULTS) as (src, dst):
        destination = Destination(_RecordsDeregistrations(dst, events),  # type: ignore[arg-type]
                                  blocks=blocks, timeout=10)
        thread = threading.Thread(target=destination.run)
        thread.start()
        Source(src, source_blocks, policy=PinUntilDone(PolicyOptions()),
               config=SourceConfig(timeout=10)).run()
        thread.join(20)
    assert destination.result.verified and "deregister" in events and "digest" in events
    assert events.index("digest") > max(i for i, e in enumerate(events) if e == "deregister")


def test_zero_pages_are_counted_as_pages_not_ranges() -> None:
    with against_a_destination(MiB) as (source, destination, _blocks):
        source.send(wire.Compress(entries=(
            wire.CompressRange(value=0, block_idx=0, offset=source.remote[0].offset,
                               length=5 * PAGE),
            wire.CompressRange(value=0, block_idx=0, offset=source.remote[0].offset + 8 * PAGE,
                               length=PAGE))))
        source.session.wait_ready()
        assert destination.result.zero_pages == 6
