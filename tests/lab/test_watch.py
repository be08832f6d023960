"""The in-guest watcher and ping on the lab: devices put in place with the plain libvirt API.

Each test starts a watch, then acts through libvirt, then reads the watch: the order a
caller of vhotplug.guest.watch must follow. Every device attached here is detached in
``finally`` and its removal awaited. Timings go to the terminal and the summary.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from tests.lab.conftest import report
from vhotplug import errors
from vhotplug.guest.ping import ping_through
from vhotplug.guest.ssh import GuestSession
from vhotplug.guest.watch import Identity, Seen, Watch, start_watch, wait_for

LIVE = libvirt.VIR_DOMAIN_AFFECT_LIVE
#: QEMU must read the images: a world-traversable directory outside /tmp and /root.
SCRATCH = Path("/var/lib/vhotplug/scratch")
WATCH_TIMEOUT = 60.0


@dataclass(frozen=True)
class Case:
    id: str
    identity: Identity
    alias: str
    bus: str  # nic model, or disk bus
    name_re: str
    driver: str


CASES = [
    Case("virtio-nic", Identity("nic", "52:54:00:7e:57:a1"), "ua-wnic1", "virtio", r"eth\d+", "virtio_net"),
    Case("e1000-nic", Identity("nic", "52:54:00:7e:57:a2"), "ua-wnic2", "e1000", r"eth\d+", "e1000"),
    Case("virtio-disk", Identity("disk", "vhw-virtio"), "ua-wdisk1", "virtio", r"vd[a-z]+", "virtio_blk"),
    Case("scsi-disk", Identity("disk", "vhw-scsi"), "ua-wdisk2", "scsi", r"sd[a-z]+", "sd"),
    Case("usb-disk", Identity("disk", "vhw-usb"), "ua-wdisk3", "usb", r"sd[a-z]+", "sd"),
]


def nic_xml(mac: str, model: str, alias: str) -> str:
    iface = etree.Element("interface", type="user")
    etree.SubElement(iface, "mac", address=mac)
    etree.SubElement(iface, "model", type=model)
    etree.SubElement(iface, "alias", name=alias)
    return etree.tostring(iface, encoding="unicode")


def disk_xml(image: Path, serial: str, bus: str, alias: str) -> str:
    disk = etree.Element("disk", type="file", device="disk")
    etree.SubElement(disk, "driver", name="qemu", type="raw")
    etree.SubElement(disk, "source", file=str(image))
    # A target name libvirt accepts for the bus; the guest picks its own name anyway.
    etree.SubElement(disk, "target", dev={"virtio": "vdw", "scsi": "sdw", "usb": "sdx"}[bus], bus=bus)
    etree.SubElement(disk, "serial").text = serial
    etree.SubElement(disk, "alias", name=alias)
    return etree.tostring(disk, encoding="unicode")


@pytest.fixture
def session(lab) -> Iterator[GuestSession]:
    with GuestSession(lab.info.target) as s:
        yield s


@pytest.fixture(scope="module")
def scratch(lab) -> Iterator[Path]:
    SCRATCH.mkdir(parents=True, exist_ok=True)
    SCRATCH.chmod(0o755)
    yield SCRATCH
    for path in SCRATCH.glob(f"{lab.name}-*.img"):
        path.unlink(missing_ok=True)


def device_xml(case: Case, scratch: Path, lab_name: str) -> str:
    if case.identity.kind == "nic":
        return nic_xml(case.identity.value, case.bus, case.alias)
    image = scratch / f"{lab_name}-{case.alias}.img"
    with image.open("wb") as fh:
        fh.truncate(64 * 2**20)
    return disk_xml(image, case.identity.value, case.bus, case.alias)


def live_aliases(dom: libvirt.virDomain) -> set[str]:
    return set(etree.fromstring(dom.XMLDesc(0)).xpath("//devices/*/alias/@name"))


def detach_and_wait(session: GuestSession, dom: libvirt.virDomain, alias: str,
                    identity: Identity) -> tuple[Seen, Watch, float]:
    """Detach ``alias`` (if libvirt still has it); wait until the guest dropped it and libvirt did too."""
    with start_watch(session, identity, present=False, timeout=WATCH_TIMEOUT) as watch:
        acted = time.monotonic()
        if alias in live_aliases(dom):
            dom.detachDeviceAlias(alias, LIVE)
        seen = watch.result()
    # The guest lets go first; libvirt forgets the device when QEMU reports it deleted, a
    # moment later. Waiting here keeps the next test from meeting a half-removed device.
    deadline = time.monotonic() + WATCH_TIMEOUT
    while alias in live_aliases(dom):
        assert time.monotonic() < deadline, f"libvirt still lists {alias} after the guest dropped it"
        time.sleep(0.05)
    return seen, watch, acted


def times(watch: Watch, seen: Seen, acted: float) -> tuple[float, float]:
    """(guest clock from the libvirt call to the guest's change, host clock from the call to knowing it)."""
    return seen.guest_seconds - (acted - watch.started_at), watch.finished_at - acted


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_guest_sees_attach_and_detach(lab, conn, session, scratch, request, case: Case):
    dom = conn.lookupByName(lab.name)
    xml = device_xml(case, scratch, lab.name)
    assert case.alias not in live_aliases(dom)
    try:
        with start_watch(session, case.identity, present=True, timeout=WATCH_TIMEOUT) as watch:
            assert watch.initial == "", f"{case.identity.describe()} is in the guest before the attach"
            acted = time.monotonic()
            dom.attachDeviceFlags(xml, LIVE)
            call = time.monotonic() - acted
            seen = watch.result()
        guest_in, host_in = times(watch, seen, acted)
        assert re.fullmatch(case.name_re, seen.name), seen
        assert seen.driver == case.driver, seen
        assert re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]", seen.detail["pci"]), seen
        if case.bus == "usb":
            assert re.fullmatch(r"\d+-[\d.]+", seen.detail["usb"]), seen
        if case.bus in ("scsi", "usb"):
            assert re.fullmatch(r"\d+:\d+:\d+:\d+", seen.detail["scsi"]), seen
        # The guest names the device by itself; cross-check with a plain look at sysfs.
        if case.identity.kind == "nic":
            mac = session.run(["cat", f"/sys/class/net/{seen.name}/address"]).stdout.strip()
            assert mac == case.identity.value
        else:
            assert session.run(["test", "-b", f"/dev/{seen.name}"], check=False).status == 0
    finally:
        gone, gone_watch, gone_acted = detach_and_wait(session, dom, case.alias, case.identity)
    assert gone.name == "" and gone.detail.get("was") == seen.name, gone
    guest_out, host_out = times(gone_watch, gone, gone_acted)
    report(request.config, f"watch {case.id:12s} attach: call {call:.3f} s, guest shows it after "
                           f"{guest_in:.3f} s (guest clock) / {host_in:.3f} s (host); detach: guest drops it "
                           f"after {guest_out:.3f} s (guest) / {host_out:.3f} s (host); "
                           f"{seen.name} {seen.driver} {seen.detail}")


