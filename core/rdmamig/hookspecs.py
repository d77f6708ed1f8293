"""Every extension point of rdmamig, in one place.

A plugin is a module (or object) with functions marked ``@hookimpl`` and is found
through the ``rdmamig`` entry-point group, exactly like the built-in ones::

    # pyproject.toml of a third-party plugin
    [project.entry-points.rdmamig]
    mybackend = "my_package.plugin"

    # my_package/plugin.py
    from rdmamig.hookspecs import hookimpl

    @hookimpl
    def rdmamig_add_backends(registry):
        registry.add_backend(MyBackend)     # a rdmamig.transport.Backend subclass

Set ``RDMAMIG_BLOCK_PLUGINS=name1,name2`` (entry-point names) to keep plugins from
loading. A backend is held to :mod:`rdmamig.testing.conformance`, a policy to
:mod:`rdmamig.testing.policy_conformance`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .plugins import Registry

#: The project name: pluggy's marker name and the entry-point group plugins use.
PROJECT = "rdmamig"
hookspec = pluggy.HookspecMarker(PROJECT)
#: Marks a plugin's implementation of a hook below.
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def rdmamig_add_backends(registry: Registry) -> None:
    """Register transports with ``registry.add_backend(cls)``.

    :param registry: the registry being built. ``cls`` is a subclass of
        :class:`rdmamig.transport.Backend` whose ``name`` users select it by;
        ``cls()`` must be cheap and must not fail when the transport cannot run
        here: ``unavailable_reason()`` says why instead.
    :return: nothing; every plugin's implementation is called.
    """


@hookspec
def rdmamig_add_policies(registry: Registry) -> None:
    """Register unpin policies with ``registry.add_policy(cls)``.

    :param registry: the registry being built. ``cls`` is a subclass of
        :class:`rdmamig.policy.UnpinPolicy` with a ``name``; the engine creates one
        instance per migration as ``cls(options)`` with a
        :class:`rdmamig.policy.PolicyOptions`. The engine tells the policy about
        chunk registrations, writes, re-dirtied chunks, iteration boundaries and
        pressure (a registration refused), and asks it which chunks to unpin. A
        policy never touches a transport; the engine refuses to unpin a chunk that
        has a write in flight and reports the policy's error.
    :return: nothing; every plugin's implementation is called.
    """
