"""The monitor: typed figures out, live parameters in, QMP's shapes."""

from __future__ import annotations

import pytest
from conftest import Migration
from rdmamig.engine import RamBlock
from rdmamig.status import Monitor, Parameters, Status


def test_a_misspelt_figure_is_an_error_not_a_new_figure() -> None:
    monitor = Monitor(total_bytes=1 << 20, max_downtime=0.3)
    with pytest.raises(TypeError, match="transfered"):
        monitor.update(transfered=4096)  # type: ignore[call-arg]
    monitor.update(transferred=4096, remaining=8192)
    monitor.set_status(Status.ACTIVE)
    ram = monitor.query()["ram"]
    assert (ram["transferred"], ram["remaining"], ram["total"]) == (4096, 8192, 1 << 20)


def test_progress_is_a_copy_of_the_figures() -> None:
    monitor = Monitor(total_bytes=4096, max_downtime=0.3)
    seen = monitor.progress
    seen.transferred = 99
    assert monitor.progress.transferred == 0 and monitor.progress.remaining == 4096


def test_parameters_are_what_a_driver_changes_and_the_engine_reads() -> None:
    monitor = Monitor(total_bytes=4096, max_downtime=0.3, max_bandwidth=1 << 20)
    parameters: Parameters = monitor.parameters
    parameters.set(downtime_limit_ms=50, max_bandwidth=0)
    assert (parameters.max_downtime, parameters.max_bandwidth) == (0.05, None)
    assert parameters.query() == {"downtime-limit": 50, "max-bandwidth": 0}
    monitor.set_status(Status.ACTIVE)
    monitor.cancel()
    assert parameters.cancel_requested.is_set() and monitor.status is Status.CANCELLING


@pytest.mark.parametrize(("changes", "message"), [
    ({"max_bandwidth": 10**30}, "'max-bandwidth' expects an integer in the range of 0 to"),
    ({"max_bandwidth": -1}, "'max-bandwidth' expects"),
    ({"downtime_limit_ms": 2_000_001}, "'downtime-limit' expects an integer in the range of "
                                       "0 to 2000000 ms"),
])
def test_parameters_are_bounded_as_qemu_bounds_them(changes: dict[str, int],
                                                    message: str) -> None:
    parameters = Parameters(max_downtime=0.3, max_bandwidth=1 << 20)
    with pytest.raises(ValueError, match=message):
        parameters.set(**changes)  # type: ignore[arg-type]
    assert parameters.query() == {"downtime-limit": 300, "max-bandwidth": 1 << 20}


def test_the_reports_total_time_is_query_migrates(migration: Migration) -> None:
    # One clock: QEMU's total-time runs from setup to completed, verification and
    # commit included, and the summary says the same.
    source_monitor = Monitor(total_bytes=8 << 20, max_downtime=0.3)
    blocks = [RamBlock.anonymous("ram0", 8 << 20)]
    blocks[0].array[::4096] = 1
    migration.run(blocks, monitor=source_monitor)
    source, destination = migration.source, migration.destination
    assert source is not None and destination is not None
    assert source.result.verified and source.result.verify_time_s > 0
    assert source_monitor.query()["total-time"] == round(source.result.total_time_s * 1000)
    assert destination.monitor.query()["total-time"] == round(
        destination.result.total_time_s * 1000)


def test_a_migration_cancelled_before_its_setup_stays_cancelling_until_it_ends() -> None:
    # A driver may cancel as soon as the control socket answers, before the
    # source has entered setup: as QEMU's, a cancelling migration only ends.
    monitor = Monitor(total_bytes=1 << 20, max_downtime=0.3, max_bandwidth=None)
    monitor.cancel()
    monitor.set_status(Status.SETUP)
    monitor.set_status(Status.ACTIVE)
    assert monitor.query()["status"] == "cancelling"
    assert monitor.parameters.cancel_requested.is_set()
    monitor.set_status(Status.CANCELLED)
    assert monitor.query()["status"] == "cancelled"
