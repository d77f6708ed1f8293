"""Watching and driving a running migration the QEMU way: ``--events`` and a QMP
control socket, driven from a second process by ``qemu.qmp`` (the library QEMU's
own tests drive QEMU with)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import xxhash
from hostile import RDMAMIG
from test_faults import DIRTIER

pytest.importorskip("qemu.qmp", reason="needs qemu.qmp (a test dependency)")
MiB = 1 << 20

#: The second process: watches through the socket, changes the limits, cancels.
DRIVER = textwrap.dedent("""
    import json, os, sys, time
    from qemu.qmp.legacy import QEMUMonitorProtocol
    deadline = time.monotonic() + 120
    while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
        time.sleep(0.05)
    qmp = QEMUMonitorProtocol(sys.argv[1])
    qmp.connect(negotiate=True)
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = qmp.cmd_raw("query-migrate")["return"]
        seen.append(status)
        if status["status"] == "active" and status["ram"]["dirty-sync-count"] >= 3:
            break
        time.sleep(0.05)
    answers = {
        "set": qmp.cmd_raw("migrate-set-parameters",
                           {"downtime-limit": 1, "max-bandwidth": 512 << 20}),
        "parameters": qmp.cmd_raw("query-migrate-parameters")["return"],
        "unknown": qmp.cmd_raw("no-such-command"),
        "bad": qmp.cmd_raw("migrate-set-parameters", {"downtime-limit": -1}),
        "cancel": qmp.cmd_raw("migrate_cancel"),
    }
    events = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
            e["data"].get("status") == "cancelled" for e in events):
        event = qmp.pull_event(wait=5)
        if event:
            events.append(event)
    print(json.dumps({"seen": seen, "answers": answers, "events": events}))
