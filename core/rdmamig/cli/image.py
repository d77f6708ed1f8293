"""``rdmamig image``: migration images – import a saved QEMU migration stream,
export one that QEMU loads, show what an image holds."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from ..convert import export_image, import_stream
from ..errors import ConfigurationError
from ..image import open_image
from ..units import size_text


def _import(args: argparse.Namespace) -> int:
    into: Path = args.dir
    if str(args.file) == "-":
        image = import_stream(sys.stdin.buffer, into, name="-")
    else:
        try:
            source = open(args.file, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise ConfigurationError(f"cannot read {args.file}: {exc.strerror}") from None
        with source:
            image = import_stream(source, into, name=str(args.file))
    manifest = image.manifest
    print(f"imported {len(manifest.blocks)} RAM block(s), "
          f"{size_text(sum(b.length for b in manifest.blocks))}, and "
          f"{manifest.state_bytes} bytes of device state into {image.path}", file=sys.stderr)
    return 0


def _export(args: argparse.Namespace) -> int:
    image = open_image(args.dir)
    if not args.no_digest_check:
        image.check_digests()
    if str(args.file) == "-":
        export_image(image, sys.stdout.buffer)
        return 0
    final: Path = args.file
    if final.exists() or final.is_symlink():
        raise ConfigurationError(f"{final} exists; export writes a new file (remove it "
                                 f"first)")
    if not final.parent.is_dir():
        raise ConfigurationError(f"{final.parent} is not a directory")
    # Written beside its final name and renamed once whole: a reader of FILE never
    # sees half a stream.
    staging = final.parent / f".{final.name}.partial-{secrets.token_hex(4)}"
    try:
        with open(staging, "xb") as out:
            count = export_image(image, out)
        # Linked into place only if nothing appeared there meanwhile.
        try:
            os.link(staging, final)
        except FileExistsError:
            raise ConfigurationError(f"{final} appeared while the image was exported; it "
                                     f"is left as it was") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
    print(f"exported {image.path} as a {count}-byte QEMU migration stream: {final}",
          file=sys.stderr)
    return 0


def describe(path: Path) -> dict[str, Any]:
    """What ``rdmamig image info --json`` prints."""
    image = open_image(path)
    manifest = image.manifest
    data: dict[str, Any] = {
        "path": str(image.path), "origin": manifest.origin, "created": manifest.created,
        "ram_bytes": sum(b.length for b in manifest.blocks),
        "blocks": [{"name": b.name, "length": b.length, "digest": b.digest}
                   for b in manifest.blocks],
        "state_bytes": manifest.state_bytes, "state_digest": manifest.state_digest,
        "source": manifest.source}
    if manifest.qemu is not None:
        data["machine"] = manifest.qemu.machine
        data["devices"] = list(manifest.qemu.devices)
    return data


def _shown(text: object) -> str:
    """``text`` as it may reach a terminal: an image travels between hosts, and a
    name in its manifest could hold escape sequences; those are shown escaped."""
    value = str(text)
    return value if value.isprintable() else value.encode("unicode_escape").decode("ascii")


def _info(args: argparse.Namespace) -> int:
    data = describe(args.dir)
    if args.json:
        print(json.dumps(data, indent=2))  # JSON escapes control characters itself
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text
    console = Console()
    console.print(Text(f"{_shown(data['path'])}: {_shown(data['origin'])} image, "
                       f"{size_text(data['ram_bytes'])} of RAM"
                       + (f", machine {_shown(data['machine'])}" if "machine" in data
                          else "")))
    table = Table("block", "bytes", "xxh3-128")
    for block in data["blocks"]:
        table.add_row(Text(_shown(block["name"])), str(block["length"]),
                      Text(_shown(block["digest"])))
    table.add_row(Text("(state)"), str(data["state_bytes"]), Text(_shown(data["state_digest"])))
    console.print(table)
    if data.get("devices"):
        console.print(Text(f"{len(data['devices'])} device sections: "
                           + ", ".join(_shown(device) for device in data["devices"])))
    return 0


def add_verb(verbs: Any) -> None:
    """Add ``image`` and its actions to the ``rdmamig`` parser."""
    image = verbs.add_parser("image", help="migration images: import or export QEMU "
                                           "migration streams, show an image")
    actions = image.add_subparsers(dest="action", metavar="ACTION", required=True)
    imp = actions.add_parser("import", help="a saved QEMU migration stream (migrate "
                                            "\"exec:cat > FILE\") into a new image DIR")
    imp.add_argument("file", type=Path, metavar="FILE", help="the stream (- : stdin)")
    imp.add_argument("dir", type=Path, metavar="DIR", help="the image to create")
    imp.set_defaults(run=_import)
    exp = actions.add_parser("export", help="an image as a QEMU migration stream "
                                            "(-incoming \"exec:cat FILE\" loads it)")
    exp.add_argument("dir", type=Path, metavar="DIR", help="the image")
    exp.add_argument("file", type=Path, metavar="FILE", help="the stream (- : stdout)")
    exp.add_argument("--no-digest-check", action="store_true",
                     help="export even blocks that no longer match the manifest's digests")
    exp.set_defaults(run=_export)
    info = actions.add_parser("info", help="blocks, sizes, digests, machine type, devices")
    info.add_argument("dir", type=Path, metavar="DIR", help="the image")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=_info)
