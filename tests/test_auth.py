"""The pre-shared key: where it is read from, and that nothing prints it."""

from __future__ import annotations

import pydoc

import pytest
import rdmamig
from rdmamig.auth import ENVIRONMENT, load_key
from rdmamig.caps import Capability
from rdmamig.control import Role


def test_help_never_shows_the_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "do-not-print-me-0123456789abcdef"
    monkeypatch.setenv(ENVIRONMENT, secret)
    key = load_key(None)
    assert key is not None  # read from the environment when no file is given
    for thing in (rdmamig, rdmamig.load_key, load_key):
        assert secret not in pydoc.render_doc(thing, renderer=pydoc.plaintext)
    assert secret not in repr(key) and secret not in str(key)
    given = load_key(None, {ENVIRONMENT: " " + secret + "\n"})
    assert given is not None
    facts = (Role.SOURCE, Capability.AUTH, bytes(32), bytes(32))
    assert given.proof(*facts) == key.proof(*facts)  # the same key, whitespace aside
