"""An unmodified QEMU (Debian's qemu-system-x86_64, TCG) migrating over real RDMA
into rdmamig and out of it, inside the soft-RoCE guest (run by harness.py).

    python tests/rxe/qemu_check.py to-rdmamig [--pin-all] HOST
    python tests/rxe/qemu_check.py to-qemu [--pin-all] HOST
    python tests/rxe/qemu_check.py to-rdmamig-refused HOST
    python tests/rxe/qemu_check.py round-trip HOST
    python tests/rxe/qemu_check.py pins HOST
    python tests/rxe/qemu_check.py never-touched HOST
    python tests/rxe/qemu_check.py speed [--rounds N] HOST

``--qemu-root DIR`` runs another QEMU release (Debian 13's, by chroot) instead of the
system's.

``to-rdmamig``: a paused 64 MiB guest with random RAM migrates (``migrate
rdma:HOST:PORT``) into ``rdmamig listen --backend verbs``; QEMU reports completed
and the image's blocks are byte-identical to the source's RAM. ``to-qemu``: that
guest saved to a file and imported is sent with ``rdmamig send --image --backend
verbs`` into a QEMU started with ``-incoming rdma:HOST:PORT``; QEMU reports completed
and its RAM is byte-identical. ``round-trip``: a running guest (SeaBIOS with no boot
device) migrates live A -> rdmamig -> B; B runs after ``cont``. ``pins``: what
QEMU's destination pins (its ``VmPin``) when rdmamig sends into it, against what
QEMU's own source makes it pin, and under an unpin policy's cap. Exits non-zero with
the reason on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernelmem import sparse_file
from qemuvm import Guest, qemu_root

MiB = 1 << 20
RAM = 64 * MiB
PORT = 4455
RDMAMIG = [sys.executable, "-m", "rdmamig"]


STARTED = time.monotonic()


def log(message: str) -> None:
    """A progress line with the seconds since start (the guest is slow: say where)."""
    print(f"[{time.monotonic() - STARTED:7.1f} s] {message}", flush=True)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"FAILED: {message}")


def listen(into: Path, host: str, *, wrapper: tuple[str, ...] = ()
           ) -> tuple[subprocess.Popen[str], float]:
    """``rdmamig listen`` on verbs (run by ``wrapper``), once it says it listens."""
    started = time.monotonic()
    errors = into.parent / f"{into.name}.stderr"
    with errors.open("w") as stderr:  # a file: a full pipe would stall the listener
        process = subprocess.Popen([*wrapper, *RDMAMIG, "listen", f"{host}:{PORT}", "--once",
                                    "--into", str(into), "--backend", "verbs", "--timeout", "600",
                                    "--report", str(into.parent / "listen.json")],
                                   stdout=subprocess.PIPE, stderr=stderr, text=True)
    process.errors = errors  # type: ignore[attr-defined]
    assert process.stdout is not None
    line = process.stdout.readline()
    check(line.startswith("listening on"), f"rdmamig listen did not start: {line!r} "
                                           f"{errors.read_text()[-3000:]}")
    log(f"rdmamig {line.strip()}")
    return process, time.monotonic() - started


def stderr_of(process: subprocess.Popen[str]) -> str:
    if process.poll() is None:
        process.kill()
        process.wait(30)
    return str(process.errors.read_text()[-3000:])  # type: ignore[attr-defined]


def send_image(image: Path, host: str, what: str, *extra: str) -> None:
    """``rdmamig send --image`` on verbs to the QEMU listening at ``host``; fails
    with ``what`` and rdmamig's words unless it succeeded."""
    sent = subprocess.run([*RDMAMIG, "send", f"{host}:{PORT}", "--image", str(image),
                           "--backend", "verbs", "--quiet", *extra],
                          capture_output=True, text=True, timeout=900)
    check(sent.returncode == 0, f"{what}: {sent.stderr[-3000:]}")


def image_block(image: Path, name: str) -> bytes:
    from rdmamig.image import open_image
    opened = open_image(image)
    index = [b.name for b in opened.manifest.blocks].index(name)
    return bytes(opened.block(index).view)


