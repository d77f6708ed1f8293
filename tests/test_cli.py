"""The command line, end to end, with real processes: migrate, listen / send, and
failures injected by killing a side."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from rdmamig import loopback
from rdmamig.caps import SOURCE_DEFAULTS, Capability
from rdmamig.cli.options import parse_size
from rdmamig.engine import Destination, RamBlock, Source, SourceConfig
from rdmamig.errors import MigrationError
from rdmamig.image import open_image
from rdmamig.migration import Plan
from rdmamig.pinning import locked_bytes
from rdmamig.plugins import load_registry
from rdmamig.policy import PolicyOptions
from rdmamig_policies.pin_until_done import PinUntilDone
from rdmamig_tcp import TcpBackend

MiB = 1 << 20
RDMAMIG = [sys.executable, "-m", "rdmamig"]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RDMAMIG, *args], capture_output=True, text=True, timeout=timeout)


def test_migrate_small_guest_writes_a_report(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    result = run("migrate", "--ram", "16MiB", "--blocks", "2", "--zero-fraction", "0.95",
                 "--quiet", "--report", str(report))
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["verified"] is True and data["ram_bytes"] == 16 * MiB
    for key in ("backend", "policy", "total_time_s", "downtime_ms", "iterations",
                "bytes_written", "zero_pages", "registrations", "unregistrations",
                "pinned_peak_bytes_source", "pinned_peak_bytes_destination",
                "throughput_gbps"):
        assert key in data
    assert data["zero_pages"] > 0 and data["pinned_peak_bytes_destination"] > 0


def test_migrate_live_with_pin_all(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    result = run("migrate", "--ram", "64MiB", "--dirty-rate", "200MiB", "--pattern",
                 "sequential", "--pin-all", "--max-downtime", "20", "--quiet",
                 "--report", str(report))
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["verified"] and data["bytes_written"] > data["ram_bytes"]
    assert data["capabilities"] & Capability.PIN_ALL
    assert data["policy"] == "pin-until-done + PIN_ALL"


@pytest.mark.parametrize(("args", "message"), [
    (["migrate", "--backend", "nope"], "unknown backend 'nope'; known:"),
    (["migrate", "--policy", "nope"], "unknown policy 'nope'; known:"),
    (["policies", "compare", "--policies", "lru,nope"], "unknown policy 'nope'; known:"),
    (["migrate", "--policy", "lru", "--pin-cap", "8MiB", "--pin-all"],
     "--pin-all registers whole blocks up front, and policy 'lru' unpins chunks"),
    (["policies", "compare", "--patterns", "zigzag"], "unknown pattern 'zigzag'; known:"),
    (["migrate", "--ram", "12 parsecs"], "cannot parse size '12 parsecs'"),
    (["listen", "127.0.0.1:0", "--into", "x", "--handshake-timeout", "0"],
     "argument --handshake-timeout: '0' is not a number of seconds"),
    (["listen", "127.0.0.1:0", "--into", "x", "--handshake-timeout", "9999"],
     "handshake_timeout=9999.0: must be over 0 and at most 3600 s"),
    (["migrate", "--inline-pages", "-3"],
     "argument --inline-pages: '-3' is not a whole number from 0 to 256"),
    (["migrate", "--max-downtime", "-5"],
     "argument --max-downtime: '-5' is not a number of milliseconds, 0 or more"),
    (["send", "h:1", "--max-iterations", "0"],
     "argument --max-iterations: '0' is not a whole number 1 or more"),
    (["policies", "compare", "--channels", "17"],
     "argument --channels: '17' is not a whole number from 1 to 16"),
    (["send", "127.0.0.1:1", "--block", "a=/etc/hostname"], "not a positive multiple"),
    (["send", "127.0.0.1:9", "--block", f"a={__file__}x"], "No such file"),
    (["send", "no-port", "--block", "a=b"], "cannot parse address 'no-port'"),
    (["migrate", "--ram", "1.5"], "size '1.5' is 1.5 bytes: not a whole number of bytes"),
    (["migrate", "--ram", "1PB"], "cannot parse size '1PB'"),
    (["migrate", "--timeout", "-1"], "argument --timeout: '-1' is not a number of seconds"),
    (["migrate", "--timeout", "inf"], "argument --timeout: 'inf' is not a number of seconds"),
    (["migrate", "--timeout", "nan"], "argument --timeout: 'nan' is not a number of seconds"),
    (["migrate", "--zero-fraction", "1.5"], "'1.5' is not a fraction from 0 to 1"),
    (["migrate", "--blocks", "0"], "argument --blocks: '0' is not a whole number 1 or more"),
    (["migrate", "--report", "/nonexistent/r.json"],
     "cannot write '/nonexistent/r.json': /nonexistent is not a directory"),
    (["migrate", "--report", "/"], "'/' is a directory, not a file to write"),
    (["migrate", "--plot", "/nonexistent/p.png"], "cannot write '/nonexistent/p.png'"),
    (["listen", "127.0.0.1:0", "--once", "--into", "/nonexistent/img"],
     "/nonexistent is not a directory"),
    (["send", "127.0.0.1:9", "--block", "a=b", "--psk-file", "/"],
     "the key file / is not a regular file"),
    (["migrate", "--ram", "100TiB"], "(the source's and the destination's copies) is more "
                                     "than this machine's"),
    (["migrate", "--ram", "1GB"], "--ram 1000000000 bytes is not whole 4 KiB pages "
                                  "(decimal suffixes are powers of ten"),
    (["send", "127.0.0.1:9", "--block", "a=/dev/null", "--block", "a=/dev/null"],
     "--block names must differ: 'a' given more than once"),
    (["migrate", "--events", "-", "--report", "-"],
     "--events - and --report - would both write standard output"),
    (["listen", "127.0.0.1:0", "--into", "x", "--control", "unix:/tmp/x.qmp"],
     "--control is for --once"),
    (["migrate", "--control", "tcp:127.0.0.1:4444"],
     "control address 'tcp:127.0.0.1:4444': only unix:PATH is served"),
    (["listen", "127.0.0.1:0", "--once", "--into", "x", "--control", "tcp:[::1]:4444"],
     "control address 'tcp:[::1]:4444': only unix:PATH is served"),
])
def test_bad_arguments_exit_2_with_one_clear_line(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


def test_global_flags_work_before_the_verb(tmp_path: Path) -> None:
    quiet = run("-q", "migrate", "--ram", "4MiB", "--report", str(tmp_path / "r.json"))
    assert quiet.returncode == 0, quiet.stderr
    assert run("-v", "-v", "backends").returncode == 0
    assert run("-x", "backends").returncode == 2


def test_policy_lab_compares_policies_under_their_caps(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the lab's --plot needs matplotlib")
    report, plot = tmp_path / "lab.json", tmp_path / "lab.png"
    result = run("policies", "compare", "--ram", "16MiB", "--dirty-rate", "20MiB",
                 "--policies", "pin-until-done,eager,lru", "--caps", "4MiB,8MiB",
                 "--patterns", "hotspot,sequential", "--report", str(report),
                 "--plot", str(plot), timeout=300)
    assert result.returncode == 0, result.stderr
    runs = json.loads(report.read_text())["runs"]
    # One run per workload and policy, and per cap for a capped policy.
    assert [(r["pattern"], r["policy"], r["pin_cap"]) for r in runs] == [
        (pattern, policy, cap) for pattern in ("hotspot", "sequential")
        for policy, cap in (("pin-until-done", None), ("eager", None), ("lru", 4 * MiB),
                            ("lru", 8 * MiB))]
    for r in runs:
        assert r["verified"], r["error"]
        assert r["timeline"]["source"], "no pinned-bytes samples to plot"
        if r["pin_cap"] is not None:
            assert r["pinned_peak_bytes_source"] <= r["pin_cap"]
            assert r["pinned_peak_bytes_destination"] <= r["pin_cap"]
        if r["policy"] == "pin-until-done":
            assert r["pinned_peak_bytes_source"] == 16 * MiB and r["unregistrations"] == 0
        else:
            assert r["unregistrations"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for column in ("re-reg", "peak pinned", "inline"):
        assert column in result.stdout


@pytest.mark.parametrize(("text", "size"), [
    ("4096", 4096), ("1.5K", 1536), ("1GB", 10**9), ("2TB", 2 * 10**12), ("1T", 2**40),
    ("1e9", 10**9), ("512MiB", 512 << 20), ("0.5G", 1 << 29),
])
def test_sizes_take_decimal_and_binary_units(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_a_report_can_go_to_standard_output() -> None:
    result = run("migrate", "--ram", "4MiB", "--quiet", "--report", "-")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["verified"]
    assert not Path("-").exists()


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0 and re.fullmatch(
        r"rdmamig \S+ \(protocol version 1\)\n", result.stdout)


def test_unreachable_address_exits_3(tmp_path: Path) -> None:
    block = tmp_path / "b"
    block.write_bytes(bytes(MiB))
    result = run("send", "127.0.0.1:1", "--block", f"ram={block}", "--quiet")
    assert result.returncode == 3
    assert "cannot reach the destination 127.0.0.1:1" in result.stderr


def _listen(into: Path, *extra: str) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen([*RDMAMIG, "listen", "127.0.0.1:0", "--once", "--into", str(into),
                                *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("listening on "), line
    return process, int(line.rsplit(":", 1)[1])


def test_listen_and_send_file_backed_blocks(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    files = {}
    for name, size in (("pc.ram", 8 * MiB), ("/rom@etc/acpi/tables", 128 * 1024)):
        path = tmp_path / f"src-{len(files)}"
        path.write_bytes(rng.bytes(size))
        files[name] = path
    state = tmp_path / "state"
    state.write_bytes(b"device state")
    listener, port = _listen(tmp_path / "into", "--report", str(tmp_path / "dst.json"))
    sent = run("send", f"127.0.0.1:{port}", "--quiet", "--state", str(state),
               *[arg for name, path in files.items() for arg in ("--block", f"{name}={path}")])
    assert sent.returncode == 0, sent.stderr
    assert listener.wait(60) == 0
    image = open_image(tmp_path / "into")
    assert [b.name for b in image.manifest.blocks] == list(files)
    for index, path in enumerate(files.values()):
        assert bytes(image.block(index).view) == path.read_bytes()
    assert image.state() == b"device state"
    assert image.manifest.origin == "rdmamig" and image.verify() == []
    assert json.loads((tmp_path / "dst.json").read_text())["verified"] is True
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_destination_killed_mid_bulk(tmp_path: Path) -> None:
    listener, port = _listen(tmp_path / "into")
    blocks = [RamBlock.anonymous("ram0", 128 * MiB)]
    blocks[0].array[:] = np.frombuffer(np.random.default_rng(1).bytes(128 * MiB), np.uint8)
    before = blocks[0].digest()
    locked_before = locked_bytes()

    def kill_halfway(sample: dict[str, float]) -> None:
        if sample["bytes_written"] >= 32 * MiB and listener.poll() is None:
            listener.kill()
            listener.wait()

    endpoint = TcpBackend().connect(host="127.0.0.1", port=port,
                                    requested=Capability.BATCH | Capability.VERIFY, timeout=10)
    with endpoint:
        source = Source(endpoint, blocks, policy=PinUntilDone(PolicyOptions()),
                        config=SourceConfig(timeout=10), on_progress=kill_halfway)
        with pytest.raises(MigrationError, match="source failed: "):
            source.run()
        assert endpoint.pinned_bytes == 0
    assert locked_bytes() == locked_before
    assert blocks[0].digest() == before
    # Nothing under the image's name (SIGKILL leaves the listener's staging files).
    assert not (tmp_path / "into").exists()


def test_source_killed_mid_iteration(tmp_path: Path) -> None:
    path = tmp_path / "guest"
    path.write_bytes(np.random.default_rng(2).bytes(16 * MiB))
    stop_writer = threading.Event()

    def writer() -> None:  # another "process" dirtying the file-backed RAM
        block = RamBlock.from_file("w", path)
        rng = np.random.default_rng(3)
        while not stop_writer.is_set():
            block.array[rng.integers(0, 16 * MiB - 8, 64)] += 1
            time.sleep(0.002)

    listener = TcpBackend().listen(host="127.0.0.1", port=0, supported=TcpBackend.supported)
    port = listener.address[1]
    sender = subprocess.Popen([*RDMAMIG, "send", f"127.0.0.1:{port}", "--block",
                               f"ram0={path}", "--live", "--max-downtime", "0.001",
                               "--max-iterations", "100000", "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        endpoint = listener.accept(timeout=30)
        listener.close()
        with endpoint:
            destination = Destination(endpoint, make_block=RamBlock.anonymous, timeout=10)
            runner = threading.Thread(target=lambda: _swallow(destination.run))
            runner.start()
            deadline = time.monotonic() + 60
            while destination.result.iterations < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert destination.result.iterations >= 3
            os.kill(sender.pid, signal.SIGKILL)
            runner.join(30)
            assert not destination.result.completed
            assert "peer closed" in str(destination.result.error) or "connection" in str(
                destination.result.error)
            assert endpoint.pinned_bytes == 0
    finally:
        stop_writer.set()
        thread.join()
        sender.kill()
        sender.wait()


def _swallow(fn: object) -> None:
    with contextlib.suppress(MigrationError):
        fn()  # type: ignore[operator]


def test_backends_table_runs() -> None:
    result = run("backends")
    assert result.returncode == 0 and "tcp" in result.stdout


def test_lru_cap_holds_in_the_kernels_count_on_both_sides(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    result = run("migrate", "--ram", "64MiB", "--policy", "lru", "--pin-cap", "8MiB",
                 "--dirty-rate", "50MiB", "--pattern", "hotspot", "--quiet",
                 "--report", str(report))
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    for side in ("source", "destination"):
        assert 0 < data[f"pinned_peak_bytes_{side}"] <= 8 * MiB
        assert 0 < data[f"locked_peak_bytes_{side}"] <= 8 * MiB
    assert data["unregistrations"] >= 56


def test_pin_cap_is_refused_for_a_policy_without_one() -> None:
    result = run("migrate", "--policy", "eager", "--pin-cap", "8MiB")
    assert result.returncode == 2
    assert "policy 'eager' keeps no cap" in result.stderr


UNDER_ULIMIT = ["setpriv", "--bounding-set", "-ipc_lock", "--inh-caps", "-ipc_lock",
                "prlimit", "--memlock=8388608:8388608"]


def test_under_ulimit_l_pin_until_done_fails_clearly_and_memlock_completes(
        tmp_path: Path) -> None:
    if shutil.which("setpriv") is None or shutil.which("prlimit") is None:
        pytest.skip("setpriv / prlimit (util-linux) are not installed")
    failed = subprocess.run([*UNDER_ULIMIT, *RDMAMIG, "migrate", "--ram", "64MiB", "--quiet"],
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1
    assert "RLIMIT_MEMLOCK is 8388608 bytes (8 MiB)" in failed.stderr
    report = tmp_path / "r.json"
    done = subprocess.run([*UNDER_ULIMIT, *RDMAMIG, "migrate", "--ram", "64MiB", "--quiet",
                           "--policy", "memlock", "--report", str(report)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    assert data["verified"] and data["locked_peak_bytes_source"] <= 8 * MiB


def test_a_listener_that_cannot_start_leaves_no_directory(tmp_path: Path) -> None:
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("listen", f"127.0.0.1:{port}", "--into", str(tmp_path / "images"))
    assert result.returncode in (2, 3) and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "images").exists()


def test_listen_events_on_stdout_are_json_lines_only(tmp_path: Path) -> None:
    listener = subprocess.Popen([*RDMAMIG, "listen", "127.0.0.1:0", "--once", "--into",
                                 str(tmp_path / "image"), "--events", "-", "--quiet"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert listener.stderr is not None
    port = next(line for line in listener.stderr
                if line.startswith("listening on")).rsplit(":", 1)[1].strip()
    block = tmp_path / "ram"
    block.write_bytes(os.urandom(1 << 20))
    assert run("send", f"127.0.0.1:{port}", "--block", f"ram={block}",
               "--quiet").returncode == 0
    out, _err = listener.communicate(timeout=60)
    events = [json.loads(line) for line in out.splitlines()]
    assert events and events[-1]["data"]["status"] == "completed"


def test_image_export_never_replaces_a_file(tmp_path: Path) -> None:
    from test_qemu_stream import small_stream
    saved, image, out = tmp_path / "saved", tmp_path / "image", tmp_path / "out.mig"
    saved.write_bytes(small_stream())
    assert run("image", "import", str(saved), str(image)).returncode == 0
    out.write_bytes(b"keep me")
    result = run("image", "export", str(image), str(out))
    assert result.returncode == 2 and "exists; export writes a new file" in result.stderr
    assert out.read_bytes() == b"keep me"


def _read_until(fd: int, wanted: bytes | None, *, seconds: float = 60) -> bytes:
    """What ``fd`` gives until ``wanted`` appears (None: until EOF), or EOF, or
    ``seconds`` pass."""
    import select
    seen, deadline = b"", time.monotonic() + seconds
    while (wanted is None or wanted not in seen) and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        try:
            data = os.read(fd, 65536) if ready else b""
        except OSError:  # a terminal whose other end is closed
            data = b""
        if not data:
            break
        seen += data
    return seen


def test_a_warning_prints_above_the_live_display_not_into_it() -> None:
    import pty
    primary, secondary = pty.openpty()
    # A downtime limit of 0 ms is always missed: the warning comes during the display.
    child = subprocess.Popen([*RDMAMIG, "migrate", "--ram", "32MiB", "--max-downtime", "0",
                              "--max-iterations", "1"],
                             stdin=secondary, stdout=secondary, stderr=secondary,
                             env={**os.environ, "COLUMNS": "120"})
    os.close(secondary)
    screen = _read_until(primary, None, seconds=300)
    os.close(primary)
    assert child.wait(60) == 0
    text = screen.decode(errors="replace")
    at = text.index("rdmamig migrate: downtime")
    # The display's line was cleared (erase line) right before it, not written on.
    assert text[:at].endswith("\r\x1b[2K"), repr(text[max(0, at - 80):at + 40])
    assert "filling" in text  # the set-up phase is named while the guest fills


def test_listen_once_shows_its_display_while_it_waits(tmp_path: Path) -> None:
    # The display is made before the listener says it listens (nothing of it on the
    # clock of a migration that starts then) and shown while it waits; the line
    # still goes to standard output, not into the display on the terminal.
    import pty
    primary, secondary = pty.openpty()
    child = subprocess.Popen([*RDMAMIG, "listen", "127.0.0.1:0", "--once", "--into",
                              str(tmp_path / "into")], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=secondary,
                             env={**os.environ, "COLUMNS": "120"})
    os.close(secondary)
    # Reads the terminal on once "waiting" is seen, so that a full one never stalls
    # the listener; it ends when the listener does (EOF).
    drain = threading.Thread(target=_read_until, args=(primary, None), daemon=True)
    try:
        assert child.stdout is not None
        line = _read_until(child.stdout.fileno(), b"\n")
        assert line.startswith(b"listening on "), line
        assert b"waiting" in _read_until(primary, b"waiting")  # before any source came
        drain.start()
        port = int(line.split(b":")[-1])
        (tmp_path / "ram").write_bytes(bytes(4 * MiB))
        sent = run("send", f"127.0.0.1:{port}", "--quiet", "--block", f"ram={tmp_path / 'ram'}")
        assert sent.returncode == 0, sent.stderr
        assert child.wait(60) == 0
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(30)
        if drain.is_alive():
            drain.join(30)
        os.close(primary)


def test_a_host_that_is_not_this_machines_fails_with_its_reason() -> None:
    # The destination process cannot listen there: its reason, not an EOFError.
    result = run("migrate", "--ram", "4MiB", "--host", "192.0.2.1", "--quiet")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "cannot listen on 192.0.2.1:0" in result.stderr


def test_blocks_split_ram_into_whole_pages(tmp_path: Path) -> None:
    # 32 MiB in 3 blocks: 2730 pages each, the remainder left out (as the harness runs it).
    report = tmp_path / "r.json"
    result = run("migrate", "--ram", "32MiB", "--blocks", "3", "--quiet", "--report",
                 str(report))
    assert result.returncode == 0, result.stderr
    assert json.loads(report.read_text())["ram_bytes"] == 3 * (32 * MiB // 3 // 4096 * 4096)


def test_verbose_shows_the_steps_and_very_verbose_the_protocol() -> None:
    common = ("migrate", "--ram", "16MiB", "--policy", "lru", "--pin-cap", "4MiB")
    quiet, steps, protocol = run(*common), run("-v", *common), run("-vv", *common)
    assert all(done.returncode == 0 for done in (quiet, steps, protocol))
    assert "pass 1" not in quiet.stderr
    # -v: the steps of both sides (the destination is a process of its own).
    for line in ("rdmamig migrate: pass 1: 16 MiB dirty",
                 "rdmamig destination: 1 RAM block(s): ram0 16 MiB",
                 "rdmamig migrate: 1 of 1 block(s) match",
                 "rdmamig migrate: the destination kept the migration"):
        assert line in steps.stderr
    assert "REGISTER REQUEST" not in steps.stderr
    # -vv: every message each way, the registrations and the policy's decisions.
    for line in ("rdmamig migrate: source -> REGISTER REQUEST (1 entry)",
                 "rdmamig destination: destination <- REGISTER REQUEST (1 entry)",
                 "rdmamig migrate: source <- UNREGISTER FINISHED",
                 "rdmamig migrate: registering 2 chunk(s) as 1 region(s)",
                 "rdmamig migrate: policy lru unpins 2 chunk(s)"):
        assert line in protocol.stderr


@pytest.mark.parametrize("after_s", [0.0, 0.05, 0.15, 0.3])
def test_ctrl_c_while_rdmamig_starts_is_an_interruption_not_a_traceback(
        tmp_path: Path, after_s: float) -> None:
    # As the console script: import the entry point (which loads nothing heavy),
    # then call it. The launcher says when it calls it; Ctrl-C then lands while
    # rdmamig loads the rest, parses or starts migrating.
    started = tmp_path / "started"
    # As from a terminal, whatever the suite was started from: SIGINT not ignored.
    launcher = (f"import pathlib, signal, sys; from rdmamig.cli import main; "
                f"signal.signal(signal.SIGINT, signal.default_int_handler); "
                f"pathlib.Path({str(started)!r}).touch(); "
                f"sys.exit(main(['migrate', '--ram', '64MiB']))")
    child = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(after_s)
    child.send_signal(signal.SIGINT)
    _out, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().endswith("interrupted")


@pytest.mark.parametrize("handler", ["default_int_handler", "SIG_IGN"])
def test_ctrl_c_while_rdmamig_loads_waits_until_it_has_loaded(handler: str) -> None:
    # Raised inside an extension module's import (numpy's), the interruption came
    # out as an ImportError with a traceback: it is held until the imports are
    # done. The launcher interrupts itself as the CLI starts importing numpy. Where
    # SIGINT is ignored (a background job of a script), it stays ignored.
    launcher = textwrap.dedent(f"""
        import builtins, os, signal, sys
        from rdmamig.cli import main
        signal.signal(signal.SIGINT, signal.{handler})
        plain = builtins.__import__
        def importing(name, *args, **kwargs):
            if name == "numpy" and "numpy" not in sys.modules:
                os.kill(os.getpid(), signal.SIGINT)
            return plain(name, *args, **kwargs)
        builtins.__import__ = importing
        code = main(["migrate", "--ram", "64MiB"])
        print("rdmamig.cli.app" in sys.modules, code)
        """)
    done = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True,
                          timeout=60)
    if handler == "SIG_IGN":
        assert done.stdout.split()[-2:] == ["True", "0"], done.stderr
    else:
        assert done.stdout.split() == ["True", "130"], done.stderr
        assert done.stderr.strip() == "rdmamig: interrupted"


def test_an_interrupted_local_migration_takes_its_destination_process_along(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-C while the source runs: the destination process, which ignores SIGINT
    # and was listening, must go too, or `rdmamig migrate` waits for it at exit.
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(loopback, "run_source", interrupted)
    registry = load_registry()
    plan = Plan(backend=registry.backend("tcp"), policy=registry.policy("pin-until-done"),
                options=PolicyOptions(), requested=SOURCE_DEFAULTS,
                config=SourceConfig(timeout=20))
    with pytest.raises(KeyboardInterrupt):
        loopback.migrate_locally(plan, loopback.Guest(ram=1 << 20))
    left = multiprocessing.active_children()
    for process in left:
        process.kill()
    assert left == []
