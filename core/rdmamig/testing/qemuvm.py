"""Real QEMU guests for interoperability tests and benchmarks: an unmodified
``qemu-system-x86_64`` (TCG) with its RAM in a file, driven over QMP with the QEMU
project's own client (``qemu.qmp``, a test dependency)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

QEMU = "qemu-system-x86_64"


class Guest:
    """One QEMU process: a ``pc`` machine whose RAM is ``ram_path`` (so its memory can
    be read from outside), paused or running, with a QMP socket.

    Args:
        workdir: where its sockets and logs go.
        name: tells guests in one test apart.
        ram: bytes of RAM.
        incoming: ``-incoming`` URI (a destination), or None.
        paused: start with ``-S``.
        kernel, initrd: boot this Linux instead of the firmware's nothing.
        command: how to run QEMU (another release: ``chroot ROOT qemu-system-x86_64``,
            see :func:`qemu_root`); every path it is given must be visible there.
        ram_path: a file to run the RAM in, as it is (kept at the end); by default a
            new one in ``ram_dir``, removed at the end.
        prealloc: have QEMU allocate all of its RAM before it starts.
        anonymous: RAM in QEMU's own anonymous memory (``memory-backend-ram``), as
            most VMs run, instead of a file: a page the guest never touched is not
            resident (:meth:`resident_anonymous`); :meth:`ram_bytes` reads it over QMP.
    """

    def __init__(self, workdir: Path, name: str, *, ram: int, incoming: str | None = None,
                 paused: bool = False, kernel: Path | None = None,
                 initrd: Path | None = None, random_ram: bool = False,
                 ram_dir: Path = Path("/dev/shm"), command: Sequence[str] = (QEMU,),
                 ram_path: Path | None = None, prealloc: bool = False,
                 anonymous: bool = False) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol  # a test dependency only

        self._own_ram = ram_path is None and not anonymous
        self.anonymous = anonymous
        self.workdir = workdir
        self.ram_path = ram_path or ram_dir / f"rdmamig-test-{os.getpid()}-{name}.ram"
        self.console = workdir / f"{name}.console"
        self.qmp_path = workdir / f"{name}.qmp"
        self.ram = ram
        self.qmp_path.unlink(missing_ok=True)  # a stale socket would look like QEMU's
        if random_ram:
            with self.ram_path.open("wb") as out:
                rng = np.random.default_rng(7)
                for _ in range(ram // (16 << 20)):
                    out.write(rng.bytes(16 << 20))
        backend = (f"memory-backend-ram,id=mem,size={ram}" if anonymous else
                   f"memory-backend-file,id=mem,size={ram},mem-path={self.ram_path},share=on")
        args = [*command, "-accel", "tcg", "-nodefaults", "-display", "none",
                "-machine", "pc,memory-backend=mem", "-m", f"{ram >> 20}",
                "-object", backend + (",prealloc=on" if prealloc else ""),
                "-serial", f"file:{self.console}",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if paused:
            args.append("-S")
        if kernel is not None:
            args += ["-kernel", str(kernel), "-append", "console=ttyS0 quiet panic=-1"]
        if initrd is not None:
            args += ["-initrd", str(initrd)]
        if incoming is not None:
            args += ["-incoming", incoming]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.qmp = QEMUMonitorProtocol(str(self.qmp_path))
        try:
            deadline = time.monotonic() + 30
            while not self.qmp_path.exists():
                if self.process.poll() is not None or time.monotonic() > deadline:
                    assert self.process.stderr is not None
                    raise RuntimeError(f"{name}: QEMU did not start: "
                                       f"{self.process.stderr.read().decode()}")
                time.sleep(0.05)
            self._connect_qmp()
        except BaseException:
            self.close()
            raise

    def _connect_qmp(self, attempts: int = 5) -> None:
        """Connect to QEMU's QMP socket, again if negotiation fails: once in a CI run
        a QEMU started with ``-incoming exec:`` answered ``qmp_capabilities`` with
        something other than a return while it loaded; it answered at once after."""
        from qemu.qmp.legacy import QEMUMonitorProtocol
        from qemu.qmp.protocol import ConnectError
        for attempt in range(attempts):
            try:
                self.qmp.connect()
                return
            except ConnectError:
                if attempt == attempts - 1 or self.process.poll() is not None:
                    raise
                self.qmp.close()
                time.sleep(0.2)
                self.qmp = QEMUMonitorProtocol(str(self.qmp_path))

    def cmd(self, command: str, **arguments: Any) -> Any:
        """A QMP command's return value (raising on its error)."""
        reply = self.qmp.cmd_raw(command, arguments or None)
        if "error" in reply:
            raise RuntimeError(f"QMP {command}: {reply['error']}")
        return reply["return"]

    def wait_migration(self, timeout: float = 120, interval: float = 0.05) -> dict[str, Any]:
        """``query-migrate`` once it says completed (or failed), asked every
        ``interval`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info: dict[str, Any] = self.cmd("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                return info
            time.sleep(interval)
        raise TimeoutError(f"migration not done within {timeout} s: {info}")

    def console_text(self) -> str:
        """What the guest printed on its serial console."""
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def wait_console(self, needle: str, timeout: float = 180) -> str:
        """The console once it holds ``needle``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.console_text()
            if needle in text:
                return text
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise TimeoutError(f"{needle!r} not on the console within {timeout} s: "
                           f"{self.console_text()[-2000:]}")

    def ram_bytes(self) -> bytes:
        """The guest's RAM, read from its backing file (anonymous RAM: saved by QMP
        ``pmemsave``, which reads guest-physical addresses: the legacy VGA and BIOS
        window at 640 KiB to 1 MiB shows devices, not RAM)."""
        if not self.anonymous:
            return self.ram_path.read_bytes()
        saved = self.workdir / f"{self.console.stem}.pmem"
        self.cmd("pmemsave", val=0, size=self.ram, filename=str(saved))
        try:
            return saved.read_bytes()
        finally:
            saved.unlink(missing_ok=True)

    def resident_anonymous(self) -> int:
        """Bytes of anonymous memory QEMU has resident (``RssAnon``): its guest RAM's
        touched pages when :attr:`anonymous`, and its own heap."""
        with open(f"/proc/{self.process.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no RssAnon in /proc/{self.process.pid}/status")

    def close(self) -> None:
        """Stop QEMU and remove its RAM file."""
        self.qmp.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        if self._own_ram:
            self.ram_path.unlink(missing_ok=True)


@contextlib.contextmanager
def qemu_root(root: Path) -> Iterator[list[str]]:
    """Run the QEMU of another root file system (Debian 13's, made by debootstrap):
    yields the command, with /dev, /proc, /sys and /dev/shm (where the guests' RAM,
    sockets and consoles go) of this system mounted inside it meanwhile."""
    mounted: list[Path] = []
    try:
        for source, target, kind in (("/dev", "dev", "bind"), ("proc", "proc", "proc"),
                                     ("/sys", "sys", "bind"), ("/dev/shm", "dev/shm", "bind")):
            where = root / target
            options = ["--bind", source] if kind == "bind" else ["-t", kind, source]
            subprocess.run(["mount", *options, str(where)], check=True, capture_output=True)
            mounted.append(where)
        yield ["chroot", str(root), QEMU]
    finally:
        for where in reversed(mounted):
            subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)
