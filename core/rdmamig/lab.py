"""The policy lab: the same live migration under several unpin policies, caps and
workloads, to compare what each costs (``rdmamig policies compare``)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs

from .engine import SourceConfig
from .errors import ConfigurationError
from .loopback import Guest, migrate_locally
from .migration import Plan, source_capabilities
from .plugins import Registry
from .policy import Hint, PolicyOptions
from .report import require_matplotlib
from .transport import Backend
from .units import size_text
from .workload import PATTERNS


@attrs.frozen(kw_only=True)
class LabRun:
    """One migration of the lab: a workload, a policy and its cap (None: uncapped)."""

    pattern: str
    policy: str
    cap: int | None


def lab_runs(registry: Registry, *, policies: Sequence[str], caps: Sequence[int],
             patterns: Sequence[str]) -> list[LabRun]:
    """Every (workload, policy, cap): a policy that takes a cap runs once per cap,
    any other once per workload.

    Raises:
        UnknownNameError: a policy no plugin registered.
        ConfigurationError: an unknown workload pattern.
    """
    for pattern in patterns:
        if pattern not in PATTERNS:
            raise ConfigurationError(f"unknown pattern {pattern!r}; known: "
                                     f"{', '.join(PATTERNS)}")
    runs = []
    for pattern, name in itertools.product(patterns, policies):
        if registry.policy(name).takes_cap:
            runs += [LabRun(pattern=pattern, policy=name, cap=cap) for cap in caps]
        else:
            runs.append(LabRun(pattern=pattern, policy=name, cap=None))
    return runs


def run_lab(registry: Registry, runs: Iterable[LabRun], *, backend: type[Backend],
            backend_options: dict[str, Any], config: SourceConfig, ram: int,
            dirty_rate: float,
            before_each: Callable[[LabRun], None] = lambda run: None) -> list[dict[str, Any]]:
    """Migrate a guest of ``ram`` bytes dirtying ``dirty_rate`` bytes/s once per run;
    the reports, in order. The hotspot's hot set (the first tenth of the RAM) is
    given to every policy as a hint."""
    hot = Hint(kind="hot", block="ram0", offset=0, length=max(ram // 10, 4096))
    results = []
    for run in runs:
        policy = registry.policy(run.policy)
        plan = Plan(backend=backend, backend_options=backend_options, policy=policy,
                    options=PolicyOptions(pin_cap=run.cap, hints=(hot,)),
                    requested=source_capabilities(policy), config=config)
        before_each(run)
        results.append(migrate_locally(plan, Guest(ram=ram, dirty_rate=dirty_rate,
                                                   pattern=run.pattern)))
    return results


def plot_pinned(results: list[dict[str, Any]], path: Path) -> None:
    """Pinned bytes (source) over time, one line per policy, one panel per workload.

    Raises:
        ConfigurationError: matplotlib is not installed.
    """
    plt = require_matplotlib()
    patterns = list(dict.fromkeys(r["pattern"] for r in results))
    # Each panel its own time axis: one slow run would squeeze all the others.
    fig, axes = plt.subplots(len(patterns), 1, squeeze=False,
                             figsize=(8, 3 * len(patterns)))
    for axis, pattern in zip(axes[:, 0], patterns, strict=True):
        for report in (r for r in results if r["pattern"] == pattern):
            samples = report["timeline"]["source"]
            label = report["policy"] + (f" {size_text(report['pin_cap'])}"
                                        if report.get("pin_cap") else "")
            axis.plot([s["t"] for s in samples], [s["pinned_bytes"] / 2**20 for s in samples],
                      label=label)
        axis.set_title(f"{pattern} dirtying")
        axis.set_ylabel("pinned MiB (source)")
        axis.legend(fontsize="small")
    for axis in axes[:, 0]:
        axis.set_xlabel("seconds since connect")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
