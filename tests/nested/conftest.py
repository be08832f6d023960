"""The nested lab's L1 for integration tests: booted once per session under the machine's libvirtd.

Nothing here skips: if L1 cannot come up, every nested test errors. The domain name carries the
pytest PID (``vhn-l1-PID``), so runs on a reused machine never collide, and the L1 of a run that
was killed (its PID is gone) is removed at the next run.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator

import libvirt
import pytest

from tests.support import Reporter, remove_stale_labs
from vhotplug.lab import manager, nested
from vhotplug.lab.nested import L1
from vhotplug.virt.connection import connection, open_connection

URI = os.environ.get("VHOTPLUG_TEST_URI", "qemu:///system")
_TEST_L1 = re.compile(r"^vhn-l1-(\d+)$")
_TIMES = Reporter("nested lab times")


_SPAN: list[float] = []  # monotonic times of the first nested test's start and the last one's end


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "nested: needs the nested lab's L1 booted under the machine's libvirtd")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    nested = "tests/nested/" in str(item.fspath)
    if nested and not _SPAN:
        _SPAN.append(time.monotonic())
    yield
    if nested:
        del _SPAN[1:]
        _SPAN.append(time.monotonic())  # after teardown: L2 and L1 removal count too


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/nested/" in str(item.fspath):
            item.add_marker(pytest.mark.nested)


#: Show a line now (past pytest's capture) and again in the final summary.
report = _TIMES.report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    total = []
    if len(_SPAN) == 2:
        total.append(f"the whole nested job (L1 + L2 boot, every scenario, teardown): "
                     f"{_SPAN[1] - _SPAN[0]:.0f} s (bound: 15 min)")
    _TIMES.summary(terminalreporter, *total)


def remove_stale_l1s(conn: libvirt.virConnect) -> list[str]:
    """L1s left by a test run that was killed (its pytest PID is gone); only lab-marked domains are touched."""
    return remove_stale_labs(conn, _TEST_L1)


@pytest.fixture(scope="session")
def l1(request: pytest.FixtureRequest) -> Iterator[L1]:
    name = f"vhn-l1-{os.getpid()}"
    with connection(URI) as conn:
        stale = remove_stale_l1s(conn)
    if stale:
        report(request.config, f"\nremoved L1 domains left by killed test runs: {', '.join(stale)}")
    try:
        with connection(URI) as conn:
            booted = nested.up_l1(conn, name, timeout=300)
        report(request.config, f"\nL1 {name}: SSH after {booted.boot_seconds:.1f} s, libvirtd answered after "
                               f"{booted.libvirt_seconds:.1f} s (q35 + intel IOMMU, TCG)")
        yield booted
    finally:
        with connection(URI) as conn:
            manager.down(conn, name)


@pytest.fixture
def host_conn() -> Iterator[libvirt.virConnect]:
    c = open_connection(URI)
    yield c
    c.close()


@pytest.fixture
def l1_conn(l1: L1) -> Iterator[libvirt.virConnect]:
    c = open_connection(l1.uri)
    yield c
    c.close()
