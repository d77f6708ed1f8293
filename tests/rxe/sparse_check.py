"""On an RDMA device: a tmpfs block that is mostly holes (a VM's ``/dev/shm`` memory
backend that the guest never touched) goes over verbs without its holes being
read, registered or allocated on either side: the source file keeps its allocated
size, and the image the listener writes allocates what was populated.

    python tests/rxe/sparse_check.py HOST
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rdmamig.image import open_image
from rdmamig.memory import content_digest

RDMAMIG = [sys.executable, "-m", "rdmamig"]
PORT = 18529
MiB = 1 << 20
TOTAL = 256 * MiB
#: Four 16 MiB extents of data, chunk-aligned, holes between them.
EXTENTS = [(i * 64 * MiB + 8 * MiB, 16 * MiB) for i in range(4)]


def check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"FAILED: {what}")


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def main() -> None:
    host = sys.argv[1]
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:  # the guest's /var/tmp is read-only
        work = Path(tmp)
        block = work / "mem.bin"
        with open(block, "wb") as f:
            f.truncate(TOTAL)
            for offset, size in EXTENTS:
                f.seek(offset)
                f.write(os.urandom(size))
        populated = sum(size for _, size in EXTENTS)
        check(allocated(block) == populated, f"the test file has {allocated(block)} bytes")
        image = work / "image"
        listener = subprocess.Popen(
            [*RDMAMIG, "listen", f"{host}:{PORT}", "--backend", "verbs", "--once", "--into",
             str(image), "--quiet", "--timeout", "120"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert listener.stdout is not None
        line = listener.stdout.readline()
        check(line.startswith("listening on"), f"listen did not start: {line!r}")
        sent = subprocess.run([*RDMAMIG, "send", f"{host}:{PORT}", "--backend", "verbs",
                               "--block", f"mem={block}", "--quiet", "--timeout", "120"],
                              capture_output=True, text=True, timeout=600)
        _out, err = listener.communicate(timeout=120)
        check(sent.returncode == 0, f"send failed: {sent.stderr}")
        check(listener.returncode == 0, f"listen exited {listener.returncode}: {err}")
        check(allocated(block) == populated,
              f"the source file grew from {populated} to {allocated(block)} allocated bytes")
        received = open_image(image)
        check(received.verify() == [], "the image does not match its manifest")
        check(received.block(0).digest() == content_digest(block.read_bytes()),
              "the image holds other bytes")
        held = allocated(image / received.manifest.blocks[0].file)
        check(abs(held - populated) <= populated // 100,
              f"the image allocated {held} bytes for {populated} populated")
        print(f"PASS: {TOTAL // MiB} MiB with {populated // MiB} MiB populated: source "
              f"allocated {allocated(block) // MiB} MiB after, image {held // MiB} MiB")


if __name__ == "__main__":
    main()
