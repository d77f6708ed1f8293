"""Connecting two endpoints of one backend inside one process, for tests."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ..caps import Capability
from ..transport import Backend, Endpoint

#: Address the conformance suite uses (a verbs device needs its own IP, not loopback).
HOST_ENV = "RDMAMIG_TEST_HOST"


def default_host() -> str:
    """The address tests listen on: ``$RDMAMIG_TEST_HOST`` or 127.0.0.1."""
    return os.environ.get(HOST_ENV, "127.0.0.1")


@contextmanager
def connected_pair(
    backend: Backend,
    *,
    requested: Capability = Capability(0),
    supported: Capability | None = None,
    host: str | None = None,
    timeout: float = 10.0,
) -> Iterator[tuple[Endpoint, Endpoint]]:
    """A (source, destination) pair connected over ``backend``; both closed on exit."""
    host = host or default_host()
    listener = backend.listen(host=host, port=0, supported=(
        backend.supported if supported is None else supported))
    accepted: list[Endpoint] = []
    failures: list[BaseException] = []

    def accept() -> None:
        try:
            accepted.append(listener.accept(timeout=timeout))
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=accept, name="rdmamig-test-accept")
    thread.start()
    try:
        source = backend.connect(host=host, port=listener.address[1], requested=requested,
                                 timeout=timeout)
    finally:
        thread.join(timeout)
        listener.close()
    if failures:
        source.close()
        raise failures[0]
    destination = accepted[0]
    try:
        yield source, destination
    finally:
        source.close()
        destination.close()
