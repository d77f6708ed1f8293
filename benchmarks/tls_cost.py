"""What TLS costs the TCP backend: one-sided write throughput with and without it,
alternating in one run on loopback (``benchmarks/tcp_write.py``'s measurement).

    python benchmarks/tls_cost.py [--gib 1] [--repeat 5]

A throwaway CA and server certificate are made with ``openssl`` for the run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tcp_write import GiB, bench_rdmamig

SIZES = [64 << 10, 1 << 20]


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """(CA, server certificate, server key) for 127.0.0.1, valid for a day."""
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, request = directory / "server.pem", directory / "server.key", directory / "r"
    ext = directory / "ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for command in (
        ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "1",
         "-subj", "/CN=rdmamig benchmark CA"],
        ["openssl", "req", *ec, "-keyout", key, "-out", request, "-subj", "/CN=127.0.0.1"],
        ["openssl", "x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key,
         "-CAcreateserial", "-out", cert, "-days", "1", "-extfile", ext],
    ):
        subprocess.run([str(part) for part in command], check=True, capture_output=True)
    return ca, cert, key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=1.0, help="written per run")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ca, cert, key = make_certificates(Path(tmp))
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
