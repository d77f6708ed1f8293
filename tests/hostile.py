"""Tools for attacking a running ``rdmamig listen``: the service in a process of its
own, a raw client speaking the TCP backend's framing byte by byte, and a real
source to check that the listener still serves afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from rdmamig import wire
from rdmamig.auth import PreSharedKey
from rdmamig.caps import SOURCE_DEFAULTS, Capability, PrivateData
from rdmamig.engine import RamBlock, SourceConfig, SourceResult
from rdmamig.image import Image, open_image
from rdmamig.migration import Plan, run_source
from rdmamig.plugins import load_registry
from rdmamig.policy import PolicyOptions
from rdmamig_tcp.frames import FENCE, FRAME, MAGIC, Kind, header

RDMAMIG = [sys.executable, "-m", "rdmamig"]
HOST = "127.0.0.1"


class Service:
    """``rdmamig listen`` serving into ``images`` (a process of its own, started by
    ``wrapper``, ``prlimit`` say)."""

    def __init__(self, images: Path, *extra: str, env: dict[str, str] | None = None,
                 wrapper: tuple[str, ...] = ()) -> None:
        self.images = images
        self.log = images.parent / f"{images.name}.log"
        self._log = self.log.open("w")
        self.process = subprocess.Popen(
            [*wrapper, *RDMAMIG, "listen", f"{HOST}:0", "--into", str(images), *extra],
            stdout=subprocess.PIPE, stderr=self._log, text=True,
            env={**os.environ, **(env or {})})
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.startswith("listening on "), (line, self.log.read_text())
        self.port = int(line.rsplit(":", 1)[1])

    def stop(self) -> int:
        """SIGTERM it and wait: its exit status."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(60)
        self._log.close()
        return code

    def status(self, field: str) -> int:
        """A figure of /proc/PID/status in bytes (VmRSS, VmLck) or a count."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == field:
                number, *unit = value.split()
                return int(number) * (1024 if unit == ["kB"] else 1)
        raise KeyError(field)

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def images_made(self) -> list[Image]:
        """The images it exposed, each checked against its manifest."""
        return [open_image(path) for path in sorted(self.images.iterdir())
                if not path.name.startswith(".")]

    def leftovers(self) -> list[str]:
        """Anything in the image directory that is not a whole image."""
        return sorted(path.name for path in self.images.iterdir() if path.name.startswith("."))

    def wait_for_log(self, text: str, timeout: float = 60) -> str:
        """Wait until the service's log says ``text``: the log so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log.read_text()
            if text in log:
                return log
            time.sleep(0.05)
        raise AssertionError(f"the listener never logged {text!r}: {self.log.read_text()}")


@contextmanager
def service(images: Path, *extra: str, env: dict[str, str] | None = None,
            wrapper: tuple[str, ...] = ()) -> Iterator[Service]:
    """A running service; stopped (SIGTERM) at the end, which it must survive
    cleanly: exit 130 and no staging left behind."""
    running = Service(images, *extra, env=env, wrapper=wrapper)
    try:
        yield running
    finally:
        code = running.stop()
    assert code == 130, running.log.read_text()
    assert running.leftovers() == []


def real_migration(port: int, *, size: int = 4 << 20, key: PreSharedKey | None = None,
                   channels: int = 1, name: str = "mem", seed: int = 1, blocks: int = 1
                   ) -> tuple[SourceResult, str | None, RamBlock]:
    """A real rdmamig source migrating ``size`` random bytes (and ``blocks - 1``
    one-page blocks more): what it said, and the first block."""
    registry = load_registry()
    requested = SOURCE_DEFAULTS | (Capability.AUTH if key is not None else Capability(0))
    plan = Plan(backend=registry.backend("tcp"),
                backend_options={"channels": channels} if channels > 1 else {},
                policy=registry.policy("pin-until-done"), options=PolicyOptions(),
                requested=requested, config=SourceConfig(timeout=20), key=key)
    block = RamBlock.anonymous(name, size)
    block.array[:] = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    more = [RamBlock.anonymous(f"{name}{index}", 4096) for index in range(1, blocks)]
    result, error = run_source(plan, HOST, port, [block, *more])
    return result, None if error is None else str(error), block


def assert_serves(listener: Service, *, key: PreSharedKey | None = None,
                  size: int = 4 << 20) -> None:
    """A real migration into ``listener`` verifies, is committed, and its image
    holds exactly the source's bytes."""
    before = {image.path for image in listener.images_made()}
    result, error, block = real_migration(listener.port, key=key, size=size)
    assert error is None and result.verified and result.committed, (error,
                                                                    listener.log.read_text())
    made = [image for image in listener.images_made() if image.path not in before]
    assert len(made) == 1
    assert made[0].block(0).digest() == block.digest()


class RawPeer:
    """A client of the TCP backend written from its framing: it sends exactly the
    bytes it is told to, whatever the protocol says."""

    def __init__(self, port: int, *, timeout: float = 20) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.posted_writes = 0

    def close(self) -> None:
        self.sock.close()

    def hello(self, flags: Capability = SOURCE_DEFAULTS) -> Capability:
        """CONNECT with ``flags``; the granted flags (AssertionError on REJECT)."""
        body = MAGIC + PrivateData(flags=int(flags)).encode()
        self.sock.sendall(header(Kind.CONNECT, length=len(body), rkey=1) + body)
        kind, payload = self.frame()
        assert kind == Kind.ACCEPT, payload
        return Capability(PrivateData.decode_untrusted(payload).flags)

    def frame(self) -> tuple[int, bytes]:
        """The next frame's kind and payload."""
        head = self._exact(FRAME.size)
        kind, _flags, _rkey, _addr, _wr_id, length = FRAME.unpack(head)
        return kind, self._exact(length) if kind != Kind.ACK else b""

    def _exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            more = self.sock.recv(size - len(data))
            if not more:
                raise ConnectionError(f"closed after {len(data)} of {size} bytes")
            data += more
        return data

    def send(self, message: wire.Message | bytes) -> None:
        """One control SEND (a message, or raw bytes as its content)."""
        data = message if isinstance(message, bytes) else wire.encode(message)
        fence = FENCE.pack(self.posted_writes)
        self.sock.sendall(header(Kind.SEND, length=len(fence) + len(data)) + fence + data)

    def recv(self, capabilities: Capability = SOURCE_DEFAULTS) -> wire.Message:
        """The next control message."""
        while True:
            kind, payload = self.frame()
            if kind == Kind.SEND:
                return wire.decode_untrusted(payload[FENCE.size:], extensions=capabilities)

    def write(self, *, rkey: int, addr: int, data: bytes, signaled: bool = True) -> None:
        """One WRITE frame."""
        self.posted_writes += 1
        self.sock.sendall(header(Kind.WRITE, length=len(data), rkey=rkey, remote_addr=addr,
                                 wr_id=self.posted_writes, flags=1 if signaled else 0) + data)

    def is_closed_by_peer(self, timeout: float) -> bool:
        """Whether the listener closes this connection within ``timeout`` s."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(4096):
                pass
        except TimeoutError:
            return False
        except OSError:
            return True
        return True
