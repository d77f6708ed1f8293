"""Moving a numpy array with the library against a plain socket, in one run on
loopback: ``rdmamig.send`` / ``rdmamig.receive_into`` (verified, committed) against
``sendall`` / ``recv_into`` of the same buffer.

    python benchmarks/library_vs_socket.py [--gib 1] [--repeat 3] [--channels 1]

The receiver is another process with its array pre-faulted; the sender's array holds
random bytes. Each round's time runs on the sender from the call until the receiver
has everything: for the library, until ``send`` returns (the destination verified
and kept it); for the socket, until the receiver's one-byte answer after its last
``recv_into``. Rounds alternate; the figures are medians and the ratio is the
socket's time over the library's (1.0: as fast as a socket).
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import statistics
import time
from multiprocessing.connection import Connection

import numpy as np
import rdmamig

GiB = 1 << 30


def _buffer(size: int) -> np.ndarray:
    array = np.empty(size, dtype=np.uint8)
    array[:] = 1  # faulted in before the clock starts, as the library's would be
    return array


def _library_receiver(pipe: Connection, size: int, channels: int) -> None:
    array = _buffer(size)
    rdmamig.receive_into("127.0.0.1:0", {"array": array}, announce=pipe.send,
                         channels=channels)
    pipe.send(int(array[-1]))


def _socket_receiver(pipe: Connection, size: int) -> None:
    array = _buffer(size)
    view = memoryview(array)
    with socket.create_server(("127.0.0.1", 0)) as server:
        pipe.send(server.getsockname()[1])
        conn, _ = server.accept()
    with conn:
        got = 0
        while got < size:
            count = conn.recv_into(view[got:])
            if not count:
                raise ConnectionError(f"sender closed after {got} of {size} bytes")
            got += count
        conn.sendall(b"!")
    pipe.send(int(array[-1]))


def _round(kind: str, data: np.ndarray, channels: int) -> float:
    context = multiprocessing.get_context("spawn")
    mine, theirs = context.Pipe()
    args = (theirs, data.nbytes, channels) if kind == "library" else (theirs, data.nbytes)
    target = _library_receiver if kind == "library" else _socket_receiver
    child = context.Process(target=target, args=args)
    child.start()
    port = mine.recv()
    started = time.perf_counter()
    if kind == "library":
        rdmamig.send(f"127.0.0.1:{port}", {"array": data}, channels=channels)
    else:
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(memoryview(data))
            if conn.recv(1) != b"!":
                raise ConnectionError("the receiver did not answer")
    elapsed = time.perf_counter() - started
    if mine.recv() != int(data[-1]):
        raise AssertionError(f"{kind}: the receiver's last byte differs")
    child.join(30)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--channels", type=int, default=1)
    args = parser.parse_args()
    size = int(args.gib * GiB) // 4096 * 4096
    data = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8)
    times: dict[str, list[float]] = {"socket": [], "library": []}
    for round_ in range(args.repeat):
        for kind in times:
            times[kind].append(_round(kind, data, args.channels))
            print(f"round {round_ + 1} {kind:8} {times[kind][-1]:.3f} s", flush=True)
    socket_s, library_s = (statistics.median(times[kind]) for kind in ("socket", "library"))
    mib = size / (1 << 20)
    print(f"| {mib:.0f} MiB | channels {args.channels} | socket {socket_s:.3f} s "
          f"({mib / socket_s:.0f} MiB/s) | library {library_s:.3f} s "
          f"({mib / library_s:.0f} MiB/s) | {socket_s / library_s:.2f}x |")


if __name__ == "__main__":
    main()
