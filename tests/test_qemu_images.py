"""Migration images against a real QEMU (``qemu-system-x86_64``, TCG): what QEMU
saves imports, what rdmamig exports loads, and a running guest carries on."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from kernelmem import allocated, sparse_file
from qemuvm import REQUIRE_ENV, Guest, need_qemu
from rdmamig.memory import content_digest

MiB = 1 << 20
RDMAMIG = [sys.executable, "-m", "rdmamig"]
RXE = Path(__file__).parent / "rxe"
#: The guest's init: a counter on the serial console, and memory it keeps changing.
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t devtmpfs dev /dev
mount -t tmpfs tmpfs /tmp
i=0
while true; do
  i=$((i + 1))
  echo "rdmamig-tick $i" > /dev/ttyS0
  dd if=/dev/urandom of=/tmp/churn bs=64k count=8 2>/dev/null
  usleep 100000
done
"""


def rdmamig(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RDMAMIG, *args], capture_output=True, text=True, timeout=300)


def save(guest: Guest, stream: Path) -> dict[str, object]:
    guest.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30})
    guest.cmd("migrate", uri=f"exec:cat > {stream}")
    info = guest.wait_migration()
    assert info["status"] == "completed", info
    return info


def import_and_export(stream: Path, image: Path, out: Path) -> None:
    done = rdmamig("image", "import", str(stream), str(image))
    assert done.returncode == 0, done.stderr
    done = rdmamig("image", "export", str(image), str(out))
    assert done.returncode == 0, done.stderr


def mem_digest(image: Path) -> str:
    info = json.loads(rdmamig("image", "info", str(image), "--json").stdout)
    return next(b["digest"] for b in info["blocks"] if b["name"] == "mem")


@pytest.fixture
def guests() -> Iterator[list[Guest]]:
    started: list[Guest] = []
    yield started
    for guest in started:
        guest.close()


def test_a_paused_guest_goes_through_an_image_byte_identical(
        tmp_path: Path, guests: list[Guest]) -> None:
    need_qemu()
    a = Guest(tmp_path, "a", ram=64 * MiB, paused=True, random_ram=True)
    guests.append(a)
    stream, image, out = tmp_path / "saved", tmp_path / "image", tmp_path / "exported"
    save(a, stream)
    import_and_export(stream, image, out)
    # The source is paused after completion: its RAM is what the image holds.
    assert mem_digest(image) == content_digest(a.ram_bytes()).hex()
    info = json.loads(rdmamig("image", "info", str(image), "--json").stdout)
    assert info["origin"] == "qemu" and info["machine"].startswith("pc-i440fx-")
    assert "cpu/0" in info["devices"] and "timer/0" in info["devices"]
    b = Guest(tmp_path, "b", ram=64 * MiB, incoming=f"exec:cat {out}")
    guests.append(b)
    assert b.wait_migration()["status"] == "completed"
    assert b.ram_bytes() == a.ram_bytes()


