"""Reports of a migration: the JSON of ``--report``, the summary table, the plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .engine import DestinationResult, SourceResult
from .errors import ConfigurationError
from .status import capability_names
from .units import size_text


def build_report(*, backend: str, policy: str, ram_bytes: int, source: SourceResult | None,
                 destination: DestinationResult | None,
                 error: str | Exception | None = None,
                 status: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The ``--report`` JSON: every field QEMU's ``query-migrate`` users look for,
    and with ``status`` (a :class:`~rdmamig.status.Monitor`'s ``query()``) the
    ``query-migrate`` answer itself, with the negotiated capabilities by name."""
    error = None if error is None else str(error)
    src = source or SourceResult()
    dst = destination or DestinationResult()
    total = src.total_time_s or dst.total_time_s
    sides = [r.verified for r in (source, destination) if r is not None]
    verified = bool(sides) and all(sides) and error is None
    completed = error is None and (dst.completed if destination is not None
                                   else source is not None)
    # A QEMU peer has no hash check to offer: its migrations complete unverified.
    peer = "qemu" if "qemu" in (src.peer, dst.peer) else "rdmamig"
    report: dict[str, Any] = {
        #: Which side this report is of: ``source``, ``destination`` or ``both``.
        "side": ("both" if source is not None and destination is not None
                 else "destination" if destination is not None else "source"),
        "succeeded": completed and (verified or peer == "qemu"),
        "verified": verified,
        "verification": ("verified" if verified else "not offered by the peer (QEMU)"
                         if peer == "qemu" and completed else "not verified"),
        "peer": peer,
        "completed": completed,
        "error": error or dst.error,
        "backend": backend,
        "policy": policy,
        "ram_bytes": ram_bytes,
        "total_time_s": total,
        "transfer_time_s": src.transfer_time_s or dst.transfer_time_s,
        "downtime_ms": src.downtime_s * 1000,
        "verify_time_s": max(src.verify_time_s, dst.verify_time_s),
        "iterations": src.iterations or dst.iterations,
        "bytes_written": src.bytes_written,
        "zero_pages": src.zero_pages or dst.zero_pages,
        "duplicate_pages": src.duplicate_pages,
        "inline_pages": src.inline_pages or dst.inline_pages,
        "registrations": src.registrations,
        "unregistrations": src.unregistrations,
        "reregistrations": src.reregistrations,
        "pinned_peak_bytes_source": src.pinned_peak_bytes,
        "pinned_peak_bytes_destination": dst.pinned_peak_bytes,
        #: What the source asked the peer to pin at most, by its own accounting: the
        #: figure for a QEMU destination, which reports none of its own.
        "peer_pinned_peak_bytes": src.peer_pinned_peak_bytes,
        "locked_peak_bytes_source": src.locked_peak_bytes,
        "locked_peak_bytes_destination": dst.locked_peak_bytes,
        "throughput_gbps": ram_bytes / total / 1e9 if total else 0.0,
        "capabilities": src.capabilities,
        "throttle": src.throttle,
    }
    report.update(extra)
    if status is not None:
        report["query-migrate"] = {**status,
                                   "capabilities": capability_names(src.capabilities)}
    report["timeline"] = {"source": src.timeline, "destination_pinned": dst.pinned_timeline,
                          "pass_starts": src.pass_starts, "stopped_at": src.stopped_at_s}
    return report


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` as JSON (to standard output for ``-``)."""
    text = json.dumps(report, indent=2) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        path.write_text(text)


def summary_table(report: dict[str, Any]) -> Any:
    """A rich table of the main figures."""
    from rich.table import Table

    title = ("[green]verified[/]" if report["verified"] else
             "[yellow]completed, not verified: the peer (QEMU) offers no verification[/]"
             if report["succeeded"] else "[red]FAILED[/]")
    table = Table(title="migration " + title, show_header=False)
    # A side shows what it measured, not the other side's figures as zeros.
    source = report.get("side", "both") != "destination"
    destination = report.get("side", "both") != "source"
    rows = [
        ("backend / policy", f"{report['backend']} / {report['policy']}") if source
        else ("backend", report["backend"]),
        ("peer / verification", f"{report['peer']} / {report['verification']}"),
        ("RAM", size_text(report["ram_bytes"])),
        ("total time", f"{report['total_time_s']:.3f} s"),
        ("transfer time (until all is in place)", f"{report['transfer_time_s']:.3f} s"),
    ]
    if report["succeeded"]:
        rows.append(("throughput", f"{report['throughput_gbps']:.2f} GB/s"))
    if source:
        rows += [
            ("downtime", f"{report['downtime_ms']:.1f} ms" if report["succeeded"] else "-"),
            ("iterations", str(report["iterations"])),
            ("written", size_text(report["bytes_written"])),
            ("zero pages (sent as COMPRESS) / inline pages",
             f"{report.get('duplicate_pages') or report['zero_pages']} "
             f"({report['zero_pages']}) / {report['inline_pages']}"),
            ("registrations / unregistrations",
             f"{report['registrations']} / {report['unregistrations']}"),
            ("asked the peer to pin, at most",
             size_text(report.get("peer_pinned_peak_bytes", 0))),
        ]
    else:
        rows += [("passes", str(report["iterations"])),
                 ("zero pages / inline pages",
                  f"{report['zero_pages']} / {report['inline_pages']}")]
    for name, method in report.get("dirty_tracking", {}).items():
        rows.append((f"written pages of {name} found by", method))
    peaks = [size_text(report[f"pinned_peak_bytes_{side}"])
             for side, shown in (("source", source), ("destination", destination)) if shown]
    names = " / ".join(n for n, shown in (("source", source), ("destination", destination))
                       if shown)
    rows += [(f"pinned peak ({names})", " / ".join(peaks)),
             ("verify time", f"{report['verify_time_s']:.3f} s")]
    if report.get("error"):
        rows.append(("error", str(report["error"])))
    for key, value in rows:
        table.add_row(key, value)
    return table


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (call it before any work that a plot
    would follow, so that a missing matplotlib is found first).

    Raises:
        ConfigurationError: matplotlib is not installed (``pip install rdmamig[plot]``).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigurationError("--plot needs matplotlib: pip install 'rdmamig[plot]'"
                                 ) from None
    return plt


#: Seconds the plotted throughput is averaged over.
RATE_WINDOW = 0.25


def rate_series(samples: list[dict[str, float]]) -> tuple[Any, Any]:
    """(seconds, GB/s) of a timeline: the bytes whose writes completed over the last
    :data:`RATE_WINDOW` seconds, not from one sample to the next (batches complete
    in bursts) and not the bytes queued (a window is queued at once, long before
    the link carries it). A report from before ``bytes_completed`` uses
    ``bytes_written``."""
    import numpy as np
    t = np.array([s["t"] for s in samples])
    done = np.array([s.get("bytes_completed", s["bytes_written"]) for s in samples])
    back = np.clip(np.searchsorted(t, t - RATE_WINDOW, side="right") - 1, 0, None)
    span = np.maximum(t - t[back], 1e-9)
    return t, np.where(t - t[back] > 0, (done - done[back]) / span / 1e9, 0.0)


def plot_timeline(report: dict[str, Any], path: Path) -> None:
    """Throughput, dirty bytes remaining and pinned bytes over time, as a PNG, with
    the passes marked and the downtime shaded.

    Raises:
        ConfigurationError: matplotlib is not installed.
    """
    plt = require_matplotlib()
    timeline = report["timeline"]
    samples = timeline["source"]
    t, rate = rate_series(samples)
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(8, 7))
    axes[0].plot(t, rate)
    axes[0].set_ylabel(f"GB/s over {RATE_WINDOW} s")
    stopped = timeline.get("stopped_at")
    for axis in axes:
        for number, start in enumerate(timeline.get("pass_starts") or [], start=1):
            axis.axvline(start, color="grey", linewidth=0.6, linestyle=":")
            if axis is axes[0]:
                axis.annotate(f"pass {number}", (start, 1), xycoords=("data", "axes fraction"),
                              fontsize=7, va="top", rotation=90)
        if stopped is not None:
            axis.axvspan(stopped, stopped + report["downtime_ms"] / 1000, color="red",
                         alpha=0.15, label="downtime" if axis is axes[0] else None)
    if stopped is not None:
        axes[0].legend(loc="lower right")
    axes[1].plot(t, [s["dirty_bytes"] / 2**20 for s in samples])
    axes[1].set_ylabel("dirty MiB left")
    axes[2].plot(t, [s["pinned_bytes"] / 2**20 for s in samples], label="source")
    dst = report["timeline"]["destination_pinned"]
    if dst:
        axes[2].step([x for x, _ in dst], [y / 2**20 for _, y in dst], where="post",
                     label="destination")
    axes[2].set_ylabel("pinned MiB")
    axes[2].set_xlabel("seconds since connect")
    axes[2].legend()
    fig.suptitle(f"rdmamig {report['backend']} / {report['policy']}: "
                 f"{size_text(report['ram_bytes'])} in {report['total_time_s']:.2f} s")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