""")


def test_a_second_process_watches_and_cancels_a_running_send(tmp_path: Path) -> None:
    static, hot = tmp_path / "static.bin", tmp_path / "hot.bin"
    static.write_bytes(os.urandom(32 * MiB))
    hot.write_bytes(os.urandom(8 * MiB))
    before = xxhash.xxh3_128_hexdigest(static.read_bytes())
    control, events, report = tmp_path / "qmp.sock", tmp_path / "events", tmp_path / "r.json"
    dirtier = subprocess.Popen([sys.executable, "-c", DIRTIER, str(hot)])
    listener = subprocess.Popen([*RDMAMIG, "listen", "127.0.0.1:0", "--once", "--into",
                                 str(tmp_path / "received")], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None
        port = listener.stdout.readline().rsplit(":", 1)[1].strip()
        source = subprocess.Popen(
            [*RDMAMIG, "send", f"127.0.0.1:{port}", "--block", f"static={static}",
             "--block", f"hot={hot}", "--live", "--pause-pid", str(dirtier.pid),
             "--max-downtime", "0", "--max-iterations", "100000", "--quiet",
             "--control", f"unix:{control}", "--events", str(events), "--report",
             str(report)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        driver = subprocess.run([sys.executable, "-c", DRIVER, str(control)],
                                capture_output=True, text=True, timeout=300)
        assert driver.returncode == 0, driver.stderr
        seen = json.loads(driver.stdout)
        _out, err = source.communicate(timeout=120)
        listener.wait(60)
    finally:
        for process in (dirtier, listener):
            process.kill()
            process.wait()
    # What the driver saw: setup or active, and figures that add up.
    statuses = [s["status"] for s in seen["seen"]]
    assert statuses[-1] == "active" and set(statuses) <= {"setup", "active"}
    last = seen["seen"][-1]["ram"]
    assert last["total"] == 40 * MiB and last["page-size"] == 4096
    assert last["transferred"] > 0 and last["dirty-sync-count"] >= 3
    answers = seen["answers"]
    assert answers["set"] == {"return": {}}
    assert answers["parameters"] == {"downtime-limit": 1, "max-bandwidth": 512 << 20}
    assert answers["unknown"]["error"]["class"] == "CommandNotFound"
    assert answers["bad"]["error"]["class"] == "GenericError"
    assert answers["cancel"] == {"return": {}}
    assert [e["data"]["status"] for e in seen["events"] if e["event"] == "MIGRATION"][-2:] == [
        "cancelling", "cancelled"]
    # The source: failed as cancelled, memory intact, its process running, nothing
    # pinned, the socket gone; the listener kept nothing.
    assert source.returncode == 1 and "migration cancelled (migrate_cancel)" in err
    assert xxhash.xxh3_128_hexdigest(static.read_bytes()) == before
    assert not control.exists()
    assert listener.returncode == 1 and not (tmp_path / "received").exists()
    data = json.loads(report.read_text())
    assert data["query-migrate"]["status"] == "cancelled"
    assert data["query-migrate"]["rdmamig"] == {"pinned-bytes": 0, "locked-bytes": 0}
    # The events file: QMP's statuses in order, a MIGRATION_PASS per pass.
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    flow = [e["data"]["status"] for e in lines if e["event"] == "MIGRATION"]
    assert flow == ["setup", "active", "cancelling", "cancelled"]
    passes = [e["data"]["pass"] for e in lines if e["event"] == "MIGRATION_PASS"]
    assert passes == list(range(1, len(passes) + 1)) and len(passes) >= 3
    assert all(set(e["timestamp"]) == {"seconds", "microseconds"} for e in lines)


def test_a_completed_migrations_report_and_events_agree(tmp_path: Path) -> None:
    events, report = tmp_path / "events", tmp_path / "r.json"
    result = subprocess.run([*RDMAMIG, "migrate", "--ram", "32MiB", "--dirty-rate", "20MiB",
                             "--quiet", "--events", str(events), "--report", str(report)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    status = data["query-migrate"]
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    flow = [e["data"]["status"] for e in lines if e["event"] == "MIGRATION"]
    assert flow == ["setup", "active", "device", "completed"]
    passes = [e["data"]["pass"] for e in lines if e["event"] == "MIGRATION_PASS"]
    assert status["status"] == "completed" and status["ram"]["remaining"] == 0
    assert status["ram"]["dirty-sync-count"] == len(passes) == data["iterations"]
    assert status["downtime"] == round(data["downtime_ms"])
    assert status["ram"]["total"] == data["ram_bytes"] == 32 * MiB
    assert status["ram"]["duplicate"] == data["duplicate_pages"] >= data["zero_pages"]
    assert "verify" in status["capabilities"] and "commit" in status["capabilities"]
    assert status["rdmamig"]["pinned-bytes"] == 0
    # What the plot marks: a start per pass, the last when the workload stopped.
    starts, stopped = data["timeline"]["pass_starts"], data["timeline"]["stopped_at"]
    assert len(starts) == len(passes) and starts == sorted(starts)
    assert starts[-1] >= stopped >= starts[-2]


def test_a_listener_reports_each_migrations_statuses(tmp_path: Path) -> None:
    block, events = tmp_path / "mem.bin", tmp_path / "events"
    block.write_bytes(os.urandom(4 * MiB))
    listener = subprocess.Popen([*RDMAMIG, "listen", "127.0.0.1:0", "--once", "--into",
                                 str(tmp_path / "image"), "--events", str(events), "-q"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert listener.stdout is not None
    port = listener.stdout.readline().rsplit(":", 1)[1].strip()
    sent = subprocess.run([*RDMAMIG, "send", f"127.0.0.1:{port}", "--block", f"m={block}",
                           "--quiet"], capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr
    assert listener.wait(60) == 0
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert [e["data"]["status"] for e in lines if e["event"] == "MIGRATION"] == [
        "setup", "active", "completed"]
    assert {e["data"]["id"] for e in lines} == {"migration-1"}
    assert [e["data"]["pass"] for e in lines if e["event"] == "MIGRATION_PASS"] == [1, 2]


#: A libvirt-style driver's calls around a migration, from a second process.
LIBVIRT_STYLE = textwrap.dedent("""
    import json, sys
    from qemu.qmp.legacy import QEMUMonitorProtocol
    qmp = QEMUMonitorProtocol(sys.argv[1])
    greeting = qmp.connect(negotiate=True)
    calls = [("query-version", None), ("query-status", None),
             ("query-migrate-capabilities", None),
             ("migrate-set-capabilities",
              {"capabilities": [{"capability": "auto-converge", "state": True}]}),
             ("migrate-set-capabilities",
              {"capabilities": [{"capability": "rdma-pin-all", "state": True}]}),
             ("migrate-set-capabilities",
              {"capabilities": [{"capability": "x-nothing", "state": True}]}),
             ("human-monitor-command", {"command-line": "info migrate"}),
             ("human-monitor-command", {"command-line": "info  status"})]
    print(json.dumps({"greeting": greeting,
                      "answers": [qmp.cmd_raw(name, args) for name, args in calls]}))