def test_memory_a_guest_never_touched_stays_unallocated_through_an_image(
        tmp_path: Path, guests: list[Guest]) -> None:
    # A 256 MiB guest that holds data in four 4 MiB extents, holes elsewhere.
    need_qemu()
    ram, extents = 256 * MiB, {i * 64 * MiB + 8 * MiB: os.urandom(4 * MiB) for i in range(4)}
    ram_file = Path("/dev/shm") / f"rdmamig-test-{os.getpid()}-sparse.ram"
    sparse_file(ram_file, ram, extents)
    content = ram_file.read_bytes()
    try:
        a = Guest(tmp_path, "a", ram=ram, paused=True, ram_path=ram_file)
        guests.append(a)
        stream, image, out = tmp_path / "saved", tmp_path / "image", tmp_path / "exported"
        save(a, stream)
    finally:
        ram_file.unlink()
    import_and_export(stream, image, out)
    # The image holds what the guest used: QEMU's ZERO records stay holes.
    from rdmamig.image import open_image
    manifest = open_image(image).manifest
    mem = next(block for block in manifest.blocks if block.name == "mem")
    used = sum(map(len, extents.values()))
    assert used <= allocated(image / mem.file) <= used + used // 100
    # A QEMU with anonymous RAM, as most run, loads rdmamig's export with no more
    # resident than from QEMU's own stream of the same guest: neither touches a
    # page the guest never wrote.
    resident = {}
    for name, saved in (("qemu", stream), ("rdmamig", out)):
        b = Guest(tmp_path, f"b-{name}", ram=ram, incoming=f"exec:cat {saved}",
                  anonymous=True)
        guests.append(b)
        assert b.wait_migration()["status"] == "completed"
        resident[name] = b.resident_anonymous()
        # pmemsave reads guest-physical memory: below 1 MiB lie the VGA and BIOS.
        assert b.ram_bytes()[MiB:] == content[MiB:]
    # QEMU's own anonymous memory varies by a few MiB between runs (5 MiB seen); a
    # guest's never-touched RAM faulted in would be 240 MiB.
    assert resident["rdmamig"] <= resident["qemu"] + 16 * MiB, resident
    assert resident["rdmamig"] < used + 64 * MiB < ram, resident


@pytest.fixture(scope="module")
def linux() -> Iterator[tuple[Path, Path]]:
    """Debian's kernel (fetched as the soft-RoCE harness fetches it) and a busybox
    initramfs whose init is :data:`INIT`."""
    need_qemu()
    busybox = shutil.which("busybox")
    if busybox is None or shutil.which("cpio") is None:
        message = "busybox (busybox-static) and cpio are needed to build the guest"
        if __import__("os").environ.get(REQUIRE_ENV):
            pytest.fail(message)
        pytest.skip(message)
    sys.path.insert(0, str(RXE))
    import harness  # tests/rxe/harness.py

    cache = Path("/var/tmp/rdmamig-rxe")
    cache.mkdir(parents=True, exist_ok=True)
    kernel, _root, _version = harness.fetch_kernel(cache)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for sub in ("bin", "proc", "dev", "tmp"):
            (root / sub).mkdir()
        shutil.copy(busybox, root / "bin" / "busybox")
        (root / "init").write_text(INIT)
        (root / "init").chmod(0o755)
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        archive = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=files, cwd=root,
                                 capture_output=True, check=True).stdout
        initrd = Path(tmp).parent / f"rdmamig-ticks-{__import__('os').getpid()}.cpio"
        initrd.write_bytes(archive)
    yield kernel, initrd
    initrd.unlink(missing_ok=True)


def ticks(console: str) -> list[int]:
    return [int(n) for n in re.findall(r"rdmamig-tick (\d+)", console)]


def test_a_running_guest_migrates_through_an_image_and_carries_on(
        tmp_path: Path, guests: list[Guest], linux: tuple[Path, Path]) -> None:
    kernel, initrd = linux
    a = Guest(tmp_path, "a", ram=128 * MiB, kernel=kernel, initrd=initrd)
    guests.append(a)
    a.wait_console("rdmamig-tick 5")
    stream, image, out = tmp_path / "saved", tmp_path / "image", tmp_path / "exported"
    info = save(a, stream)  # while the guest runs and writes its memory
    assert a.cmd("query-status")["status"] == "postmigrate"
    assert info["ram"]["dirty-sync-count"] >= 2  # it iterated: the memory changed
    last = ticks(a.console_text())[-1]
    import_and_export(stream, image, out)
    assert mem_digest(image) == content_digest(a.ram_bytes()).hex()
    b = Guest(tmp_path, "b", ram=128 * MiB, kernel=kernel, initrd=initrd,
              incoming=f"exec:cat {out}")
    guests.append(b)
    assert b.wait_migration()["status"] == "completed"
    b.cmd("cont")
    b.wait_console(f"rdmamig-tick {last + 5}", timeout=120)
    carried = ticks(b.console_text())
    # B goes on from where A stopped: no reboot, no gap.
    assert carried[0] in (last, last + 1), (last, carried[:5])
    assert carried == list(range(carried[0], carried[0] + len(carried)))
