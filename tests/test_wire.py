"""The control-message codec: golden vectors, strict errors, a real QEMU capture, fuzz."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rdmamig import ProtocolError, wire
from rdmamig.caps import Capability
from rdmamig.errors import LocalProtocolError, RemoteProtocolError

CAPTURE = Path(__file__).resolve().parent / "data" / "qemu-7.2-rdma-dynamic.jsonl"


def hdr(length: int, command: int, repeat: int = 1) -> str:
    return f"{length:08x}{command:08x}{repeat:08x}00000000"


# Each vector is written out by hand from PROTOCOL.md's layout tables.
GOLDEN = [
    (wire.ErrorMessage(), hdr(0, 1)),
    (wire.Ready(), hdr(0, 2)),
    (wire.QemuFile(data=b"QEVM"), hdr(4, 3) + "5145564d"),
    (wire.RamBlocksRequest(), hdr(0, 4)),
    (wire.RamBlocksResult(blocks=(
        wire.DestBlock(remote_host_addr=0x7F64_54A6_0000, offset=0, length=0x400_0000),
        wire.DestBlock(remote_host_addr=0x7F64_4F40_0000, offset=0x400_0000, length=0x2_0000,
                       remote_rkey=0x1234),
    )), hdr(64, 5)
        + "00007f6454a60000" "0000000000000000" "0000000004000000" "00000000" "00000000"
        + "00007f644f400000" "0000000004000000" "0000000000020000" "00001234" "00000000"),
    (wire.Compress(entries=(
        wire.CompressRange(value=0, block_idx=3, offset=0x1000, length=0x2_0000),)),
     hdr(24, 6) + "00000000" "00000003" "0000000000001000" "0000000000020000"),
    (wire.RegisterRequest(entries=(
        wire.Register(key=0x10_0000, current_index=0, chunks=1),
        wire.Register(key=0x20_0000, current_index=2, chunks=3))),
     hdr(48, 7, 2) + "0000000000100000" "00000000" "00000000" "0000000000000001"
     + "0000000000200000" "00000002" "00000000" "0000000000000003"),
    (wire.RegisterResult(entries=(wire.RegisterKey(rkey=0x8D1, host_addr=0x7F64_54A6_0000),)),
     hdr(16, 8) + "000008d1" "00000000" "00007f6454a60000"),
    (wire.RegisterFinished(), hdr(0, 9)),
    (wire.UnregisterRequest(entries=(wire.Register(key=5, current_index=1, chunks=1),)),
     hdr(24, 10) + "0000000000000005" "00000001" "00000000" "0000000000000001"),
    (wire.UnregisterFinished(), hdr(0, 11)),
]


@pytest.mark.parametrize(("message", "hexbytes"), GOLDEN, ids=lambda v: type(v).__name__)
def test_golden_vectors(message: wire.Message, hexbytes: str) -> None:
    raw = bytes.fromhex(hexbytes)
    assert wire.encode(message) == raw
    assert wire.decode_untrusted(raw) == message


def test_extension_messages_round_trip_only_when_negotiated() -> None:
    hashes = wire.BlockHashes(entries=(wire.BlockHash(block_idx=1, digest=bytes(range(16))),))
    raw = wire.encode(hashes)
    assert raw == bytes.fromhex(hdr(24, 12) + "00000001" "00000000" + bytes(range(16)).hex())
    assert wire.decode_untrusted(raw, extensions=Capability.VERIFY) == hashes
    with pytest.raises(RemoteProtocolError, match=r"type=12 at offset 4: unknown command"):
        wire.decode_untrusted(raw)
    result = wire.VerifyResult(matched=5, mismatched=1)
    assert wire.decode_untrusted(wire.encode(result), extensions=Capability.VERIFY) == result


EVERY_CAPABILITY = (Capability.VERIFY | Capability.INLINE | Capability.AUTH
                    | Capability.COMMIT | Capability.REASONS | Capability.CHUNK_HASHES)

# The extension messages (docs/protocol-extensions.md), written out by hand.
EXTENSION_GOLDEN = [
    (wire.AuthHello(nonce=bytes(range(32))), hdr(32, 15) + bytes(range(32)).hex()),
    (wire.AuthChallenge(nonce=b"\x11" * 32, proof=b"\x22" * 32),
     hdr(64, 16) + "11" * 32 + "22" * 32),
    (wire.AuthProof(proof=b"\x33" * 32), hdr(32, 17) + "33" * 32),
    (wire.Commit(), hdr(0, 18)),
    (wire.CommitResult(committed=True), hdr(8, 19) + "00000001" "00000000"),
    (wire.CommitResult(committed=False, reason="disk full"),
     hdr(17, 19) + "00000000" "00000000" + b"disk full".hex()),
    (wire.ErrorMessage(reason="no"), hdr(2, 1) + "6e6f"),
    (wire.VerifyResult(matched=5, mismatched=1), hdr(8, 13) + "00000005" "00000001"),
    (wire.Pages(entries=(wire.InlinePage(block_idx=1, offset=0x2000, data=b"\xab" * 4096),)),
     hdr(4112, 14) + "00000001" "00000000" "0000000000002000" + "ab" * 4096),
    (wire.ChunkHashes(entries=(
        wire.ChunkHash(block_idx=1, chunk=0x203, digest=bytes(range(16))),
        wire.ChunkHash(block_idx=2, chunk=0, digest=b"\xee" * 16))),
     hdr(48, 20, 2) + "00000001" "00000203" + bytes(range(16)).hex()
     + "00000002" "00000000" + "ee" * 16),
]


@pytest.mark.parametrize(("message", "hexbytes"), EXTENSION_GOLDEN,
                         ids=lambda v: type(v).__name__)
def test_extension_golden_vectors(message: wire.Message, hexbytes: str) -> None:
    raw = bytes.fromhex(hexbytes)
    assert wire.encode(message) == raw
    assert wire.decode_untrusted(raw, extensions=EVERY_CAPABILITY) == message


@pytest.mark.parametrize(("hexbytes", "error"), [
    (hdr(31, 15) + "00" * 31, "len=31 at offset 0: AUTH HELLO is 32 bytes"),
    (hdr(65, 16) + "00" * 65, "len=65 at offset 0: AUTH CHALLENGE is 64 bytes"),
    (hdr(0, 17), "len=0 at offset 0: AUTH PROOF is 32 bytes"),
    (hdr(1, 18) + "00", "len=1 at offset 0: COMMIT carries no data"),
    (hdr(7, 19) + "00" * 7, "len=7 at offset 0: COMMIT RESULT is 8 to 1032 bytes"),
    (hdr(1033, 19) + "00" * 1033, "len=1033 at offset 0: COMMIT RESULT is 8 to 1032 bytes"),
    (hdr(8, 19) + "00000002" "00000000", "committed=2 at offset 16: COMMIT RESULT committed"),
    (hdr(1025, 1) + "61" * 1025, "len=1025 at offset 0: ERROR carries no data, or with "
                                 "REASONS negotiated a reason of at most 1024 bytes"),
    (hdr(7, 13) + "00" * 7, "len=7 at offset 0: VERIFY RESULT is 8 bytes"),
    (hdr(4112, 14, 0) + "00" * 4112, "repeat=0 at offset 8: PAGES needs at least one entry"),
    (hdr(25, 20) + "00" * 25, "len=25 at offset 0: CHUNK HASHES"),
])
def test_extension_messages_are_held_to_their_sizes(hexbytes: str, error: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        wire.decode_untrusted(bytes.fromhex(hexbytes), extensions=EVERY_CAPABILITY)
    assert str(info.value).startswith(error)


@pytest.mark.parametrize("hexbytes", [h for _m, h in EXTENSION_GOLDEN],
                         ids=[type(m).__name__ for m, _h in EXTENSION_GOLDEN])
def test_every_prefix_of_an_extension_message_is_refused(hexbytes: str) -> None:
    raw = bytes.fromhex(hexbytes)
    for end in range(len(raw)):
        with pytest.raises(RemoteProtocolError):
            wire.decode_untrusted(raw[:end], extensions=EVERY_CAPABILITY)


def test_an_error_reason_needs_reasons() -> None:
    raw = wire.encode(wire.ErrorMessage(reason="no"))
    with pytest.raises(RemoteProtocolError, match="len=2 at offset 0: ERROR carries no data"):
        wire.decode_untrusted(raw, extensions=EVERY_CAPABILITY & ~Capability.REASONS)


def test_pages_carry_whole_pages_only_when_inline_was_negotiated() -> None:
    page = wire.InlinePage(block_idx=2, offset=0x3000, data=bytes([9]) * 4096)
    raw = wire.encode(wire.Pages(entries=(page,)))
    assert raw[:16] == bytes.fromhex(hdr(4112, 14))
    assert raw[16:32] == bytes.fromhex("00000002" "00000000" "0000000000003000")
    assert wire.decode_untrusted(raw, extensions=Capability.INLINE) == wire.Pages(
        entries=(page,))
    with pytest.raises(RemoteProtocolError, match=r"type=14 at offset 4: unknown command "
                                                  r"\(INLINE not negotiated\)"):
        wire.decode_untrusted(raw, extensions=Capability.VERIFY)
    two = raw[:8] + struct.pack("!I", 2) + raw[12:]  # repeat says 2, one page follows
    with pytest.raises(RemoteProtocolError, match="PAGES with repeat=2 must be 8224 bytes"):
        wire.decode_untrusted(two, extensions=Capability.INLINE)
    # A page is exactly a page: no silent padding of short data.
    with pytest.raises(ValueError, match="data"):
        wire.InlinePage(block_idx=0, offset=0, data=b"short")
    full = wire.Pages(entries=(page,) * wire.MAX_PAGES)
    assert len(wire.encode(full)) <= wire.MAX_MESSAGE
    with pytest.raises(LocalProtocolError, match="over the"):
        wire.encode(wire.Pages(entries=(page,) * (wire.MAX_PAGES + 1)))


def test_private_data_is_eight_bytes() -> None:
    from rdmamig.caps import PrivateData
    assert PrivateData(version=1, flags=1).encode() == bytes.fromhex("0000000100000001")


@pytest.mark.parametrize(("hexbytes", "error"), [
    ("00000000000000", "message length=7 at offset 0: shorter than the 16-byte header"),
    (hdr(4, 2), "len=4 at offset 0: message carries 0 data bytes"),
    (hdr(4, 2) + "00000000", "len=4 at offset 0: READY carries no data"),
    (hdr(0, 0), "type=0 at offset 4: type 0 (none) is never valid on the wire"),
    (hdr(0, 99), "type=99 at offset 4: unknown command"),
    (hdr(0, 14), "type=14 at offset 4: unknown command"),
    (hdr(24, 6, 4097) + "00" * 24, "repeat=4097 at offset 8: COMPRESS allows at most 4096"),
    (hdr(24, 7, 2) + "00" * 24,
     "len=24 at offset 0: REGISTER REQUEST with repeat=2 must be 48 bytes (24 per entry)"),
    (hdr(16, 8, 0) + "00" * 16, "repeat=0 at offset 8: REGISTER RESULT needs at least one"),
    (hdr(33, 5) + "00" * 33, "len=33 at offset 0: RAM BLOCKS RESULT must be a multiple of 32"),
    (hdr(24, 6) + "00000100" "00000000" + "00" * 16,
     "value=256 at offset 16: COMPRESS value must be a byte value"),
    (hdr(24, 6) + "00000000" "00000000" "ffffffffffff8000" "0000000000010000",
     "length=65536 at offset 32: range at offset 18446744073709518848 wraps"),
    # A block the peer says ends past 2**64: its second entry, so at offset 48.
    (hdr(64, 5) + "0000000000001000" "0000000000000000" "0000000000001000" "00000000" "00000000"
     + "fffffffffffff000" "0000000000001000" "0000000000002000" "00000000" "00000000",
     "remote_host_addr=0xfffffffffffff000 at offset 48: block of 8192 bytes wraps"),
])
def test_malformed_messages_name_field_value_and_offset(hexbytes: str, error: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        wire.decode_untrusted(bytes.fromhex(hexbytes))
    assert str(info.value).startswith(error)


def test_oversized_message_is_refused_before_parsing() -> None:
    raw = bytes.fromhex(hdr(wire.MAX_DATA + 1, 3)) + bytes(wire.MAX_DATA + 1)
    with pytest.raises(RemoteProtocolError,
                       match=r"message length=524289 at offset 0: over the 524288-byte max"):
        wire.decode_untrusted(raw)


def test_repeat_is_ignored_where_it_carries_no_count() -> None:
    # QEMU sends UNREGISTER FINISHED with repeat = chunks unpinned, and QEMU FILE
    # headers with uninitialised repeat and padding before 8.x.
    raw = bytes.fromhex("00000000" "0000000b" "00000007" "00000000")
    assert wire.decode_untrusted(raw) == wire.UnregisterFinished()
    raw = bytes.fromhex("00000002" "00000003" "deadbeef" "cafef00d" "abcd")
    assert wire.decode_untrusted(raw) == wire.QemuFile(data=b"\xab\xcd")
    assert wire.encode(wire.QemuFile(data=b"\xab\xcd")) == bytes.fromhex(hdr(2, 3) + "abcd")


def test_encode_refuses_what_does_not_fit() -> None:
    with pytest.raises(LocalProtocolError, match="must carry 1 to 4096 entries, not 0"):
        wire.encode(wire.Compress(entries=()))
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        wire.encode(wire.RegisterResult(entries=(wire.RegisterKey(rkey=2**32, host_addr=0),)))
    with pytest.raises(LocalProtocolError, match="over the 524272 maximum"):
        wire.encode(wire.QemuFile(data=bytes(wire.MAX_DATA + 1)))


# ------------------------------------------------------------------ a real QEMU run


def _capture() -> list[dict[str, object]]:
    return [json.loads(line) for line in CAPTURE.read_text().splitlines()]


def _zero_padding(raw: bytes) -> bytes:
    """``raw`` with the padding fields zeroed: QEMU 7.2 leaves the Register padding
    uninitialised, and PROTOCOL.md says padding is ignored on receipt."""
    out = bytearray(raw)
    out[12:16] = bytes(4)
    command = struct.unpack_from("!I", raw, 4)[0]
    if command in (wire.Command.REGISTER_REQUEST, wire.Command.UNREGISTER_REQUEST):
        for at in range(16, len(raw), 24):
            out[at + 12:at + 16] = bytes(4)
    return bytes(out)


def test_every_message_of_a_real_qemu_migration_round_trips() -> None:
    messages = [bytes.fromhex(str(r["hex"])) for r in _capture() if r["what"] == "control"]
    assert len(messages) == 433  # the counts of ../captures/README.md
    nonzero_padding = 0
    for raw in messages:
        decoded = wire.decode_untrusted(raw)
        assert wire.encode(decoded) == _zero_padding(raw)
        nonzero_padding += raw != _zero_padding(raw)
    assert nonzero_padding == 68  # every REGISTER REQUEST of QEMU 7.2


def test_capture_ram_blocks_result_lists_six_blocks() -> None:
    result = next(wire.decode_untrusted(bytes.fromhex(str(r["hex"]))) for r in _capture()
                  if r["what"] == "control" and str(r["hex"])[8:16] == "00000005")
    assert isinstance(result, wire.RamBlocksResult)
    assert [b.length for b in result.blocks] == [
        64 << 20, 128 << 10, 256 << 10, 128 << 10, 4096, 4096]


def _capture_requests() -> list[bytes]:
    return [bytes.fromhex(str(r["hex"])) for r in _capture() if r["what"] == "control"
            and str(r["hex"])[8:16] == f"{wire.Command.REGISTER_REQUEST:08x}"]


def test_qemus_register_requests_count_the_chunks_after_the_first() -> None:
    # QEMU 7.2's source asks for one chunk at a time with chunks=0 (its destination
    # pins chunk .. chunk + chunks, inclusive): the capture's every request.
    requests = _capture_requests()
    assert len(requests) == 68
    first = requests[0]
    assert first.hex() == (hdr(24, 7) + "0000000000000000" "00000000" "937f0000"
                           "0000000000000000")
    entries = [e for raw in requests for e in wire.decode_untrusted(raw).entries]
    assert {(e.chunks, e.count) for e in entries} == {(0, 1)}
    # rdmamig asking for the same chunk sends QEMU's bytes (padding aside).
    assert wire.encode(wire.RegisterRequest(entries=(wire.Register.covering(
        key=0, current_index=0, count=1),))) == _zero_padding(first)


def test_a_pair_of_chunks_is_chunks_1_as_qemus_source_computes_it() -> None:
    # qemu_rdma_write_one: chunks = length / 1 MiB, less one for a whole number of
    # chunks; a 2 MiB registration at 3 MiB of block 2 is therefore chunks=1.
    length = 2 * wire.CHUNK_SIZE
    qemu_chunks = length // wire.CHUNK_SIZE - (length % wire.CHUNK_SIZE == 0)
    raw = bytes.fromhex(hdr(24, 7) + "0000000000300000" "00000002" "00000000"
                        "0000000000000001")
    entry = wire.Register.covering(key=0x30_0000, current_index=2, count=2)
    assert entry.chunks == qemu_chunks == 1
    assert wire.encode(wire.RegisterRequest(entries=(entry,))) == raw
    decoded = wire.decode_untrusted(raw)
    assert isinstance(decoded, wire.RegisterRequest) and decoded.entries[0].count == 2
    with pytest.raises(LocalProtocolError, match="at least one chunk, not 0"):
        wire.Register.covering(key=0, current_index=0, count=0)


# ------------------------------------------------------------------ fuzz

_VALID = [raw for _m, hexbytes in GOLDEN for raw in [bytes.fromhex(hexbytes)]]
EVERY_EXTENSION = Capability.VERIFY | Capability.INLINE


def _decode_or_protocol_error(data: bytes) -> None:
    try:
        message = wire.decode_untrusted(data, extensions=EVERY_EXTENSION)
    except ProtocolError:
        return
    # Whatever parses must re-encode to the same bytes, padding and repeat aside.
    again = wire.encode(message)
    assert wire.decode_untrusted(again, extensions=EVERY_EXTENSION) == message


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_parse_or_raise_protocol_error(data: bytes) -> None:
    _decode_or_protocol_error(data)


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(_VALID), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)),
                                         max_size=8), st.integers(0, 200))
def test_mutated_messages_parse_or_raise_protocol_error(
        raw: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(raw)
    for at, value in flips:
        if at < len(data):
            data[at] = value
    _decode_or_protocol_error(bytes(data))
    _decode_or_protocol_error(bytes(data[:cut]))


@pytest.mark.parametrize("raw", _VALID, ids=range(len(_VALID)))
def test_every_prefix_of_a_valid_message_is_refused_cleanly(raw: bytes) -> None:
    for end in range(len(raw)):
        with pytest.raises(RemoteProtocolError):
            wire.decode_untrusted(raw[:end])


@settings(max_examples=500, deadline=None)
@given(st.integers(1, 2**32 - 1), st.sampled_from(list(wire.Command)),
       st.integers(0, 2**32 - 1))
def test_header_fields_of_any_value_never_escape(length: int, command: int,
                                                 repeat: int) -> None:
    data = struct.pack("!IIII", length, command, repeat, 0) + bytes(min(length, 600))
    _decode_or_protocol_error(data)
