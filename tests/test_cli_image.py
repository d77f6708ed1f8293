"""``rdmamig image`` and ``send --image``, end to end with real processes: bad input
gets one line and the right exit status, and nothing partial is left behind."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from rdmamig.convert import import_stream
from rdmamig.errors import RemoteProtocolError
from rdmamig.qemu.ram import PAGE_SIZE as PAGE
from rdmamig.qemu.ram import RamBlockInfo
from test_qemu_stream import small_stream

RDMAMIG = [sys.executable, "-m", "rdmamig"]


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*RDMAMIG, *args], capture_output=True, timeout=120, input=stdin)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "saved"
    path.write_bytes(small_stream())
    return path


def test_import_export_and_info(tmp_path: Path, saved: Path) -> None:
    image, out = tmp_path / "image", tmp_path / "out"
    assert run("image", "import", str(saved), str(image)).returncode == 0
    assert run("image", "export", str(image), str(out)).returncode == 0
    # What rdmamig writes reads back the same: the export decodes to the same image.
    again = tmp_path / "again"
    assert run("image", "import", str(out), str(again)).returncode == 0
    first = json.loads(run("image", "info", str(image), "--json").stdout)
    second = json.loads(run("image", "info", str(again), "--json").stdout)
    assert first["blocks"] == second["blocks"] and first["state_digest"] == second[
        "state_digest"]
    assert first["machine"] == "pc-i440fx-7.2" and first["devices"] == ["timer/0"]
    assert [b["name"] for b in first["blocks"]] == ["mem", "pc.rom"]
    # Zero pages stay holes in the block files.
    assert (image / "blocks" / "0000.ram").stat().st_blocks * 512 < 8 * 4096
    assert leftovers(tmp_path) == []


def test_stdin_and_stdout(tmp_path: Path, saved: Path) -> None:
    image = tmp_path / "image"
    assert run("image", "import", "-", str(image), stdin=saved.read_bytes()).returncode == 0
    exported = run("image", "export", str(image), "-")
    assert exported.returncode == 0
    out = tmp_path / "out"
    assert run("image", "export", str(image), str(out)).returncode == 0
    assert exported.stdout == out.read_bytes()


@pytest.mark.parametrize(("cut", "message"), [
    (20, b"at offset 8: the stream ends"),
    (-10, b"without EOF and the VM description"),
])
def test_a_truncated_stream_fails_with_one_line_and_leaves_nothing(
        tmp_path: Path, saved: Path, cut: int, message: bytes) -> None:
    saved.write_bytes(saved.read_bytes()[:cut])
    result = run("image", "import", str(saved), str(tmp_path / "image"))
    assert result.returncode == 1
    assert result.stderr.startswith(b"rdmamig image: failed: ") and message in result.stderr
    assert result.stderr.count(b"\n") == 1 and b"Traceback" not in result.stderr
    assert not (tmp_path / "image").exists() and leftovers(tmp_path) == []


class _Pieces(io.RawIOBase):
    """A pipe that hands out the given pieces, one per read."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


def test_bytes_after_the_vm_description_are_refused(tmp_path: Path, saved: Path) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data + b"junk")
    result = run("image", "import", str(saved), str(tmp_path / "image"))
    assert result.returncode == 1 and b"without EOF and the VM description" in result.stderr
    # From a pipe, the junk after a whole stream comes in a read of its own.
    with pytest.raises(RemoteProtocolError, match=r"4 bytes at offset \d+: after the VM desc"):
        import_stream(_Pieces(data, b"junk"), tmp_path / "image")
    assert not (tmp_path / "image").exists() and leftovers(tmp_path) == []
    assert import_stream(_Pieces(data), tmp_path / "image").manifest.qemu is not None


