"""Running one side of a migration over a backend chosen by name: connect and
migrate blocks (:func:`run_source`), or listen, accept one source and receive
(:func:`receive`, :func:`receive_on`); and the one-call forms of both for a
program that has memory to move (:func:`send`, :func:`receive_into`)."""

from __future__ import annotations

import contextlib
import errno
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from .auth import PreSharedKey
from .caps import SOURCE_DEFAULTS, Capability, is_qemu
from .engine import (
    Destination,
    DestinationResult,
    RamBlock,
    Source,
    SourceConfig,
    SourceResult,
    Workload,
)
from .engine.outgoing import outgoing_for
from .errors import (
    ConfigurationError,
    MigrationError,
    RdmamigError,
    TransportError,
    UnreachableError,
)
from .limits import Limits
from .policy import PolicyOptions, UnpinPolicy
from .status import Monitor, Status
from .tracking import DirtyTracker
from .transport import Backend, Endpoint, Listener, address_text

#: How often a source waiting for its destination (``connect_wait``) tries again.
CONNECT_RETRY_S = 0.2


@attrs.frozen(kw_only=True)
class Plan:
    """A source's choices, resolved against the plugin registry."""

    backend: type[Backend]
    #: Keyword options for the backend's constructor (``device``, ``channels``).
    backend_options: dict[str, Any] = attrs.field(factory=dict)
    policy: type[UnpinPolicy]
    options: PolicyOptions
    requested: Capability
    config: SourceConfig
    #: The pre-shared key to prove (then ``requested`` holds AUTH).
    key: PreSharedKey | None = None

    def __attrs_post_init__(self) -> None:
        """The rules that make a plan valid, whoever made it (the CLI, :func:`send`).

        Raises:
            ConfigurationError: a cap for a policy that keeps none, or PIN_ALL asked
                with a policy that unpins.
        """
        if self.options.pin_cap is not None and not self.policy.takes_cap:
            raise ConfigurationError(f"policy {self.policy.name!r} keeps no cap; a pin cap "
                                     f"is for the policies that take one (rdmamig policies)")
        if self.requested & Capability.PIN_ALL and not self.policy.keeps_everything:
            raise ConfigurationError(f"--pin-all registers whole blocks up front, and policy "
                                     f"{self.policy.name!r} unpins chunks: use one or the "
                                     f"other")

    @property
    def label(self) -> str:
        """The policy as a report names it: with ``+ PIN_ALL`` when whole blocks are
        registered up front by request (``--pin-all``), not by the policy."""
        asked = bool(self.requested & Capability.PIN_ALL)
        if asked and not self.policy.capabilities & Capability.PIN_ALL:
            return f"{self.policy.name} + PIN_ALL"
        return self.policy.name


def source_capabilities(policy: type[UnpinPolicy], *, key: PreSharedKey | None = None,
                        pin_all: bool = False) -> Capability:
    """What a source asks for: rdmamig's extensions, what ``policy`` needs, AUTH with
    a key and PIN_ALL when asked."""
    requested = SOURCE_DEFAULTS | policy.capabilities
    if key is not None:
        requested |= Capability.AUTH
    if pin_all:
        requested |= Capability.PIN_ALL
    return requested


def available_backend(backend: type[Backend], options: dict[str, Any] | None = None) -> Backend:
    """An instance of ``backend`` with ``options``, checked to run here.

    Raises:
        ConfigurationError: it takes no such option or refuses its value, or cannot
            run on this machine.
    """
    try:
        instance = backend(**(options or {}))
    except TypeError:
        named = ", ".join("--" + key.replace("_", "-") for key in options or {})
        raise ConfigurationError(f"backend {backend.name!r} takes no option {named}") from None
    except ValueError as exc:  # an option's value it refuses
        raise ConfigurationError(f"backend {backend.name!r}: {exc}") from None
    reason = instance.unavailable_reason()
    if reason is not None:
        raise ConfigurationError(f"backend {backend.name!r} cannot run here: {reason}")
    return instance


