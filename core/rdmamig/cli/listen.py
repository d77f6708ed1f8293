"""``rdmamig listen``: a destination service. It receives migrations, each into a
new migration image, exposed under its name only once complete and verified
(:mod:`rdmamig.image`), until it is stopped (SIGINT, SIGTERM); ``--once`` receives
one and exits with its outcome.

A listener is a trust boundary: a connection that fails its handshake or its
migration is logged and dropped and never ends the listener or another migration;
with a key (``--psk-file`` or ``$RDMAMIG_PSK``) only sources that prove it are
served; the layout a source declares is checked against ``--max-ram`` and the
free space before anything is made.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import itertools
import logging
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .. import __version__
from ..auth import PreSharedKey, load_key
from ..engine import Destination, RamBlock
from ..errors import ConfigurationError, RefusedError, TransportError
from ..image import DiskSpace, ImageWriter, check_new_image, remove_stale_staging
from ..limits import Limits, physical_memory
from ..migration import available_backend, listen, receive_on
from ..plugins import load_registry
from ..qmp import ControlServer
from ..report import build_report
from ..status import Event, Monitor
from ..transport import Backend, Endpoint, Listener, address_text
from ..units import size_text
from .options import (
    STDOUT,
    add_connection_arguments,
    backend_options,
    check_outputs,
    events_file,
    finish,
    parse_address,
    parse_control_address,
    parse_seconds,
    parse_size,
    whole_number,
)

log = logging.getLogger("rdmamig.listen")

#: Images a listener without a key keeps at most unless told otherwise.
KEYLESS_MAX_IMAGES = 32
#: How often the serving loop wakes to notice a signal.
_POLL_SECONDS = 0.5


class _Quota:
    """What a service keeps in its image directory: at most ``images`` images and
    ``total`` bytes allocated by them, those being received counted in (at the
    RAM they declared). A key-less listener (for QEMU sources, which cannot
    authenticate) takes images from anyone who can reach it: this is what bounds
    what they can leave."""

    def __init__(self, directory: Path, *, images: int | None, total: int | None) -> None:
        self.directory = directory
        self.images = images
        self.total = total
        self._lock = threading.Lock()
        self._receiving: dict[int, int] = {}
        #: What the kept images allocated when each migration declared its first
        #: block: walked once per migration, not once per block.
        self._kept_bytes: dict[int, int] = {}

    def claim(self, number: int, length: int) -> None:
        """Migration ``number`` declares a block of ``length`` bytes more.

        Raises:
            RefusedError: over either quota.
        """
        with self._lock:
            if number not in self._receiving:
                kept = [p for p in self.directory.iterdir() if not p.name.startswith(".")]
                if self.images is not None and len(kept) + len(self._receiving) >= self.images:
                    raise RefusedError(f"this listener keeps at most {self.images} images "
                                       f"(--max-images) and has them")
                self._kept_bytes[number] = (sum(_allocated(image) for image in kept)
                                            if self.total is not None else 0)
            if self.total is not None:
                used = self._kept_bytes[number]
                asked = used + sum(self._receiving.values()) + length
                if asked > self.total:
                    raise RefusedError(f"this listener keeps at most {self.total} bytes of "
                                       f"images (--max-bytes): {used} are kept, "
                                       f"{asked - used} would be received")
            self._receiving[number] = self._receiving.get(number, 0) + length

    def done(self, number: int) -> None:
        """Migration ``number`` is over (kept: its image counts from now on)."""
        with self._lock:
            self._receiving.pop(number, None)
            self._kept_bytes.pop(number, None)


def _allocated(image: Path) -> int:
    """Bytes an image's files have allocated (holes not counted)."""
    return sum(path.lstat().st_blocks * 512 for path in image.rglob("*"))


