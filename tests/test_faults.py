"""The fault matrix: a live ``rdmamig send`` into ``rdmamig listen --once``, one side
killed (SIGKILL) or stopped (SIGTERM) while connected or while pages flow. After
each: the source's memory is intact, nothing is exposed as an image, the process
the source paused runs again, and the side that survives exits non-zero and says
why."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import xxhash
from hostile import RDMAMIG

MiB = 1 << 20

#: Writes random pages into a file for ever: memory that keeps a migration going.
DIRTIER = textwrap.dedent("""
    import mmap, os, random, sys
    with open(sys.argv[1], "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
    pages = len(m) // 4096
    while True:
        at = random.randrange(pages) * 4096
        m[at:at + 4096] = os.urandom(4096)
""")


def _wait_for(what: str, ready: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"never saw: {what}")
        time.sleep(0.02)


def _state(pid: int) -> str:
    """The process state letter of /proc/PID/stat (T: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _data_arrived(images: Path) -> bool:
    """Whether a block file of the staging image holds data yet."""
    return any(block.stat().st_blocks > 0 for block in images.glob(".*.partial-*/blocks/*"))


@pytest.mark.parametrize("victim", ["source", "destination"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
@pytest.mark.parametrize("point", ["connected", "transferring"])
def test_a_side_that_dies_leaves_the_source_intact_and_nothing_exposed(
        tmp_path: Path, victim: str, sig: signal.Signals, point: str) -> None:
    static, hot = tmp_path / "static.bin", tmp_path / "hot.bin"
    static.write_bytes(os.urandom(32 * MiB))
    hot.write_bytes(os.urandom(8 * MiB))
    before = xxhash.xxh3_128_hexdigest(static.read_bytes())
    image = tmp_path / "received"
    dirtier = subprocess.Popen([sys.executable, "-c", DIRTIER, str(hot)])
    listener = subprocess.Popen([*RDMAMIG, "listen", "127.0.0.1:0", "--once", "--into",
                                 str(image), "--timeout", "10"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stderr is not None
        port = listener.stdout.readline().rsplit(":", 1)[1].strip()
        source = subprocess.Popen(
            [*RDMAMIG, "send", f"127.0.0.1:{port}", "--block", f"static={static}",
             "--block", f"hot={hot}", "--live", "--pause-pid", str(dirtier.pid),
             "--max-downtime", "0", "--max-iterations", "100000", "--timeout", "10",
             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if point == "connected":
            line = listener.stderr.readline()  # the listener logs what it accepts
            assert "accepted" in line, line
        else:
            _wait_for("pages arriving", lambda: _data_arrived(tmp_path))
        killed, survivor = (source, listener) if victim == "source" else (listener, source)
        killed.send_signal(sig)
        killed_code = killed.wait(30)
        survivor_code = survivor.wait(60)
        _out, survivor_err = survivor.communicate()
        # The survivor says why, and fails.
        assert survivor_code == 1, survivor_err
        assert "failed:" in survivor_err
        # SIGTERM is an interruption like Ctrl-C; SIGKILL leaves no say.
        assert killed_code == (130 if sig == signal.SIGTERM else -signal.SIGKILL)
        # The source's memory is as it was, its paused process runs.
        assert xxhash.xxh3_128_hexdigest(static.read_bytes()) == before
        assert _state(dirtier.pid) != "T"
        # Nothing is exposed as complete.
        assert not image.exists()
        staging = list(tmp_path.glob(".received.partial-*"))
        if victim == "destination" and sig == signal.SIGKILL:
            # Nobody was left to clean up (staging is made with the first block,
            # after the handshake): the next listener does.
            assert len(staging) == (1 if point == "transferring" else 0)
            again = subprocess.Popen([*RDMAMIG, "listen", "127.0.0.1:0", "--once", "--into",
                                      str(image), "--timeout", "1"], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
            _out, err = again.communicate(timeout=60)
            assert ("left by a listener that was killed" in err) == bool(staging), err
        assert list(tmp_path.glob(".received.partial-*")) == []
    finally:
        for process in (dirtier, listener):
            process.kill()
            process.wait()
