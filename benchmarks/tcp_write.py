"""One-sided write throughput of the TCP backend against plain sockets (and UCX's
tcp put when ``ucx_perftest`` is installed), all in one run on loopback.

    python benchmarks/tcp_write.py [--gib-per-size 2] [--repeat 3]

The receiver is another process with a 1 GiB pre-faulted region; the sender writes
into it with 4 KiB, 64 KiB, 1 MiB and 2 MiB writes, 64 per signalled batch. The
baseline is a bare loop of ``sendall`` -> ``recv_into`` the same mapping.
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing
import re
import shutil
import socket
import statistics
import subprocess
import time
from multiprocessing.connection import Connection
from typing import Any

from rdmamig import wire
from rdmamig.caps import Capability
from rdmamig.plugins import load_registry
from rdmamig.transport import RemoteWrite

GiB = 1 << 30
SIZES = [4096, 64 << 10, 1 << 20, 2 << 20]
BATCH = 64


def _region(size: int = GiB) -> mmap.mmap:
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)


def _rdmamig_receiver(pipe: Connection, backend_name: str, host: str, size: int,
                      options: dict[str, Any]) -> None:
    backend = load_registry().backend(backend_name)(**options)
    listener = backend.listen(host=host, port=0, supported=Capability(0))
    pipe.send(listener.address[1])
    endpoint = listener.accept(timeout=30)
    memory = _region(size)
    with endpoint, listener:
        region = endpoint.register(buffer=memoryview(memory), remote_write=True)
        pipe.send((region.addr, region.rkey))
        endpoint.recv_message(timeout=None)  # the sender's "done"


def _plain_receiver(pipe: Connection, size: int, total: int) -> None:
    memory = memoryview(_region())
    with socket.create_server(("127.0.0.1", 0)) as server:
        pipe.send(server.getsockname()[1])
        conn, _ = server.accept()
    with conn:
        at, got = 0, 0
        while got < total:
            view = memory[at:at + size]
            n = conn.recv_into(view, size, socket.MSG_WAITALL)
            got += n
            at = (at + size) % GiB
        conn.sendall(b"k")


def bench_rdmamig(size: int, total: int, *, backend: str = "tcp", host: str = "127.0.0.1",
                  region: int = GiB, receiver: dict[str, Any] | None = None,
                  **options: Any) -> float:
    """Bytes/s of one-sided writes of ``size`` bytes into a ``region``-byte registered
    region of another process, over ``backend`` made with ``options`` (the
    receiver's with ``receiver``)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_rdmamig_receiver,
                          args=(child, backend, host, region, receiver or {}))
    process.start()
    port = parent.recv()
    endpoint = load_registry().backend(backend)(**options).connect(
        host=host, port=port, requested=Capability(0), timeout=30)
    source = _region(region)
    with endpoint:
        local = endpoint.register(buffer=memoryview(source), remote_write=False)
        addr, rkey = parent.recv()
        per_batch = size * BATCH
        batches = max(total // per_batch, 1)
        started = time.perf_counter()
        previous = None
        at = 0
        for _ in range(batches):
            writes = []
            for _ in range(BATCH):
                writes.append(RemoteWrite(region=local, offset=at, length=size,
                                          remote_addr=addr + at, rkey=rkey))
                at = (at + size) % region
            ticket = endpoint.post_writes(writes=writes)
            if previous is not None:
                endpoint.wait_writes(ticket=previous, timeout=60)
            previous = ticket
        endpoint.wait_writes(ticket=previous, timeout=60)  # type: ignore[arg-type]
        elapsed = time.perf_counter() - started
        endpoint.send_message(data=wire.encode(wire.Ready()))
    process.join()
    return batches * per_batch / elapsed


def bench_plain(size: int, total: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    total = total // size * size
    process = ctx.Process(target=_plain_receiver, args=(child, size, total))
    process.start()
    port = parent.recv()
    source = memoryview(_region())
    with socket.create_connection(("127.0.0.1", port)) as conn:
        started = time.perf_counter()
        at = 0
        for _ in range(total // size):
            conn.sendall(source[at:at + size])
            at = (at + size) % GiB
        conn.recv(1)
        elapsed = time.perf_counter() - started
    process.join()
    return total / elapsed


def bench_ucx(size: int, iterations: int) -> float | None:
    """UCX's own one-sided put over its TCP transport (bytes/s), or None."""
    tool = shutil.which("ucx_perftest")
    if tool is None:
        return None
    port = 13337
    env = {"UCX_TLS": "tcp", "PATH": "/usr/bin:/bin"}
    server = subprocess.Popen([tool, "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = subprocess.run([tool, "127.0.0.1", "-p", str(port), "-t", "ucp_put_bw", "-s",
                              str(size), "-n", str(iterations), "-w", "100", "-f"],
                             env=env, capture_output=True, text=True, timeout=120).stdout
    finally:
        server.kill()
        server.wait()
    # With -f the last row is: iterations, latency 50%ile / average / overall,
    # bandwidth (MB/s, which perftest means as MiB/s) average / overall, msg rates.
    rows = [re.findall(r"[\d.]+", line) for line in out.splitlines()]
    rows = [row for row in rows if len(row) == 8]
    if not rows:
        return None
    return float(rows[-1][5]) * 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib-per-size", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--channels", type=int, default=4,
                        help="lanes of the striped column (TcpBackend(channels=N))")
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')}, loopback, medians of {args.repeat} runs")
    print(f"| write size | rdmamig tcp GB/s | plain socket GB/s | ratio | UCX tcp put GB/s |"
          f" rdmamig / UCX | rdmamig tcp, {args.channels} lanes GB/s |")
    print("|---|---|---|---|---|---|---|")
    for size in SIZES:
        total = int(args.gib_per_size * GiB) if size >= 64 << 10 else GiB // 4
        ours = statistics.median(bench_rdmamig(size, total) for _ in range(args.repeat))
        striped = statistics.median(bench_rdmamig(size, total, channels=args.channels)
                                    for _ in range(args.repeat))
        plain = statistics.median(bench_plain(size, total) for _ in range(args.repeat))
        ucx_runs = [bench_ucx(size, max(total // size // 4, 1000)) for _ in range(args.repeat)]
        ucx = statistics.median(u for u in ucx_runs if u) if any(ucx_runs) else None
        ucx_text = f"{ucx / 1e9:.2f}" if ucx else "n/a"
        ratio_ucx = f"{ours / ucx:.2f}" if ucx else "n/a"
        print(f"| {size // 1024} KiB | {ours / 1e9:.2f} | {plain / 1e9:.2f} | "
              f"{ours / plain:.2f} | {ucx_text} | {ratio_ucx} | {striped / 1e9:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
