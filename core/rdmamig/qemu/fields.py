"""The basic fields of QEMU's migration stream, shared by its section and ``ram``
record codecs: bounds checks and u8-length-prefixed names (idstrs)."""

from __future__ import annotations

from ..errors import StreamError, TruncatedError


def need_bytes(buf: memoryview, at: int, size: int, what: str, start: int) -> None:
    """Raise :class:`TruncatedError` (for the record at ``start``) unless ``buf``
    holds ``size`` bytes from ``at``."""
    if len(buf) - at < size:
        raise TruncatedError(what, at=at,
                             reason=f"the stream ends after {max(len(buf) - at, 0)} of its {size} "
                                    "bytes", offset=start)


def decode_name_untrusted(buf: memoryview, at: int, what: str, start: int) -> tuple[str, int]:
    """A u8-length-prefixed name (an idstr) at ``at``; ``what`` names it in errors.

    Raises:
        TruncatedError: the bytes end inside it.
        RemoteProtocolError: empty or not UTF-8.
    """
    need_bytes(buf, at, 1, f"{what} length", start)
    size = buf[at]
    need_bytes(buf, at + 1, size, what, start)
    raw = bytes(buf[at + 1:at + 1 + size])
    if not size:
        raise StreamError(what, at=at, reason="empty")
    try:
        return raw.decode("utf-8"), at + 1 + size
    except UnicodeDecodeError:
        raise StreamError(f"{what}={raw!r}", at=at, reason="not UTF-8") from None


def encode_name(name: str) -> bytes:
    """A u8-length-prefixed name."""
    raw = name.encode()
    if not 0 < len(raw) <= 255:
        raise ValueError(f"name {name!r} is not 1 to 255 bytes")
    return bytes([len(raw)]) + raw
