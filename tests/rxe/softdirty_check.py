"""In the soft-RoCE guest, whose kernel keeps soft-dirty bits: another process's
writes to a ``/dev/shm`` block are found by the kernel's bits, not by hashing.

    python tests/rxe/softdirty_check.py check HOST
        Passes in which a writer rewrites random pages: every page whose content
        changed (checksums) is among those soft-dirty found. Then a live
        ``send --live --pause-pid`` over verbs with the writer running verifies,
        and its report says soft-dirty found the writes.
    python tests/rxe/softdirty_check.py bench HOST
        The cost of one pass of each tracker, a 512 MiB block of which the writer
        rewrites 1 % between passes (a benchmark line: it fails nothing).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
from rdmamig.memory import ChecksumTracker, RamBlock
from rdmamig.tracking import SoftDirtyTracker, choose_tracker, kernel_keeps_soft_dirty
from rdmamig.workload import PausedProcess

RDMAMIG = [sys.executable, "-m", "rdmamig"]
PORT = 18531
MiB = 1 << 20
PAGE = 4096

#: Maps argv[1] shared. "N" on stdin: rewrite N random pages, answer "done".
#: "run N": rewrite N random pages every 10 ms until killed.
WRITER = textwrap.dedent("""
    import mmap, os, random, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR)
    m = mmap.mmap(fd, 0)
    pages = len(m) // 4096
    print("mapped", flush=True)
    for line in sys.stdin:
        word = line.split()
        if word[0] == "run":
            while True:
                for _ in range(int(word[1])):
                    at = random.randrange(pages) * 4096
                    m[at:at + 4096] = os.urandom(4096)
                time.sleep(0.01)
        for _ in range(int(word[0])):
            at = random.randrange(pages) * 4096
            m[at:at + 4096] = os.urandom(4096)
        print("done", flush=True)
""")


def check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"FAILED: {what}")


def writer(path: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    check(process.stdout.readline().strip() == "mapped", "the writer did not start")
    return process


def rewrite(process: subprocess.Popen[str], pages: int) -> None:
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(f"{pages}\n")
    process.stdin.flush()
    check(process.stdout.readline().strip() == "done", "the writer stopped answering")


def block_file(work: Path, size: int, name: str = "mem.bin") -> Path:
    path = work / name
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    return path


def passes(path: Path, process: subprocess.Popen[str], count: int, rewritten: int
           ) -> list[tuple[float, float, int]]:
    """(soft-dirty seconds, checksum seconds, pages changed) of ``count`` passes,
    each after the writer rewrote ``rewritten`` pages. Fails if soft-dirty misses
    a page whose content changed."""
    soft_block, sum_block = RamBlock.from_file("soft", path), RamBlock.from_file("sums", path)
    soft = SoftDirtyTracker(soft_block, path, PausedProcess(process.pid))
    sums = ChecksumTracker(sum_block)
    soft_block.take_dirty()
    sum_block.take_dirty()
    figures = []
    for number in range(count):
        rewrite(process, rewritten)
        started = time.perf_counter()
        soft.scan()
        middle = time.perf_counter()
        sums.scan()
        ended = time.perf_counter()
        found, changed = soft_block.take_dirty(), sum_block.take_dirty()
        missed = np.flatnonzero(changed & ~found)
        check(not len(missed), f"pass {number}: soft-dirty missed {len(missed)} written "
                               f"page(s), the first {missed[:5].tolist()}")
        check(soft.method == "soft-dirty", f"the tracker fell back: {soft.method}")
        figures.append((middle - started, ended - middle, int(changed.sum())))
    return figures


def live_migration(host: str, work: Path) -> str:
    # A file of its own: the passes' blocks still map theirs, and a second process
    # mapping the block rules soft-dirty out.
    path = block_file(work, 64 * MiB, "live.bin")
    process = writer(path)
    assert process.stdin is not None
    process.stdin.write("run 16\n")
    process.stdin.flush()
    try:
        report = work / "report.json"
        listener = subprocess.Popen(
            [*RDMAMIG, "listen", f"{host}:{PORT}", "--backend", "verbs", "--once", "--into",
             str(work / "image"), "--quiet", "--timeout", "120"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert listener.stdout is not None
        line = listener.stdout.readline()
        check(line.startswith("listening on"), f"listen did not start: {line!r}")
        sent = subprocess.run(
            [*RDMAMIG, "-v", "send", f"{host}:{PORT}", "--backend", "verbs", "--block",
             f"mem={path}", "--live", "--pause-pid", str(process.pid), "--tracker",
             "soft-dirty", "--max-downtime", "0", "--max-iterations", "4", "--timeout", "120",
             "--report", str(report)], capture_output=True, text=True, timeout=900)
        _out, err = listener.communicate(timeout=120)
        check(sent.returncode == 0, f"send failed: {sent.stderr[-2000:]}")
        check(listener.returncode == 0, f"listen exited {listener.returncode}: {err}")
        r = json.loads(report.read_text())
        check(r["verified"], "the live migration did not verify")
        check(r["dirty_tracking"] == {"mem": "soft-dirty"}, f"tracking: {r['dirty_tracking']}")
        check(r["iterations"] == 5, f"{r['iterations']} passes, not 4 live and the last")
        check(Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
              != "T", "the writer was left stopped")
        return (f"live send verified, {r['iterations']} passes, downtime "
                f"{r['downtime_ms']:.0f} ms")
    finally:
        process.kill()
        process.wait()


def main() -> None:
    mode, host = sys.argv[1], sys.argv[2]
    check(kernel_keeps_soft_dirty(), "this guest's kernel keeps no soft-dirty bits")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        work = Path(tmp)
        size = 64 * MiB if mode == "check" else 512 * MiB
        path = block_file(work, size)
        process = writer(path)
        try:
            refusal = choose_tracker(RamBlock.from_file("mem", path), path,
                                     PausedProcess(process.pid)).method
            check(refusal == "soft-dirty", f"auto chose {refusal}")
            pages = size // PAGE
            figures = passes(path, process, 5 if mode == "check" else 7, pages // 100)
        finally:
            process.kill()
            process.wait()
        soft = statistics.median(f[0] for f in figures)
        sums = statistics.median(f[1] for f in figures)
        line = (f"{size // MiB} MiB, 1 % rewritten per pass: soft-dirty {1000 * soft:.1f} ms, "
                f"checksum {1000 * sums:.0f} ms per pass ({sums / soft:.0f}x)")
        if mode == "check":
            line = f"{live_migration(host, work)}; {line}"
        print(f"PASS: {line}" if mode == "check" else line)


if __name__ == "__main__":
    main()
