"""The Xen lab for integration tests: Xen + dom0 booted once per session under the machine's libvirtd, and
the lab guest as a PV domU inside it.

Nothing here skips: if the Xen lab cannot come up, every Xen test errors. Domain names carry the pytest
PID (``vhx-xen-PID``, ``vhx-pv-PID``), so runs on a reused machine never collide; the Xen lab of a run
that was killed (its PID is gone) is removed at the next run, with its domU's files.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import libvirt
import pytest

from tests.support import Reporter, Suite, alive, opened, remove_stale_labs, session_l1
from vhotplug.lab import manager, xen
from vhotplug.lab.manager import LabDomain
from vhotplug.lab.nested import L1
from vhotplug.virt.connection import connection

URI = os.environ.get("VHOTPLUG_TEST_URI", "qemu:///system")
_TEST_XEN = re.compile(r"^vhx-xen-(\d+)$")
_TEST_DOMU = re.compile(r"^vhx-pv-(\d+)$")
_TIMES = Reporter("Xen lab times")
_SUITE = Suite("tests/xen/")


@dataclass(frozen=True)
class XenGuest:
    """The PV lab guest inside the Xen lab's dom0."""

    name: str
    uri: str  # the Xen lab's xen+ssh URI (the domU's hypervisor)
    info: LabDomain
    boot_seconds: float


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "xen: needs the Xen lab (Xen + dom0) booted under the machine's libvirtd")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    _SUITE.mark(items, pytest.mark.xen)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    _SUITE.started(item)
    yield
    _SUITE.ended(item)  # after teardown: the domU's and the Xen lab's removal count too


#: Show a line now (past pytest's capture) and again in the final summary.
report = _TIMES.report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    took = _SUITE.seconds()
    _TIMES.summary(terminalreporter, *([f"the whole Xen job (boots, every test, teardown): {took:.0f} s"]
                                       if took is not None else []))


def remove_stale_xen_labs(conn: libvirt.virConnect) -> list[str]:
    """Xen labs left by a killed test run (their pytest PID is gone), and their domUs' files here.

    The domUs themselves went with their dom0; only lab-marked domains are touched.
    """
    removed = remove_stale_labs(conn, _TEST_XEN)
    domains = manager.lab_root() / "domains"
    for ddir in domains.glob("vhx-pv-*") if domains.is_dir() else ():
        m = _TEST_DOMU.match(ddir.name)
        if m and int(m.group(1)) != os.getpid() and not alive(int(m.group(1))):
            shutil.rmtree(ddir, ignore_errors=True)
    return removed


@pytest.fixture(scope="session")
def xen_lab(request: pytest.FixtureRequest) -> Iterator[L1]:
    """The Xen lab (Xen + dom0) booted with ``lab up --xen``'s code; its ``uri`` is libvirt in dom0."""
    with session_l1(request.config, _TIMES, URI, f"vhx-xen-{os.getpid()}", stale=remove_stale_xen_labs,
                    up=lambda conn, name: xen.up_xen(conn, name, timeout=300),
                    describe=lambda b: f"Xen lab {b.name}: dom0 SSH after {b.boot_seconds:.1f} s, libvirtd "
                                       f"(Xen driver) answered after {b.libvirt_seconds:.1f} s") as booted:
        yield booted


@pytest.fixture(scope="session")
def xen_guest(xen_lab: L1, request: pytest.FixtureRequest) -> Iterator[XenGuest]:
    """The ordinary lab guest as a PV domU in dom0 (``vhotplug -c URI lab up``), reached through dom0."""
    name = f"vhx-pv-{os.getpid()}"
    try:
        with connection(xen_lab.uri) as conn:
            result = manager.up(conn, name, timeout=180)
        report(request.config, f"PV domU {name}: booted to SSH in {result.boot_seconds:.1f} s "
                               f"({result.domain.target})")
        yield XenGuest(name, xen_lab.uri, result.domain, result.boot_seconds)
    finally:
        with connection(xen_lab.uri) as conn:
            manager.down(conn, name)


@pytest.fixture
def host_conn() -> Iterator[libvirt.virConnect]:
    yield from opened(URI)


@pytest.fixture
def xen_conn(xen_lab: L1) -> Iterator[libvirt.virConnect]:
    yield from opened(xen_lab.uri)
