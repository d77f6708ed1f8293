"""QEMU's migration stream: golden vectors (hand-computed, and the head of a stream
QEMU 7.2 saved), the decoder fed in any pieces, and a fuzz invariant: every input
decodes or raises RemoteProtocolError, nothing else."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rdmamig.errors import RemoteProtocolError, StreamError, TruncatedError
from rdmamig.qemu import ram, stream
from rdmamig.qemu.decoder import PrecopyDecoder
from rdmamig.qemu.ram import RamBlockInfo
from rdmamig.qemu.stream import Kind, SectionHeader

PAGE = 4096

#: The head of ``migrate "exec:cat > FILE"`` by qemu-system-x86_64 7.2 (Debian 12) of
#: a paused ``-machine pc,memory-backend=mem -m 64M -nodefaults`` guest: header,
#: configuration, and the ram section's START with its setup, EOS and footer.
QEMU_72_HEAD = bytes.fromhex(
    "5145564d00000003070000000d70632d6934343066782d372e3201000000020372616d0000000000"
    "0000040000000004082004036d656d0000000004000000142f726f6d406574632f616370692f7461"
    "626c657300000000000200000770632e62696f7300000000000400000670632e726f6d0000000000"
    "020000152f726f6d406574632f7461626c652d6c6f616465720000000000001000122f726f6d4065"
    "74632f616370692f72736470000000000000100000000000000000107e00000002")
QEMU_72_BLOCKS = [("mem", 64 << 20), ("/rom@etc/acpi/tables", 128 << 10),
                  ("pc.bios", 256 << 10), ("pc.rom", 128 << 10),
                  ("/rom@etc/table-loader", 4096), ("/rom@etc/acpi/rsdp", 4096)]


class Pages:
    """A sink that keeps the pages it is given."""

    def __init__(self) -> None:
        self.blocks: list[RamBlockInfo] = []
        self.memory: list[np.ndarray] = []

    def setup(self, blocks: list[RamBlockInfo]) -> Pages:
        self.blocks = blocks
        self.memory = [np.zeros((b.pages, PAGE), np.uint8) for b in blocks]
        return self

    def pages(self, block: int, numbers: np.ndarray, data: np.ndarray) -> None:
        self.memory[block][numbers] = data

    def zero(self, block: int, numbers: np.ndarray, fills: np.ndarray) -> None:
        self.memory[block][numbers] = fills[:, None]


def decode(data: bytes, pieces: list[int] | None = None) -> tuple[PrecopyDecoder, Pages]:
    sink = Pages()
    decoder = PrecopyDecoder(sink.setup)
    at = 0
    for size in pieces or []:
        decoder.feed(data[at:at + size])
        at += size
    decoder.feed(data[at:])
    decoder.finish()
    return decoder, sink


def device_state(description: dict[str, object] | None = None) -> bytes:
    """A device section, EOF and a VM description, as QEMU ends a stream."""
    body = bytes([Kind.SECTION_FULL]) + struct.pack("!I", 3) + b"\x05timer" + struct.pack(
        "!II", 0, 2) + bytes(range(16)) + stream.encode_footer(3) + bytes([Kind.EOF])
    if description is None:
        return body
    text = json.dumps(description).encode()
    return body + bytes([Kind.VMDESCRIPTION]) + struct.pack("!I", len(text)) + text


def small_stream(*, footers: bool = True, tail: bytes | None = None,
                 setup: list[RamBlockInfo] | None = None) -> bytes:
    """A whole stream of two blocks: a bulk round (END) with data, zero and filled
    pages, after a PART that wrote pages that the END writes again (``setup``:
    other blocks declared before them)."""
    footer = stream.encode_footer(2) if footers else b""
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, (4, PAGE), dtype=np.uint8)
    return b"".join([
        stream.encode_header(), stream.encode_configuration("pc-i440fx-7.2"),
        stream.encode_section_header(SectionHeader(kind=Kind.SECTION_START, section_id=2,
                                                   idstr="ram", instance_id=0, version_id=4)),
        ram.encode_setup([*(setup or []), RamBlockInfo(name="mem", length=8 * PAGE),
                          RamBlockInfo(name="pc.rom", length=2 * PAGE)]),
        ram.encode_eos(), footer,
        stream.encode_section_header(SectionHeader(kind=Kind.SECTION_PART, section_id=2)),
        ram.encode_pages("mem", np.array([1, 2]), np.full((2, PAGE), 9, np.uint8), first=True),
        ram.encode_eos(), footer,
        stream.encode_section_header(SectionHeader(kind=Kind.SECTION_END, section_id=2)),
        ram.encode_pages("mem", np.array([0, 1, 2, 7]), data, first=True),
        ram.encode_zero_pages("mem", np.array([3, 4]), first=False),
        ram.encode_pages("pc.rom", np.array([1]), data[:1], first=True),
        ram.encode_eos(), footer,
        device_state({"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0}]})
        if tail is None else tail])


# ---------------------------------------------------------------- golden vectors


def test_header_and_configuration_golden() -> None:
    assert stream.encode_header() == b"QEVM\x00\x00\x00\x03"
    assert stream.encode_configuration("pc-i440fx-7.2") == (
        b"\x07\x00\x00\x00\x0dpc-i440fx-7.2")
    view = memoryview(b"QEVM\x00\x00\x00\x03")
    assert stream.decode_header_untrusted(view) == 8


def test_records_golden() -> None:
    assert ram.encode_eos() == bytes.fromhex("0000000000000010")
    assert ram.encode_hook() == bytes.fromhex("0000000000000080")
    page = bytes([5]) * PAGE
    first = ram.encode_pages("mem", np.array([3]), np.frombuffer(page, np.uint8)[None],
                             first=True)
    assert first == bytes.fromhex("0000000000003008") + b"\x03mem" + page
    more = ram.encode_pages("mem", np.array([4]), np.frombuffer(page, np.uint8)[None],
                            first=False)
    assert more == bytes.fromhex("0000000000004028") + page
    assert ram.encode_zero_pages("mem", np.array([1, 2]), first=True) == bytes.fromhex(
        "0000000000001002") + b"\x03mem\x00" + bytes.fromhex("000000000000202200")
    assert ram.encode_setup([RamBlockInfo(name="mem", length=2 * PAGE)]) == bytes.fromhex(
        "0000000000002004") + b"\x03mem" + bytes.fromhex("0000000000002000")
    assert stream.encode_footer(2) == b"\x7e\x00\x00\x00\x02"
    assert stream.encode_section_header(SectionHeader(
        kind=Kind.SECTION_START, section_id=2, idstr="ram", instance_id=0, version_id=4)
    ) == bytes.fromhex("0100000002") + b"\x03ram" + bytes.fromhex("0000000000000004")


def test_the_head_of_a_qemu_72_stream_decodes_and_reencodes() -> None:
    view = memoryview(QEMU_72_HEAD)
    at = stream.decode_header_untrusted(view)
    configuration, at = stream.decode_configuration_untrusted(view, at)
    assert configuration.machine == "pc-i440fx-7.2" and configuration.capabilities == ()
    assert configuration.raw == stream.encode_configuration("pc-i440fx-7.2")
    header, at = stream.decode_section_header_untrusted(view, at)
    assert header == SectionHeader(kind=Kind.SECTION_START, section_id=2, idstr="ram",
                                   instance_id=0, version_id=4)
    blocks, at = ram.decode_setup_untrusted(view, at)
    assert [(b.name, b.length) for b in blocks] == QEMU_72_BLOCKS
    stop, at, _ = ram.decode_records_untrusted(view, at, blocks, Pages())
    assert stop is ram.Stop.EOS
    assert stream.decode_footer_untrusted(view, at, 2) == len(QEMU_72_HEAD)
    again = (stream.encode_header() + configuration.raw + stream.encode_section_header(header)
             + ram.encode_setup(blocks) + ram.encode_eos() + stream.encode_footer(2))
    assert again == QEMU_72_HEAD


def test_configuration_subsections() -> None:
    raw = (b"\x07\x00\x00\x00\x02pc" + b"\x05\x1aconfiguration/capabilities"
           + struct.pack("!II", 1, 1) + b"\x0fx-ignore-shared"
           + b"\x05\x12configuration/uuid" + struct.pack("!I", 1) + bytes(range(16))
           + b"\x01")  # the next section starts
    configuration, at = stream.decode_configuration_untrusted(memoryview(raw), 0)
    assert configuration.capabilities == ("x-ignore-shared",)
    assert configuration.uuid == bytes(range(16)) and at == len(raw) - 1
    unknown = b"\x07\x00\x00\x00\x02pc\x05\x0dconfiguration" + struct.pack("!I", 1) + b"\x01"
    with pytest.raises(RemoteProtocolError, match="subsection 'configuration' at offset 26: "
                                                  "a configuration subsection rdmamig"):
        stream.decode_configuration_untrusted(memoryview(unknown), 0)


# ---------------------------------------------------------------- the decoder


def test_qemu_10_announces_the_switchover_before_the_end() -> None:
    # QEMU 10.0 sends MIG_CMD_SWITCHOVER_START (11, no data) before the END section.
    assert stream.encode_command(stream.Command.SWITCHOVER_START) == b"\x08\x00\x0b\x00\x00"
    data = small_stream()
    end = data.index(stream.encode_section_header(SectionHeader(kind=Kind.SECTION_END,
                                                                section_id=2)))
    decoder, _sink = decode(data[:end] + b"\x08\x00\x0b\x00\x00" + data[end:])
    assert decoder.switchover_start
    assert not decode(data)[0].switchover_start


def test_a_stream_decodes_with_the_last_write_of_each_page() -> None:
    decoder, sink = decode(small_stream())
    mem, rom = sink.memory
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, (4, PAGE), dtype=np.uint8)
    assert (mem[[0, 1, 2, 7]] == data).all() and not mem[3:7].any()
    assert (rom[1] == data[0]).all() and not rom[0].any()
    assert decoder.parts == 1 and decoder.ram_section is not None
    assert decoder.ram_section.footers
    assert decoder.device_state is not None
    assert decoder.device_state.devices() == ["timer/0"]


@pytest.mark.parametrize("tail", [device_state(None), device_state({"devices": []})],
                         ids=["no description", "description"])
def test_streams_without_footers_or_description(tail: bytes) -> None:
    decoder, _ = decode(small_stream(footers=False, tail=tail))
    assert decoder.ram_section is not None and not decoder.ram_section.footers
    assert decoder.device_state is not None and decoder.device_state.raw == tail


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 9000), max_size=8))
def test_any_split_into_pieces_decodes_the_same(pieces: list[int]) -> None:
    whole, sink = decode(small_stream())
    split, again = decode(small_stream(), pieces)
    assert all((a == b).all() for a, b in zip(sink.memory, again.memory, strict=True))
    assert split.device_state == whole.device_state and split.offset == whole.offset


def test_every_prefix_is_refused_as_truncated() -> None:
    data = small_stream()
    for end in list(range(0, 200)) + list(range(200, len(data) - 1, 97)):
        sink = Pages()
        decoder = PrecopyDecoder(sink.setup)
        decoder.feed(data[:end])
        with pytest.raises(TruncatedError):
            decoder.finish()


def _refused(data: bytes, message: str) -> None:
    """``data`` is refused with ``message`` whole and fed in two pieces alike: the
    error's offset is counted from the stream's start, as a field and in its text."""
    seen = []
    for cut in (len(data), len(data) // 2, len(data) - 3):
        sink = Pages()
        with pytest.raises(RemoteProtocolError, match=message) as info:
            decoder = PrecopyDecoder(sink.setup)
            decoder.feed(data[:cut])
            decoder.feed(data[cut:])
            decoder.finish()
        seen.append((type(info.value), str(info.value)))
        if isinstance(info.value, StreamError):
            assert f" at offset {info.value.at}: " in str(info.value)
    assert len(set(seen)) == 1, seen


def test_what_precopy_ram_migration_does_not_send_is_refused_by_offset() -> None:
    head = QEMU_72_HEAD
    end = stream.encode_section_header(SectionHeader(kind=Kind.SECTION_END, section_id=2))
    for flag, meaning in ((0x40, "an XBZRLE page"), (0x100, "a compressed page"),
                          (0x200, "a multifd flush")):
        record = struct.pack("!Q", flag | ram.RamFlag.CONTINUE)
        _refused(head + end + struct.pack("!Q", 0x08) + b"\x03mem" + bytes(PAGE) + record,
                 f"flags={flag | 0x20:#x} at offset {len(head) + 5 + 12 + PAGE}: {meaning}")
    _refused(head + end + struct.pack("!Q", 0x01), r"flags=0x1 at offset 198: an obsolete")
    _refused(head + end + struct.pack("!Q", 0x28) + bytes(PAGE),
             "flags=0x28 at offset 198: CONTINUE before any record named a RAM block")
    _refused(head + end + struct.pack("!Q", 0x08) + b"\x04nope",
             "RAM block name 'nope' at offset 206: not in the setup's list")
    _refused(head + end + struct.pack("!Q", (64 << 20) | 0x08) + b"\x03mem",
             "offset=0x4000000 at offset 198: outside RAM block 'mem'")
    _refused(head + end + struct.pack("!Q", 0x0C),
             r"flags=0xc at offset 198: an unknown combination")
    _refused(head + stream.encode_command(stream.Command.POSTCOPY_ADVISE, bytes(16)),
             "command=3 at offset 194: POSTCOPY_ADVISE, a QEMU_VM_COMMAND that precopy")
    _refused(head + b"\x08\x00\x63\x00\x00", "command=99 at offset 194: an unknown")
    _refused(head + b"\x01\x00\x00\x00\x03\x05block" + bytes(8),
             "section 'block' at offset 193: an iterable section other than 'ram'")
    _refused(head + b"\x04\x00\x00\x00\x03\x05timer" + bytes(8),
             r"section 'timer' at offset 193: device state \(FULL\) before")
    _refused(head[:8] + b"\x07\x00\x00\x10\x00", "len=4096 at offset 9: a machine type")
    _refused(b"QEVM\x00\x00\x00\x02", "version=2 at offset 4")
    _refused(b"RMIGSTR\x01", "magic=b'RMIG' at offset 0: not a QEMU migration stream")
    _refused(small_stream() + b"x", "without EOF and the VM description")


def test_pages_past_their_block_in_a_run_are_refused() -> None:
    head = QEMU_72_HEAD
    end = stream.encode_section_header(SectionHeader(kind=Kind.SECTION_END, section_id=2))
    rom = ram.encode_pages("/rom@etc/acpi/rsdp", np.array([0]), np.zeros((1, PAGE), np.uint8),
                           first=True)
    run = ram.encode_pages("x", np.array([0, 1]), np.zeros((2, PAGE), np.uint8), first=False)
    at = len(head) + 5 + len(rom) + 8 + PAGE
    _refused(head + end + rom + run, f"offset=0x1000 at offset {at}: outside RAM block "
                                     f"'/rom@etc/acpi/rsdp'")


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 255))
def test_any_corrupted_byte_decodes_or_raises_protocol_error(at: int, value: int) -> None:
    data = bytearray(small_stream())
    data[at % len(data)] = value
    sink = Pages()
    try:
        decoder = PrecopyDecoder(sink.setup)
        decoder.feed(bytes(data))
        decoder.finish()
    except RemoteProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_after_the_head_decode_or_raise_protocol_error(data: bytes) -> None:
    sink = Pages()
    try:
        decoder = PrecopyDecoder(sink.setup)
        decoder.feed(QEMU_72_HEAD + data)
        decoder.finish()
    except RemoteProtocolError:
        pass


# ---------------------------------------------------------------- the stream's end


class _CountsJson:
    """Counts the bytes the stream codec hands to ``json.loads``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bytes = 0
        real = json.loads

        def loads(text: bytes | bytearray) -> object:
            self.bytes += len(text)
            return real(text)

        monkeypatch.setattr(stream.json, "loads", loads)


