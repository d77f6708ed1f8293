"""``rdmamig migrate`` over TCP against QEMU's own TCP migration, same run, same sizes.

    python benchmarks/migrate_vs_qemu.py [--sizes 1GiB,4GiB] [--repeat 3]

rdmamig: ``rdmamig migrate --ram SIZE --zero-fraction 0|1`` (destination pre-faulted,
the report's ``transfer_time_s``: from connect to the destination holding
everything, before verification, which QEMU does not do). QEMU: two
``qemu-system-x86_64`` (TCG, paused guest, ``memory-backend-file`` in /dev/shm with
``prealloc=on``), ``max-bandwidth`` lifted, plain and multifd with 4 channels
(rdmamig with 1 and with ``--channels 4``);
``total-time`` from ``query-migrate``. Random content is written into the source's
backing file before QEMU starts. Needs the package ``qemu-system-x86``.

``--baseline DIR`` (a checkout of another commit, e.g. ``git worktree add /tmp/base
HEAD~1``) runs that tree's rdmamig too, interleaved with this one in every repeat,
and prints the ratio of the two: how a change moved the speed, in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rdmamig.cli.options import parse_size
from rdmamig.testing.qemuvm import Guest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def qemu_migration(size: int, *, random: bool, multifd: int, attempts: int = 3) -> float:
    """Seconds QEMU reports as ``total-time``; ``multifd`` channels, 0 for plain.

    QEMU 7.2 now and then completes a paused guest's migration entirely in its
    stop-and-copy stage and then reports ``total-time`` 0; such a run is repeated.
    """
    for _ in range(attempts - 1):
        with contextlib.suppress(_NoTotalTime):
            return _qemu_migration_once(size, random=random, multifd=multifd)
    return _qemu_migration_once(size, random=random, multifd=multifd)


class _NoTotalTime(RuntimeError):
    """QEMU completed but reported no total time."""


def _qemu_migration_once(size: int, *, random: bool, multifd: int) -> float:
    work = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="rdmamig-bench-"))
    guests: list[Guest] = []
    try:
        src = Guest(work, "src", ram=size, paused=True, random_ram=random, prealloc=True,
                    ram_dir=work)
        guests.append(src)
        dst = Guest(work, "dst", ram=size, paused=True, incoming="defer", prealloc=True,
                    ram_dir=work)
        guests.append(dst)
        for guest in (src, dst):
            guest.cmd("migrate-set-parameters", **{"max-bandwidth": 107374182400})
            if multifd:
                guest.cmd("migrate-set-capabilities",
                          capabilities=[{"capability": "multifd", "state": True}])
                guest.cmd("migrate-set-parameters", **{"multifd-channels": multifd})
        port = _free_port()
        dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = src.wait_migration(timeout=900)
        if info.get("status") != "completed":
            raise RuntimeError(f"QEMU migration {info.get('status')}")
        if not info.get("total-time"):
            raise _NoTotalTime(f"QEMU reports no total-time: {info}")
        return float(info["total-time"]) / 1000
    finally:
        for guest in guests:
            guest.close()
        shutil.rmtree(work, ignore_errors=True)


def rdmamig_migration(size: int, *, random: bool, extra: list[str] | None = None,
                      tree: Path | None = None) -> dict[str, Any]:
    """``rdmamig migrate`` of this installation or, with ``tree``, of that checkout's
    sources (its packages first on PYTHONPATH)."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(str(tree / part) for part in (
            "core", "plugins/tcp_fallback", "plugins/policies", "plugins/verbs"))
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        subprocess.run([sys.executable, "-m", "rdmamig", "migrate", "--ram", str(size),
                        "--zero-fraction", "0" if random else "1", "--quiet", "--report",
                        report.name, *(extra or [])], check=True, capture_output=True,
                       env=env)
        return dict(json.loads(Path(report.name).read_text()))


def _seconds(variant: str, size: int, *, random: bool, channels: int,
             baseline: Path | None) -> float:
    """One migration's total time: rdmamig (``ours``, or ``base`` from the baseline
    tree) with 1 or ``channels`` channels, QEMU plain or multifd."""
    if variant[:4] in ("ours", "base"):
        extra = ["--channels", str(channels)] if variant.endswith("N") else []
        tree = baseline if variant.startswith("base") else None
        report = rdmamig_migration(size, random=random, extra=extra, tree=tree)
        # Before 2026-12-07 total_time_s was this (the baseline tree's may be).
        return float(report.get("transfer_time_s", report["total_time_s"]))
    return qemu_migration(size, random=random, multifd=channels if variant == "multi" else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1GiB,4GiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--channels", type=int, default=4,
                        help="rdmamig's --channels and QEMU's multifd-channels (default 4)")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="also run the rdmamig of this checkout, for a same-run ratio")
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU rows")
    args = parser.parse_args()
    channels = args.channels
    have_qemu = shutil.which("qemu-system-x86_64") is not None and not args.no_qemu
    against: list[str] = []
    print(f"# {time.strftime('%Y-%m-%d')} on {os.uname().nodename}, {os.cpu_count()} cores, "
          f"loopback; medians of {args.repeat}, the four runs of a repeat back to back; "
          f"GB/s = bytes / total time / 1e9")
    print(f"| RAM | content | rdmamig 1 channel | QEMU plain | ratio | rdmamig {channels} "
          f"channels | QEMU multifd-{channels} | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for text in args.sizes.split(","):
        size = parse_size(text)
        for random in (True, False):
            variants = ["ours1", "oursN", *(["plain", "multi"] if have_qemu else []),
                        *(["base1", "baseN"] if args.baseline else [])]
            rates: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.repeat):
                for name in variants:
                    seconds = _seconds(name, size, random=random, channels=channels,
                                       baseline=args.baseline)
                    rates[name].append(size / seconds / 1e9)
            gbps = {name: statistics.median(values) for name, values in rates.items()}
            plain, multi = gbps.get("plain"), gbps.get("multi")
            print(f"| {text} | {'random' if random else 'zero'} | {gbps['ours1']:.2f} | "
                  + (f"{plain:.2f} | {gbps['ours1'] / plain:.2f}" if plain else "n/a | n/a")
                  + f" | {gbps['oursN']:.2f} | "
                  + (f"{multi:.2f} | {gbps['oursN'] / multi:.2f}" if multi else "n/a | n/a")
                  + " |", flush=True)
            if args.baseline:
                against.append(
                    f"| {text} | {'random' if random else 'zero'} | {gbps['ours1']:.2f} | "
                    f"{gbps['base1']:.2f} | {gbps['ours1'] / gbps['base1']:.2f} | "
                    f"{gbps['oursN']:.2f} | {gbps['baseN']:.2f} | "
                    f"{gbps['oursN'] / gbps['baseN']:.2f} |")
    if against:
        print(f"\nagainst {args.baseline} (GB/s, medians, same repeats):")
        print(f"| RAM | content | this, 1 channel | baseline | ratio | this, {channels} "
              f"channels | baseline | ratio |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(against), flush=True)
    for extra in ([], ["--channels", str(channels)]):
        live = rdmamig_migration(1 << 30, random=True, extra=[
            "--dirty-rate", "100MiB", "--pattern", "hotspot", *extra])
        print(f"\nlive 1 GiB, 100 MiB/s hotspot dirtying, {' '.join(extra) or '1 channel'}: "
              f"{live['iterations']} iterations, downtime {live['downtime_ms']:.1f} ms, "
              f"total {live['total_time_s']:.2f} s, verified {live['verified']}")


if __name__ == "__main__":
    main()
