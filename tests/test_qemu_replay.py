"""QEMU 7.2's side of a real RDMA migration (the capture in tests/data), replayed
message by message against rdmamig's destination over TCP: the destination
answers every request QEMU made, pins what QEMU means by each and nothing more,
and touches no chunk QEMU did not ask for."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import attrs
import numpy as np
import pytest
from rdmamig import wire
from rdmamig.caps import Capability
from rdmamig.control import Role
from rdmamig.engine import Destination, RamBlock
from rdmamig.session import ControlSession
from rdmamig.testing import connected_pair
from rdmamig_tcp import TcpBackend

CAPTURE = Path(__file__).resolve().parent / "data" / "qemu-7.2-rdma-dynamic.jsonl"
KiB, MiB = 1 << 10, 1 << 20
#: The guest's RAM blocks, as QEMU's ram setup lists them (tests/data/CAPTURE-README.md).
BLOCKS = [("mem", 64 * MiB), ("/rom@etc/acpi/tables", 128 * KiB), ("pc.bios", 256 * KiB),
          ("pc.rom", 128 * KiB), ("/rom@etc/table-loader", 4 * KiB),
          ("/rom@etc/acpi/rsdp", 4 * KiB)]


def captured() -> tuple[list[wire.Message], list[int]]:
    """Every control message QEMU's source sent, in order, and the offsets QEMU's
    destination gave the blocks in its RAM BLOCKS RESULT."""
    messages, offsets = [], []
    for line in CAPTURE.read_text().splitlines():
        record = json.loads(line)
        if record["what"] != "control":
            continue
        message = wire.decode_untrusted(bytes.fromhex(record["hex"]),
                                        extensions=Capability(0))
        if record["sender"] == "source":
            messages.append(message)
        elif isinstance(message, wire.RamBlocksResult):
            offsets = [block.offset for block in message.blocks]
    return messages, offsets


def moved(message: wire.Message, theirs: list[int], ours: list[int]) -> wire.Message:
    """``message`` with its addresses in the destination's RAM space (PROTOCOL.md:
    a block's offset from RAM BLOCKS RESULT plus the offset in the block) moved
    from the offsets the captured QEMU destination gave to those rdmamig's gave."""
    if isinstance(message, wire.RegisterRequest):
        return wire.RegisterRequest(entries=tuple(attrs.evolve(
            e, key=e.key - theirs[e.current_index] + ours[e.current_index])
            for e in message.entries))
    if isinstance(message, wire.Compress):
        return wire.Compress(entries=tuple(attrs.evolve(
            e, offset=e.offset - theirs[e.block_idx] + ours[e.block_idx])
            for e in message.entries))
    return message


def replay(messages: list[wire.Message], theirs: list[int], blocks: list[RamBlock]
           ) -> tuple[Destination, set[tuple[int, int]]]:
    """QEMU's source's ``messages``, sent to a destination receiving into untouched
    ``blocks``; returns it and the chunks (block, chunk) QEMU asked for."""
    asked: set[tuple[int, int]] = set()
    with connected_pair(TcpBackend()) as (src, dst):
        destination = Destination(dst, blocks=blocks, timeout=10)
        thread = threading.Thread(target=destination.run)
        thread.start()
        session = ControlSession(src, role=Role.SOURCE, capabilities=src.capabilities,
                                 timeout=10)
        ours: list[int] = []
        for message in messages:
            message = moved(message, theirs, ours)
            session.wait_ready()
            session.send(message)
            if isinstance(message, wire.RamBlocksRequest):
                reply = session.recv_reply(wire.Command.RAM_BLOCKS_RESULT)
                assert isinstance(reply, wire.RamBlocksResult)
                ours = [block.offset for block in reply.blocks]
            elif isinstance(message, wire.RegisterRequest):
                session.recv_reply(wire.Command.REGISTER_RESULT)
                for entry in message.entries:
                    first = (entry.key - ours[entry.current_index]) // MiB
                    asked |= {(entry.current_index, first + i) for i in range(entry.count)}
                # What is pinned now: what QEMU asked for, no more.
                assert dst.pinned_bytes <= len(asked) * MiB
        src.close()  # QEMU ends its stream by disconnecting
        thread.join(30)
        assert dst.pinned_bytes == 0
    assert destination.result.completed and destination.result.peer == "qemu", (
        destination.result.error)
    assert destination.result.registrations == len(asked)
    return destination, asked


@pytest.fixture(params=["anonymous", "file"])
def blocks(request: pytest.FixtureRequest, tmp_path: Path) -> list[RamBlock]:
    """Untouched memory as a library user gives it, or sparse files as the image a
    listener writes."""
    if request.param == "anonymous":
        return [RamBlock.anonymous(name, length, populate=False) for name, length in BLOCKS]
    return [RamBlock.from_file(name, tmp_path / f"{index}.ram", length=length)
            for index, (name, length) in enumerate(BLOCKS)]


def touched_chunks(block: RamBlock) -> set[int]:
    return set((np.flatnonzero(block.populated_pages(0, block.pages)) * 4096 // MiB).tolist())


def test_qemus_requests_are_answered_pinning_what_qemu_means(blocks: list[RamBlock]) -> None:
    messages, theirs = captured()
    destination, asked = replay(messages, theirs, blocks)
    # 64 chunks of mem and one of each ROM but pc.rom (all zeros: COMPRESS).
    assert len(asked) == 68
    assert destination.result.zero_pages == 128 * 1024 // 4096
    for index, block in enumerate(blocks):
        assert touched_chunks(block) <= {chunk for b, chunk in asked if b == index}