def test_an_unknown_flag_names_it_and_its_offset(tmp_path: Path, saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    at = data.index(b"\x03mem", 200) - 8  # the END section's first PAGE record
    data[at + 7] = 0x48  # PAGE | XBZRLE
    saved.write_bytes(data)
    result = run("image", "import", str(saved), str(tmp_path / "image"))
    assert result.returncode == 1
    assert f"flags=0x48 at offset {at}: an XBZRLE page".encode() in result.stderr
    assert leftovers(tmp_path) == []


def test_usage_errors_exit_2(tmp_path: Path, saved: Path) -> None:
    image = tmp_path / "image"
    assert run("image", "import", str(saved), str(image)).returncode == 0
    again = run("image", "import", str(saved), str(image))
    assert again.returncode == 2 and b"exists; an image is never written over" in again.stderr
    plain = tmp_path / "plain"
    plain.mkdir()
    result = run("image", "export", str(plain), str(tmp_path / "out"))
    assert result.returncode == 2 and b"is not an rdmamig image (no manifest.json)" in (
        result.stderr)
    result = run("image", "info", str(tmp_path / "nothing"))
    assert result.returncode == 2
    result = run("image", "import", str(tmp_path / "missing"), str(tmp_path / "x"))
    assert result.returncode == 2 and b"cannot read" in result.stderr
    result = run("image", "export", str(image), str(tmp_path / "no" / "out"))
    assert result.returncode == 2 and b"is not a directory" in result.stderr


def test_a_damaged_image_is_refused(tmp_path: Path, saved: Path) -> None:
    image = tmp_path / "image"
    assert run("image", "import", str(saved), str(image)).returncode == 0
    with (image / "blocks" / "0001.ram").open("r+b") as block:
        block.truncate(4096)
    result = run("image", "export", str(image), str(tmp_path / "out"))
    assert result.returncode == 1
    assert b"block 'pc.rom': " in result.stderr and b"is missing or not 8192 bytes" in (
        result.stderr)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_send_image_writes_the_same_image_on_the_listener(tmp_path: Path,
                                                         saved: Path) -> None:
    image, received = tmp_path / "image", tmp_path / "received"
    assert run("image", "import", str(saved), str(image)).returncode == 0
    listener = subprocess.Popen([*RDMAMIG, "listen", "127.0.0.1:0", "--once", "--into",
                                 str(received)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert listener.stdout is not None
    line = listener.stdout.readline()
    port = line.rsplit(":", 1)[1].strip()
    sent = run("send", f"127.0.0.1:{port}", "--image", str(image), "--quiet")
    assert sent.returncode == 0, sent.stderr
    assert listener.wait(60) == 0
    ours = json.loads(run("image", "info", str(image), "--json").stdout)
    theirs = json.loads(run("image", "info", str(received), "--json").stdout)
    for key in ("origin", "machine", "blocks", "state_digest", "devices"):
        assert ours[key] == theirs[key], key
    # And it exports to the same stream QEMU would load.
    assert run("image", "export", str(image), str(tmp_path / "a")).returncode == 0
    assert run("image", "export", str(received), str(tmp_path / "b")).returncode == 0
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_a_native_image_does_not_export_as_a_qemu_stream(tmp_path: Path) -> None:
    block = tmp_path / "block"
    block.write_bytes(bytes(range(256)) * 64)
    received = tmp_path / "received"
    listener = subprocess.Popen([*RDMAMIG, "listen", "127.0.0.1:0", "--once", "--into",
                                 str(received)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert listener.stdout is not None
    port = listener.stdout.readline().rsplit(":", 1)[1].strip()
    assert run("send", f"127.0.0.1:{port}", "--block", f"ram={block}", "--quiet"
               ).returncode == 0
    assert listener.wait(60) == 0
    result = run("image", "export", str(received), str(tmp_path / "out"))
    assert result.returncode == 2 and b"holds an rdmamig migration, not a QEMU one" in (
        result.stderr)


def test_an_import_is_held_to_the_listeners_layout_limits(tmp_path: Path) -> None:
    # 300 blocks of a page each: over the 256 a listener takes; refused before any
    # file is made (one file per block would run out of descriptors first).
    blocks = [RamBlockInfo(name=f"b{i}", length=PAGE) for i in range(300)]
    saved = tmp_path / "saved"
    saved.write_bytes(small_stream(setup=blocks))
    result = run("image", "import", str(saved), str(tmp_path / "image"))
    assert result.returncode == 1, result.stderr
    assert b"lists 302 RAM blocks; this destination takes at most 256" in result.stderr
    assert result.stderr.count(b"\n") == 1
    assert not (tmp_path / "image").exists() and leftovers(tmp_path) == []
    # And a name no listener takes.
    saved.write_bytes(small_stream(setup=[RamBlockInfo(name="a\x1bb", length=PAGE)]))
    result = run("image", "import", str(saved), str(tmp_path / "image"))
    assert result.returncode == 1 and b"printable characters" in result.stderr
    assert not (tmp_path / "image").exists() and leftovers(tmp_path) == []


def test_bytes_changed_behind_the_manifest_are_neither_exported_nor_sent(
        tmp_path: Path, saved: Path) -> None:
    image = tmp_path / "image"
    assert run("image", "import", str(saved), str(image)).returncode == 0
    with (image / "blocks" / "0000.ram").open("r+b") as block:
        block.seek(5 * 4096)
        block.write(b"changed")
    result = run("image", "export", str(image), str(tmp_path / "out"))
    assert result.returncode == 1 and result.stderr.count(b"\n") == 1, result.stderr
    assert b"'mem' no longer match(es) the digest in manifest.json" in result.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    # Refused before connecting: nobody listens on port 9.
    sent = run("send", "127.0.0.1:9", "--image", str(image), "--quiet")
    assert sent.returncode == 1 and b"no longer match(es) the digest" in sent.stderr
    # Asked for explicitly, it goes.
    assert run("image", "export", str(image), str(tmp_path / "out"),
               "--no-digest-check").returncode == 0
