"""Finding the pages another process writes (rdmamig.tracking): the process held
still while its bits are read, its mappings found by inode, the rules that decide
when soft-dirty bits can be trusted, and the fall back to checksums when the
process stops being trackable. The soft-dirty migration itself runs in the
soft-RoCE guest, whose kernel keeps the bits (tests/rxe/softdirty_check.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from rdmamig import tracking
from rdmamig.memory import RamBlock
from rdmamig.tracking import (
    Mapping,
    SoftDirtyTracker,
    choose_tracker,
    kernel_keeps_soft_dirty,
    shared_mappings,
    soft_dirty_refusal,
)
from rdmamig.workload import PausedProcess

MiB = 1 << 20
PAGE = 4096
SHM = Path("/dev/shm")

#: Maps its argv files shared (argv[2:] as "PATH@OFFSET+LENGTH"), says so on stdout,
#: then writes a counter into the first page of each mapping from two threads
#: until stdin closes; "unmap" on stdin unmaps them.
MAPPER = textwrap.dedent("""
    import mmap, os, sys, threading
    maps = []
    for spec in sys.argv[1:]:
        path, _, rest = spec.partition("@")
        offset, _, length = rest.partition("+")
        fd = os.open(path, os.O_RDWR)
        maps.append(mmap.mmap(fd, int(length), offset=int(offset)))
        os.close(fd)
    private = mmap.mmap(os.open(sys.argv[1].partition("@")[0], os.O_RDONLY), 4096,
                        flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    def write():
        n = 0
        while maps:
            for m in list(maps):
                try:
                    m[0:8] = n.to_bytes(8, "little")
                except ValueError:
                    pass
            n += 1
    for _ in range(2):
        threading.Thread(target=write, daemon=True).start()
    print("mapped", flush=True)
    for line in sys.stdin:
        if line.strip() == "unmap":
            held, maps[:] = list(maps), []
            for m in held:
                m.close()
            print("unmapped", flush=True)
""")


@pytest.fixture
def shm_file() -> Iterator[Path]:
    path = SHM / f"rdmamig-test-{os.getpid()}-{time.monotonic_ns()}"
    with open(path, "wb") as f:
        f.write(os.urandom(4 * MiB))
    yield path
    path.unlink(missing_ok=True)


def _mapper(*specs: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", MAPPER, *specs], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "mapped"
    return process


def _states(pid: int) -> set[str]:
    return {Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()[0]
            for task in os.listdir(f"/proc/{pid}/task")}


@pytest.fixture
def mapper(shm_file: Path) -> Iterator[subprocess.Popen[str]]:
    process = _mapper(f"{shm_file}@0+{4 * MiB}")
    yield process
    process.kill()
    process.wait()


def test_a_stop_returns_once_every_thread_has_stopped(mapper: subprocess.Popen[str]) -> None:
    paused = PausedProcess(mapper.pid)
    paused.stop()
    assert _states(mapper.pid) == {"T"}  # three threads
    assert len(os.listdir(f"/proc/{mapper.pid}/task")) == 3
    with paused.held():  # stopped for stop-and-copy: a sync leaves it stopped
        pass
    assert _states(mapper.pid) == {"T"}
    paused.resume()
    time.sleep(0.05)
    assert "T" not in _states(mapper.pid)
    with paused.held():
        assert _states(mapper.pid) == {"T"}
    time.sleep(0.05)
    assert "T" not in _states(mapper.pid)


def test_a_process_gone_is_not_resumed_and_not_stoppable(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    paused = PausedProcess(gone.pid)
    paused.resume()  # never stopped here: nothing to do, no error
    with pytest.raises(Exception, match=f"process {gone.pid} .* is gone"):
        paused.stop()


def test_shared_mappings_are_found_by_inode_at_their_offsets(shm_file: Path) -> None:
    link = shm_file.with_name(shm_file.name + "-link")
    os.link(shm_file, link)
    try:
        process = _mapper(f"{link}@0+{MiB}", f"{shm_file}@{2 * MiB}+{MiB}")
        try:
            found = shared_mappings(process.pid, shm_file)
        finally:
            process.kill()
            process.wait()
    finally:
        link.unlink()
    # Both shared mappings, by either name; not the private one.
    assert sorted(m.offset for m in found) == [0, 2 * MiB]
    assert all(m.high - m.low == MiB for m in found)
    assert all(isinstance(m, Mapping) for m in found)


@pytest.mark.skipif(kernel_keeps_soft_dirty(), reason="this kernel keeps soft-dirty bits")
def test_a_kernel_without_soft_dirty_gets_checksums_and_says_why(
        shm_file: Path, mapper: subprocess.Popen[str]) -> None:
    block = RamBlock.from_file("mem", shm_file)
    tracker = choose_tracker(block, shm_file, PausedProcess(mapper.pid))
    assert tracker.method == "checksum (this kernel keeps no soft-dirty bits " \
                             "(CONFIG_MEM_SOFT_DIRTY))"
    with pytest.raises(Exception, match="--tracker soft-dirty for block mem: this kernel"):
        choose_tracker(block, shm_file, PausedProcess(mapper.pid), wanted="soft-dirty")


@pytest.fixture
def soft_dirty_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rules below the kernel's, on any kernel."""
    monkeypatch.setattr(tracking, "kernel_keeps_soft_dirty", lambda: True)
    monkeypatch.setattr(tracking, "_swap_in_use", lambda: False)


@pytest.mark.usefixtures("soft_dirty_kernel")
def test_soft_dirty_is_trusted_only_where_nothing_drops_the_bits(
        tmp_path: Path, shm_file: Path, mapper: subprocess.Popen[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    on_disk = Path(__file__)
    if tracking._tmpfs_options(on_disk) is None:
        assert "is not on tmpfs" in str(soft_dirty_refusal(on_disk, mapper.pid))
    assert soft_dirty_refusal(shm_file, mapper.pid) is None
    # Its writes are the only ones seen: another process mapping the file forbids it.
    other = _mapper(f"{shm_file}@0+{MiB}")
    try:
        assert f"process(es) {other.pid} map" in str(soft_dirty_refusal(shm_file, mapper.pid))
    finally:
        other.kill()
        other.wait()
    # A process that does not map the file has nothing to show.
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert "does not map" in str(soft_dirty_refusal(shm_file, idle.pid))
    finally:
        idle.kill()
        idle.wait()
    monkeypatch.setattr(tracking, "_swap_in_use", lambda: True)
    assert "swap is on" in str(soft_dirty_refusal(shm_file, mapper.pid))


def test_tmpfs_huge_pages_are_read_from_the_mount(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text("tmpfs /dev/shm tmpfs rw,nosuid,huge=always 0 0\n"
                      "tmpfs /dev/shm/my\\040vm tmpfs rw,size=1g 0 0\n"
                      "/dev/sda1 / ext4 rw 0 0\n")
    real_open = open

    def fake_open(path: object, *args: object, **kwargs: object) -> object:
        return real_open(mounts if path == "/proc/self/mounts" else path,  # type: ignore
                         *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    assert tracking._tmpfs_options(Path("/dev/shm/vm.ram")) == {
        "rw": "", "nosuid": "", "huge": "always"}
    assert tracking._tmpfs_options(Path("/dev/shm/my vm/ram"))["size"] == "1g"
    assert tracking._tmpfs_options(Path("/var/lib/vm.ram")) is None


def _tracker(shm_file: Path, pid: int) -> tuple[SoftDirtyTracker, RamBlock]:
    block = RamBlock.from_file("mem", shm_file)
    block.take_dirty()
    return SoftDirtyTracker(block, shm_file, PausedProcess(pid)), block


def test_a_process_that_unmaps_the_block_makes_it_all_dirty_then_checksummed(
        shm_file: Path, mapper: subprocess.Popen[str]) -> None:
    tracker, block = _tracker(shm_file, mapper.pid)
    assert tracker.method == "soft-dirty"
    assert mapper.stdin is not None and mapper.stdout is not None
    mapper.stdin.write("unmap\n")
    mapper.stdin.flush()
    assert mapper.stdout.readline().strip() == "unmapped"
    # Whatever it wrote before unmapping is unknown now: every page is dirty.
    assert tracker.scan() == block.pages
    assert block.take_dirty().all()
    assert tracker.method.startswith("checksum (soft-dirty until process ")
    # From now on checksums find the writes of anyone.
    with open(shm_file, "r+b") as f:
        f.seek(3 * PAGE)
        f.write(b"changed")
    assert tracker.scan() == 1
    assert np.flatnonzero(block.take_dirty()).tolist() == [3]


def test_a_process_that_exits_makes_the_block_all_dirty(
        shm_file: Path, mapper: subprocess.Popen[str]) -> None:
    tracker, block = _tracker(shm_file, mapper.pid)
    mapper.kill()
    mapper.wait()
    assert tracker.scan() == block.pages
    assert block.take_dirty().all()
    assert "cannot be tracked any more" in tracker.method or "unmapped" in tracker.method


def test_send_live_reports_its_tracker_and_refuses_a_bad_choice(
        tmp_path: Path, shm_file: Path, mapper: subprocess.Popen[str]) -> None:
    rdmamig = [sys.executable, "-m", "rdmamig"]
    listener = subprocess.Popen([*rdmamig, "listen", "127.0.0.1:0", "--once", "--into",
                                 str(tmp_path / "image"), "--quiet"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    assert listener.stdout is not None
    port = listener.stdout.readline().rsplit(":", 1)[1].strip()
    report = tmp_path / "report.json"
    sent = subprocess.run([*rdmamig, "-v", "send", f"127.0.0.1:{port}", "--block",
                           f"mem={shm_file}", "--live", "--pause-pid", str(mapper.pid),
                           "--report", str(report)],
                          capture_output=True, text=True, timeout=120)
    listener.communicate(timeout=60)
    assert sent.returncode == 0, sent.stderr
    method = json.loads(report.read_text())["dirty_tracking"]["mem"]
    expected = "soft-dirty" if kernel_keeps_soft_dirty() else "checksum (this kernel"
    assert method.startswith(expected)
    assert "block mem:" in sent.stderr  # -v says which and why
    assert "T" not in _states(mapper.pid)  # running again
    wrong = subprocess.run([*rdmamig, "send", "127.0.0.1:1", "--block", f"mem={shm_file}",
                            "--tracker", "checksum"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "--tracker is for --live" in wrong.stderr


def test_a_stop_that_times_out_leaves_the_process_running(
        mapper: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import rdmamig.workload

    monkeypatch.setattr(rdmamig.workload, "_has_stopped", lambda pid: False)
    paused = PausedProcess(mapper.pid)
    paused.STOP_TIMEOUT = 0.05
    with pytest.raises(Exception, match="did not stop within"), paused.held():
        pass
    time.sleep(0.05)
    assert "T" not in _states(mapper.pid)
