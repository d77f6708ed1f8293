"""Run rdmamig's verbs tests on real verbs, on a machine whose kernel has none.

Boots Debian's stock kernel (fetched with ``apt-get download``, never installed on
the host) in ``qemu-system-x86_64 -accel tcg``, with the host's own root file system
shared read-only over virtio-9p and this checkout shared writable at the same path.
The guest loads soft-RoCE (``rdma_rxe``), creates ``rxe0`` over its NIC and runs the
steps below with the interpreter this harness runs under (a virtual environment of
Debian's python3 with python3-pyverbs). It prints a pass/fail summary and exits
non-zero on any failure. See ../../../shared/SOFT-ROCE.md for the facts behind it.

    python tests/rxe/harness.py [--cache DIR] [--keep-going] [STEP ...]

Where the machine has an RDMA device already, ``--direct`` runs the same steps on it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUEST_IP = "10.0.2.15"
#: Modules the guest loads (dependencies are resolved with modprobe).
MODULES = ["crc32_generic", "virtio_pci", "virtio_net", "9pnet_virtio", "9p", "rdma_rxe",
           "rdma_ucm", "ib_uverbs"]


RESULTS = REPO / ".rxe-results"
#: Where the harness caches what it fetches (a kernel, Debian 13's root).
CACHE = Path("/var/tmp/rdmamig-rxe")
#: Debian 13 (QEMU 10) by debootstrap, run in the guest by chroot.
QEMU_ROOT = str(CACHE / "trixie")


def steps(python: str, host: str) -> dict[str, list[str]]:
    """Name -> command of every check run on the device whose address is ``host``."""
    report = str(RESULTS / "migrate-{}.json")
    migrate = [python, "-m", "rdmamig", "migrate", "--backend", "verbs", "--host", host,
               "--quiet", "--timeout", "120"]
    qemu = ["tests/rxe/qemu_check.py"]
    return {
        "devices": ["ibv_devices"],
        "backends": [python, "-m", "rdmamig", "backends", "--json"],
        "conformance": [python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_conformance.py", "-k", "verbs"],
        "migrate-idle": [*migrate, "--ram", "32MiB", "--report", report.format("idle")],
        "migrate-live": [*migrate, "--ram", "32MiB", "--dirty-rate", "8MiB", "--pattern",
                         "hotspot", "--report", report.format("live")],
        "migrate-pin-all": [*migrate, "--ram", "32MiB", "--pin-all",
                            "--report", report.format("pin-all")],
        "migrate-blocks": [*migrate, "--ram", "32MiB", "--blocks", "3", "--zero-fraction",
                           "0.5", "--report", report.format("blocks")],
        # At most 8 rounds: under TCG the hotspot guest may never converge, and 30
        # rounds of re-registration took a minute without checking anything more.
        "migrate-lru": [*migrate, "--ram", "32MiB", "--policy", "lru", "--pin-cap", "8MiB",
                        "--dirty-rate", "8MiB", "--max-iterations", "8",
                        "--report", report.format("lru")],
        "device": [python, "tests/rxe/device_check.py", host, "rxe0"],
        "listen-service": [python, "tests/rxe/listen_check.py", host],
        "sparse": [python, "tests/rxe/sparse_check.py", host],
        # The guest's kernel keeps soft-dirty bits (this machine's may not).
        "soft-dirty": [python, "tests/rxe/softdirty_check.py", "check", host],
        "soft-dirty-speed": [python, "tests/rxe/softdirty_check.py", "bench", host],
        "ksm-verbs": [python, "tests/rxe/ksm_check.py", host],
        "memlock": ["setpriv", "--bounding-set", "-ipc_lock", "--inh-caps", "-ipc_lock",
                    "prlimit", "--memlock=8388608:8388608", python, "tests/rxe/memlock_check.py"],
        "migrate-memlock": ["setpriv", "--bounding-set", "-ipc_lock", "--inh-caps", "-ipc_lock",
                            "prlimit", "--memlock=8388608:8388608", *migrate, "--ram", "32MiB",
                            "--policy", "memlock", "--report", report.format("memlock")],
        # An unmodified QEMU over RDMA into rdmamig and out of it (qemu_check.py).
        "qemu-to-rdmamig": [python, *qemu, "to-rdmamig", host],
        "qemu-to-rdmamig-pin-all": [python, *qemu, "to-rdmamig", "--pin-all", host],
        "qemu-to-failing-rdmamig": [python, *qemu, "to-rdmamig-refused", host],
        "rdmamig-to-qemu": [python, *qemu, "to-qemu", host],
        "rdmamig-to-qemu-pin-all": [python, *qemu, "to-qemu", "--pin-all", host],
        "qemu-round-trip": [python, *qemu, "round-trip", host],
        "qemu-pins": [python, *qemu, "pins", host],
        "qemu-never-touched": [python, *qemu, "never-touched", host],
        # The same against the newest QEMU the registries have (Debian 13's, in the
        # debootstrap root the harness builds), as QEMU's migration-compat jobs do.
        "qemu10-to-rdmamig": [python, *qemu, "to-rdmamig", "--qemu-root", QEMU_ROOT, host],
        "rdmamig-to-qemu10": [python, *qemu, "to-qemu", "--qemu-root", QEMU_ROOT, host],
        "qemu10-pins": [python, *qemu, "pins", "--qemu-root", QEMU_ROOT, host],
        # A benchmark line, not a pass/fail check: QEMU -> QEMU, QEMU -> rdmamig and
        # rdmamig -> QEMU for the same guest, in this run.
        "qemu-speed": [python, *qemu, "speed", host],
        "speed": [python, "tests/rxe/speed.py", "--host", host],
    }


#: What the guest prints as each step ends: the step, its exit status, its seconds.
STEP_MARK = "rdmamig-step"
#: Steps that measure: their figures are reported, and a run that fails to measure
#: (a timeout on a loaded machine) is reported too, but fails nothing.
BENCHMARKS = {"ksm-verbs", "qemu-speed", "soft-dirty-speed", "speed"}


# ------------------------------------------------------------------ prerequisites

#: What the harness and the guest need, and the Debian package that has it.
NEEDS = {"qemu-system-x86_64": "qemu-system-x86", "busybox": "busybox-static",
         "debootstrap": "debootstrap",
         "cpio": "cpio", "depmod": "kmod", "modprobe": "kmod", "rdma": "iproute2",
         "ibv_devices": "ibverbs-utils", "ib_write_bw": "perftest",
         "/usr/lib/python3/dist-packages/pyverbs": "python3-pyverbs",
         "/usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so": "ibverbs-providers"}


def _present(need: str) -> bool:
    return Path(need).exists() if need.startswith("/") else shutil.which(need) is not None


def ensure_prerequisites() -> None:
    """Install the distribution's packages the run needs (as root), or say which."""
    missing = sorted({package for need, package in NEEDS.items() if not _present(need)})
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"missing packages: {' '.join(missing)} (apt-get install them)")
    print(f"installing {' '.join(missing)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing, "rdma-core"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        _run("apt-get", "update", "-q")
        subprocess.run(install, env=env, check=True, capture_output=True)


# ------------------------------------------------------------------ the guest image


def _run(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=True, text=True, capture_output=True, **kwargs)


def fetch_kernel(cache: Path) -> tuple[Path, Path, str]:
    """Debian's newest ``linux-image-*-amd64-unsigned``, unpacked under ``cache``:
    (vmlinuz, modules root, kernel version)."""
    found = _run("apt-cache", "search", "--names-only",
                 r"^linux-image-[0-9.]+-[0-9]+-amd64-unsigned$").stdout.split()
    names = sorted({n for n in found if n.startswith("linux-image-")},
                   key=lambda n: [int(x) for x in re.findall(r"\d+", n)])
    if not names:
        raise SystemExit("no linux-image-*-amd64-unsigned package in the apt sources")
    package = names[-1]
    unpacked = cache / package
    if not unpacked.exists():
        download = cache / "download"
        download.mkdir(parents=True, exist_ok=True)
        _run("apt-get", "download", package, cwd=download)
        deb = next(download.glob(f"{package}_*.deb"))
        _run("dpkg", "-x", str(deb), str(unpacked))
        deb.unlink()
    version = next((unpacked / "lib" / "modules").iterdir()).name
    return next((unpacked / "boot").glob("vmlinuz-*")), unpacked, version


def build_qemu_root(root: Path) -> None:
    """Debian 13 with its qemu-system-x86 (and the verbs providers its QEMU needs for
    rxe) under ``root``, by debootstrap from Debian's registry; kept once built."""
    if (root / "usr" / "bin" / "qemu-system-x86_64").exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    _run("debootstrap", "--variant=minbase", "--include=qemu-system-x86,ibverbs-providers",
         "trixie", str(partial), apt_mirror())
    partial.rename(root)


def apt_mirror(etc: Path = Path("/etc/apt")) -> str:
    """The Debian archive this machine's apt configuration uses (a mirror, a proxy),
    for debootstrap: the first ``deb`` source that is not a security one, from
    deb822 ``.sources`` files or one-line ``.list`` files.

    Raises:
        SystemExit: apt names no Debian archive.
    """
    uris: list[str] = []
    for path in sorted(etc.glob("sources.list.d/*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields = dict(line.split(":", 1) for line in stanza.splitlines()
                          if ":" in line and not line.startswith(("#", " ")))
            if "deb" in fields.get("Types", "").split():
                uris += fields.get("URIs", "").split()
    for path in [etc / "sources.list", *sorted(etc.glob("sources.list.d/*.list"))]:
        if path.exists():
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", "", line).split()
                if len(words) >= 3 and words[0] == "deb":
                    uris.append(words[1])
    archive = next((uri for uri in uris if "security" not in uri), None)
    if archive is None:
        raise SystemExit(f"no Debian archive in {etc}'s sources for debootstrap")
    return archive


def module_order(root: Path, version: str) -> list[Path]:
    """Every .ko the guest needs, dependencies first."""
    _run("depmod", "-b", str(root), version)
    order: list[Path] = []
    for module in MODULES:
        out = _run("modprobe", "-d", str(root), "-S", version, "--show-depends",
                   module).stdout
        for line in out.splitlines():
            if line.startswith("insmod "):
                path = Path(line.split()[1])
                if path not in order:
                    order.append(path)
    return order


INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m || echo "insmod $m failed"; done
repo=$(sed -n 's/.*rdmamig.repo=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
mkdir -p /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 hostroot /newroot
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
for d in /dev/shm /tmp /run; do mount -t tmpfs tmpfs /newroot$d; done
# The checkout last: it may live under /tmp, which the tmpfs above covers.
mkdir -p /newroot$repo 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 work /newroot$repo
ip link set lo up
ip link set eth0 up
ip addr add {ip}/24 dev eth0
chroot /newroot /bin/sh -c "ulimit -l unlimited; cd $repo && sh {script}"
echo "rdmamig-guest-done"
poweroff -f
"""


def build_initramfs(cache: Path, modules: list[Path], script: str) -> Path:
    image = cache / "initrd.gz"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for sub in ("bin", "proc", "sys", "dev", "lib/modules", "newroot"):
            (root / sub).mkdir(parents=True)
        shutil.copy(shutil.which("busybox") or "/bin/busybox", root / "bin" / "busybox")
        for module in modules:
            shutil.copy(module, root / "lib" / "modules" / module.name)
        (root / "modules.order").write_text("\n".join(m.name for m in modules) + "\n")
        init = root / "init"
        init.write_text(INIT.format(ip=GUEST_IP, script=script))
        init.chmod(0o755)
        files = _run("find", ".", cwd=root).stdout
        archive = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=files.encode(),
                                 cwd=root, check=True, capture_output=True).stdout
        subprocess.run(["gzip", "-1"], input=archive, stdout=image.open("wb"), check=True)
    return image


# ------------------------------------------------------------------ running


def guest_script(selected: dict[str, list[str]], results: Path, keep_going: bool, *,
                 host: str, soft_roce: bool) -> str:
    """The shell script run in the checkout: set up rxe0 (in the guest), run the
    steps, record each one's exit status and output."""
    lines = ["set -u", "export PYTHONDONTWRITEBYTECODE=1 RDMAMIG_TEST_HOST=" + host,
             f"out={results}", "mkdir -p $out"]
    if soft_roce:
        lines.append("rdma link add rxe0 type rxe netdev eth0 > $out/setup.log 2>&1")
    lines.append(f"echo {'$?' if soft_roce else 0} > $out/setup.rc")
    for name, command in selected.items():
        quoted = " ".join(_quote(part) for part in command)
        lines.append(f"s=$(date +%s); timeout 900 {quoted} > $out/{name}.log 2>&1; "
                     f"rc=$?; echo $rc > $out/{name}.rc; "
                     f"echo \"{STEP_MARK} {name} $rc $(($(date +%s) - s))\"")
        if not keep_going and name not in BENCHMARKS:
            lines.append(f"[ $(cat $out/{name}.rc) = 0 ] || exit 1")
    return "\n".join(lines) + "\n"


def _quote(part: str) -> str:
    return part if re.fullmatch(r"[\w./:=,+-]+", part) else "'" + part.replace("'", "'\\''") + "'"


def boot(cache: Path, kernel: Path, initrd: Path, timeout: float) -> str:
    # -cpu max: numpy's wheels use instructions (AVX2...) that the default model lacks.
    args = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "2",
            "-nographic",
            "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", f"console=ttyS0 quiet panic=-1 rdmamig.repo={REPO}",
            "-nic", "user,model=virtio-net-pci",
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                       "multidevs=remap",
            "-virtfs", f"local,path={REPO},mount_tag=work,security_model=none,multidevs=remap"]
    guest = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, errors="replace")
    timer = threading.Timer(timeout, guest.kill)
    timer.start()
    console: list[str] = []
    try:
        assert guest.stdout is not None
        for line in guest.stdout:  # each step is told as it ends
            console.append(line)
            if line.startswith(STEP_MARK):
                _mark, name, rc, seconds = line.split()
                verdict = ("BENCH" if rc == "0" else "NOFIG") if name in BENCHMARKS else (
                    "PASS" if rc == "0" else "FAIL")
                print(f"{verdict}  {name:<24} {seconds} s", flush=True)
        guest.wait()
    finally:
        timer.cancel()
    (cache / "console.log").write_text("".join(console))
    return "".join(console)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("steps", nargs="*", help="steps to run (default: all)")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--keep-going", action="store_true", help="run every step")
    # The whole run took 30 min on an idle 2-core machine: room for a busy one, within
    # CI's 90 minutes.
    parser.add_argument("--timeout", type=float, default=4800, help="seconds for the guest")
    parser.add_argument("--command", help="run this shell command as the only step (debugging)")
    parser.add_argument("--direct", action="store_true",
                        help="run the steps here, on an RDMA device this machine has")
    parser.add_argument("--host", default=GUEST_IP,
                        help=f"the device's address (default: the guest's, {GUEST_IP})")
    args = parser.parse_args()
    every = steps(sys.executable, args.host)
    unknown = set(args.steps) - set(every)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}; known: {', '.join(every)}")
    selected = {name: every[name] for name in args.steps or every}
    if args.command:
        selected = {"command": ["sh", "-c", args.command]}
    results = RESULTS
    shutil.rmtree(results, ignore_errors=True)
    script = REPO / ".rxe-guest.sh"
    script.write_text(guest_script(selected, results, args.keep_going, host=args.host,
                                   soft_roce=not args.direct))
    started = time.monotonic()
    if args.direct:
        subprocess.run(["sh", str(script)], cwd=REPO, check=False)
    else:
        ensure_prerequisites()
        args.cache.mkdir(parents=True, exist_ok=True)
        kernel, root, version = fetch_kernel(args.cache)
        if any(name.startswith(("qemu10", "rdmamig-to-qemu10")) for name in selected):
            build_qemu_root(Path(QEMU_ROOT))
        initrd = build_initramfs(args.cache, module_order(root, version), script.name)
        print(f"booting the soft-RoCE guest (TCG) for {len(selected)} steps; each is "
              f"told as it ends, all of them take about 30 min", flush=True)
        console = boot(args.cache, kernel, initrd, args.timeout)
        if "rdmamig-guest-done" not in console:
            print(console[-3000:])
            print(f"the guest did not finish; console in {args.cache / 'console.log'}")
            return 1
    return summarize(selected, results, time.monotonic() - started)


