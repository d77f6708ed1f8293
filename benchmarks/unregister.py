"""Unpinning off the data path: ``lru`` at a 64 MiB cap on a 1 GiB migration with
asynchronous unregistration (one batched UNREGISTER REQUEST per decision, local
deregistration on a worker thread) against the same policy unregistering inline
(one request per chunk, deregistration in the data path), and ``pin-until-done``
as the reference – all in one run, interleaved in a shuffled order (a run right
after a ``pin-until-done`` run, which pins and frees 2 GiB, was measured about 5 %
slower), medians.

    python benchmarks/unregister.py [--ram 1GiB] [--cap 64MiB] [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CASES = {
    "pin-until-done": ["--policy", "pin-until-done"],
    "lru async": ["--policy", "lru", "--unregister", "async"],
    "lru inline": ["--policy", "lru", "--unregister", "inline"],
    # Without the INLINE path: every dirtied chunk that was unpinned is registered again.
    "lru async, no INLINE": ["--policy", "lru", "--unregister", "async", "--inline-pages", "0"],
}


def run(ram: str, cap: str, extra: list[str], live: bool) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        args = [sys.executable, "-m", "rdmamig", "migrate", "--ram", ram, "--quiet",
                "--report", report.name, *extra]
        if "lru" in extra:
            args += ["--pin-cap", cap]
        if live:
            args += ["--dirty-rate", "100MiB", "--pattern", "hotspot"]
        subprocess.run(args, check=True, capture_output=True)
        return dict(json.loads(Path(report.name).read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ram", default="1GiB")
    parser.add_argument("--cap", default="64MiB")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')}, {args.ram}, cap {args.cap}, medians of "
          f"{args.repeat}, runs interleaved in shuffled order")
    print("| guest | case | GB/s | min – max | vs pin-until-done | unregistrations | inline pages |"
          " peak pinned src / dst MiB | peak VmLck src / dst MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for live in (False, True):
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CASES}
        for repeat in range(args.repeat):
            order = list(CASES)
            random.Random(repeat).shuffle(order)
            for name in order:
                report = run(args.ram, args.cap, CASES[name], live)
                assert report["verified"], report["error"]
                runs[name].append(report)
        base = statistics.median(r["throughput_gbps"] for r in runs["pin-until-done"])
        for name, reports in runs.items():
            gbps = statistics.median(r["throughput_gbps"] for r in reports)
            mib = 2**20
            peak = max(reports, key=lambda r: r["pinned_peak_bytes_source"])
            unregistrations = statistics.median(r["unregistrations"] for r in reports)
            inline = statistics.median(r["inline_pages"] for r in reports)
            speeds = [r["throughput_gbps"] for r in reports]
            print(f"| {'live 100 MiB/s hotspot' if live else 'idle'} | {name} | {gbps:.2f} | "
                  f"{min(speeds):.2f} – {max(speeds):.2f} | {gbps / base:.0%} | "
                  f"{unregistrations:.0f} | {inline:.0f}"
                  f" | {peak['pinned_peak_bytes_source'] // mib} / "
                  f"{peak['pinned_peak_bytes_destination'] // mib} | "
                  f"{max(r['locked_peak_bytes_source'] for r in reports) // mib} / "
                  f"{max(r['locked_peak_bytes_destination'] for r in reports) // mib} |",
                  flush=True)


if __name__ == "__main__":
    main()
