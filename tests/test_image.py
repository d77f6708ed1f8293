"""Migration images: an image is exposed only whole, and never over anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash
from rdmamig.errors import ConfigurationError
from rdmamig.image import ImageWriter, open_image
from rdmamig.memory import content_digest


@pytest.mark.parametrize("meanwhile", ["empty directory", "file", "dangling link"])
def test_an_image_never_replaces_what_appeared_at_its_path(tmp_path: Path,
                                                          meanwhile: str) -> None:
    # Something appears at the final path after the writer began (its check at the
    # start passed): the commit must leave it as it was, whatever it is. A plain
    # rename would replace an empty directory or a link without a word.
    path = tmp_path / "image"
    writer = ImageWriter(path, [("mem", 8192, None)])
    writer.blocks[0].array[:] = 7
    if meanwhile == "empty directory":
        path.mkdir()
    elif meanwhile == "file":
        path.write_bytes(b"someone else's")
    else:
        path.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigurationError, match="appeared while the image was written"):
        writer.commit(origin="rdmamig")
    writer.close()
    if meanwhile == "empty directory":
        assert path.is_dir() and not any(path.iterdir())
    elif meanwhile == "file":
        assert path.read_bytes() == b"someone else's"
    else:
        assert path.is_symlink() and path.readlink() == tmp_path / "nowhere"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image"]  # no staging left


def test_a_committed_image_reads_back(tmp_path: Path) -> None:
    writer = ImageWriter(tmp_path / "image", [("mem", 8192, None)])
    writer.blocks[0].array[:] = 7
    image = writer.commit(origin="rdmamig")
    writer.close()
    assert open_image(image.path).block(0).array.min() == 7


def test_image_info_shows_a_name_with_escape_sequences_escaped(tmp_path: Path) -> None:
    # Images travel between hosts: a block name in a manifest edited elsewhere must
    # not reach the terminal as an escape sequence (one set the terminal's title).
    writer = ImageWriter(tmp_path / "image", [("mem", 8192, None)])
    writer.commit(origin="rdmamig")
    writer.close()
    manifest = tmp_path / "image" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["blocks"][0]["name"] = "mem\x1b]0;owned\x07"
    manifest.write_text(json.dumps(data))
    shown = subprocess.run([sys.executable, "-m", "rdmamig", "image", "info",
                            str(tmp_path / "image")], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "FORCE_COLOR": "1",
                                            "COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr
    assert "\x1b]" not in shown.stdout and "\x07" not in shown.stdout
    assert "mem\\x1b]0;owned\\x07" in shown.stdout


def test_block_digests_are_checked_as_their_manifest_version_took_them(tmp_path: Path) -> None:
    writer = ImageWriter(tmp_path / "image", [("mem", 3 << 20, None)])
    writer.blocks[0].array[::4096] = 9
    image = writer.commit(origin="rdmamig")
    writer.close()
    manifest = image.path / "manifest.json"
    data = json.loads(manifest.read_text())
    assert data["version"] == 2
    assert data["blocks"][0]["digest"] == content_digest(image.block(0).view).hex()
    assert open_image(image.path).verify() == []
    # An image written by an rdmamig of version 1 manifests: xxh3-128 of the block.
    data["version"] = 1
    data["blocks"][0]["digest"] = xxhash.xxh3_128_hexdigest(image.block(0).view)
    manifest.write_text(json.dumps(data))
    assert open_image(image.path).verify() == []
    image.block(0).array[5] = 1
    assert open_image(image.path).verify() == ["mem"]
