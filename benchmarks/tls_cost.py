"""What TLS costs the TCP backend: one-sided write throughput with and without it,
alternating in one run on loopback (``benchmarks/tcp_write.py``'s measurement).

    python benchmarks/tls_cost.py [--gib 1] [--repeat 5]

A throwaway CA and server certificate are made with ``openssl`` for the run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rdmamig.testing.certificates import make_certificates

sys.path.insert(0, str(Path(__file__).parent))
from tcp_write import GiB, bench_rdmamig

SIZES = [64 << 10, 1 << 20]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=1.0, help="written per run")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        made = make_certificates(Path(tmp))
        ca, cert, key = made["ca"], made["cert"], made["key"]
        tls_receiver = {"tls_cert": cert, "tls_key": key}
        print(f"# {time.strftime('%Y-%m-%d')}, loopback, medians of {args.repeat} "
              f"alternating runs of {args.gib} GiB")
        print("| write size | tcp GB/s | tcp + TLS GB/s | ratio | tcp + TLS, 4 lanes GB/s "
              "| ratio |")
        print("|---|---|---|---|---|---|")
        for size in SIZES:
            plain, tls, lanes = [], [], []
            for _ in range(args.repeat):
                total = int(args.gib * GiB)
                plain.append(bench_rdmamig(size, total))
                tls.append(bench_rdmamig(size, total, receiver=tls_receiver, tls_ca=ca))
                lanes.append(bench_rdmamig(size, total, receiver=tls_receiver, tls_ca=ca,
                                           channels=4))
            p, t, t4 = (statistics.median(runs) for runs in (plain, tls, lanes))
            print(f"| {size >> 10} KiB | {p / 1e9:.2f} | {t / 1e9:.2f} | {t / p:.2f} | "
                  f"{t4 / 1e9:.2f} | {t4 / p:.2f} |", flush=True)


if __name__ == "__main__":
    main()
