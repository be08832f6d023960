"""The nested lab's L1 for integration tests: booted once per session under the machine's libvirtd.

Nothing here skips: if L1 cannot come up, every nested test errors. The domain name carries the
pytest PID (``vhn-l1-PID``), so runs on a reused machine never collide, and the L1 of a run that
was killed (its PID is gone) is removed at the next run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import libvirt
import pytest

from tests.support import Reporter, Suite, opened, remove_stale_labs, session_l1
from vhotplug.lab import nested
from vhotplug.lab.nested import L1

URI = os.environ.get("VHOTPLUG_TEST_URI", "qemu:///system")
_TEST_L1 = re.compile(r"^vhn-l1-(\d+)$")
_TIMES = Reporter("nested lab times")


_SUITE = Suite("tests/nested/")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "nested: needs the nested lab's L1 booted under the machine's libvirtd")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    _SUITE.started(item)
    yield
    _SUITE.ended(item)  # after teardown: L2 and L1 removal count too


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    _SUITE.mark(items, pytest.mark.nested)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Keep each phase's report on the test (``item.rep_call``), so its finalisers know how it ended."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


#: Show a line now (past pytest's capture) and again in the final summary.
report = _TIMES.report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    total = []
    if (took := _SUITE.seconds()) is not None:
        total.append(f"the whole nested job (L1 + L2 boot, every scenario, teardown): {took:.0f} s (bound: 15 min)")
    _TIMES.summary(terminalreporter, *total)


def remove_stale_l1s(conn: libvirt.virConnect) -> list[str]:
    """L1s left by a test run that was killed (its pytest PID is gone); only lab-marked domains are touched."""
    return remove_stale_labs(conn, _TEST_L1)


@pytest.fixture(scope="session")
def l1(request: pytest.FixtureRequest) -> Iterator[L1]:
    with session_l1(request.config, _TIMES, URI, f"vhn-l1-{os.getpid()}", stale=remove_stale_l1s,
                    up=lambda conn, name: nested.up_l1(conn, name, timeout=300),
                    describe=lambda b: f"L1 {b.name}: SSH after {b.boot_seconds:.1f} s, libvirtd answered after "
                                       f"{b.libvirt_seconds:.1f} s (q35 + intel IOMMU, TCG)") as booted:
        yield booted


@pytest.fixture
def host_conn() -> Iterator[libvirt.virConnect]:
    yield from opened(URI)


@pytest.fixture
def l1_conn(l1: L1) -> Iterator[libvirt.virConnect]:
    yield from opened(l1.uri)
