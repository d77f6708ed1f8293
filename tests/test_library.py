"""The README's library example, run as it is written: two processes, one call each."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rdmamig

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


def test_a_read_only_source_buffer_migrates_and_a_bad_buffer_is_named() -> None:
    import threading

    import pytest
    import rdmamig
    from rdmamig.errors import ConfigurationError

    data = np.random.default_rng(3).bytes(1 << 20)  # bytes: read-only
    received = np.zeros(1 << 20, dtype=np.uint8)
    ports: list[int] = []
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(rdmamig.receive_into(
        "127.0.0.1:0", {"ram": received}, announce=ports.append, timeout=30)))
    thread.start()
    deadline = time.monotonic() + 30
    while not ports and time.monotonic() < deadline:
        time.sleep(0.01)
    result = rdmamig.send(f"127.0.0.1:{ports[0]}", {"ram": data})
    thread.join(30)
    assert result.verified and received.tobytes() == data
    with pytest.raises(ConfigurationError, match="RAM block 'ram': not contiguous memory"):
        rdmamig.send("127.0.0.1:9", {"ram": np.zeros((256, 32), dtype=np.uint8)[:, :16]})
    with pytest.raises(ConfigurationError, match="'ram' is read-only memory: a destination"):
        rdmamig.receive_into("127.0.0.1:0", {"ram": data}, timeout=1)


def test_a_source_can_wait_for_a_destination_that_is_not_listening_yet() -> None:
    import threading

    import pytest
    import rdmamig
    from rdmamig.errors import UnreachableError

    port = _free_port()
    with pytest.raises(UnreachableError, match="cannot reach the destination"):
        rdmamig.send(f"127.0.0.1:{port}", {"ram": bytes(4096)})  # at once, by default
    received = np.zeros(1 << 20, dtype=np.uint8)
    later = threading.Timer(1.0, lambda: rdmamig.receive_into(
        f"127.0.0.1:{port}", {"ram": received}, timeout=30))
    later.start()
    data = np.random.default_rng(5).bytes(1 << 20)
    result = rdmamig.send(f"127.0.0.1:{port}", {"ram": data}, connect_wait=60)
    later.join(30)
    assert result.verified and received.tobytes() == data


def test_every_public_name_loads_from_where_the_package_says() -> None:
    # rdmamig loads its names lazily from a table beside __all__: the two must list
    # the same names, and each must load.
    assert set(rdmamig.__all__) == {"__version__", *rdmamig._EXPORTS}
    for name in rdmamig.__all__:
        assert getattr(rdmamig, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nowhere'"):
        rdmamig.nowhere  # noqa: B018