""")


def test_the_commands_a_libvirt_style_driver_issues_answer_in_qemus_shapes(
        tmp_path: Path) -> None:
    from rdmamig import __version__
    from rdmamig.qmp import ControlServer
    from rdmamig.status import Monitor, Status

    monitor = Monitor(total_bytes=64 * MiB, max_downtime=0.3)
    monitor.set_status(Status.SETUP)
    monitor.set_status(Status.ACTIVE)
    monitor.update(transferred=8 * MiB, remaining=56 * MiB, normal=2048)
    socket_path = tmp_path / "qmp.sock"
    with ControlServer(socket_path, monitor, version=__version__, capabilities={
            "rdma-pin-all": True, "auto-converge": False, "events": True}):
        driver = subprocess.run([sys.executable, "-c", LIBVIRT_STYLE, str(socket_path)],
                                capture_output=True, text=True, timeout=60)
    assert driver.returncode == 0, driver.stderr
    out = json.loads(driver.stdout)
    major, minor, micro = (int(part) for part in __version__.split("."))
    version = {"qemu": {"major": major, "minor": minor, "micro": micro},
               "package": f"rdmamig {__version__}"}
    assert out["greeting"]["QMP"]["version"] == version
    answers = [a.get("return", a.get("error")) for a in out["answers"]]
    assert answers[0] == version
    assert answers[1] == {"status": "running", "running": True, "singlestep": False}
    assert answers[2] == [{"capability": "rdma-pin-all", "state": True},
                          {"capability": "auto-converge", "state": False},
                          {"capability": "events", "state": True}]
    assert answers[3] == {"class": "GenericError",
                          "desc": "There's a migration process in progress"}
    assert answers[4] == {}  # unchanged: nothing to refuse
    assert "does not accept value 'x-nothing'" in answers[5]["desc"]
    assert answers[6].startswith("Migration status: active\r\ntotal time: ")
    assert "transferred ram: 8192 kbytes\r\n" in answers[6]
    assert "remaining ram: 57344 kbytes\r\n" in answers[6]
    assert answers[7] == "rdmamig answers 'info migrate' only, not 'info status'\r\n"


def test_the_readme_qmp_example_runs_as_written(tmp_path: Path) -> None:
    import re

    from hostile import service

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = next(block for block in re.findall(r"```sh\n(.*?)```", readme, re.DOTALL)
                   if "--control unix:/run/rdmamig.qmp" in block)
    block = tmp_path / "vm-ram"
    block.write_bytes(os.urandom(64 * MiB))
    with service(tmp_path / "images") as listener:
        script = (example.replace("dst-host:4444", f"127.0.0.1:{listener.port}")
                  .replace("/dev/shm/vm-ram", str(block))
                  .replace("/run/rdmamig.qmp", str(tmp_path / "rdmamig.qmp"))
                  .replace("rdmamig send", f"{sys.executable} -m rdmamig send")
                  .replace("python3 -", f"{sys.executable} -"))
        done = subprocess.run(["bash", "-e", "-c", script], capture_output=True, text=True,
                              timeout=180)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert "'status':" in lines[0] and lines[1].startswith("{'status': ")
    assert lines[-1] in ("cancelling", "cancelled", "completed"), done.stdout


#: A client that reads the final event, then asks for the status a while later.
LATE_READER = textwrap.dedent("""
    import json, os, sys, time
    from qemu.qmp.legacy import QEMUMonitorProtocol
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.01)
    qmp = QEMUMonitorProtocol(sys.argv[1])
    qmp.connect(negotiate=True)
    final = None
    while final is None:
        event = qmp.pull_event(wait=60)
        if event["event"] == "MIGRATION" and event["data"]["status"] in (
                "completed", "failed", "cancelled"):
            final = event["data"]["status"]
    time.sleep(1.0)  # a poller between two polls
    print(json.dumps({"event": final, "later": qmp.cmd_raw("query-migrate")["return"]}))
