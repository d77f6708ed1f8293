"""Migration images: a migrated set of RAM blocks and the state that goes with them,
on disk, in one format for native rdmamig migrations and for QEMU's.

An image is a directory::

    manifest.json     what the image holds (versioned; see :class:`Manifest`)
    blocks/0000.ram   one file per RAM block, in the order of the manifest,
    blocks/0001.ram   sparse where pages are zero
    state.bin         the state after the RAM: QEMU's device sections, EOF and VM
                      description as QEMU wrote them, or an rdmamig workload's state

Block files are named by position, never by the (peer-supplied) block name, so no
name can collide with another block's file or with the image's own files. An image
is written under a hidden staging name beside its final one, every file created
new (never through a link, never over an existing file), and renamed into place
only when it is complete and its digests are recorded; an existing path is never
replaced (``renameat2(RENAME_NOREPLACE)``).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import json
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import xxhash

from .errors import ConfigurationError, ImageError, MigrationError, ProtocolError
from .limits import UNLIMITED_RAM, Limits, check_layout
from .memory import RamBlock
from .qemu.origin import QemuOrigin

FORMAT: Final = "rdmamig-image"
#: The manifest's version; a reader refuses versions it does not know. Version 2:
#: block digests are :meth:`RamBlock.digest`'s (over chunk digests); version 1's were
#: xxh3-128 of the whole block, and are still checked as such.
VERSION: Final = 2
READABLE: Final = (1, 2)
MANIFEST: Final = "manifest.json"
#: Where an image can come from.
ORIGINS: Final = ("qemu", "rdmamig")
STATE: Final = "state.bin"
BLOCKS: Final = "blocks"
#: Largest manifest read (a few thousand blocks fit in far less).
MAX_MANIFEST: Final = 16 << 20


@attrs.frozen(kw_only=True)
class ImageBlock:
    """One RAM block of an image.

    Attributes:
        name: the block's name (QEMU's idstr, or the rdmamig source's name).
        length: bytes.
        file: its file, relative to the image.
        digest: its :meth:`RamBlock.digest`, hex.
        addr: its guest-physical address, when the QEMU stream carried it.
    """

    name: str
    length: int
    file: str
    digest: str
    addr: int | None = None


@attrs.frozen(kw_only=True)
class Manifest:
    """``manifest.json``: what an image holds and where it came from.

    Attributes:
        origin: ``qemu`` (a QEMU migration stream) or ``rdmamig`` (a native one).
        blocks: the RAM blocks, in the order the source listed them.
        state_digest: xxh3-128 of ``state.bin``, hex.
        state_bytes: its size.
        created: when the image was completed (UTC, ISO 8601).
        source: free-form facts about how it was made (the command, the peer).
        qemu: for a QEMU image, what replaying it as QEMU's stream needs.
        version: the manifest's version (how its block digests were taken).
    """

    origin: str
    blocks: tuple[ImageBlock, ...]
    state_digest: str
    state_bytes: int
    created: str = ""
    source: dict[str, Any] = attrs.Factory(dict)
    qemu: QemuOrigin | None = None
    version: int = VERSION

    def to_json(self) -> dict[str, Any]:
        """The manifest as written."""
        return {"format": FORMAT, "version": self.version, "origin": self.origin,
                "created": self.created, "source": self.source,
                "blocks": [attrs.asdict(b) for b in self.blocks],
                "state": {"file": STATE, "bytes": self.state_bytes,
                          "digest": self.state_digest},
                "qemu": self.qemu.to_json() if self.qemu is not None else None}

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Read a manifest.

        Raises:
            ImageError: not an rdmamig image manifest, another version, malformed.
        """
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ImageError(f"{MANIFEST} is not an rdmamig image manifest")
        if data.get("version") not in READABLE:
            raise ImageError(f"{MANIFEST} has version {data.get('version')!r}; this rdmamig "
                             f"reads versions {', '.join(map(str, READABLE))}")
        try:
            blocks = tuple(ImageBlock(name=str(b["name"]), length=int(b["length"]),
                                      file=str(b["file"]), digest=str(b["digest"]),
                                      addr=None if b.get("addr") is None else int(b["addr"]))
                           for b in data["blocks"])
            state = data["state"]
            qemu = data.get("qemu")
            manifest = cls(origin=str(data["origin"]), blocks=blocks,
                           state_digest=str(state["digest"]), state_bytes=int(state["bytes"]),
                           created=str(data.get("created", "")),
                           source=dict(data.get("source") or {}),
                           qemu=QemuOrigin.from_json(qemu) if qemu is not None else None,
                           version=int(data["version"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ImageError(f"{MANIFEST} is malformed: {exc!r}") from None
        manifest.check()
        return manifest

    def check(self) -> None:
        """What every reader of an image relies on, checked once (images travel
        between hosts: a manifest is untrusted input): its blocks as a listener
        checks a source's (:func:`rdmamig.limits.check_layout`), guest addresses
        that are u64, digests of 16 bytes, an origin that is known.

        Raises:
            ImageError: a field that is not, named (with any string escaped).
        """
        if self.origin not in ORIGINS:
            raise ImageError(f"{MANIFEST}: origin {self.origin!r} is not one of "
                             f"{', '.join(ORIGINS)}")
        try:
            check_layout([(b.name, b.length) for b in self.blocks],
                         Limits(max_ram=UNLIMITED_RAM), lister=MANIFEST)
        except (ProtocolError, MigrationError) as exc:
            raise ImageError(str(exc)) from None
        for block in self.blocks:
            if block.addr is not None and not 0 <= block.addr < 2**64:
                raise ImageError(f"{MANIFEST}: block {block.name!r} has address {block.addr}, "
                                 f"not a u64")
            if not _is_digest(block.digest):
                raise ImageError(f"{MANIFEST}: block {block.name!r} has digest "
                                 f"{block.digest[:40]!r}, not 32 hex digits")
        if not _is_digest(self.state_digest) or self.state_bytes < 0:
            raise ImageError(f"{MANIFEST}: the state's digest or size is malformed")


def _is_digest(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


def block_file(index: int) -> str:
    """The file of block ``index``, relative to the image."""
    return f"{BLOCKS}/{index:04d}.ram"


def digest_hex(data: bytes | memoryview) -> str:
    """xxh3-128 of ``data``, hex (the digest rdmamig verifies blocks with)."""
    return xxhash.xxh3_128_hexdigest(data)


# ---------------------------------------------------------------- reading


@attrs.frozen
class Image:
    """An image on disk (:func:`open_image`)."""

    path: Path
    manifest: Manifest

    def block(self, index: int, *, writable: bool = False) -> RamBlock:
        """Block ``index``, its file opened through no symbolic link and mapped
        read-only; ``writable``: opened and mapped for writing too (shared: writes
        go to the image), for a backend that cannot register read-only memory.

        Raises:
            ImageError: the file is gone or no longer of its size.
        """
        entry = self.manifest.blocks[index]
        return RamBlock.from_fd(entry.name, _open_regular(
            self.path, entry.file, size=entry.length, writable=writable), writable=writable)

    def blocks(self, *, writable: bool = False) -> list[RamBlock]:
        """Every block, mapped (:meth:`block`)."""
        return [self.block(i, writable=writable) for i in range(len(self.manifest.blocks))]

    def state(self) -> bytes:
        """The state after the RAM.

        Raises:
            ImageError: ``state.bin`` is gone or no longer of its size.
        """
        with os.fdopen(_open_regular(self.path, STATE, size=self.manifest.state_bytes),
                       "rb") as state:
            return state.read()

    def origin(self) -> dict[str, Any]:
        """What a source sends ahead of this image's blocks (an ORIGIN record), so
        that the destination writes the same image: :meth:`ImageWriter.commit_from`."""
        addrs = [b.addr for b in self.manifest.blocks]
        if self.manifest.qemu is not None:
            return self.manifest.qemu.record(addrs)
        return {"origin": self.manifest.origin, "qemu": None, "addrs": addrs}

    def verify(self) -> list[str]:
        """Names of the blocks (and ``state.bin``) whose content no longer matches
        the manifest's digest."""
        bad = [entry.name for index, entry in enumerate(self.manifest.blocks)
               if self._block_digest(index) != entry.digest]
        if digest_hex(self.state()) != self.manifest.state_digest:
            bad.append(STATE)
        return bad

    def check_digests(self) -> None:
        """Refuse an image whose content changed behind its manifest's back (an
        image travels between hosts): what is sent or exported is what was kept.

        Raises:
            ImageError: the blocks (or state) whose digest no longer matches.
        """
        bad = self.verify()
        if bad:
            raise ImageError(f"{self.path}: {', '.join(repr(name) for name in bad)} no longer "
                             f"match(es) the digest in {MANIFEST}: changed since the image "
                             f"was written (--no-digest-check to use it anyway)")

    def _block_digest(self, index: int) -> str:
        block = self.block(index)
        if self.manifest.version == 1:
            return digest_hex(block.view)
        return block.digest().hex()


def open_image(path: Path) -> Image:
    """Open the image at ``path``, checking its files against the manifest.

    Raises:
        ConfigurationError: ``path`` is not an image (no directory, no manifest).
        ImageError: the manifest is damaged or a file is missing or of another size.
    """
    manifest_path = path / MANIFEST
    if not path.is_dir() or not manifest_path.is_file():
        raise ConfigurationError(f"{path} is not an rdmamig image (no {MANIFEST})")
    with os.fdopen(_open_regular(path, MANIFEST), "rb") as file:
        text = file.read(MAX_MANIFEST + 1)
    if len(text) > MAX_MANIFEST:
        raise ImageError(f"{manifest_path} is over {MAX_MANIFEST} bytes")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ImageError(f"{manifest_path} cannot be read: {exc}") from None
    manifest = Manifest.from_json(data)
    for index, entry in enumerate(manifest.blocks):
        if entry.file != block_file(index):
            raise ImageError(f"block {entry.name!r}: file {entry.file!r} is not "
                             f"{block_file(index)!r}")
        os.close(_open_regular(path, entry.file, size=entry.length, what=f"block "
                                                                          f"{entry.name!r}: "))
    os.close(_open_regular(path, STATE, size=manifest.state_bytes))
    return Image(path, manifest)


def _open_regular(image: Path, relative: str, *, size: int | None = None,
                  what: str = "", writable: bool = False) -> int:
    """Open the image's file ``relative`` read-only (or read-write), component by
    component from the image's directory with no symbolic link followed (a
    ``blocks`` directory replaced by a link elsewhere is refused): its descriptor.

    Raises:
        ImageError: it is missing, reached through a link, not a regular file, or
            not ``size`` bytes (``what`` names it).
    """
    shown = f"{what}{image / relative}"
    try:
        directory = os.open(image, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(f"{shown} cannot be opened: {exc.strerror}") from None
    fd = -1
    try:
        *parents, name = relative.split("/")
        for part in parents:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                            dir_fd=directory)
            os.close(directory)
            directory = inner
        fd = os.open(name, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW
                     | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=directory)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or (size is not None and info.st_size != size):
            os.close(fd)
            raise ImageError(f"{shown} is missing or not "
                             f"{'a file' if size is None else f'{size} bytes'}")
        return fd
    except OSError as exc:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        reason = ("a symbolic link" if exc.errno in (errno.ELOOP, errno.ENOTDIR)
                  else exc.strerror)
        raise ImageError(f"{shown} is missing or not {size} bytes ({reason})"
                         if size is not None else f"{shown} cannot be opened: {reason}"
                         ) from None
    finally:
        os.close(directory)


# ---------------------------------------------------------------- writing


def check_new_image(path: Path) -> None:
    """Check that an image can be created at ``path`` (before any work for it).

    Raises:
        ConfigurationError: ``path`` exists (an image is never written over
            anything), or its parent is not a directory.
    """
    if path.exists() or path.is_symlink():
        raise ConfigurationError(f"{path} exists; an image is never written over anything")
    if not path.parent.is_dir():
        raise ConfigurationError(f"{path.parent} is not a directory")


class DiskSpace:
    """The free space of one filesystem, shared by every image written into it at
    once (a listener's sessions): each writer claims the bytes its blocks may fill,
    and a claim is granted only if the free space, plus what the claimants have
    allocated already, holds every claim. Thread-safe.

    Args:
        directory: a directory on the filesystem.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._claims: dict[ImageWriter, int] = {}

    def claim(self, writer: ImageWriter, length: int) -> None:
        """Claim ``length`` bytes more for ``writer``.

        Raises:
            ImageError: they do not fit beside the other claims.
        """
        with self._lock:
            stats = os.statvfs(self.directory)
            free = stats.f_bavail * stats.f_frsize
            filled = sum(w.allocated_bytes() for w in self._claims)
            claimed = sum(self._claims.values()) + length
            if claimed > free + filled:
                others = claimed - self._claims.get(writer, 0) - length
                raise ImageError(
                    f"{self._claims.get(writer, 0) + length} bytes of RAM blocks do not fit "
                    f"the {free + filled - others} bytes free in {self.directory}"
                    + (f" beside the {others} bytes other migrations into it may fill"
                       if others else ""))
            self._claims[writer] = self._claims.get(writer, 0) + length

    def release(self, writer: ImageWriter) -> None:
        """Drop ``writer``'s claim (committed: its blocks are on disk; or removed)."""
        with self._lock:
            self._claims.pop(writer, None)


class ImageWriter:
    """Writes an image: blocks are added sparse (all zero) under a staging name,
    filled by the caller, and :meth:`commit` records their digests and renames the
    image into place. Used as a context manager, anything not committed is removed.

    Args:
        path: where the image goes; it must not exist.
        blocks: (name, length, guest address or None) of blocks to add now.
        space: the account of the filesystem's free space this image shares with
            others written at the same time (by default, one of its own).

    Raises:
        ConfigurationError: ``path`` exists, or its parent does not.
    """

    def __init__(self, path: Path, blocks: Sequence[tuple[str, int, int | None]] = (), *,
                 space: DiskSpace | None = None) -> None:
        check_new_image(path)
        self.path = path
        # The pid says whose it is: a later listener removes it if we were killed.
        self.staging = path.parent / f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        self.blocks: list[RamBlock] = []
        self._addrs: list[int | None] = []
        self._state = b""
        self._committed = False
        os.mkdir(self.staging, 0o700)
        self._space = space or DiskSpace(path.parent)
        try:
            os.mkdir(self.staging / BLOCKS, 0o700)
            for name, length, addr in blocks:
                self.add_block(name, length, addr)
        except BaseException:
            self.abort()
            raise

    def add_block(self, name: str, length: int, addr: int | None = None) -> RamBlock:
        """Create the next block's file, sparse, and map it.

        Raises:
            ImageError: the blocks so far would not fit the disk's free space, were
                they filled (with what other images sharing ``space`` may fill).
        """
        self._space.claim(self, length)
        file = self.staging / block_file(len(self.blocks))
        fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.ftruncate(fd, length)
        finally:
            os.close(fd)
        block = RamBlock.from_file(name, file)
        self.blocks.append(block)
        self._addrs.append(addr)
        return block

    def allocated_bytes(self) -> int:
        """Bytes the image's block files have allocated so far."""
        return sum(block.allocated_bytes() for block in self.blocks)

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the image's staging files unless it was committed."""
        if not self._committed:
            self.abort()

    def set_state(self, state: bytes) -> None:
        """The state after the RAM."""
        self._state = bytes(state)

    def commit(self, *, origin: str, qemu: QemuOrigin | None = None,
               source: dict[str, Any] | None = None,
               digests: Sequence[bytes] = ()) -> Image:
        """Record the digests (``digests``, one per block, when they were just
        taken), write the manifest, flush everything to disk and rename the image
        into place.

        Raises:
            ConfigurationError: something appeared at the final path meanwhile.
            OSError: the disk refused.
        """
        taken = list(digests) or [block.digest() for block in self.blocks]
        entries = tuple(ImageBlock(name=block.name, length=block.length, file=block_file(i),
                                   digest=digest.hex(), addr=addr)
                        for i, (block, addr, digest) in enumerate(
                            zip(self.blocks, self._addrs, taken, strict=True)))
        manifest = Manifest(origin=origin, blocks=entries,
                            state_digest=digest_hex(self._state),
                            state_bytes=len(self._state),
                            created=datetime.datetime.now(datetime.UTC).isoformat(
                                timespec="seconds"),
                            source=source or {}, qemu=qemu)
        _write_new(self.staging / STATE, self._state)
        _write_new(self.staging / MANIFEST,
                   (json.dumps(manifest.to_json(), indent=2) + "\n").encode())
        for block in self.blocks:
            block.flush()
        for directory in (self.staging / BLOCKS, self.staging):
            _fsync_dir(directory)
        try:
            _rename_new(self.staging, self.path)
        except FileExistsError:
            raise ConfigurationError(f"{self.path} appeared while the image was written; "
                                     f"it is left as it was") from None
        _fsync_dir(self.path.parent)
        self._committed = True
        self._space.release(self)
        return Image(self.path, manifest)

    def commit_from(self, origin: dict[str, Any] | None, *,
                    source: dict[str, Any] | None = None,
                    digests: Sequence[bytes] = ()) -> Image:
        """:meth:`commit` with what a source said of its image (:meth:`Image.origin`),
        or as a native rdmamig migration when it said nothing. ``origin`` is a record
        the peer's stream codec has checked
        (:func:`rdmamig.engine.stream.decode_origin_untrusted`).

        Raises:
            ImageError: ``origin`` is not such a record.
        """
        if origin is None:
            return self.commit(origin="rdmamig", source=source, digests=digests)
        qemu = QemuOrigin.from_json(origin["qemu"]) if origin.get("qemu") else None
        if origin.get("addrs"):
            self._addrs = list(origin["addrs"])
        return self.commit(origin=origin["origin"], qemu=qemu, source=source,
                           digests=digests)

    def abort(self) -> None:
        """Remove the staging directory and everything in it."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self._space.release(self)


def remove_stale_staging(directory: Path, image: str = "*") -> list[Path]:
    """Remove the staging directories, in ``directory``, of images named ``image``
    (a glob) that a process no longer running left behind (one killed by SIGKILL):
    the ones removed.
    """
    removed = []
    for staging in directory.glob(f".{image}.partial-*-*"):
        pid = staging.name.rsplit("-", 2)[-2]
        if not pid.isdigit() or staging.is_symlink() or not staging.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
        except PermissionError:  # someone else's, and running
            pass
    return removed


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


_RENAME_NOREPLACE: Final = 1
_AT_FDCWD: Final = -100
_libc = ctypes.CDLL(None, use_errno=True)  # libc, without find_library's ldconfig run


def _rename_new(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``, which must not exist (an empty directory
    there would be replaced by a plain rename).

    Raises:
        FileExistsError: ``target`` exists.
    """
    if _libc.renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target),
                       _RENAME_NOREPLACE) == 0:
        return
    code = ctypes.get_errno()
    if code != errno.EINVAL:  # EINVAL: a filesystem without RENAME_NOREPLACE
        raise OSError(code, os.strerror(code), str(target))
    if target.exists() or target.is_symlink():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