def run_source(plan: Plan, host: str, port: int, blocks: Sequence[RamBlock], *,
               workload: Workload | None = None, trackers: Sequence[DirtyTracker] = (),
               on_progress: Callable[[dict[str, float]], None] | None = None,
               origin: dict[str, Any] | None = None,
               monitor: Monitor | None = None) -> tuple[SourceResult, MigrationError | None]:
    """Connect and migrate ``blocks``: the source's result (what it did, also when it
    failed) and the error it failed with, or None. ``monitor`` hears its status from
    ``setup`` on, and may cancel it or change its limits (:mod:`rdmamig.status`).

    A destination that grants none of rdmamig's extensions is an unmodified QEMU:
    it gets QEMU's own stream, which needs ``origin`` to be a QEMU image's.

    Raises:
        ConfigurationError: the plan's backend cannot run here, or a QEMU
            destination and no QEMU image.
        UnreachableError: the destination cannot be reached.
    """
    backend = available_backend(plan.backend, plan.backend_options)
    monitor = monitor or Monitor(total_bytes=sum(b.length for b in blocks),
                                 max_downtime=plan.config.max_downtime,
                                 max_bandwidth=plan.config.max_bandwidth)
    monitor.set_status(Status.SETUP)
    started = time.monotonic()
    while True:
        try:
            endpoint = backend.connect(host=host, port=port, requested=plan.requested,
                                       timeout=plan.config.timeout)
            break
        except RdmamigError as exc:
            refused = isinstance(exc, TransportError) and exc.errno == errno.ECONNREFUSED
            if refused and time.monotonic() - started < plan.config.connect_wait:
                time.sleep(CONNECT_RETRY_S)  # not listening yet
                continue
            monitor.set_status(Status.FAILED, str(exc))
            raise UnreachableError(f"cannot reach the destination "
                                   f"{address_text(host, port)}: {exc}") from exc
    with endpoint:
        outgoing = outgoing_for(origin, qemu_peer=is_qemu(requested=plan.requested,
                                                          granted=endpoint.capabilities))
        source = Source(endpoint, blocks, policy=plan.policy(plan.options), config=plan.config,
                        workload=workload, trackers=trackers, on_progress=on_progress,
                        started_at=started, stream=outgoing, key=plan.key,
                        monitor=monitor)
        try:
            source.run()
        except MigrationError as exc:
            return source.result, exc
    return source.result, None


def listen(backend: Backend, host: str, port: int, *,
           key: PreSharedKey | None = None) -> Listener:
    """Bind a listener for sources; with ``key``, one that refuses sources that do
    not offer to prove it (Capability.AUTH).

    Raises:
        TransportError: the address cannot be bound.
    """
    return backend.listen(host=host, port=port, supported=backend.supported,
                          required=Capability.AUTH if key is not None else Capability(0))


def receive_on(endpoint: Endpoint, *, timeout: float,
               blocks: Sequence[RamBlock] | None = None,
               make_block: Callable[[str, int], RamBlock] | None = None,
               limits: Limits | None = None, key: PreSharedKey | None = None,
               keep: Callable[[Destination], None] | None = None,
               monitor: Monitor | None = None, auth_timeout: float | None = None,
               admit: Callable[[], None] | None = None) -> Destination:
    """Receive the migration of an accepted source into ``blocks`` (or blocks made
    by ``make_block``), closing ``endpoint`` at the end. The destination's
    ``result`` says how it ended (``error`` when it failed); see
    :class:`~rdmamig.engine.Destination` for the other arguments."""
    destination = Destination(endpoint, blocks=blocks, make_block=make_block, timeout=timeout,
                              limits=limits, key=key, keep=keep, monitor=monitor,
                              auth_timeout=auth_timeout, admit=admit)
    with endpoint, contextlib.suppress(MigrationError):  # destination.result holds the reason
        destination.run()
    return destination


def receive(backend: Backend, host: str, port: int, *, timeout: float,
            blocks: Sequence[RamBlock] | None = None,
            make_block: Callable[[str, int], RamBlock] | None = None,
            announce: Callable[[int], None] = lambda port: None,
            limits: Limits | None = None, key: PreSharedKey | None = None,
            keep: Callable[[Destination], None] | None = None) -> Destination:
    """Listen on ``host``:``port``, accept one source and receive its migration
    (:func:`receive_on`). ``announce`` hears the port bound.

    Raises:
        TransportError: the address cannot be bound, or no source came in time.
    """
    with listen(backend, host, port, key=key) as listener:
        announce(listener.address[1])
        endpoint = listener.accept(timeout=timeout)
    return receive_on(endpoint, timeout=timeout, blocks=blocks, make_block=make_block,
                      limits=limits, key=key, keep=keep)


