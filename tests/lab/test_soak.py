"""Issue #12, "Load", in small: 4 worker processes x 3 NIC attach/detach cycles over 2 lab domains, each
operation a vhotplug process with --wait-lock (bench/soak.py; `make soak` runs the full 8 x 25 over 4).
Nothing lost, duplicated or wrong, no operation failed, and the workers really met on the same domain."""

from __future__ import annotations

import pytest

from bench import soak
from tests.lab.conftest import URI, report
from tests.support import remove_stale_labs
from vhotplug.virt.connection import connection


@pytest.fixture
def no_stale_soak_labs(request: pytest.FixtureRequest) -> None:
    """Soak domains (vhl-soak-N-PID) of a run that was killed: removed before this one boots its own."""
    with connection(URI) as conn:
        stale = remove_stale_labs(conn, soak.SOAK_LAB)
    if stale:
        report(request.config, f"\nremoved soak domains left by killed runs: {', '.join(stale)}")


def test_soak_small(request: pytest.FixtureRequest, no_stale_soak_labs: None) -> None:
    result = soak.run(domains=2, workers=4, cycles=3, uri=URI, kill_after=240,
                      log=lambda line: report(request.config, f"\n{line}" if line.startswith("lab") else line))
    for line in result.lines():
        report(request.config, line)
    summary = "\n".join(result.lines())

    assert len(result.ops) == 2 * 4 * 3, summary
    assert result.failures == [], summary
    assert result.worker_errors == [], summary
    assert result.lost == {}, summary
    assert result.duplicated == {}, summary
    assert result.wrong == [], summary
    # Every domain was in use, and at least two operations of different workers ran on one domain at once
    # (the second waited for the first's lock).
    assert {op["domain"] for op in result.ops} == set(result.names)
    pairs, _ = result.overlaps()
    assert pairs >= 1, summary
    assert result.samples >= 2, summary
    assert result.leftover_processes == [], summary
    assert result.ok