class _Service:
    """What every migration of one ``listen`` shares."""

    def __init__(self, args: argparse.Namespace, key: PreSharedKey | None) -> None:
        self.args = args
        self.key = key
        self.limits = Limits(max_ram=args.max_ram or physical_memory(),
                             max_pinned=args.max_pinned)
        #: Writes one event of any migration (``--events``), or None.
        self.events: Callable[[Event], None] | None = None
        #: One account of the free space for every migration at once.
        self.space = DiskSpace(args.into.parent if args.once else args.into)
        images = args.max_images if args.max_images is not None else (
            None if key is not None else KEYLESS_MAX_IMAGES)
        #: What a service keeps (None with --once).
        self.quota = None if args.once else _Quota(args.into, images=images or None,
                                                   total=args.max_bytes)

    def receive(self, endpoint: Endpoint, into: Path, number: int = 1, *,
                admit: Callable[[], None] | None = None,
                monitor: Monitor | None = None) -> dict[str, Any]:
        """Receive migration ``number`` into a new image at ``into`` (once ``admit``
        lets the source in; heard by ``monitor``): its report."""
        args = self.args
        monitor = monitor or Monitor(total_bytes=0, max_downtime=0.0)
        write = self.events
        if write is not None:  # a service's events say which migration they are of
            monitor.subscribe(lambda event: write(
                {**event, "data": {**event["data"], "id": f"migration-{number}"}}))
        # Made with the first block: nothing is created before the source has
        # authenticated and its layout passed the limits.
        writer: ImageWriter | None = None

        def make_block(name: str, length: int) -> RamBlock:
            nonlocal writer
            if self.quota is not None:
                self.quota.claim(number, length)
            writer = writer or ImageWriter(into, space=self.space)
            return writer.add_block(name, length)

        def keep(destination: Destination) -> None:
            result = destination.result
            assert writer is not None
            writer.set_state(result.state)
            writer.commit_from(result.origin, digests=result.digests, source={
                "backend": args.backend, "listen": args.address, "peer": result.peer,
                "verification": "verified" if result.verified else
                "not offered by the peer (QEMU)"})

        try:
            destination = receive_on(endpoint, timeout=args.timeout, make_block=make_block,
                                     limits=self.limits, key=self.key, keep=keep,
                                     monitor=monitor, auth_timeout=args.auth_timeout,
                                     admit=admit)
        finally:
            if writer is not None:
                writer.close()  # removes the staging files of what was not kept
            if self.quota is not None:
                self.quota.done(number)
        result = destination.result
        return build_report(backend=args.backend, policy="-", ram_bytes=sum(
            b.length for b in destination.blocks), source=None, destination=result,
            error=result.error if not result.committed else None)


def run(args: argparse.Namespace) -> int:
    """Run ``rdmamig listen``."""
    registry = load_registry()
    backend = available_backend(registry.backend(args.backend),
                                backend_options(args, registry))
    host, port = parse_address(args.address)
    key = load_key(args.psk_file)
    check_outputs(args)
    if args.once:
        check_new_image(args.into)
        stale = remove_stale_staging(args.into.parent, args.into.name)
    else:
        if args.report is not None:
            raise ConfigurationError("--report is for --once (a service writes a summary "
                                     "line per migration)")
        if args.control is not None:
            raise ConfigurationError("--control is for --once (QMP watches one migration; "
                                     "a service's are in its log and --events)")
        made = not args.into.exists()
        _check_image_directory(args.into)
        bound = threading.Event()
        try:
            return _run_in(args, backend, host, port, key, remove_stale_staging(args.into),
                           bound=bound)
        finally:
            if made and not bound.is_set():  # it failed to start: it leaves nothing
                with contextlib.suppress(OSError):
                    args.into.rmdir()
    return _run_in(args, backend, host, port, key, stale, bound=threading.Event())


