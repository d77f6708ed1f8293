"""Migration images: an image is exposed only whole, and never over anything."""

from __future__ import annotations

from pathlib import Path

import pytest
from rdmamig.errors import ConfigurationError
from rdmamig.image import ImageWriter, open_image


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
