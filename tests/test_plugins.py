"""Plugin discovery through the ``rdmamig`` entry-point group."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from rdmamig.errors import UnknownNameError
from rdmamig.plugins import load_registry, plugin_manager


def test_built_ins_come_through_entry_points() -> None:
    names = {name for name, _plugin in plugin_manager().list_name_plugin()}
    assert {"tcp", "policies"} <= names


def test_third_party_plugin_is_selectable_by_name() -> None:
    registry = load_registry()
    backend = registry.backend("example-tcp")
    assert backend.__module__ == "rdmamig_example"
    assert registry.policy("example-oldest-half").name == "example-oldest-half"


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownNameError,
                       match=r"unknown backend 'nope'; known: example-tcp, tcp"):
        load_registry().backend("nope")


def test_blocking_a_plugin_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RDMAMIG_BLOCK_PLUGINS", "example, other")
    registry = load_registry()
    assert "example-tcp" not in registry.backends
    assert "tcp" in registry.backends


def test_cli_backends_json_reports_availability() -> None:
    out = subprocess.run([sys.executable, "-m", "rdmamig", "backends", "--json"],
                         check=True, capture_output=True, text=True).stdout
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["tcp"]["available"] is True and rows["tcp"]["reason"] is None
    for row in rows.values():
        assert set(row) >= {"name", "available", "reason"}
        assert (row["reason"] is None) == row["available"]
