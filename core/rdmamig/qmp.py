"""A control socket that speaks QMP (QEMU's monitor protocol) for a running
migration, so that what drives QEMU's migrations (libvirt, KubeVirt, OpenStack,
``qemu.qmp``) can drive rdmamig's: ``--control unix:PATH``.

The protocol is QMP's: a greeting, ``qmp_capabilities``, then commands as JSON
objects (``{"execute": ..., "arguments": ..., "id": ...}``) answered by
``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}``, with events
(``MIGRATION``, ``MIGRATION_PASS``) sent as they happen. The commands are
QEMU's: ``query-migrate``, ``migrate_cancel`` (``migrate-cancel`` too),
``migrate-set-parameters`` (``downtime-limit`` in ms, ``max-bandwidth`` in
bytes/s), ``query-migrate-parameters``, ``query-migrate-capabilities`` and
``migrate-set-capabilities`` (fixed while the migration runs, as QEMU's),
``query-status`` (the workload's run state), ``query-version`` (rdmamig's, in
QEMU's shape), ``human-monitor-command`` (``info migrate``), ``query-commands``.

The socket is created mode 0600 (only its owner may drive the migration) and
removed at the end, once the clients still connected have left (at most
:data:`LINGER_S` later: they may still ask for the final status); it never
replaces anything but a stale socket.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigurationError
from .status import Event, Monitor, Status

log = logging.getLogger("rdmamig.qmp")

#: Longest command a client may send.
MAX_COMMAND = 64 << 10
#: Clients served at once.
MAX_CLIENTS = 8
#: Seconds the socket stays, once the migration is over, for clients still
#: connected to read its final status.
LINGER_S = 5.0


def parse_control(text: str) -> Path:
    """``unix:PATH`` (QEMU's ``-qmp unix:PATH`` spelling) -> PATH.

    Raises:
        ConfigurationError: another kind of address.
    """
    kind, sep, path = text.partition(":")
    if kind != "unix" or not sep or not path:
        raise ConfigurationError(f"control address {text!r}: only unix:PATH is served (a "
                                 f"socket its file permissions guard: QMP has no "
                                 f"authentication)")
    return Path(path)


#: QMP's ``RunState`` of a migration's source for each of its statuses (what
#: ``query-status`` says of the workload): it runs until stop-and-copy, is stopped
#: during it, and is done after a completed migration or runs again after a failed one.
SOURCE_RUN_STATES = {Status.NONE: "running", Status.SETUP: "running",
                     Status.ACTIVE: "running", Status.DEVICE: "finish-migrate",
                     Status.COMPLETED: "postmigrate", Status.FAILED: "running",
                     Status.CANCELLING: "running", Status.CANCELLED: "running"}
#: The same for a destination, as a QEMU started with ``-incoming`` and ``-S``: in
#: migration until it completes, then paused (the memory is there, nothing runs it).
DESTINATION_RUN_STATES = {**{status: "inmigrate" for status in Status},
                          Status.COMPLETED: "paused", Status.FAILED: "shutdown",
                          Status.CANCELLED: "shutdown"}


class ControlServer:
    """Serves ``monitor`` on the unix socket ``path`` until closed.

    Args:
        version: rdmamig's version, told in QEMU's ``VersionInfo`` shape.
        capabilities: the migration capabilities in QEMU's names and their state
            (``query-migrate-capabilities``); fixed once the migration runs.
        destination: the migration is received here (``listen``): the run states
            are an incoming QEMU's, and only the source cancels.
    """

    def __init__(self, path: Path, monitor: Monitor, *, version: str,
                 capabilities: dict[str, bool] | None = None,
                 destination: bool = False) -> None:
        self.path = path
        self.monitor = monitor
        self._version = version
        self._capabilities = dict(capabilities or {})
        self._destination = destination
        self._sock = self._bind(path)
        self._clients = threading.BoundedSemaphore(MAX_CLIENTS)
        #: Clients connected now, and a condition to wait for them to leave.
        self._connected = 0
        self._left = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name="rdmamig-qmp")
        self._thread.start()

    @staticmethod
    def _bind(path: Path) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ConfigurationError(f"--control: {path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # stale: nobody listens on it
            else:
                raise ConfigurationError(f"--control: {path} is in use")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous = os.umask(0o177)
        try:
            sock.bind(str(path))
        except OSError as exc:
            sock.close()
            raise ConfigurationError(f"--control: cannot bind {path}: {exc.strerror}") from None
        finally:
            os.umask(previous)
        sock.listen(MAX_CLIENTS)
        return sock

    def close(self, *, linger: float = LINGER_S) -> None:
        """Stop taking clients, let those connected ask what they still want (the
        final status: a QEMU whose migration ended goes on answering) until they
        leave or ``linger`` seconds pass, then remove the socket."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._left:
            self._left.wait_for(lambda: self._connected == 0, timeout=linger)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------ clients

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if not self._clients.acquire(blocking=False):
                conn.close()
                continue
            with self._left:
                self._connected += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name="rdmamig-qmp-client").start()

    def _serve(self, conn: socket.socket) -> None:
        lock = threading.Lock()

        def send(message: dict[str, Any]) -> None:
            with lock, contextlib.suppress(OSError):
                conn.sendall(json.dumps(message).encode() + b"\r\n")

        def forward(event: Event) -> None:
            send(event)

        negotiated = False
        try:
            send({"QMP": {"version": self._version_info(), "capabilities": []}})
            for command in _commands(conn):
                if not negotiated:
                    if command.get("execute") == "qmp_capabilities":
                        negotiated = True
                        self.monitor.subscribe(forward)
                        send(_answer(command, {}))
                    else:
                        send(_error(command, "CommandNotFound", "Expecting capabilities "
                                    "negotiation with 'qmp_capabilities'"))
                    continue
                send(self._execute(command))
        except (OSError, ValueError) as exc:
            log.info("control client dropped: %s", exc)
        finally:
            self.monitor.unsubscribe(forward)
            conn.close()
            self._clients.release()
            with self._left:
                self._connected -= 1
                self._left.notify_all()

    def _execute(self, command: dict[str, Any]) -> dict[str, Any]:
        name = command.get("execute")
        arguments = command.get("arguments") or {}
        handler = self._handlers().get(str(name))
        if handler is None:
            return _error(command, "CommandNotFound", f"The command {name} has not been found")
        if not isinstance(arguments, dict):
            return _error(command, "GenericError", "'arguments' must be an object")
        try:
            return _answer(command, handler(arguments))
        except (TypeError, ValueError) as exc:
            return _error(command, "GenericError", str(exc))

    def _handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "query-migrate": lambda _arguments: self.monitor.query(),
            "migrate_cancel": self._cancel,
            "migrate-cancel": self._cancel,
            "migrate-set-parameters": self._set_parameters,
            "query-migrate-parameters": lambda _arguments: self.monitor.parameters.query(),
            "query-migrate-capabilities": lambda _arguments: [
                {"capability": name, "state": state}
                for name, state in self._capabilities.items()],
            "migrate-set-capabilities": self._set_capabilities,
            "query-status": self._status,
            "query-version": lambda _arguments: self._version_info(),
            "human-monitor-command": self._human,
            "qmp_capabilities": lambda _arguments: {},
        }
        handlers["query-commands"] = lambda _arguments: [{"name": n} for n in handlers]
        return handlers

    def _version_info(self) -> dict[str, Any]:
        """rdmamig's version in QEMU's ``VersionInfo`` (``query-version``, greeting)."""
        numbers = [int(part) if part.isdigit() else 0
                   for part in [*self._version.split("."), "0", "0"][:3]]
        return {"qemu": dict(zip(("major", "minor", "micro"), numbers, strict=True)),
                "package": f"rdmamig {self._version}"}

    def _status(self, _arguments: dict[str, Any]) -> dict[str, Any]:
        """``query-status``: the workload's run state, as QEMU's for its guest."""
        states = DESTINATION_RUN_STATES if self._destination else SOURCE_RUN_STATES
        state = states[Status(self.monitor.query()["status"])]
        return {"status": state, "running": state == "running", "singlestep": False}

    def _set_capabilities(self, arguments: dict[str, Any]) -> dict[str, Any]:
        listed = arguments.get("capabilities")
        if not isinstance(listed, list):
            raise ValueError("Parameter 'capabilities' expects an array")
        for entry in listed:
            name = entry.get("capability") if isinstance(entry, dict) else None
            if name not in self._capabilities:
                raise ValueError(f"Parameter 'capability' does not accept value {name!r} "
                                 f"(rdmamig has {', '.join(self._capabilities)})")
            if bool(entry.get("state")) != self._capabilities[name]:
                raise ValueError("There's a migration process in progress")
        return {}

    def _human(self, arguments: dict[str, Any]) -> str:
        """``human-monitor-command``: ``info migrate`` as QEMU's HMP prints it."""
        line = " ".join(str(arguments.get("command-line", "")).split())
        if line != "info migrate":
            return f"rdmamig answers 'info migrate' only, not {line!r}\r\n"
        info = self.monitor.query()
        ram = info.get("ram", {})
        rows = [f"Migration status: {info['status']}"]
        if "total-time" in info:
            rows.append(f"total time: {info['total-time']} ms")
        for key, label in (("expected-downtime", "expected downtime"),
                           ("downtime", "downtime"), ("setup-time", "setup")):
            if key in info:
                rows.append(f"{label}: {info[key]} ms")
        if ram:
            rows += [f"transferred ram: {ram['transferred'] >> 10} kbytes",
                     f"throughput: {ram['mbps']:.2f} mbps",
                     f"remaining ram: {ram['remaining'] >> 10} kbytes",
                     f"total ram: {ram['total'] >> 10} kbytes",
                     f"duplicate: {ram['duplicate']} pages",
                     f"normal: {ram['normal']} pages",
                     f"normal bytes: {ram['normal-bytes'] >> 10} kbytes",
                     f"dirty sync count: {ram['dirty-sync-count']}",
                     f"page size: {ram['page-size'] >> 10} kbytes"]
        return "".join(row + "\r\n" for row in rows)

    def _cancel(self, _arguments: dict[str, Any]) -> dict[str, Any]:
        if self._destination:
            raise ValueError("the source cancels a migration; its destination cannot")
        self.monitor.cancel()
        return {}

    def _set_parameters(self, arguments: dict[str, Any]) -> dict[str, Any]:
        unknown = set(arguments) - {"downtime-limit", "max-bandwidth"}
        if unknown:
            raise ValueError(f"Parameter '{sorted(unknown)[0]}' is unexpected (rdmamig "
                             f"takes downtime-limit and max-bandwidth)")
        values = {}
        for name, value in arguments.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Parameter '{name}' expects a number 0 or more")
            values[name] = value
        self.monitor.parameters.set(downtime_limit_ms=values.get("downtime-limit"),
                                    max_bandwidth=values.get("max-bandwidth"))
        return {}


def _commands(conn: socket.socket) -> Any:
    """The JSON objects a client sends, one after another (with or without newlines
    between them)."""
    decoder = json.JSONDecoder()
    buffer = ""
    while True:
        data = conn.recv(4096)
        if not data:
            return
        buffer += data.decode("utf-8", "replace")
        while True:
            stripped = buffer.lstrip()
            if not stripped:
                buffer = ""
                break
            if not stripped.startswith("{"):
                raise ValueError(f"not a JSON object: {stripped[:40]!r}")
            try:
                command, end = decoder.raw_decode(stripped)
            except ValueError:
                if len(stripped) > MAX_COMMAND:
                    raise ValueError(f"a command of over {MAX_COMMAND} bytes") from None
                buffer = stripped
                break
            buffer = stripped[end:]
            yield command if isinstance(command, dict) else {}


def _answer(command: dict[str, Any], value: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {"return": value}
    if "id" in command:
        answer["id"] = command["id"]
    return answer


def _error(command: dict[str, Any], kind: str, description: str) -> dict[str, Any]:
    answer: dict[str, Any] = {"error": {"class": kind, "desc": description}}
    if "id" in command:
        answer["id"] = command["id"]
    return answer
