"""The lab guest for integration tests: booted once per session under the real libvirtd.

Nothing here skips: if libvirtd or the lab cannot come up, every lab test errors.
The domain name carries the pytest PID, so runs on a reused machine never collide.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import libvirt
import pytest
from lxml import etree

from tests.support import Reporter, remove_stale_labs
from vhotplug.lab import manager
from vhotplug.lab.manager import LabDomain
from vhotplug.virt.connection import connection, open_connection

URI = os.environ.get("VHOTPLUG_TEST_URI", "qemu:///system")


@dataclass(frozen=True)
class Lab:
    name: str
    uri: str
    info: LabDomain
    boot_seconds: float


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/lab/" in str(item.fspath):
            item.add_marker(pytest.mark.lab)


_TIMES = Reporter("lab boot times")
#: Show a line now (past pytest's capture) and again in the final summary.
report = _TIMES.report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    _TIMES.summary(terminalreporter)


_TEST_LAB = re.compile(r"^vhl-(?:test|cpu|pc|plain)-(\d+)$")


def remove_stale_test_labs(conn: libvirt.virConnect) -> list[str]:
    """Lab domains left by a test run that was killed (its pytest PID is gone): a reused machine keeps them."""
    return remove_stale_labs(conn, _TEST_LAB)


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    name = f"vhl-test-{os.getpid()}"
    with connection(URI) as conn:
        stale = remove_stale_test_labs(conn)
    if stale:
        report(request.config, f"\nremoved lab domains left by killed test runs: {', '.join(stale)}")
    with connection(URI) as conn:
        result = manager.up(conn, name, timeout=300)
    report(request.config, f"\nlab {name}: booted to SSH in {result.boot_seconds:.1f} s (q35, TCG)")
    yield Lab(name, URI, result.domain, result.boot_seconds)
    with connection(URI) as conn:
        manager.down(conn, name)


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    c = open_connection(URI)
    yield c
    c.close()


@contextlib.contextmanager
def stopped_domain(conn: libvirt.virConnect, name: str) -> Iterator[libvirt.virDomain]:
    """A minimal persistent domain that never runs (no maxMemory, no NUMA), undefined afterwards."""
    dom = etree.Element("domain", type="qemu")
    etree.SubElement(dom, "name").text = name
    etree.SubElement(dom, "memory", unit="MiB").text = "256"
    os_el = etree.SubElement(dom, "os")
    etree.SubElement(os_el, "type", arch="x86_64", machine="q35").text = "hvm"
    defined = conn.defineXML(etree.tostring(dom, encoding="unicode"))
    try:
        yield defined
    finally:
        defined.undefine()