def test_the_end_is_found_once_however_the_device_state_is_cut(
        monkeypatch: pytest.MonkeyPatch) -> None:
    description = {"devices": [{"name": "timer", "instance_id": 0}], "pad": "}" * 5000}
    tail = device_state(description)
    counts = _CountsJson(monkeypatch)
    state = stream.DeviceStateTail(1000)
    for at in range(0, len(tail), 7):  # many pieces, some ending in "}"
        state.feed(tail[at:at + 7])
        assert state.complete() == (at + 7 >= len(tail))
    assert state.finish().description == description
    assert counts.bytes == len(json.dumps(description))  # parsed once, at the end


def test_near_descriptions_cost_no_more_parsing_than_the_bytes_given(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A peer's tail of EOF + VMDESCRIPTION pairs, each claiming a description that
    # ends where a later piece does and is not JSON: every piece completes one.
    pairs, piece = 300, 100
    head = bytes([Kind.SECTION_FULL]) + b"x" * 15
    first = bytearray(head)
    for i in range(pairs):
        end = len(head) + pairs * 6 + piece * (i + 1)
        at = len(first) + 1
        first += bytes([Kind.EOF, Kind.VMDESCRIPTION]) + struct.pack("!I", end - at - 5)
    counts = _CountsJson(monkeypatch)
    state = stream.DeviceStateTail(0)
    state.feed(bytes(first))
    given = len(first)
    for _ in range(pairs):
        state.feed(b"{" * (piece - 1) + b"}")
        given += piece
        assert not state.complete()
    assert counts.bytes <= given + (1 << 20)
    with pytest.raises(StreamError, match=r"VM description at offset \d+: not JSON"):
        state.finish()


def test_a_shifted_error_keeps_its_type_and_fields() -> None:
    error = TruncatedError("ram setup", at=3, reason="ends early", offset=1).shifted(10)
    assert type(error) is TruncatedError
    assert (error.at, error.offset, error.reason) == (13, 11, "ends early")
    assert str(error) == "ram setup at offset 13: ends early"


def test_a_stream_without_configuration_has_no_origin_to_replay() -> None:
    data = small_stream().replace(stream.encode_configuration("pc-i440fx-7.2"), b"", 1)
    decoder, _sink = decode(data)
    with pytest.raises(RemoteProtocolError, match="no configuration section"):
        decoder.origin()
    assert decode(small_stream())[0].origin().machine == "pc-i440fx-7.2"


def test_a_device_name_a_terminal_would_act_on_is_refused() -> None:
    tail = device_state({"devices": [{"name": "\x1b]0;owned\x07", "instance_id": 0}]})
    decoder, _sink = decode(small_stream(tail=tail))
    with pytest.raises(RemoteProtocolError, match=r"the stream's qemu device '\\x1b\]0;owned"):
        decoder.origin()


def test_a_zero_record_hands_its_fill_byte_to_the_sink() -> None:
    # A PART of ZERO records – fill 0x5A for page 2 (the record naming the block),
    # 0x33 and 0 for pages 5 and 6 (a run of CONTINUE records, decoded together) –
    # then an END that writes nothing: the sink is given each record's own fill byte.
    end = stream.encode_section_header(SectionHeader(kind=Kind.SECTION_END, section_id=2))
    head = small_stream()[:small_stream().index(end)]
    zeros = b"".join(ram.page_records("mem", np.array([2, 5, 6]),
                                      np.array([[0x5A], [0x33], [0]], np.uint8),
                                      ram.RamFlag.ZERO, first=True))
    part = stream.encode_section_header(SectionHeader(kind=Kind.SECTION_PART, section_id=2))
    footer = stream.encode_footer(2)
    _decoder, sink = decode(head + part + zeros + ram.encode_eos() + footer + end
                            + ram.encode_eos() + footer + device_state(None))
    mem = sink.memory[0]
    assert (mem[2] == 0x5A).all() and (mem[5] == 0x33).all() and not mem[6].any()


def _setup_of(count: int) -> bytes:
    head = small_stream()
    start = head.index(ram.encode_setup([RamBlockInfo(name="mem", length=8 * PAGE),
                                         RamBlockInfo(name="pc.rom", length=2 * PAGE)]))
    return head[:start] + ram.encode_setup([RamBlockInfo(name=f"rom{i:04d}", length=PAGE)
                                            for i in range(count)])


def test_a_setup_fed_a_byte_at_a_time_is_decoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each block of the list is decoded when its bytes are there, and not again:
    # decoding it all again at every piece made a long setup quadratic, and a
    # key-less listener's peer chooses the pieces.
    data = _setup_of(1000)
    calls = 0
    real = ram.decode_name_untrusted

    def counting(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ram, "decode_name_untrusted", counting)
    sink = Pages()
    decoder = PrecopyDecoder(sink.setup)
    for at in range(len(data)):
        decoder.feed(data[at:at + 1])
    decoder.feed(ram.encode_eos())  # the records begin: the setup is complete
    assert [b.name for b in decoder.blocks] == [f"rom{i:04d}" for i in range(1000)]
    assert calls <= 2 * len(data)  # an attempt per piece, at most: not per block and piece


def test_a_setup_of_more_blocks_than_a_vm_has_is_refused() -> None:
    _refused(_setup_of(ram.MAX_SETUP_BLOCKS + 1) + ram.encode_eos(),
             r"RAM block 1025 at offset \d+: more than 1024 blocks in the ram setup")