def _run_in(args: argparse.Namespace, backend: Backend, host: str, port: int,
            key: PreSharedKey | None, stale: list[Path], *, bound: threading.Event) -> int:
    """``rdmamig listen`` once its image directory is there; ``bound`` is set once
    it listens."""
    for staging in stale:
        log.info("removed %s, left by a listener that was killed", staging)
    service = _Service(args, key)
    _allow_open_files(1 if args.once else args.max_sessions, service.limits.max_blocks)
    with events_file(args.events) as write:
        service.events = write
        try:
            listener = listen(backend, host, port, key=key)
        except TransportError as exc:  # the address is the operator's to fix: exit 2
            raise ConfigurationError(str(exc)) from None
        bound.set()
        port = listener.address[1]
        if args.once:
            return _receive_once(service, listener, address_text(host, port))
        _announce(args, address_text(host, port))
        if listener.concurrent:
            with listener:
                _serve(service, listener, _Admission(
                    sessions=args.max_sessions, pending=args.max_pending, wait=args.timeout))
        else:
            _serve_one_at_a_time(service, listener,
                                 lambda: listen(backend, host, port, key=key))
    return 0


def _announce(args: argparse.Namespace, address: str) -> None:
    """Say where it listens: on standard output, unless the events go there (a
    JSON line each)."""
    print(f"listening on {address}", flush=True,
          file=sys.stderr if args.events == STDOUT else sys.stdout)


def _receive_once(service: _Service, listener: Listener, address: str) -> int:
    """``listen --once``: accept one source and receive its migration."""
    args = service.args
    monitor = Monitor(total_bytes=0, max_downtime=0.0)
    with contextlib.ExitStack() as stack:
        # Made before it says it listens, so that none of it is on the clock of a
        # migration that starts then (a QEMU source's): the control socket, and the
        # display, which shows "waiting" until the source comes (started after the
        # line on standard output: a live display takes over what is printed).
        if args.control is not None:
            stack.enter_context(ControlServer(args.control, monitor, version=__version__,
                                              destination=True))
        display = destination_display(not args.quiet, monitor)
        _announce(args, address)
        stack.enter_context(display)
        with listener:
            endpoint = listener.accept(timeout=args.timeout)
        report = service.receive(endpoint, args.into, monitor=monitor)
    return finish(args, report)


def destination_display(shown: bool, monitor: Monitor) -> contextlib.AbstractContextManager[Any]:
    """On a terminal (standard error), the destination's own progress while the
    context is entered: its status, the pass the source is in, what it has
    pinned. Made at the call (loading what draws it), shown on entering."""
    if not shown:
        return contextlib.nullcontext()
    from rich.console import Console
    console = Console(stderr=True)
    if not console.is_terminal:
        return contextlib.nullcontext()
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description:>10}"),
                        TextColumn("{task.fields[line]}"), TimeElapsedColumn(),
                        console=console, transient=True)
    task = progress.add_task("waiting", line="")

    def on_event(event: Event) -> None:
        data = event["data"]
        status = monitor.query()
        pinned = status.get("rdmamig", {}).get("pinned-bytes", 0)
        progress.update(task, description=f"pass {data['pass']}" if "pass" in data
                        else str(data["status"]),
                        line=f"{size_text(monitor.total_bytes)}, pinned {size_text(pinned)}")

    @contextlib.contextmanager
    def shown_while() -> Iterator[None]:
        monitor.subscribe(on_event)
        try:
            with progress:
                yield
        finally:
            monitor.unsubscribe(on_event)

    return shown_while()


def _allow_open_files(sessions: int, blocks: int) -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one: a mapped block keeps two file
    descriptors (Python's mmap holds a copy of one, the block the other, for
    SEEK_DATA and fallocate), so ``sessions`` migrations of up to ``blocks`` blocks
    need twice that many and more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = sessions * (2 * blocks + 16) + 64
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if hard != resource.RLIM_INFINITY and hard < needed:
            log.warning("RLIMIT_NOFILE is %d: %d migrations of %d blocks each may need %d "
                        "file descriptors", hard, sessions, blocks, needed)


def _check_image_directory(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"cannot use {path} for images: {exc.strerror}") from None
    if path.is_symlink() or not path.is_dir():
        raise ConfigurationError(f"{path} is not a directory")


