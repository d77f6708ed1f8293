"""The soft-RoCE harness's own logic (tests/rxe/harness.py): what it runs in the
guest, how it reports each step, where it takes Debian from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "rxe"))
import harness


def test_debootstrap_takes_the_archive_apt_is_configured_with(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: s\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\n\n"
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian\nSuites: bookworm\n")
    assert harness.apt_mirror(tmp_path) == "http://mirror.example/debian"
    one_line = tmp_path / "old"
    one_line.mkdir()
    (one_line / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://proxy.example:3142/debian bookworm main\n")
    assert harness.apt_mirror(one_line) == "http://proxy.example:3142/debian"


def test_each_step_reports_its_name_status_and_seconds_as_it_ends(tmp_path: Path) -> None:
    script = harness.guest_script({"good": ["true"], "bad": ["sh", "-c", "exit 3"]},
                                  tmp_path / "results", True, host="127.0.0.1",
                                  soft_roce=False)
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True,
                         timeout=60).stdout.split("\n")
    marks = [line.split() for line in out if line.startswith(harness.STEP_MARK)]
    assert [(name, rc) for _mark, name, rc, _seconds in marks] == [("good", "0"), ("bad", "3")]
    assert all(seconds.isdigit() for *_rest, seconds in marks)
    assert (tmp_path / "results" / "bad.rc").read_text().strip() == "3"


def test_a_benchmark_line_is_shown_whole_a_check_line_cut(tmp_path: Path) -> None:
    figures = "speed," + " QEMU -> rdmamig 1.23 s (1.10x)," * 8
    for name in ("qemu-speed", "device"):
        (tmp_path / f"{name}.log").write_text(f"setting up\n{figures}\n")
    assert harness._gist(tmp_path, "qemu-speed", tmp_path / "qemu-speed.log") == figures
    assert harness._gist(tmp_path, "device", tmp_path / "device.log") == figures[:100]