def migrate(source: Guest, uri: str, *, pin_all: bool) -> dict[str, object]:
    source.cmd("migrate-set-parameters", **{"max-bandwidth": 10 << 30})
    if pin_all:
        source.cmd("migrate-set-capabilities", capabilities=[
            {"capability": "rdma-pin-all", "state": True}])
    started = time.monotonic()
    source.cmd("migrate", uri=uri)
    info = source.wait_migration(timeout=600)
    info["wall_s"] = time.monotonic() - started
    return info


#: How QEMU runs (``--qemu-root`` replaces it).
COMMAND: list[str] = ["qemu-system-x86_64"]


def to_rdmamig(work: Path, host: str, pin_all: bool) -> None:
    image = work / "image"
    source = Guest(work, "src", ram=RAM, paused=True, random_ram=True, command=COMMAND)
    log("source QEMU started")
    listener, startup = listen(image, host)
    try:
        try:
            info = migrate(source, f"rdma:{host}:{PORT}", pin_all=pin_all)
        except RuntimeError as exc:
            raise SystemExit(f"FAILED: {exc}; rdmamig listen: {stderr_of(listener)}") from None
        log(f"QEMU: {info['status']}")
        if info["status"] != "completed":
            raise SystemExit(f"FAILED: QEMU's migration into rdmamig: {info}; rdmamig "
                             f"listen: {stderr_of(listener)}")
        code = listener.wait(120)
        if code != 0:
            raise SystemExit(f"FAILED: rdmamig listen exited {code}: {stderr_of(listener)}")
        check(image_block(image, "mem") == source.ram_bytes(),
              "the image's mem differs from the source's RAM")
        check(source.cmd("query-status")["status"] == "postmigrate",
              "the source is not in postmigrate")
        print(f"{version()} -> rdmamig{' (pin-all)' if pin_all else ''}: completed in "
              f"{info['wall_s']:.2f} s (QEMU total-time {info.get('total-time')} ms), "
              f"rdmamig started in {startup:.0f} s; image byte-identical")
    finally:
        source.close()
        if listener.poll() is None:
            listener.kill()


#: The listener under an 8 MiB RLIMIT_MEMLOCK without CAP_IPC_LOCK: it fails when a
#: registration goes past it, partway through the guest's 64 MiB.
UNDER_ULIMIT = ("setpriv", "--bounding-set", "-ipc_lock", "--inh-caps", "-ipc_lock",
                "prlimit", "--memlock=8388608:8388608")


def to_rdmamig_refused(work: Path, host: str) -> None:
    """A listener that fails mid-migration leaves QEMU's source as it was: the
    migration fails, the guest's RAM is unchanged, it runs on; no image appears."""
    image = work / "image"
    source = Guest(work, "src", ram=RAM, paused=True, random_ram=True, command=COMMAND)
    try:
        before = source.ram_bytes()
        listener, _ = listen(image, host, wrapper=UNDER_ULIMIT)
        info = migrate(source, f"rdma:{host}:{PORT}", pin_all=False)
        check(info["status"] == "failed", f"QEMU's migration did not fail: {info}")
        code = listener.wait(120)
        errors = stderr_of(listener)
        check(code == 1 and "RLIMIT_MEMLOCK" in errors, f"listener exited {code}: {errors}")
        check(not image.exists(), "an image was left under its name")
        check(source.ram_bytes() == before, "the source's RAM changed")
        source.cmd("cont")
        check(source.cmd("query-status")["status"] == "running", "the source does not run")
        print(f"{version()} -> a failing rdmamig: QEMU reports failed, its guest is intact "
              f"and runs on; the listener said: {errors.strip().splitlines()[-1][:120]}")
    finally:
        source.close()


def saved_image(work: Path) -> tuple[Path, bytes]:
    """A paused random guest saved through exec:cat and imported: (image, its RAM)."""
    a = Guest(work, "saved", ram=RAM, paused=True, random_ram=True, command=COMMAND)
    try:
        stream = work / "saved.mig"
        a.cmd("migrate", uri=f"exec:cat > {stream}")
        check(a.wait_migration()["status"] == "completed", "QEMU could not save the guest")
        image = work / "saved-image"
        done = subprocess.run([*RDMAMIG, "image", "import", str(stream), str(image)],
                              capture_output=True, text=True)
        check(done.returncode == 0, f"image import: {done.stderr}")
        return image, a.ram_bytes()
    finally:
        a.close()


