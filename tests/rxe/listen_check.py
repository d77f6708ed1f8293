"""On an RDMA device: ``rdmamig listen --backend verbs`` as a service with a key. A
source with the wrong key is refused, a source without one is refused at the
connection, and two sources with the key are served one after the other, each into
its own image that holds exactly what was sent.

    python tests/rxe/listen_check.py HOST
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from rdmamig.image import open_image
from rdmamig.memory import content_digest

RDMAMIG = [sys.executable, "-m", "rdmamig"]
PORT = 18527


def check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"FAILED: {what}")


def send(host: str, block: Path, key: Path | None) -> subprocess.CompletedProcess[str]:
    command = [*RDMAMIG, "send", f"{host}:{PORT}", "--backend", "verbs", "--block",
               f"mem={block}", "--quiet", "--timeout", "120"]
    if key is not None:
        command += ["--psk-file", str(key)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def main() -> None:
    host = sys.argv[1]
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:  # the guest's /var/tmp is read-only
        work = Path(tmp)
        key, wrong = work / "key", work / "wrong"
        for path in (key, wrong):
            path.write_bytes(os.urandom(32).hex().encode())
            path.chmod(0o600)
        block = work / "mem.bin"
        block.write_bytes(os.urandom(8 << 20))
        images = work / "images"
        listener = subprocess.Popen(
            [*RDMAMIG, "listen", f"{host}:{PORT}", "--backend", "verbs", "--into", str(images),
             "--psk-file", str(key), "--timeout", "120"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        failure = None
        try:
            assert listener.stdout is not None
            line = listener.stdout.readline()
            check(line.startswith("listening on"), f"listen did not start: {line!r}")
            refused = send(host, block, None)
            check(refused.returncode == 3 and "requires AUTH" in refused.stderr,
                  f"a source without the key was not refused: {refused.stderr}")
            wrong_key = send(host, block, wrong)
            check(wrong_key.returncode == 1 and "could not prove" in wrong_key.stderr,
                  f"a source with the wrong key was not refused: {wrong_key.stderr}")
            for attempt in range(2):
                sent = send(host, block, key)
                check(sent.returncode == 0, f"migration {attempt + 1} failed: {sent.stderr}")
            check(listener.poll() is None, "the listener exited")
        except SystemExit as exc:
            failure = exc
        finally:
            listener.send_signal(signal.SIGTERM)
            _out, err = listener.communicate(timeout=60)
        if failure is not None:
            raise SystemExit(f"{failure}; the listener said: {err}")
        check(listener.returncode == 130, f"listen exited {listener.returncode}: {err}")
        made = sorted(p for p in images.iterdir() if not p.name.startswith("."))
        check(len(made) == 2, f"images made: {[p.name for p in made]}; log: {err}")
        sent_digest = content_digest(block.read_bytes())
        for path in made:
            image = open_image(path)
            check(image.verify() == [], f"{path} does not match its manifest")
            check(image.block(0).digest() == sent_digest, f"{path} holds other bytes")
        print("PASS: refused without the key and with the wrong one, served 2 in a row")


if __name__ == "__main__":
    main()
