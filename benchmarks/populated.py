"""Populated memory only: a large block of which a little holds data, against a
block that holds only that data, in one run.

Two ways in, each as its own processes on loopback:

* ``file``: ``rdmamig send --block ram=FILE`` of a tmpfs file (``/dev/shm``, as a
  VM's memory backend) into ``rdmamig listen --once --into IMAGE``;
* ``anon``: the library's ``send`` of an anonymous numpy buffer (never touched
  outside the written extents) into ``receive_into`` another one.

For each: the sparse case (``--total`` with ``--populated`` in ``--extents``
extents, holes between) and the dense one (a block of ``--populated``, all written).
Reported per case, medians of ``--repeat`` rounds: the source's time, how much its
resident memory grew during the migration, the source file's allocated bytes
after, the destination's (image file or resident buffer), pinned peaks on both
sides. ``--baseline DIR`` runs the sparse file case with that checkout's sources
too (``git worktree add /tmp/base REV``).

    python benchmarks/populated.py [--total 4GiB] [--populated 512MiB] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

MiB = 1 << 20


def parse_size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(text[:-len(suffix)]) * factor
    return int(text)


def environment(tree: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(str(tree / part) for part in (
            "core", "plugins/tcp_fallback", "plugins/policies", "plugins/verbs"))
    return env


def extents(total: int, populated: int, count: int) -> list[tuple[int, int]]:
    """``count`` equal extents of data spread evenly over ``total`` bytes."""
    size = populated // count
    return [(i * (total // count), size) for i in range(count)]


def write_file(path: Path, total: int, data: list[tuple[int, int]]) -> None:
    pattern = os.urandom(MiB)
    with open(path, "wb") as f:
        f.truncate(total)
        for offset, size in data:
            f.seek(offset)
            for _ in range(size // MiB):
                f.write(pattern)


def run_measured(command: list[str], env: dict[str, str]) -> tuple[int, int]:
    """Run ``command``; its exit status and peak resident memory (bytes)."""
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    if status:
        raise SystemExit(f"{command[2:4]} failed: {child.stderr.read().decode()[-2000:]}"
                         if child.stderr else "failed")
    return status, usage.ru_maxrss * 1024


def file_case(total: int, data: list[tuple[int, int]], tree: Path | None) -> dict[str, float]:
    env = environment(tree)
    # Images on tmpfs too: a disk's writeback of earlier rounds is not what is measured.
    work = Path(tempfile.mkdtemp(prefix="rdmamig-populated-", dir="/dev/shm"))
    block = Path(tempfile.mktemp(prefix="rdmamig-populated-", dir="/dev/shm"))
    try:
        write_file(block, total, data)
        listener = subprocess.Popen(
            [sys.executable, "-m", "rdmamig", "listen", "127.0.0.1:0", "--once", "--into",
             str(work / "image"), "--quiet"], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True)
        assert listener.stdout is not None
        port = next(line for line in listener.stdout
                    if line.startswith("listening on")).rsplit(":", 1)[1].strip()
        report = work / "report.json"
        _, rss = run_measured([sys.executable, "-m", "rdmamig", "send", f"127.0.0.1:{port}",
                               "--block", f"ram={block}", "--quiet", "--report",
                               str(report)], env)
        listener.wait(120)
        result = json.loads(report.read_text())
        image = work / "image" / "blocks" / "0000.ram"
        return {"seconds": result["total_time_s"], "source rss MiB": rss / MiB,
                "source allocated MiB": os.stat(block).st_blocks * 512 / MiB,
                "destination allocated MiB": os.stat(image).st_blocks * 512 / MiB,
                "source pinned peak MiB": result["pinned_peak_bytes_source"] / MiB,
                "destination pinned peak MiB": result["peer_pinned_peak_bytes"] / MiB}
    finally:
        block.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


ANON_SIDE = textwrap.dedent("""
    import json, os, resource, sys
    import numpy as np
    import rdmamig
    role, address, total, spans = sys.argv[1:5]
    total, spans = int(total), json.loads(spans)
    buffer = np.zeros(total, dtype=np.uint8)  # its own mapping, untouched
    if role == "send":
        pattern = np.frombuffer(os.urandom(1 << 20), dtype=np.uint8)
        for offset, size in spans:
            buffer[offset:offset + size].reshape(-1, 1 << 20)[:] = pattern
    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))
    before = rss()
    if role == "send":
        result = rdmamig.send(address, {"ram": buffer})
        out = {"seconds": result.total_time_s, "pinned": result.pinned_peak_bytes}
    else:
        result = rdmamig.receive_into(address, {"ram": buffer},
                                      announce=lambda port: print(port, flush=True))
        out = {"pinned": result.pinned_peak_bytes}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.update(before=before, peak=peak, after=rss())
    print(json.dumps(out), flush=True)
""")


def anon_case(total: int, data: list[tuple[int, int]]) -> dict[str, float]:
    spans = json.dumps(data)
    receiver = subprocess.Popen([sys.executable, "-c", ANON_SIDE, "receive", "127.0.0.1:0",
                                 str(total), spans], stdout=subprocess.PIPE, text=True)
    assert receiver.stdout is not None
    port = receiver.stdout.readline().strip()
    sent = subprocess.run([sys.executable, "-c", ANON_SIDE, "send", f"127.0.0.1:{port}",
                           str(total), spans], capture_output=True, text=True, check=True)
    got = json.loads(receiver.stdout.readline())
    receiver.wait(60)
    source = json.loads(sent.stdout)
    return {"seconds": source["seconds"],
            "source rss growth MiB": (source["peak"] - source["before"]) / MiB,
            "destination rss MiB": got["after"] / MiB,
            "source pinned peak MiB": source["pinned"] / MiB,
            "destination pinned peak MiB": got["pinned"] / MiB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total", default="4GiB")
    parser.add_argument("--populated", default="512MiB")
    parser.add_argument("--extents", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", type=Path, metavar="DIR")
    args = parser.parse_args()
    total, populated = parse_size(args.total), parse_size(args.populated)
    sparse = extents(total, populated, args.extents)
    dense = [(0, populated)]
    cases: dict[str, Any] = {
        "file, sparse": lambda: file_case(total, sparse, None),
        "file, dense": lambda: file_case(populated, dense, None),
        "anon, sparse": lambda: anon_case(total, sparse),
        "anon, dense": lambda: anon_case(populated, dense),
    }
    if args.baseline is not None:
        cases["file, sparse, baseline"] = lambda: file_case(total, sparse, args.baseline)
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    for _ in range(args.repeat):
        for name, case in cases.items():
            rounds[name].append(case())
    for name, runs in rounds.items():
        medians = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" if k == "seconds" else f"{k} {v:.0f}"
                                      for k, v in medians.items()))
    for way in ("file", "anon"):
        ratio = (statistics.median(r["seconds"] for r in rounds[f"{way}, sparse"])
                 / statistics.median(r["seconds"] for r in rounds[f"{way}, dense"]))
        print(f"{way}: sparse {args.total} / dense {args.populated}: {ratio:.2f}x the time")


if __name__ == "__main__":
    main()