def to_qemu(work: Path, host: str, pin_all: bool) -> None:
    image, ram = saved_image(work)
    destination = Guest(work, "dst", ram=RAM, incoming=f"rdma:{host}:{PORT}",
                        command=COMMAND)
    try:
        time.sleep(1)  # QEMU listens once its incoming side is set up
        started = time.monotonic()
        send_image(image, host, "rdmamig send into QEMU", "--timeout", "600",
                   *(["--pin-all"] if pin_all else []))
        wall = time.monotonic() - started
        info = destination.wait_migration(timeout=120)
        check(info["status"] == "completed", f"QEMU's incoming migration: {info}")
        check(destination.ram_bytes() == ram, "QEMU's RAM differs from the image")
        destination.cmd("cont")
        check(destination.cmd("query-status")["status"] == "running", "QEMU does not run")
        print(f"rdmamig -> {version()}{' (pin-all)' if pin_all else ''}: completed, send took "
              f"{wall:.1f} s with rdmamig's start-up; RAM byte-identical; cont: running")
    finally:
        destination.close()


def sparse_guest_file(path: Path, ram: int) -> tuple[bytes, int]:
    """A guest RAM file holding four 4 MiB extents, holes elsewhere: (its content,
    the bytes used)."""
    extents = {i * (ram // 4) + 8 * MiB: os.urandom(4 * MiB) for i in range(4)}
    sparse_file(path, ram, extents)
    return path.read_bytes(), sum(map(len, extents.values()))


def never_touched(work: Path, host: str) -> None:
    """A guest that used 16 MiB of its 128: QEMU -> rdmamig over RDMA gives an image
    that allocates what was used, and rdmamig -> a QEMU with anonymous RAM over RDMA
    leaves that QEMU as resident as QEMU's own migration of the guest does."""
    ram, ram_file, image = 128 * MiB, work / "sparse.ram", work / "image"
    content, used = sparse_guest_file(ram_file, ram)
    source = Guest(work, "src", ram=ram, paused=True, ram_path=ram_file, command=COMMAND)
    listener, _startup = listen(image, host)
    try:
        info = migrate(source, f"rdma:{host}:{PORT}", pin_all=False)
        check(info["status"] == "completed", f"QEMU -> rdmamig: {info}")
        check(listener.wait(120) == 0, f"rdmamig listen: {stderr_of(listener)}")
    finally:
        source.close()
        if listener.poll() is None:
            listener.kill()
    from rdmamig.image import open_image
    held = open_image(image)
    mem = next(block for block in held.manifest.blocks if block.name == "mem")
    allocated = (image / mem.file).stat().st_blocks * 512
    check(used <= allocated <= used + used // 100,
          f"the image allocated {allocated >> 20} MiB for {used >> 20} MiB used")
    resident = {}
    for name in ("qemu", "rdmamig"):
        destination = Guest(work, f"dst-{name}", ram=ram, incoming=f"rdma:{host}:{PORT}",
                            anonymous=True, command=COMMAND)
        try:
            time.sleep(1)  # QEMU listens once its incoming side is set up
            if name == "qemu":
                again = Guest(work, "src2", ram=ram, paused=True, ram_path=ram_file,
                              command=COMMAND)
                try:
                    info = migrate(again, f"rdma:{host}:{PORT}", pin_all=False)
                finally:
                    again.close()
                check(info["status"] == "completed", f"QEMU -> QEMU: {info}")
            else:
                send_image(image, host, "rdmamig send into QEMU", "--timeout", "600")
            check(destination.wait_migration(timeout=120)["status"] == "completed",
                  f"{name} -> QEMU did not complete")
            resident[name] = destination.resident_anonymous()
            check(destination.ram_bytes()[MiB:] == content[MiB:],
                  f"{name} -> QEMU: RAM above 1 MiB differs")
        finally:
            destination.close()
    # QEMU's own anonymous memory varies by a few MiB between runs; the guest's
    # never-touched RAM faulted in would be 112 MiB.
    check(resident["rdmamig"] <= resident["qemu"] + 16 * MiB,
          f"QEMU's RssAnon: {resident['rdmamig'] >> 20} MiB from rdmamig, "
          f"{resident['qemu'] >> 20} MiB from QEMU")
    print(f"{version()}, {ram >> 20} MiB guest using {used >> 20} MiB: image allocates "
          f"{allocated >> 20} MiB; destination RssAnon {resident['rdmamig'] >> 20} MiB from "
          f"rdmamig, {resident['qemu'] >> 20} MiB from QEMU")


def round_trip(work: Path, host: str) -> None:
    image = work / "image"
    listener, _startup = listen(image, host)
    a = Guest(work, "a", ram=RAM)  # runs SeaBIOS, which finds nothing to boot
    try:
        time.sleep(2)
        info = migrate(a, f"rdma:{host}:{PORT}", pin_all=False)
        check(info["status"] == "completed", f"A -> rdmamig: {info}")
        check(listener.wait(120) == 0, "rdmamig listen failed")
        ram_a = a.ram_bytes()
        check(image_block(image, "mem") == ram_a, "the image differs from A's RAM")
    finally:
        a.close()
        if listener.poll() is None:
            listener.kill()
    # -S: A ran, so B would start running as soon as it has loaded (before its RAM
    # could be compared); with -S it waits for cont.
    b = Guest(work, "b", ram=RAM, incoming=f"rdma:{host}:{PORT}", paused=True)
    try:
        time.sleep(1)
        send_image(image, host, "rdmamig -> B", "--timeout", "600")
        check(b.wait_migration(timeout=120)["status"] == "completed", "B did not complete")
        check(b.ram_bytes() == ram_a, "B's RAM differs from A's")
        b.cmd("cont")
        time.sleep(2)
        check(b.cmd("query-status")["status"] == "running", "B does not run after cont")
        print("qemu A -> rdmamig -> qemu B: completed both ways, RAM byte-identical, "
              "B running")
    finally:
        b.close()


class PinPeak:
    """The most memory a process has pinned for RDMA (``VmPin`` of /proc/PID/status,
    what ``ibv_reg_mr`` pins) while the ``with`` block runs, polled every 2 ms."""

    def __init__(self, pid: int) -> None:
        self._status = Path(f"/proc/{pid}/status")
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self.peak_bytes = 0
        #: The first pinned figure seen: QEMU's control buffers, registered when it
        #: connects, before any RAM (if the poll caught that moment).
        self.first_bytes = 0
        self.samples = 0

    def _read(self) -> int:
        for line in self._status.read_text().splitlines():
            if line.startswith("VmPin:"):
                return int(line.split()[1]) * 1024
        raise SystemExit(f"FAILED: no VmPin in {self._status}")

    def _poll(self) -> None:
        while not self._done.wait(0.002):
            try:
                pinned = self._read()
            except FileNotFoundError:
                return  # the process ended
            self.peak_bytes = max(self.peak_bytes, pinned)
            self.first_bytes = self.first_bytes or pinned
            self.samples += 1

    def __enter__(self) -> PinPeak:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join(10)


#: What QEMU pins of its own whatever the source does: its three control buffers
#: (``wr_data[RDMA_WRID_MAX]``, RDMA_CONTROL_MAX_BUFFER = 512 KiB each, registered
#: by ``qemu_rdma_reg_control`` when it connects; migration/rdma.c).
QEMU_CONTROL_PINNED = 3 * 512 * 1024

#: What rdmamig sends with into QEMU's destination, and the most QEMU may pin for
#: it: QEMU -> QEMU's own peak (``None``) plus 1 MiB, or the cap plus one 1 MiB
#: registration unit, plus QEMU's control buffers.
PIN_RUNS: dict[str, tuple[list[str], int | None]] = {
    "pin-until-done": ([], None),
    "lru --pin-cap 8MiB": (["--policy", "lru", "--pin-cap", "8MiB"],
                           8 * MiB + MiB + QEMU_CONTROL_PINNED),
    "eager": (["--policy", "eager"], None),
}


def pins(work: Path, host: str) -> None:
    """rdmamig sending into QEMU's destination pins there what QEMU's own source
    makes it pin, no more; an unpin policy holds QEMU's pinned memory to its cap.
    QEMU's side is read from QEMU's ``VmPin``; each run completes with the RAM
    byte-identical."""
    import json
    image, ram = saved_image(work)  # the same random RAM as the source below (seed 7)
    a = Guest(work, "pins-a", ram=RAM, paused=True, random_ram=True, command=COMMAND)
    b = Guest(work, "pins-b", ram=RAM, incoming=f"rdma:{host}:{PORT}", command=COMMAND)
    try:
        time.sleep(1)
        with PinPeak(b.process.pid) as watch:
            info = migrate(a, f"rdma:{host}:{PORT}", pin_all=False)
            check(info["status"] == "completed", f"QEMU -> QEMU: {info}")
            check(b.wait_migration()["status"] == "completed", "QEMU -> QEMU: destination")
        qemu_peak = watch.peak_bytes
        check(watch.samples > 0 and qemu_peak > 0, f"no VmPin seen in {watch.samples} samples")
    finally:
        a.close()
        b.close()
    figures = [f"QEMU -> QEMU {qemu_peak / MiB:.1f} MiB"]
    log(f"{figures[0]}; first VmPin seen {watch.first_bytes / MiB:.2f} MiB (QEMU's control "
        f"buffers are {QEMU_CONTROL_PINNED / MiB:.1f} MiB)")
    for name, (options, cap) in PIN_RUNS.items():
        limit = qemu_peak + MiB if cap is None else cap
        destination = Guest(work, "pins-dst", ram=RAM, incoming=f"rdma:{host}:{PORT}",
                            command=COMMAND)
        try:
            time.sleep(1)
            report = work / "pins.json"
            with PinPeak(destination.process.pid) as watch:
                send_image(image, host, f"rdmamig ({name}) -> QEMU", "--timeout", "600",
                           "--report", str(report), *options)
                info = destination.wait_migration(timeout=120)
            check(info["status"] == "completed", f"{name}: QEMU's incoming migration: {info}")
            check(destination.ram_bytes() == ram, f"{name}: QEMU's RAM differs from the image")
            asked = json.loads(report.read_text())
            check(watch.peak_bytes <= limit,
                  f"{name}: QEMU pinned {watch.peak_bytes / MiB:.1f} MiB at most, over "
                  f"{limit / MiB:.1f} MiB (rdmamig asked it to pin "
                  f"{asked['peer_pinned_peak_bytes'] / MiB:.1f} MiB at most)")
            check(asked["peer_pinned_peak_bytes"] + QEMU_CONTROL_PINNED <= limit,
                  f"{name}: rdmamig's account says {asked['peer_pinned_peak_bytes']} bytes")
            figures.append(f"rdmamig {name} {watch.peak_bytes / MiB:.1f} MiB (asked "
                           f"{asked['peer_pinned_peak_bytes'] / MiB:.1f}, "
                           f"{asked['registrations']} reg / {asked['unregistrations']} "
                           f"unreg)")
            log(figures[-1] + f"; first VmPin seen {watch.first_bytes / MiB:.2f} MiB")
        finally:
            destination.close()
    print(f"{version()} destination's VmPin peak, 64 MiB random guest: " + ", ".join(figures)
          + "; RAM byte-identical, completed")


def version() -> str:
    """``QEMU 7.2.x`` or ``QEMU 10.0.x``: the release these checks ran against."""
    out = subprocess.run([*COMMAND, "--version"], capture_output=True, text=True).stdout
    return "QEMU " + out.split("version", 1)[1].split()[0] if "version" in out else "QEMU"


def _qemu_to_qemu(work: Path, host: str) -> float:
    a = Guest(work, "a", ram=RAM, paused=True, random_ram=True, command=COMMAND)
    b = Guest(work, "b", ram=RAM, incoming=f"rdma:{host}:{PORT}", command=COMMAND)
    try:
        time.sleep(1)
        info = migrate(a, f"rdma:{host}:{PORT}", pin_all=False)
        check(info["status"] == "completed", f"QEMU -> QEMU: {info}")
        return float(info["wall_s"])  # type: ignore[arg-type]
    finally:
        a.close()
        b.close()


def _qemu_to_rdmamig(work: Path, host: str) -> float:
    image = work / "speed-image"
    shutil.rmtree(image, ignore_errors=True)
    listener, _ = listen(image, host)
    a = Guest(work, "a", ram=RAM, paused=True, random_ram=True, command=COMMAND)
    try:
        info = migrate(a, f"rdma:{host}:{PORT}", pin_all=False)
        check(info["status"] == "completed" and listener.wait(120) == 0,
              f"QEMU -> rdmamig: {info}; {stderr_of(listener)}")
        return float(info["wall_s"])  # type: ignore[arg-type]
    finally:
        a.close()
        if listener.poll() is None:
            listener.kill()


def _rdmamig_to_qemu(work: Path, host: str, image: Path) -> float:
    import json
    b = Guest(work, "b", ram=RAM, incoming=f"rdma:{host}:{PORT}", command=COMMAND)
    try:
        time.sleep(1)
        report = work / "send.json"
        send_image(image, host, "rdmamig -> QEMU", "--report", str(report))
        check(b.wait_migration(timeout=120)["status"] == "completed", "rdmamig -> QEMU")
        return float(json.loads(report.read_text())["total_time_s"])
    finally:
        b.close()


def speed(work: Path, host: str, rounds: int = 3) -> None:
    """The same paused random guest migrated QEMU -> QEMU, QEMU -> rdmamig and
    rdmamig -> QEMU, ``rounds`` times in turn after one QEMU -> QEMU to warm the
    guest up (the first migration after boot is the slowest); a QEMU source timed
    from ``migrate`` to completed as its QMP client sees it (QEMU 7.2 now and then
    reports a ``total-time`` of 0), rdmamig's send by its report (connect to done).
    Prints every figure, the medians and their ratios to QEMU -> QEMU."""
    image, _ram = saved_image(work)
    _qemu_to_qemu(work, host)  # the warm-up
    times: dict[str, list[float]] = {"QEMU -> QEMU": [], "QEMU -> rdmamig": [],
                                     "rdmamig -> QEMU": []}
    for _ in range(rounds):
        times["QEMU -> QEMU"].append(_qemu_to_qemu(work, host))
        times["QEMU -> rdmamig"].append(_qemu_to_rdmamig(work, host))
        times["rdmamig -> QEMU"].append(_rdmamig_to_qemu(work, host, image))
        log(", ".join(f"{name} {runs[-1]:.2f} s" for name, runs in times.items()))
    medians = {name: statistics.median(runs) for name, runs in times.items()}
    base = medians["QEMU -> QEMU"]
    print(f"speed, 64 MiB random guest, {version()}, medians of {rounds} alternating: "
          + ", ".join(f"{name} {seconds:.2f} s ({seconds / base:.2f}x)"
                      for name, seconds in medians.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=("to-rdmamig", "to-rdmamig-refused", "to-qemu",
                                          "round-trip", "pins", "never-touched", "speed"))
    parser.add_argument("host")
    parser.add_argument("--pin-all", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="speed: rounds to run")
    parser.add_argument("--qemu-root", type=Path, metavar="DIR",
                        help="run the QEMU of this root file system, by chroot")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.qemu_root is not None:
            COMMAND[:] = stack.enter_context(qemu_root(args.qemu_root))
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(dir="/dev/shm")))
        if args.check == "to-rdmamig":
            to_rdmamig(work, args.host, args.pin_all)
        elif args.check == "to-rdmamig-refused":
            to_rdmamig_refused(work, args.host)
        elif args.check == "to-qemu":
            to_qemu(work, args.host, args.pin_all)
        elif args.check == "round-trip":
            round_trip(work, args.host)
        elif args.check == "pins":
            pins(work, args.host)
        elif args.check == "never-touched":
            never_touched(work, args.host)
        else:
            speed(work, args.host, args.rounds)


if __name__ == "__main__":
    main()
