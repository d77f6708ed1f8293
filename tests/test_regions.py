"""The registration bookkeeping shared by the backends."""

from __future__ import annotations

import errno
import resource
import subprocess
import sys

import pytest
from rdmamig import pinning
from rdmamig.errors import LocalProtocolError, MemlockLimitError
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


def test_enomem_within_the_memlock_limit_says_memory_is_short() -> None:
    # This process may lock without limit (root's CAP_IPC_LOCK here, or an
    # unlimited RLIMIT_MEMLOCK): ENOMEM then means the machine is short of memory.
    if pinning.memlock_applies() and pinning.memlock_limit() != resource.RLIM_INFINITY:
        pytest.skip("RLIMIT_MEMLOCK binds this process")
    error = pinning.pin_refused(errno.ENOMEM, 1 << 20, "mlock")
    assert not isinstance(error, MemlockLimitError)
    assert "not because of RLIMIT_MEMLOCK" in str(error)
    assert "short of memory" in str(error)


def test_a_pin_over_a_binding_memlock_limit_blames_the_limit() -> None:
    script = ("import errno; from rdmamig import pinning; "
              "print(type(pinning.pin_refused(errno.ENOMEM, 64 << 20, 'mlock')).__name__)")
    out = subprocess.run(["setpriv", "--bounding-set", "-ipc_lock", "--inh-caps", "-ipc_lock",
                          "prlimit", "--memlock=8388608:8388608", sys.executable, "-c", script],
                         capture_output=True, text=True, timeout=60)
    if out.returncode and "setpriv" in out.stderr:
        pytest.skip(f"cannot drop CAP_IPC_LOCK here: {out.stderr.strip()}")
    assert out.stdout.strip() == "MemlockLimitError", out.stderr
