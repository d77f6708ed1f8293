"""Shared fixtures: a migration between two threads of this process, over TCP, and
a file on tmpfs."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from rdmamig.caps import SOURCE_DEFAULTS, Capability
from rdmamig.engine import Destination, RamBlock, Source, SourceConfig
from rdmamig.errors import MigrationError
from rdmamig.policy import PolicyOptions
from rdmamig.testing import connected_pair
from rdmamig_policies.pin_until_done import PinUntilDone
from rdmamig_tcp import TcpBackend

DEFAULT_CAPS = SOURCE_DEFAULTS


class Migration:
    """Runs a destination thread and a source in the calling thread."""

    def __init__(self) -> None:
        self.source: Source | None = None
        self.destination: Destination | None = None
        self.source_error: BaseException | None = None
        self.destination_error: BaseException | None = None

    def run(self, blocks: Sequence[RamBlock], *, requested: Capability = DEFAULT_CAPS,
            dest_blocks: Sequence[RamBlock] | None = None, policy: Any = None,
            config: SourceConfig | None = None, workload: Any = None,
            wrap_source: Callable[[Any], Any] | None = None,
            keep: Callable[[Destination], None] | None = None, **source_kw: Any) -> Migration:
        with connected_pair(TcpBackend(), requested=requested) as (src, dst):
            self.src_endpoint, self.dst_endpoint = src, dst
            self.destination = Destination(
                dst, blocks=dest_blocks,
                make_block=None if dest_blocks is not None else
                (lambda name, length: RamBlock.anonymous(name, length)), timeout=20, keep=keep)
            thread = threading.Thread(target=self._receive)
            thread.start()
            endpoint = wrap_source(src) if wrap_source else src
            self.source = Source(endpoint, blocks,
                                 policy=policy or PinUntilDone(PolicyOptions()),
                                 config=config or SourceConfig(timeout=20),
                                 workload=workload, **source_kw)
            try:
                self.source.run()
            except MigrationError as exc:
                self.source_error = exc
            thread.join(30)
            self.pinned_after = (src.pinned_bytes, dst.pinned_bytes)
        return self

    def _receive(self) -> None:
        assert self.destination is not None
        try:
            self.destination.run()
        except MigrationError as exc:
            self.destination_error = exc


@pytest.fixture
def migration() -> Migration:
    return Migration()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs of its own: a disk that fills up."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs",
                           str(mount)], capture_output=True, text=True, check=False)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


@pytest.fixture
def shm_file() -> Iterator[Path]:
    """A fresh file on tmpfs, where reading a hole through a mapping allocates it."""
    with open("/proc/mounts", encoding="utf-8") as mounts:
        if not any(line.split()[1:3] == ["/dev/shm", "tmpfs"] for line in mounts):
            pytest.skip("/dev/shm is not a tmpfs here")
    path = Path("/dev/shm") / f"rdmamig-test-{os.getpid()}-{id(object())}"
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