class _Admission:
    """Who may hold one of ``sessions`` migration slots: a connection gets one only
    once it has proven the key (without a key: once its handshake is complete).
    Until it has one it is pending, among at most ``pending``: when they are all
    there, the oldest that has proven nothing is closed to make room for a
    newcomer, and a newcomer is closed only when every pending one has proven
    itself (and waits for a slot, at most ``wait`` seconds). Strangers that connect
    and stay silent can thus neither take a slot nor keep a source out."""

    def __init__(self, *, sessions: int, pending: int, wait: float | None) -> None:
        self.sessions = sessions
        self._pending_max = pending
        self._wait = wait
        self._slots = threading.BoundedSemaphore(sessions)
        self._lock = threading.Lock()
        #: Pending connections by number, oldest first, and whether each is proven.
        self._pending: dict[int, tuple[Endpoint, bool]] = {}
        self._admitted: set[int] = set()

    def arrive(self, number: int, endpoint: Endpoint) -> bool:
        """Count connection ``number`` as pending; False if there is no room (it is
        closed)."""
        with self._lock:
            if len(self._pending) >= self._pending_max:
                unproven = [n for n, (_, proven) in self._pending.items() if not proven]
                if not unproven:
                    log.warning("connection %d closed: %d proven sources wait for a slot "
                                "already (--max-pending)", number, len(self._pending))
                    endpoint.close()
                    return False
                oldest, _ = self._pending.pop(unproven[0])
                log.warning("%d connections wait to authenticate (--max-pending): closed "
                            "the oldest (%d) for connection %d", self._pending_max,
                            unproven[0], number)
                oldest.close()
            self._pending[number] = (endpoint, False)
            return True

    def admit(self, number: int) -> None:
        """Connection ``number`` has proven itself: wait for a slot.

        Raises:
            RefusedError: it was closed meanwhile, or no slot came free in time.
        """
        with self._lock:
            entry = self._pending.get(number)
            if entry is None:
                raise RefusedError("closed to make room for other connections")
            self._pending[number] = (entry[0], True)
        try:
            if not self._slots.acquire(blocking=False):
                log.info("migration %d waits: %d migrations at once (--max-sessions)",
                         number, self.sessions)
                if not self._slots.acquire(timeout=self._wait):
                    raise RefusedError(f"this listener is busy: {self.sessions} migrations "
                                       f"at once (--max-sessions)")
            with self._lock:
                self._admitted.add(number)
        finally:
            with self._lock:
                self._pending.pop(number, None)

    def leave(self, number: int) -> None:
        """Connection ``number`` is over: its place or its slot is free."""
        with self._lock:
            self._pending.pop(number, None)
            admitted = number in self._admitted
            self._admitted.discard(number)
        if admitted:
            self._slots.release()


def _serve(service: _Service, listener: Listener, admission: _Admission) -> None:
    """Accept and serve sources until interrupted (``admission`` says which become
    migrations); then break off the migrations still running (their staging files
    go) and return."""
    running: dict[int, tuple[threading.Thread, Endpoint]] = {}
    lock = threading.Lock()
    numbers = itertools.count(1)

    def serve(number: int, endpoint: Endpoint) -> None:
        try:
            _serve_migration(service, number, endpoint,
                             admit=lambda: admission.admit(number))
        finally:
            with lock:
                running.pop(number, None)
            admission.leave(number)

    try:
        while True:
            try:
                endpoint = _accept(listener)
            except TransportError as exc:
                log.warning("accept failed: %s", exc)
                time.sleep(_POLL_SECONDS)
                continue
            number = next(numbers)
            if not admission.arrive(number, endpoint):
                continue
            thread = threading.Thread(target=serve, args=(number, endpoint),
                                      name=f"rdmamig-migration-{number}", daemon=True)
            with lock:
                running[number] = (thread, endpoint)
            thread.start()
    finally:
        with lock:
            left = list(running.values())
        for _thread, endpoint in left:
            endpoint.close()  # its destination fails, and its image's staging goes
        for thread, _endpoint in left:
            thread.join(timeout=30)


def _accept(listener: Listener) -> Endpoint:
    """The next source, waking now and then so that a signal is noticed."""
    while True:
        try:
            return listener.accept(timeout=_POLL_SECONDS)
        except TransportError as exc:
            if exc.errno != errno.ETIMEDOUT:
                raise


