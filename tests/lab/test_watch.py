"""The in-guest watcher and ping on the lab: devices put in place with the plain libvirt API.

Each test starts a watch, then acts through libvirt, then reads the watch: the order a
caller of vhotplug.guest.watch must follow. Every device attached here is detached in
``finally`` and its removal awaited. Timings go to the terminal and the summary.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
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



# --------------------------------------------------------------------------------------------------
# PCI functions and USB devices by vendor:device ids: what host-device passthrough is verified with

BDF_RE = r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]"


def detach_plain(dom: libvirt.virDomain, alias: str) -> None:
    """Detach ``alias`` if libvirt has it and wait until libvirt forgets it (no guest-side watch)."""
    if alias in live_aliases(dom):
        dom.detachDeviceAlias(alias, LIVE)
    deadline = time.monotonic() + WATCH_TIMEOUT
    while alias in live_aliases(dom):
        assert time.monotonic() < deadline, f"libvirt still lists {alias} after the detach"
        time.sleep(0.05)


def function_of(session: GuestSession, iface: str) -> str:
    """The PCI function below which the guest's interface ``iface`` sits (plain readlink, not the watcher)."""
    path = session.run(["readlink", "-f", f"/sys/class/net/{iface}/device"]).stdout.strip()
    bdfs = [part for part in path.split("/") if re.fullmatch(BDF_RE, part)]
    assert bdfs, path
    return bdfs[-1]


def management_nic(session: GuestSession) -> tuple[str, str]:
    """(BDF, vendor:device) of the interface carrying the default route: SSH comes in there."""
    route = session.run(["ip", "-o", "-4", "route", "show", "default"]).stdout
    iface = re.search(r"\bdev (\S+)", route)
    assert iface, route
    bdf = function_of(session, iface.group(1))
    ids = [session.run(["cat", f"/sys/bus/pci/devices/{bdf}/{f}"]).stdout.strip()[2:] for f in ("vendor", "device")]
    return bdf, ":".join(ids)


def image_for(scratch: Path, lab_name: str, alias: str) -> Path:
    image = scratch / f"{lab_name}-{alias}.img"
    with image.open("wb") as fh:
        fh.truncate(64 * 2**20)
    return image


@dataclass
class RoundTrip:
    seen: Seen
    gone: Seen
    initial: list[str]  # what matched at the present watch's first look
    timing: str


def round_trip(session: GuestSession, dom: libvirt.virDomain, identity: Identity, xml: str, alias: str,
               check: Callable[[Seen, list[str]], None]) -> RoundTrip:
    """Watch for ``identity``, attach ``xml``, ``check`` what the guest showed, detach and watch it go.

    The device is always detached; through a watch for its going once the guest had shown it.
    """
    assert alias not in live_aliases(dom)
    seen: Seen | None = None
    try:
        with start_watch(session, identity, present=True, timeout=WATCH_TIMEOUT) as watch:
            initial = watch.initial.split(",") if watch.initial else []
            acted = time.monotonic()
            dom.attachDeviceFlags(xml, LIVE)
            call = time.monotonic() - acted
            seen = watch.result()
        guest_in, host_in = times(watch, seen, acted)
        check(seen, initial)
    finally:
        if seen is None:
            detach_plain(dom, alias)
        else:
            gone, gone_watch, gone_acted = detach_and_wait(session, dom, alias, identity)
    guest_out, host_out = times(gone_watch, gone, gone_acted)
    timing = (f"attach: call {call:.3f} s, guest shows it after {guest_in:.3f} s (guest clock) / {host_in:.3f} s "
              f"(host); detach: guest drops it after {guest_out:.3f} s (guest) / {host_out:.3f} s (host); "
              f"{seen.name} {seen.driver} {seen.detail} (already there: {watch.initial or '-'})")
    return RoundTrip(seen, gone, initial, timing)