def _gist(results: Path, name: str, log: Path) -> str:
    """One line about a step: a migration's figures, else the log's last line (its
    first 100 characters, all of a benchmark's: its figures are what it is for)."""
    report = results / f"{name}.json"
    if report.exists():
        r = json.loads(report.read_text())
        return (f"verified={r['verified']} {r['ram_bytes'] >> 20} MiB in "
                f"{r['total_time_s']:.2f} s, downtime {r['downtime_ms']:.0f} ms, "
                f"{r['registrations']} reg / {r['unregistrations']} unreg")
    lines = log.read_text().strip().splitlines() if log.exists() else []
    if not lines:
        return ""
    return lines[-1] if name in BENCHMARKS else lines[-1][:100]


def summarize(selected: dict[str, list[str]], results: Path, elapsed: float) -> int:
    failed = 0
    setup = (results / "setup.rc").read_text().strip() if (results / "setup.rc").exists() else "?"
    print(f"device setup: {'ok' if setup == '0' else 'FAILED'}")
    for name in selected:
        rc_file = results / f"{name}.rc"
        rc = rc_file.read_text().strip() if rc_file.exists() else "not run"
        ok = rc == "0"
        log = results / f"{name}.log"
        if name in BENCHMARKS:
            verdict = "BENCH" if ok else "NOFIG"  # a benchmark that did not measure
        else:
            verdict = "PASS" if ok else "FAIL"
            failed += not ok
        print(f"{verdict}  {name:<16} {_gist(results, name, log)}")
        if not ok and log.exists():
            print("      " + "\n      ".join(log.read_text().splitlines()[-25:]))
    print(f"{len(selected) - failed} passed or measured, {failed} failed, {elapsed:.0f} s")
    return 1 if failed or setup != "0" else 0


if __name__ == "__main__":
    sys.exit(main())