def _serve_one_at_a_time(service: _Service, listener: Listener,
                         relisten: Callable[[], Listener]) -> None:
    """Serve sources one after the other on a backend whose listener takes one
    connection (verbs): a new listener on the same port for each."""
    for number in itertools.count(1):
        try:
            with listener:
                endpoint = _accept(listener)
        except TransportError as exc:  # the listener gave up: listen anew
            log.warning("accept failed: %s", exc)
            listener = relisten()
            continue
        _serve_migration(service, number, endpoint)
        listener = relisten()


def _serve_migration(service: _Service, number: int, endpoint: Endpoint, *,
                     admit: Callable[[], None] | None = None) -> None:
    """Migration ``number`` of a service, into a new image (once ``admit`` lets it
    in); its outcome logged, whatever it is (it is not the service's), its
    connection closed."""
    into = _image_path(service.args.into, number)
    try:
        try:
            report = service.receive(endpoint, into, number, admit=admit)
        finally:
            endpoint.close()  # first: a migration logged as over holds nothing
    except Exception as exc:
        log.warning("migration %d failed: %s", number, exc)
        return
    if report["succeeded"]:
        log.info("migration %d: %s, %d MiB in %.2f s into %s", number,
                 report["verification"], report["ram_bytes"] >> 20,
                 report["total_time_s"], into)
    else:
        log.warning("migration %d failed: %s", number, report["error"])


def _image_path(directory: Path, number: int) -> Path:
    """A new image's path in ``directory``: the time and the migration's number."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return directory / f"{stamp}-{number:04d}"


def add_verb(verbs: Any) -> None:
    """Add ``listen`` to the ``rdmamig`` parser."""
    listen_ = verbs.add_parser("listen", help="receive migrations, each into a new image")
    listen_.add_argument("address", metavar="ADDR:PORT")
    listen_.add_argument("--into", type=Path, required=True, metavar="DIR",
                         help="where images go: a directory holding one per migration, "
                              "or with --once the image itself (it must not exist)")
    listen_.add_argument("--once", action="store_true",
                         help="receive one migration, then exit with its outcome")
    listen_.add_argument("--max-sessions", type=whole_number(1, 64), default=4, metavar="N",
                         help="migrations received at once (default 4; verbs serves one)")
    listen_.add_argument("--max-pending", type=whole_number(1, 1024), default=32, metavar="N",
                         help="connections that may wait to authenticate or for a slot "
                              "(default 32); when full, the oldest that has proven nothing "
                              "is closed")
    listen_.add_argument("--auth-timeout", type=parse_seconds, default=10.0,
                         metavar="SECONDS",
                         help="seconds a source has for each authentication message "
                              "(default 10; --timeout after it)")
    listen_.add_argument("--max-images", type=whole_number(0, 10**6), metavar="N",
                         help=f"images a service keeps at most, received ones included "
                              f"(default: {KEYLESS_MAX_IMAGES} without a key, no limit "
                              f"with one; 0: no limit)")
    listen_.add_argument("--max-bytes", type=parse_size, metavar="BYTES",
                         help="bytes a service's images may allocate at most, received "
                              "ones included at the RAM they declare (default: the disk)")
    listen_.add_argument("--max-ram", type=parse_size, metavar="BYTES",
                         help="most RAM one migration may declare (default: this "
                              "machine's memory)")
    listen_.add_argument("--max-pinned", type=parse_size, metavar="BYTES",
                         help="most bytes a source may have pinned here at once "
                              "(default: only RLIMIT_MEMLOCK limits it)")
    listen_.add_argument("--control", type=parse_control_address, metavar="unix:PATH",
                         help="with --once: a QMP socket to watch the migration received "
                              "(query-migrate, query-status: inmigrate, then paused)")
    listen_.add_argument("--handshake-timeout", type=parse_seconds, metavar="SECONDS",
                         help="seconds a connection has for its handshake, first byte to "
                              "last lane (TCP; default 10)")
    add_connection_arguments(listen_)
    listen_.set_defaults(run=run)
