"""The README's library example, run as it is written: two processes, one call each."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet(name: str) -> str:
    """The README's python block that starts with ``# NAME``."""
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL):
        if block.startswith(f"# {name}"):
            return block
    raise AssertionError(f"README.md has no python block for {name}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    """Whether something listens on ``port`` (without connecting to it)."""
    table = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"
               for line in table)


def test_the_readme_moves_a_numpy_array_between_two_processes() -> None:
    port = _free_port()
    destination = subprocess.Popen(
        [sys.executable, "-c", _snippet("destination.py").replace("4444", str(port))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _listening(port):
        assert destination.poll() is None and time.monotonic() < deadline, (
            destination.communicate())
        time.sleep(0.05)
    source = subprocess.run(
        [sys.executable, "-c", _snippet("source.py").replace("4444", str(port))],
        capture_output=True, text=True, timeout=120)
    received, errors = destination.communicate(timeout=120)
    assert source.returncode == 0, source.stderr
    assert destination.returncode == 0, errors
    expected = f"{np.random.default_rng(7).random((1024, 1024)).sum():.6f}"
    assert source.stdout.split() == ["True", expected]
    assert received.split() == [expected]
