"""A saved QEMU migration stream into a migration image (:func:`import_stream`) and
an image back into a stream QEMU loads (:func:`export_image`): the application of
the QEMU stream codec (:mod:`rdmamig.qemu`) to images (:mod:`rdmamig.image`)."""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import ConfigurationError, RemoteProtocolError
from .image import Image, ImageWriter, check_new_image
from .limits import UNLIMITED_RAM, Limits, check_layout
from .memory import RamBlock
from .qemu import ram, stream
from .qemu.decoder import PrecopyDecoder
from .qemu.ram import PAGE_SIZE, RamBlockInfo
from .qemu.sink import BlockSink
from .qemu.stream import Kind, SectionHeader

#: Bytes read at a time from a pipe.
READ_SIZE = 8 << 20
#: Pages encoded at a time on export.
EXPORT_PAGES = 2048


def import_stream(source: BinaryIO, path: Path, *, name: str = "-",
                  limits: Limits | None = None) -> Image:
    """Read a QEMU migration stream (as ``migrate "exec:cat > FILE"`` saves it) from
    ``source`` into a new image at ``path``. A regular file is mapped, a pipe read
    in pieces; nothing is left under ``path`` unless the whole stream was good. The
    stream's blocks are checked as a listener checks a source's (``limits``; by
    default any RAM size the disk holds), before any file is made.

    Raises:
        RemoteProtocolError: the stream is malformed or truncated (the offset named).
        RefusedError: its blocks are over ``limits``.
        ImageError: they do not fit the disk's free space.
        ConfigurationError: ``path`` exists.
    """
    writers: list[ImageWriter] = []
    limits = limits or Limits(max_ram=UNLIMITED_RAM)

    def on_setup(blocks: list[RamBlockInfo]) -> BlockSink:
        check_layout([(b.name, b.length) for b in blocks], limits, lister="the stream")
        writers.append(ImageWriter(path, [(b.name, b.length, b.addr) for b in blocks]))
        return BlockSink(writers[0].blocks, zeroed=True)  # a new image is all holes

    decoder = PrecopyDecoder(on_setup)
    check_new_image(path)  # before the stream is read, not once its setup is
    try:
        with _pieces(source) as next_piece:
            state = decoder.read_all(next_piece)
            if extra := next_piece():
                raise RemoteProtocolError(f"{len(extra)} bytes at offset {decoder.offset}: "
                                          f"after the VM description, which ends the stream")
        if not writers:
            raise RemoteProtocolError("the stream has no ram section")
        writer = writers[0]
        writer.set_state(state.raw)
        return writer.commit(origin="qemu", qemu=decoder.origin(), source={
            "stream": name, "stream_bytes": decoder.offset, "iterations": decoder.parts})
    finally:
        for writer in writers:
            writer.close()


@contextlib.contextmanager
def _pieces(source: BinaryIO) -> Iterator[Callable[[], bytes | memoryview | None]]:
    """What :meth:`PrecopyDecoder.read_all` reads ``source`` with: a regular file
    mapped and given whole, a pipe in pieces; None at its end."""
    try:
        fd = source.fileno()
        regular = os.path.isfile(f"/proc/self/fd/{fd}") and os.fstat(fd).st_size > 0
    except (OSError, ValueError):
        regular = False
    if not regular:
        yield lambda: source.read(READ_SIZE) or None
        return
    mapping = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    whole: list[memoryview] = [memoryview(mapping)]
    view = whole[0]
    try:
        yield lambda: whole.pop() if whole else None
    finally:
        # A decoding error's traceback may still hold views into the mapping: then
        # it closes once they are gone.
        with contextlib.suppress(BufferError):
            view.release()
            mapping.close()


# ---------------------------------------------------------------- export


def export_image(image: Image, out: BinaryIO,
                 on_block: Callable[[str], None] | None = None) -> int:
    """Write ``image`` as QEMU's migration stream to ``out``: the header, the source's
    configuration, the ram section's setup and every page (ZERO for zero pages), and
    the device state as it came; returns the bytes written.

    Raises:
        ConfigurationError: the image did not come from QEMU (it has no device state
            QEMU could load).
    """
    qemu = image.manifest.qemu
    if qemu is None:
        raise ConfigurationError(f"{image.path} holds an rdmamig migration, not a QEMU one: "
                                 f"QEMU has no device state to load with it")
    infos = [RamBlockInfo(name=b.name, length=b.length, addr=b.addr)
             for b in image.manifest.blocks]
    footer = stream.encode_footer(qemu.ram_section_id) if qemu.footers else b""
    written = 0

    def put(data: bytes | memoryview) -> None:
        nonlocal written
        out.write(data)
        written += len(data)

    put(stream.encode_header() + qemu.configuration)
    put(stream.encode_section_header(SectionHeader(
        kind=Kind.SECTION_START, section_id=qemu.ram_section_id, idstr="ram",
        instance_id=qemu.ram_instance_id, version_id=qemu.ram_version_id)))
    put(ram.encode_setup(infos) + ram.encode_eos() + footer)
    if qemu.switchover_start:
        put(stream.encode_command(stream.Command.SWITCHOVER_START))
    put(stream.encode_section_header(SectionHeader(kind=Kind.SECTION_END,
                                                   section_id=qemu.ram_section_id)))
    for index, info in enumerate(infos):
        if on_block is not None:
            on_block(info.name)
        block = image.block(index)
        for data in _block_records(info.name, block):
            put(data)
    put(ram.encode_eos() + footer)
    put(image.state())
    out.flush()
    return written


def _block_records(name: str, block: RamBlock) -> Iterator[bytes | memoryview]:
    """The records of one block, a few thousand pages at a time."""
    pages = block.array.reshape(block.pages, PAGE_SIZE)
    first = True
    for start in range(0, block.pages, EXPORT_PAGES):
        end = min(start + EXPORT_PAGES, block.pages)
        nonzero = block.nonzero_pages(start, end)
        numbers = np.arange(start, end, dtype=np.uint64)
        data = numbers[nonzero]
        if len(data):
            # All data (random or used RAM): the pages as a view, not a gathered copy.
            rows = pages[start:end] if len(data) == end - start else pages[data.astype(np.intp)]
            yield from ram.page_records(name, data, rows, ram.RamFlag.PAGE, first=first)
            first = False
        zero = numbers[~nonzero]
        if len(zero):
            yield from ram.page_records(name, zero, np.zeros((len(zero), 1), np.uint8),
                                        ram.RamFlag.ZERO, first=first)
            first = False
