"""Migration images: an image is exposed only whole, and never over anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import xxhash
from rdmamig.errors import ConfigurationError, ImageError
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


def test_image_info_refuses_a_name_with_escape_sequences_escaped(tmp_path: Path) -> None:
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
    # Refused as a listener refuses it from a source, the name shown escaped.
    assert shown.returncode == 1, shown.stderr
    assert "\x1b" not in shown.stdout + shown.stderr and "\x07" not in shown.stderr
    assert "'mem\\x1b]0;owned\\x07'): a name must be 1 to 255 bytes" in shown.stderr


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
    with open(image.path / "blocks" / "0000.ram", "r+b") as block:
        block.write(b"\x01")
    assert open_image(image.path).verify() == ["mem"]


def _image(tmp_path: Path) -> Path:
    writer = ImageWriter(tmp_path / "image", [("mem", 8192, 0x100000)])
    writer.blocks[0].array[:] = 3
    writer.commit(origin="rdmamig")
    writer.close()
    return tmp_path / "image"


@pytest.mark.parametrize(("change", "reason"), [
    (lambda d: d["blocks"][0].update(length=0), "length=0 is not a positive multiple of 4096"),
    (lambda d: d["blocks"][0].update(length=5000), "length=5000 is not a positive multiple"),
    (lambda d: d["blocks"][0].update(addr=-4096), "has address -4096, not a u64"),
    (lambda d: d["blocks"][0].update(name="x" * 300), "a name must be 1 to 255 bytes"),
    (lambda d: d["blocks"][0].update(digest="zz"), "has digest 'zz', not 32 hex digits"),
    (lambda d: d["blocks"].append(dict(d["blocks"][0])), "the name is listed twice"),
    (lambda d: d["blocks"][0].update(file="../../etc/passwd"), "is not 'blocks/0000.ram'"),
    (lambda d: d.update(origin="\x1b]0;x\x07"), "origin '\\x1b]0;x\\x07' is not one of"),
    (lambda d: d.update(qemu={"machine": "pc", "configuration": "", "ram_section_id": 2**40}),
     "ram_section_id=1099511627776: not a u32"),
], ids=["length 0", "length 5000", "negative address", "long name", "digest", "twice",
        "file", "origin", "section id"])
def test_a_manifest_out_of_bounds_is_refused_naming_the_field(
        tmp_path: Path, change: Callable[[dict[str, Any]], None], reason: str) -> None:
    # Images travel between hosts: a manifest is checked whole before it is used.
    image = _image(tmp_path)
    data = json.loads((image / "manifest.json").read_text())
    change(data)
    (image / "manifest.json").write_text(json.dumps(data))
    for verb in ("info", "export"):
        shown = subprocess.run([sys.executable, "-m", "rdmamig", "image", verb, str(image),
                                *([str(tmp_path / "out")] if verb == "export" else [])],
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 1 and reason in shown.stderr, shown.stderr
        assert shown.stderr.count("\n") == 1 and "\x1b" not in shown.stderr


def test_an_image_is_read_through_no_symbolic_link_and_never_written(tmp_path: Path) -> None:
    image = _image(tmp_path)
    block = open_image(image).block(0)
    assert block.readonly
    with pytest.raises(ValueError, match="read-only"):
        block.array[0] = 1
    # Its blocks/ swapped for a link to a directory elsewhere holding a file of the
    # same name and size: refused, not followed.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "0000.ram").write_bytes(b"secret".ljust(8192, b"\0"))
    (image / "blocks").rename(tmp_path / "moved")
    (image / "blocks").symlink_to(elsewhere)
    with pytest.raises(ImageError, match=r"blocks/0000.ram is missing or not 8192 bytes "
                                         r"\(a symbolic link\)"):
        open_image(image)
