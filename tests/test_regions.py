"""The registration bookkeeping shared by the backends."""

from __future__ import annotations

import pytest
from rdmamig.errors import LocalProtocolError
from rdmamig.regions import RegionTable
from rdmamig.transport import MemoryRegion, RemoteWrite

A = MemoryRegion(addr=0x1000, length=8192, lkey=7, rkey=9)
B = MemoryRegion(addr=0x9000, length=4096, lkey=8, rkey=0)


def write(region: MemoryRegion, offset: int, length: int) -> RemoteWrite:
    return RemoteWrite(region=region, offset=offset, length=length, remote_addr=0, rkey=1)


def test_accounting_follows_adds_and_removes() -> None:
    table: RegionTable[str] = RegionTable()
    table.add(A, "a")
    table.add(B, "b")
    assert (table.pinned, table.pinned_peak) == (12288, 12288)
    assert table.remove(A) == "a"
    assert (table.pinned, table.pinned_peak) == (4096, 12288)
    assert 8 in table and 7 not in table
    assert table.drain() == [(B, "b")] and table.pinned == 0


def test_removing_an_unknown_region_is_refused() -> None:
    table: RegionTable[str] = RegionTable()
    table.add(A, "a")
    with pytest.raises(LocalProtocolError, match="region at 0x9000 is not registered here"):
        table.remove(B)
    impostor = MemoryRegion(addr=0x2000, length=8192, lkey=7, rkey=9)
    with pytest.raises(LocalProtocolError, match="not registered here"):
        table.remove(impostor)


@pytest.mark.parametrize(("offset", "length"), [(-1, 10), (0, 0), (8000, 200), (8192, 1)])
def test_a_write_must_stay_inside_its_local_region(offset: int, length: int) -> None:
    table: RegionTable[str] = RegionTable()
    table.add(A, "a")
    assert table.source_of(write(A, 0, 8192)) == (A, "a")
    with pytest.raises(LocalProtocolError, match=f"offset={offset} length={length} is outside"):
        table.source_of(write(A, offset, length))
    with pytest.raises(LocalProtocolError, match="lkey=0x8 is not registered"):
        table.source_of(write(B, 0, 1))
