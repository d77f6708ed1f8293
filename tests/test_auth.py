"""The pre-shared key: where it is read from, and that nothing prints it."""

from __future__ import annotations

import pydoc
from pathlib import Path

import pytest
import rdmamig
from rdmamig.auth import ENVIRONMENT, load_key
from rdmamig.caps import Capability
from rdmamig.control import Role
from rdmamig.errors import ConfigurationError


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


@pytest.mark.parametrize(("mode", "link", "content", "message"), [
    (0o644, False, b"k" * 32, r"readable by others \(mode 644\); chmod 600 it"),
    (0o640, False, b"k" * 32, r"readable by others \(mode 640\)"),
    (0o600, True, b"k" * 32, "cannot read the key file"),  # a link is not followed
    (0o600, False, b"k" * 15 + b"\n", "the pre-shared key is 15 bytes; it must be at least 16"),
    (0o600, False, b"k" * 5000, "is over 4096 bytes"),
])
def test_a_key_file_that_is_not_safe_is_refused(tmp_path: Path, mode: int, link: bool,
                                                content: bytes, message: str) -> None:
    key = tmp_path / "key"
    key.write_bytes(content)
    key.chmod(mode)
    path = key
    if link:
        path = tmp_path / "link"
        path.symlink_to(key)
    with pytest.raises(ConfigurationError, match=message):
        load_key(path)


def test_a_key_file_of_its_owner_alone_is_read(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"k" * 32 + b"\n")
    key.chmod(0o600)
    assert load_key(key) is not None
