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
from rdmamig.cli.options import parse_size
from rdmamig.convert import export_image, import_stream
from rdmamig.image import open_image
from rdmamig.testing.qemuvm import Guest


def _completed(guest: Guest) -> dict[str, object]:
    info = guest.wait_migration(timeout=900, interval=0.005)
    assert info["status"] == "completed", info
    return info


def qemu_save(size: int, work: Path, stream: Path) -> float:
    guest = Guest(work, "src", ram=size, paused=True, ram_path=work / "src.ram")
    try:
        guest.cmd("migrate-set-parameters", **{"max-bandwidth": 100 << 30})
        guest.cmd("migrate", uri=f"exec:cat > {stream}")
        return float(_completed(guest)["total-time"]) / 1000  # type: ignore[arg-type]
    finally:
        guest.close()


def qemu_load(size: int, work: Path, stream: Path) -> float:
    ram = work / "dst.ram"
    ram.unlink(missing_ok=True)
    guest = Guest(work, "dst", ram=size, incoming="defer", ram_path=ram)
    try:
        started = time.perf_counter()
        guest.cmd("migrate-incoming", uri=f"exec:cat {stream}")
        _completed(guest)
        return time.perf_counter() - started
    finally:
        guest.close()
        ram.unlink(missing_ok=True)


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