def test_ping_through_hotplugged_user_nic(lab, conn, session, request):
    identity = Identity("nic", "52:54:00:7e:57:b1")
    alias = "ua-wping"
    dom = conn.lookupByName(lab.name)
    try:
        with start_watch(session, identity, present=True, timeout=WATCH_TIMEOUT) as watch:
            dom.attachDeviceFlags(nic_xml(identity.value, "virtio", alias), LIVE)
            seen = watch.result()
        stats = f"/sys/class/net/{seen.name}/statistics/tx_packets"
        tx_before = int(session.run(["cat", stats]).stdout)
        result = ping_through(session, seen.name, "10.0.2.2", count=3)
        tx_after = int(session.run(["cat", stats]).stdout)
        assert result.sent == 3 and result.received >= 1, result
        assert result.rtt_ms_avg is not None and result.rtt_ms_avg > 0
        assert result.source_addr.startswith("10.0.2.")
        # The echo requests really left through the new NIC, not the management one.
        assert tx_after - tx_before >= result.sent
        # Only a /32 went on the new interface: no second route into 10.0.2.0/24.
        routes = session.run(["ip", "-4", "route", "show", "dev", seen.name]).stdout
        assert routes.strip() == "", routes
        # The management NIC still carries SSH: this session, and a new connection too.
        assert session.run(["echo", "ok"]).stdout == "ok\n"
        with GuestSession(lab.info.target) as fresh:
            assert fresh.run(["echo", "fresh"]).stdout == "fresh\n"
        report(request.config, f"ping via {seen.name}: {result.received}/{result.sent} replies, "
                               f"avg {result.rtt_ms_avg:.2f} ms, source {result.source_addr}")
    finally:
        gone, _, _ = detach_and_wait(session, dom, alias, identity)
    assert gone.name == ""
    with GuestSession(lab.info.target) as fresh:
        assert fresh.run(["echo", "after"]).stdout == "after\n"


def test_ping_without_reply_is_an_error(lab, session):
    # Bound to loopback, the request to QEMU's gateway never leaves the guest: no reply.
    with pytest.raises(errors.GuestCommandFailed, match=r"no reply from 10\.0\.2\.2 through lo"):
        ping_through(session, "lo", "10.0.2.2", count=1, timeout=15)


def test_watch_times_out_and_leaves_nothing_running(lab, session):
    start = time.monotonic()
    with pytest.raises(errors.Timeout, match="did not show the disk with serial vhw-never"):
        wait_for(session, Identity("disk", "vhw-never"), present=True, timeout=1.0)
    assert time.monotonic() - start < 5
    assert "LC_ALL" not in session.run(["ps"]).stdout


def test_cancel_stops_the_guest_side_loop(lab, session):
    watch = start_watch(session, Identity("nic", "52:54:00:7e:57:ff"), present=True, timeout=300)
    assert watch.pid > 0 and watch.initial == ""
    assert session.run(["test", "-d", f"/proc/{watch.pid}"], check=False).status == 0
    watch.cancel()
    assert watch.done
    assert session.run(["test", "-d", f"/proc/{watch.pid}"], check=False).status != 0


def test_absent_watch_returns_at_once_for_unknown_device(lab, session):
    seen = wait_for(session, Identity("nic", "52:54:00:7e:57:fe"), present=False, timeout=10)
    assert seen == Seen("", "-", seen.guest_seconds, {"polls": "1"})
    assert seen.guest_seconds < 0.5
