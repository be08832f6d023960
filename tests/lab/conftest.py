"""The lab guest for integration tests: booted once per session under the real libvirtd.

Nothing here skips: if libvirtd or the lab cannot come up, every lab test errors.
The domain name carries the pytest PID, so runs on a reused machine never collide.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from tests.support import Reporter, remove_stale_labs
from vhotplug.guest.ssh import GuestSession
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


_TEST_LAB = re.compile(r"^vhl-(?:test|cpu|pc|plain|qemu|op)-(\d+)$")


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


@contextlib.contextmanager
def own_lab(config: pytest.Config, prefix: str, why: str) -> Iterator[LabDomain]:
    """A lab domain of a module's own (``vhl-PREFIX-PID``, PREFIX one of _TEST_LAB's), removed afterwards."""
    name = f"vhl-{prefix}-{os.getpid()}"
    with connection(URI) as conn:
        up = manager.up(conn, name, timeout=300)
    report(config, f"\nlab {name}: booted to SSH in {up.boot_seconds:.1f} s ({why})")
    try:
        yield up.domain
    finally:
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


# -- faults: tests that outlast a libvirtd or an SSH connection (test_faults, test_slow_guest) --------------

E1000_KO = "/lib/modules/*/kernel/drivers/net/ethernet/intel/e1000/e1000.ko"


def live_aliases(name: str) -> set[str]:
    """The live XML's device aliases, read on a connection of its own (the test's may have died)."""
    conn = libvirt.open(URI)
    try:
        return set(etree.fromstring(conn.lookupByName(name).XMLDesc(0).encode()).xpath("devices/*/alias/@name"))
    finally:
        conn.close()


def until(what: str, check, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    """Bounded poll for a state another process brings about."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def vhotplug(run_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """vhotplug as a process of its own (one that outlives a libvirtd or an SSH connection), in JSON."""
    env = {**os.environ, "VHOTPLUG_RUN_DIR": str(run_dir), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "vhotplug", "-c", URI, "-o", "json", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def given_back(lab) -> Iterator[list[str]]:
    """Aliases a test attached: whatever it left (a failure midway included) is taken out of the guest again,
    the guest resumed and its e1000 driver loaded, so the next test starts from the same lab."""
    aliases: list[str] = []
    yield aliases
    conn = libvirt.open(URI)
    try:
        dom = conn.lookupByName(lab.name)
        if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
            dom.resume()
        with GuestSession(lab.info.target, connect_timeout=30) as s:
            s.run(["sh", "-c", f"grep -q '^e1000 ' /proc/modules || insmod {E1000_KO}"], timeout=60)
        for alias in aliases:
            if alias in live_aliases(lab.name):
                dom.detachDeviceAlias(alias, libvirt.VIR_DOMAIN_AFFECT_LIVE)
                until(f"{alias} to leave the guest", lambda a=alias: a not in live_aliases(lab.name), 60)
    finally:
        conn.close()
