"""``rdmamig image import`` / ``export`` against QEMU's own save and load of the same
guest, in the same run.

    python benchmarks/qemu_image.py [--size 1GiB] [--repeat 3] [--dir /dev/shm]

A paused ``pc`` guest (TCG) with random RAM in a ``memory-backend-file``. QEMU save:
QMP ``migrate exec:cat > FILE`` with ``max-bandwidth`` lifted, ``total-time`` of
``query-migrate``. QEMU load: a second QEMU started with ``-incoming defer``, timed
from ``migrate-incoming exec:cat FILE`` to ``completed``. rdmamig: the library calls
``import_stream`` (FILE into a new image) and ``export_image`` (the image into a new
FILE), timed in process, and the CLI verbs timed as whole commands (Python's start
included). Everything lives in ``--dir`` (tmpfs by default, as the guest's RAM). Needs
the package ``qemu-system-x86`` and ``qemu.qmp``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from qemu.qmp.legacy import QEMUMonitorProtocol
from rdmamig.cli.options import parse_size
from rdmamig.convert import export_image, import_stream
from rdmamig.image import open_image


def _qemu(size: int, ram: Path, qmp: Path, *extra: str) -> tuple[subprocess.Popen[bytes],
                                                                    QEMUMonitorProtocol]:
    process = subprocess.Popen([
        "qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-display", "none",
        "-machine", "pc,memory-backend=mem", "-m", f"{size >> 20}",
        "-object", f"memory-backend-file,id=mem,size={size},mem-path={ram},share=on",
        "-qmp", f"unix:{qmp},server=on,wait=off", *extra])
    while not qmp.exists():
        time.sleep(0.02)
    monitor = QEMUMonitorProtocol(str(qmp))
    monitor.connect()
    return process, monitor


def _wait(monitor: QEMUMonitorProtocol) -> dict[str, object]:
    while True:
        info = monitor.cmd("query-migrate")
        if info.get("status") in ("completed", "failed"):
            assert info["status"] == "completed", info
            return info
        time.sleep(0.005)


def qemu_save(size: int, work: Path, stream: Path) -> float:
    process, monitor = _qemu(size, work / "src.ram", work / "src.qmp", "-S")
    try:
        monitor.cmd("migrate-set-parameters", **{"max-bandwidth": 100 << 30})
        monitor.cmd("migrate", uri=f"exec:cat > {stream}")
        return float(_wait(monitor)["total-time"]) / 1000  # type: ignore[arg-type]
    finally:
        monitor.close()
        process.kill()
        process.wait()
        (work / "src.qmp").unlink(missing_ok=True)


def qemu_load(size: int, work: Path, stream: Path) -> float:
    (work / "dst.ram").unlink(missing_ok=True)
    process, monitor = _qemu(size, work / "dst.ram", work / "dst.qmp", "-incoming", "defer")
    try:
        started = time.perf_counter()
        monitor.cmd("migrate-incoming", uri=f"exec:cat {stream}")
        _wait(monitor)
        return time.perf_counter() - started
    finally:
        monitor.close()
        process.kill()
        process.wait()
        (work / "dst.qmp").unlink(missing_ok=True)
        (work / "dst.ram").unlink(missing_ok=True)


def timed(function: object, *args: object, **kwargs: object) -> float:
    started = time.perf_counter()
    function(*args, **kwargs)  # type: ignore[operator]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=1 << 30)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm"))
    args = parser.parse_args()
    work = args.dir / f"rdmamig-bench-{os.getpid()}"
    work.mkdir()
    try:
        with (work / "src.ram").open("wb") as out:
            rng = np.random.default_rng(1)
            for _ in range(args.size // (64 << 20)):
                out.write(rng.bytes(64 << 20))
        times: dict[str, list[float]] = {k: [] for k in (
            "qemu save", "rdmamig import", "rdmamig export", "qemu load",
            "rdmamig image import (CLI)", "rdmamig image export (CLI)")}
        stream, image, exported = work / "saved", work / "image", work / "exported"
        for _ in range(args.repeat):
            times["qemu save"].append(qemu_save(args.size, work, stream))

            def do_import() -> None:
                with stream.open("rb") as source:
                    import_stream(source, image)

            def do_export() -> None:
                with exported.open("wb") as out:
                    export_image(open_image(image), out)

            times["rdmamig import"].append(timed(do_import))
            times["rdmamig export"].append(timed(do_export))
            times["qemu load"].append(qemu_load(args.size, work, exported))
            cli = [sys.executable, "-m", "rdmamig", "image"]
            times["rdmamig image import (CLI)"].append(timed(subprocess.run, [
                *cli, "import", str(stream), str(work / "cli-image")],
                capture_output=True))
            times["rdmamig image export (CLI)"].append(timed(subprocess.run, [
                *cli, "export", str(work / "cli-image"), str(work / "cli-out")],
                capture_output=True))
            # What is left in tmpfs between repeats slows the next ones: start each
            # repeat with only the guest's RAM there.
            for path in (stream, exported, work / "cli-out"):
                path.unlink(missing_ok=True)
            for path in (image, work / "cli-image"):
                shutil.rmtree(path, ignore_errors=True)
        save = statistics.median(times["qemu save"])
        print(f"# {time.strftime('%Y-%m-%d')} on {os.uname().nodename}, {os.cpu_count()} "
              f"cores; {args.size >> 20} MiB random RAM, files in {args.dir}; medians of "
              f"{args.repeat} (min - max)")
        print("| step | seconds | GB/s | vs QEMU's save |")
        print("|---|---|---|---|")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"| {name} | {median:.3f} ({min(values):.3f} - {max(values):.3f}) | "
                  f"{args.size / median / 1e9:.2f} | {save / median:.2f}x |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