""")


def test_a_client_reads_the_final_status_after_the_migration_ends(tmp_path: Path) -> None:
    from hostile import service

    block = tmp_path / "ram"
    block.write_bytes(os.urandom(4 * MiB))  # 4 s at 1 MiB/s: time for the client to come
    socket_path = tmp_path / "qmp.sock"
    with service(tmp_path / "images") as listener:
        reader = subprocess.Popen([sys.executable, "-c", LATE_READER, str(socket_path)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sent = subprocess.run([*RDMAMIG, "send", f"127.0.0.1:{listener.port}", "--block",
                               f"ram={block}", "--quiet", "--control", f"unix:{socket_path}",
                               "--max-bandwidth", "1MiB"],
                              capture_output=True, text=True, timeout=120)
        out, err = reader.communicate(timeout=60)
    assert sent.returncode == 0, sent.stderr
    assert reader.returncode == 0, err
    seen = json.loads(out)
    assert seen["event"] == "completed" and seen["later"]["status"] == "completed"
    assert not socket_path.exists()  # removed once the client left


#: A client of the destination's socket: its run state before, then after the end.
INCOMING_READER = textwrap.dedent("""
    import json, os, sys, time
    from qemu.qmp.legacy import QEMUMonitorProtocol
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.01)
    qmp = QEMUMonitorProtocol(sys.argv[1])
    qmp.connect(negotiate=True)
    before = qmp.cmd_raw("query-status")["return"]
    cancel = qmp.cmd_raw("migrate_cancel")
    print(json.dumps({"before": before, "cancel": cancel}), flush=True)
    while True:
        event = qmp.pull_event(wait=60)
        if event["event"] == "MIGRATION" and event["data"]["status"] in (
                "completed", "failed"):
            break
    print(json.dumps({"migrate": qmp.cmd_raw("query-migrate")["return"],
                      "status": qmp.cmd_raw("query-status")["return"]}))
""")


def test_listen_once_serves_qmp_for_the_migration_it_receives(tmp_path: Path) -> None:
    socket_path = tmp_path / "in.qmp"
    listener = subprocess.Popen([*RDMAMIG, "listen", "127.0.0.1:0", "--once", "--into",
                                 str(tmp_path / "image"), "--quiet", "--control",
                                 f"unix:{socket_path}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert listener.stdout is not None
    port = listener.stdout.readline().rsplit(":", 1)[1].strip()
    reader = subprocess.Popen([sys.executable, "-c", INCOMING_READER, str(socket_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert reader.stdout is not None
    first = json.loads(reader.stdout.readline())  # connected before the source came
    assert first["before"] == {"status": "inmigrate", "running": False, "singlestep": False}
    assert "its destination cannot" in first["cancel"]["error"]["desc"]
    block = tmp_path / "ram"
    block.write_bytes(os.urandom(4 * MiB))
    sent = subprocess.run([*RDMAMIG, "send", f"127.0.0.1:{port}", "--block", f"ram={block}",
                           "--quiet"], capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    last = json.loads(out)
    assert last["migrate"]["status"] == "completed"
    assert last["status"] == {"status": "paused", "running": False, "singlestep": False}
    assert listener.wait(60) == 0