# ---------------------------------------------------------------- one call each


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port).

    Raises:
        ConfigurationError: not such an address.
    """
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not match:
        raise ConfigurationError(f"cannot parse address {text!r} (HOST:PORT or [IPV6]:PORT)")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ConfigurationError(f"port {port} in {text!r} is over 65535")
    return host, port


def _as_blocks(blocks: Mapping[str, Any] | Sequence[RamBlock]) -> list[RamBlock]:
    """``{name: buffer}`` as blocks (or the blocks given).

    Raises:
        ConfigurationError: a buffer that cannot be a block (not contiguous, not
            whole pages).
    """
    if not isinstance(blocks, Mapping):
        return list(blocks)
    try:
        return [RamBlock(name, memory) for name, memory in blocks.items()]
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None


def send(address: str, blocks: Mapping[str, Any] | Sequence[RamBlock], *,
         backend: str = "tcp", policy: str = "pin-until-done", pin_cap: int | None = None,
         pin_all: bool = False, config: SourceConfig | None = None,
         key: PreSharedKey | None = None, monitor: Monitor | None = None,
         connect_wait: float = 0.0, **backend_options: Any) -> SourceResult:
    """Migrate memory to the listener at ``address`` (``HOST:PORT``) and return what
    the source did, once the destination has verified and kept it.

    Args:
        blocks: ``{name: buffer}`` (a numpy array, bytes, a bytearray, an mmap:
            contiguous, a multiple of 4 KiB; only read) or
            :class:`~rdmamig.engine.RamBlock` objects.
        connect_wait: seconds to keep trying while nothing listens at ``address``
            yet (overrides ``config``'s).
        backend, policy: by name, as ``rdmamig backends`` / ``policies`` list them.
        pin_cap: the most a capped policy keeps pinned (``lru``, ``memlock``).
        pin_all: register whole blocks up front (PIN_ALL), with a policy that keeps
            everything.
        backend_options: the backend's own (``channels=4``, ``device="rxe0"``).

    Raises:
        MigrationError: the migration failed (the memory is as it was).
        UnreachableError: no listener there, or it refused.
        ConfigurationError, UnknownNameError: a bad name, option or buffer.
    """
    from .plugins import load_registry
    registry = load_registry()
    chosen = registry.policy(policy)
    config = config or SourceConfig()
    if connect_wait:
        config = attrs.evolve(config, connect_wait=connect_wait)
    plan = Plan(backend=registry.backend(backend), backend_options=backend_options,
                policy=chosen, options=PolicyOptions(pin_cap=pin_cap),
                requested=source_capabilities(chosen, key=key, pin_all=pin_all),
                config=config, key=key)
    host, port = parse_address(address)
    result, error = run_source(plan, host, port, _as_blocks(blocks), monitor=monitor)
    if error is not None:
        raise error
    return result


def receive_into(address: str, blocks: Mapping[str, Any] | Sequence[RamBlock], *,
                 backend: str = "tcp", key: PreSharedKey | None = None,
                 timeout: float = 60.0, announce: Callable[[int], None] = lambda port: None,
                 **backend_options: Any) -> DestinationResult:
    """Listen on ``address`` (``HOST:PORT``; port 0: any, told to ``announce``),
    receive one migration into ``blocks`` (the source's must have the same names
    and sizes, in order) and return what the destination saw, once verified.

    Raises:
        MigrationError: the migration failed or could not be verified.
        TransportError: the address cannot be bound, or no source came in time.
        ConfigurationError, UnknownNameError: a bad name, option or buffer.
    """
    from .plugins import load_registry
    into = _as_blocks(blocks)
    for block in into:  # found before anything listens
        block.require_writable()
    chosen = available_backend(load_registry().backend(backend), backend_options)
    host, port = parse_address(address)
    destination = receive(chosen, host, port, timeout=timeout, blocks=into,
                          announce=announce, key=key)
    result = destination.result
    if result.error is not None or not result.verified:
        raise MigrationError(result.error or "the source did not verify the migration")
    return result
