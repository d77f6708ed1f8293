"""Capability negotiation (PROTOCOL.md, "Connection setup")."""

from __future__ import annotations

import pytest
from rdmamig import caps
from rdmamig.caps import Capability, PrivateData
from rdmamig.errors import RemoteProtocolError


def test_destination_grants_the_supported_subset() -> None:
    request = PrivateData(version=1, flags=Capability.PIN_ALL | Capability.BATCH)
    reply = caps.accept(request, supported=Capability.PIN_ALL)
    assert reply == PrivateData(version=1, flags=Capability.PIN_ALL)


def test_unknown_flags_are_cleared_not_an_error() -> None:
    reply = caps.accept(PrivateData(version=1, flags=0xFFFF_FFFF), supported=Capability.PIN_ALL)
    assert reply.flags == Capability.PIN_ALL


def test_a_flag_the_destination_clears_is_off_on_the_source() -> None:
    assert caps.confirm(Capability.PIN_ALL | Capability.VERIFY,
                        PrivateData(version=1, flags=Capability.VERIFY)) == Capability.VERIFY


def test_source_ignores_flags_it_never_asked_for() -> None:
    assert caps.confirm(Capability(0), PrivateData(version=1, flags=0xFFFF_FFFF)) == 0


def test_newer_version_negotiates_down() -> None:
    reply = caps.accept(PrivateData(version=7, flags=0x8000_0001), supported=Capability.PIN_ALL)
    assert reply == PrivateData(version=1, flags=Capability.PIN_ALL)
    assert caps.confirm(Capability.PIN_ALL, PrivateData(version=9, flags=1)) == 1


def test_invalid_version_is_refused_clearly() -> None:
    with pytest.raises(RemoteProtocolError,
                       match=r"invalid protocol version: version=0 at offset 0"):
        caps.accept(PrivateData(version=0, flags=0), supported=Capability.PIN_ALL)


def test_short_private_data_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="private data is too short: 5 bytes"):
        PrivateData.decode_untrusted(b"\0" * 5)


def test_rdma_cm_padding_after_the_block_is_ignored() -> None:
    raw = bytes.fromhex("0000000100000001") + bytes(48)
    assert PrivateData.decode_untrusted(raw) == PrivateData(version=1, flags=1)
