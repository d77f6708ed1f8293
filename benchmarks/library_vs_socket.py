"""Moving a numpy array with the library against a plain socket, in one run on
loopback: ``rdmamig.send`` / ``rdmamig.receive_into`` (verified, committed) against
``sendall`` / ``recv_into`` of the same buffer.

    python benchmarks/library_vs_socket.py [--gib 1] [--repeat 3] [--channels 1]
        [--baseline DIR]

Each round is a process of its own (``--baseline DIR``: the library of that
checkout's sources, as a third kind of round) whose receiver is a child process
with its array pre-faulted; the sender's array holds random bytes (a first,
untimed round of each kind fills the bytecode caches). A round makes two calls one
after the other, each timed on the sender from the call until the receiver has
everything: for the library, until ``send`` returns (the destination verified and
kept it); for the socket, until the receiver's one-byte answer after its last
``recv_into``. The first call of a process also loads the library's plugins. Rounds
alternate; the figures are medians and the ratios are the socket's time over each
library's for the same call (1.0: as fast as a socket).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import time
from datetime import date
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import rdmamig

GiB = 1 << 30
#: Transfers per round, one after the other in the same processes: the first call
#: of a process also loads the library's plugins (entry points).
CALLS = 2


def _buffer(size: int) -> np.ndarray:
    array = np.empty(size, dtype=np.uint8)
    array[:] = 1  # faulted in before the clock starts, as the library's would be
    return array


def _library_receiver(pipe: Connection, size: int, channels: int) -> None:
    array = _buffer(size)
    for _ in range(CALLS):
        rdmamig.receive_into("127.0.0.1:0", {"array": array}, announce=pipe.send,
                             channels=channels)
        pipe.send(int(array[-1]))


def _socket_receiver(pipe: Connection, size: int) -> None:
    array = _buffer(size)
    view = memoryview(array)
    for _ in range(CALLS):
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


def _round(kind: str, size: int, channels: int) -> list[float]:
    """The times of the round's calls, in order."""
    data = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8)
    context = multiprocessing.get_context("spawn")
    mine, theirs = context.Pipe()
    args = (theirs, data.nbytes, channels) if kind == "library" else (theirs, data.nbytes)
    target = _library_receiver if kind == "library" else _socket_receiver
    child = context.Process(target=target, args=args)
    child.start()
    send = rdmamig.send  # loaded before the clock starts (rdmamig loads names lazily)
    times = []
    for _ in range(CALLS):
        port = mine.recv()
        started = time.perf_counter()
        if kind == "library":
            send(f"127.0.0.1:{port}", {"array": data}, channels=channels)
        else:
            with socket.create_connection(("127.0.0.1", port)) as conn:
                conn.sendall(memoryview(data))
                if conn.recv(1) != b"!":
                    raise ConnectionError("the receiver did not answer")
        times.append(time.perf_counter() - started)
        if mine.recv() != int(data[-1]):
            raise AssertionError(f"{kind}: the receiver's last byte differs")
    child.join(30)
    return times


def _in_a_process(kind: str, size: int, channels: int, tree: Path | None) -> list[float]:
    """One round in a process of its own: the library of ``tree``'s sources when
    given, else of this checkout."""
    env = dict(os.environ)
    # As an installed package would, modules load from their bytecode caches: a
    # machine that sets this would compile the plugins' sources in every round.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(str(tree / part) for part in (
            "core", "plugins/tcp_fallback", "plugins/policies", "plugins/verbs"))
    done = subprocess.run([sys.executable, __file__, "--one", kind, "--bytes", str(size),
                           "--channels", str(channels)], env=env, check=True,
                          capture_output=True, text=True)
    return [float(word) for word in done.stdout.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--baseline", type=Path, metavar="DIR")
    parser.add_argument("--one", choices=["socket", "library"], help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(*_round(args.one, args.bytes, args.channels))
        return
    size = int(args.gib * GiB) // 4096 * 4096
    kinds = {"socket": ("socket", None), "library": ("library", None)}
    if args.baseline is not None:
        kinds["baseline"] = ("library", args.baseline)
    times: dict[str, list[list[float]]] = {kind: [] for kind in kinds}
    for what, tree in kinds.values():  # untimed: fills the bytecode caches
        _in_a_process(what, 1 << 20, args.channels, tree)
    for round_ in range(args.repeat):
        for kind, (what, tree) in kinds.items():
            times[kind].append(_in_a_process(what, size, args.channels, tree))
            print(f"round {round_ + 1} {kind:8} " + ", ".join(
                f"{seconds:.3f} s" for seconds in times[kind][-1]), flush=True)
    medians = {kind: [statistics.median(call) for call in zip(*rounds, strict=True)]
               for kind, rounds in times.items()}
    mib = size / (1 << 20)
    print(f"{date.today()}, {os.cpu_count()} CPUs, {mib:.0f} MiB, channels {args.channels}, "
          f"medians of {args.repeat}; each call's ratio is the socket's same call's time "
          "over its time:")
    print("| | first call in its process | of the socket's | the call after it "
          "| of the socket's |")
    print("|---|---|---|---|---|")
    for kind, (first, later) in medians.items():
        socket_first, socket_later = medians["socket"]
        print(f"| {kind} | {first:.3f} s ({mib / first:.0f} MiB/s) | "
              f"{socket_first / first:.2f}x | {later:.3f} s ({mib / later:.0f} MiB/s) | "
              f"{socket_later / later:.2f}x |")


if __name__ == "__main__":
    main()
