"""The plugin manager (pluggy) and the registry of backends and policies by name."""

from __future__ import annotations

import os
from typing import TypeVar

import pluggy

from . import hookspecs
from .errors import UnknownNameError
from .policy import UnpinPolicy
from .transport import Backend

#: The one entry-point group every plugin, built-in or not, is found through.
ENTRY_POINT_GROUP = hookspecs.PROJECT
#: Comma-separated entry-point names that must not be loaded.
BLOCK_ENV = "RDMAMIG_BLOCK_PLUGINS"

_T = TypeVar("_T", type[Backend], type[UnpinPolicy])


class Registry:
    """Backends and unpin policies, keyed by the name each declares."""

    def __init__(self) -> None:
        self._backends: dict[str, type[Backend]] = {}
        self._policies: dict[str, type[UnpinPolicy]] = {}

    @staticmethod
    def _add(table: dict[str, _T], kind: str, cls: _T) -> None:
        name = cls.name
        if name in table and table[name] is not cls:
            raise ValueError(f"{kind} name {name!r} is registered twice: by "
                             f"{table[name].__module__} and {cls.__module__}")
        table[name] = cls

    @staticmethod
    def _get(table: dict[str, _T], kind: str, name: str) -> _T:
        try:
            return table[name]
        except KeyError:
            known = ", ".join(sorted(table)) or "none"
            raise UnknownNameError(f"unknown {kind} {name!r}; known: {known}") from None

    def add_backend(self, cls: type[Backend]) -> None:
        """Make ``cls`` selectable as ``--backend cls.name``."""
        self._add(self._backends, "backend", cls)

    def add_policy(self, cls: type[UnpinPolicy]) -> None:
        """Make ``cls`` selectable as ``--policy cls.name``."""
        self._add(self._policies, "policy", cls)

    def backend(self, name: str) -> type[Backend]:
        """The backend class registered as ``name``.

        Raises:
            UnknownNameError: no plugin registered it; the message lists the known ones.
        """
        return self._get(self._backends, "backend", name)

    def policy(self, name: str) -> type[UnpinPolicy]:
        """The policy class registered as ``name``.

        Raises:
            UnknownNameError: no plugin registered it; the message lists the known ones.
        """
        return self._get(self._policies, "policy", name)

    @property
    def backends(self) -> dict[str, type[Backend]]:
        """Every registered backend, by name."""
        return dict(sorted(self._backends.items()))

    @property
    def policies(self) -> dict[str, type[UnpinPolicy]]:
        """Every registered policy, by name."""
        return dict(sorted(self._policies.items()))


def plugin_manager(*, blocked: set[str] | None = None) -> pluggy.PluginManager:
    """A plugin manager with every ``rdmamig`` entry point loaded except the blocked
    ones (``blocked`` or, by default, the names in ``$RDMAMIG_BLOCK_PLUGINS``)."""
    if blocked is None:
        blocked = {name.strip() for name in os.environ.get(BLOCK_ENV, "").split(",")}
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    for name in blocked - {""}:
        manager.set_blocked(name)
    manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return manager


def load_registry(manager: pluggy.PluginManager | None = None) -> Registry:
    """Ask every plugin to register its backends and policies."""
    manager = manager or plugin_manager()
    registry = Registry()
    manager.hook.rdmamig_add_backends(registry=registry)
    manager.hook.rdmamig_add_policies(registry=registry)
    return registry