def test_pci_watch_sees_the_new_virtio_nic_not_the_one_already_there(lab, conn, session, request):
    identity = Identity("pci", "1af4:1041")  # modern virtio-net, as behind a root port
    mac, alias = "52:54:00:7e:57:c1", "ua-wpci-nic"
    pre_nic, pre_alias = Identity("nic", "52:54:00:7e:57:c2"), "ua-wpci-pre"
    dom = conn.lookupByName(lab.name)
    mgmt, mgmt_ids = management_nic(session)
    try:
        # A virtio NIC with the same ids, there before the watch starts: must never be the answer.
        with start_watch(session, pre_nic, present=True, timeout=WATCH_TIMEOUT) as watch:
            dom.attachDeviceFlags(nic_xml(pre_nic.value, "virtio", pre_alias), LIVE)
            pre = watch.result()
        pre_bdf = pre.detail["pci"]

        def check(seen: Seen, initial: list[str]) -> None:
            assert pre_bdf in initial, (pre_bdf, initial)
            assert re.fullmatch(BDF_RE, seen.name), seen
            assert seen.name not in initial and seen.name not in (mgmt, pre_bdf), (seen, initial, mgmt)
            assert (seen.driver, seen.detail["pci"]) == ("virtio-pci", seen.name), seen
            assert "block" not in seen.detail, seen
            # Plain looks at sysfs: the interface named is the NIC attached, on the function named.
            net = seen.detail["net"]
            assert session.run(["cat", f"/sys/class/net/{net}/address"]).stdout.strip() == mac
            assert function_of(session, net) == seen.name

        trip = round_trip(session, dom, identity, nic_xml(mac, "virtio", alias), alias, check)
        # Gone is the one detached, while the other one with the same ids stays, bound.
        assert trip.gone.name == "" and trip.gone.detail.get("was") == trip.seen.name, trip.gone
        assert session.run(["test", "-e", f"/sys/bus/pci/devices/{pre_bdf}/driver"], check=False).status == 0
    finally:
        detach_and_wait(session, dom, pre_alias, pre_nic)
    report(request.config, f"watch pci-nic      {trip.timing}; management NIC {mgmt} is {mgmt_ids}")


def test_pci_watch_sees_a_virtio_disk_function_and_its_block_device(lab, conn, session, scratch, request):
    identity = Identity("pci", "1af4:1042")  # modern virtio-blk
    serial, alias = "vhw-pci", "ua-wpci-disk"
    dom = conn.lookupByName(lab.name)

    def check(seen: Seen, initial: list[str]) -> None:
        assert re.fullmatch(BDF_RE, seen.name) and seen.name not in initial, (seen, initial)
        assert (seen.driver, seen.detail["pci"]) == ("virtio-pci", seen.name), seen
        block = seen.detail["block"]
        assert "net" not in seen.detail, seen
        assert session.run(["cat", f"/sys/block/{block}/serial"]).stdout.strip() == serial
        assert session.run(["test", "-b", f"/dev/{block}"], check=False).status == 0

    xml = disk_xml(image_for(scratch, lab.name, alias), serial, "virtio", alias)
    trip = round_trip(session, dom, identity, xml, alias, check)
    assert trip.gone.name == "" and trip.gone.detail.get("was") == trip.seen.name, trip.gone
    report(request.config, f"watch pci-disk     {trip.timing}")


def test_usb_watch_sees_the_usb_storage_device(lab, conn, session, scratch, request):
    identity = Identity("usb", "46f4:0001")  # QEMU's usb-storage: what libvirt makes of <disk bus="usb">
    serial, alias = "vhw-usbid", "ua-wusbid"
    dom = conn.lookupByName(lab.name)

    def check(seen: Seen, initial: list[str]) -> None:
        assert re.fullmatch(r"\d+-[\d.]+", seen.name) and seen.name not in initial, (seen, initial)
        assert (seen.driver, seen.detail["usb"]) == ("usb-storage", seen.name), seen
        bus, dev = seen.detail["busdev"].split(".")
        usb = f"/sys/bus/usb/devices/{seen.name}"
        assert session.run(["cat", f"{usb}/busnum"]).stdout.strip() == bus
        assert session.run(["cat", f"{usb}/devnum"]).stdout.strip() == dev
        # libvirt's <serial> is the USB device's serial: the device named is the disk attached.
        assert session.run(["cat", f"{usb}/serial"]).stdout.strip() == serial

    xml = disk_xml(image_for(scratch, lab.name, alias), serial, "usb", alias)
    trip = round_trip(session, dom, identity, xml, alias, check)
    assert trip.gone.name == "" and trip.gone.detail.get("was") == trip.seen.name, trip.gone
    report(request.config, f"watch usb-ids      {trip.timing}")
