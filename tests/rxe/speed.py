"""On an RDMA device: rdmamig's verbs one-sided writes against perftest's
``ib_write_bw`` (rdma_cm, same device, same sizes), in one run; prints the ratio.

    python tests/rxe/speed.py --host 10.0.2.15 [--device rxe0]

Under soft-RoCE in a TCG guest both are slow (tens of MB/s): the ratio is the figure.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import time
from pathlib import Path

SIZES = [64 << 10, 1 << 20]
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "tcp_write.py"


def ib_write_bw(device: str, host: str, size: int, iterations: int) -> float:
    """Bytes/s that ``ib_write_bw -R`` reports (average)."""
    common = ["ib_write_bw", "-d", device, "-R", "-s", str(size), "-n", str(iterations), "-F",
              "--report_gbits", "-p", "18515"]
    server = subprocess.Popen(common, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        out = subprocess.run([*common, host], capture_output=True, text=True, timeout=600,
                             check=True).stdout
    finally:
        server.wait(timeout=60)
    # "#bytes #iterations BW peak[Gb/sec] BW average[Gb/sec] MsgRate[Mpps]"
    rows = [line.split() for line in out.splitlines() if re.match(r"\s*\d+\s+\d+\s", line)]
    return float(rows[-1][3]) * 1e9 / 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--device", default="rxe0")
    parser.add_argument("--megabytes", type=int, default=64, help="per size and tool")
    args = parser.parse_args()
    # Imported by name (not from a spec) so that its spawned receiver can be too.
    sys.path.insert(0, str(BENCH.parent))
    bench = importlib.import_module(BENCH.stem)
    print(f"# {time.strftime('%Y-%m-%d')}: verbs on {args.device}, both ends on this host")
    print("| write size | rdmamig verbs MB/s | ib_write_bw MB/s | ratio |")
    print("|---|---|---|---|")
    for size in SIZES:
        total = args.megabytes << 20
        ours = bench.bench_rdmamig(size, total, backend="verbs", host=args.host,
                                   region=total)
        theirs = ib_write_bw(args.device, args.host, size, max(total // size, 100))
        # ib_write_bw under TCG now and then reports an average of 0.00 Gb/s.
        ratio = f"{ours / theirs:.2f}" if theirs else "n/a: ib_write_bw reported 0"
        print(f"| {size >> 10} KiB | {ours / 1e6:.1f} | {theirs / 1e6:.1f} | {ratio} |",
              flush=True)


if __name__ == "__main__":
    main()
