"""A small recording stand-in for the libvirt objects the passthrough flow uses, with fault injection.

Honest where it matters: the domain keeps a live and a persistent XML document and changes them as libvirt
would (attach adds the device with an address, detach removes it and emits DEVICE_REMOVED to registered
callbacks), node devices move between their host driver and vfio-pci, and every call is recorded in order.

``Recorder.fail_at = N`` makes the N-th recorded call raise (once); calls that change something record a
second point after the change (``domain.attach:done``) so a failure *after* libvirt acted is covered too.
A node device built with ``host_owned=True`` fails the test outright if anything tries to detach it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from vhotplug.addresses import Bdf

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def libvirt_error(message: str, code: int = libvirt.VIR_ERR_INTERNAL_ERROR) -> libvirt.libvirtError:
    exc = libvirt.libvirtError(message)
    exc.err = (code, 0, message, libvirt.VIR_ERR_ERROR, "", None, None, 0, 0)
    return exc


class Recorder:
    """Every call in order; raises ``fail_with(name)`` at call number ``fail_at`` (once)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail_at: int | None = None
        self.fail_with: Callable[[str], BaseException] = lambda name: libvirt_error(f"injected fault at {name}")
        self.fail_names: dict[str, BaseException] = {}  # fail every call of this name (e.g. a broken reattach)

    def hit(self, name: str) -> None:
        index = len(self.calls)
        self.calls.append(name)
        if name in self.fail_names:
            raise self.fail_names[name]
        if self.fail_at == index:
            self.fail_at = None
            raise self.fail_with(name)


class FakeNodeDevice:
    def __init__(self, rec: Recorder, bdf: Bdf, *, driver: str | None, vendor: int = 0x8086, product: int = 0x10D3,
                 klass: int = 0x020000, group: int | None = 7, members: tuple[Bdf, ...] = (),
                 host_owned: bool = False, stub: str = "vfio-pci") -> None:
        self.rec, self.bdf, self.driver, self.host_driver = rec, bdf, driver, driver
        # stub "pciback" is Xen's: the function lands in pciback's slot list, and a reattach while it is
        # listed leaves it on pciback (as seen with libvirt 9.0 + Xen 4.17) until the slot is removed.
        self.stub, self.pciback_slot = stub, False
        self.vendor, self.product, self.klass, self.group = vendor, product, klass, group
        self.members = members or (bdf,)
        self.host_owned = host_owned

    def name(self) -> str:
        return self.bdf.nodedev_name

    def XMLDesc(self, flags: int = 0) -> str:
        self.rec.hit("nodedev.xml")
        root = etree.Element("device")
        etree.SubElement(root, "name").text = self.name()
        etree.SubElement(root, "path").text = f"/sys/devices/pci0000:00/{self.bdf}"
        if self.driver:
            etree.SubElement(etree.SubElement(root, "driver"), "name").text = self.driver
        cap = etree.SubElement(root, "capability", type="pci")
        etree.SubElement(cap, "class").text = f"0x{self.klass:06x}"
        for key in ("domain", "bus", "slot", "function"):
            etree.SubElement(cap, key).text = str(getattr(self.bdf, key))
        etree.SubElement(cap, "product", id=f"0x{self.product:04x}").text = "Fake NIC"
        etree.SubElement(cap, "vendor", id=f"0x{self.vendor:04x}").text = "Fake Vendor"
        if self.group is not None:
            grp = etree.SubElement(cap, "iommuGroup", number=str(self.group))
            for m in self.members:
                etree.SubElement(grp, "address", domain=f"0x{m.domain:04x}", bus=f"0x{m.bus:02x}",
                                 slot=f"0x{m.slot:02x}", function=f"0x{m.function:x}")
        return etree.tostring(root, encoding="unicode")

    def detachFlags(self, driver: str | None, flags: int) -> None:
        if self.host_owned:
            pytest.fail(f"vhotplug tried to take {self.bdf}, a device the host uses, from its host driver")
        self.rec.hit("nodedev.detach")
        self.driver = self.stub
        self.pciback_slot = self.stub == "pciback"
        self.rec.hit("nodedev.detach:done")

    def dettach(self) -> None:
        self.detachFlags(None, 0)

    def reAttach(self) -> None:
        self.rec.hit("nodedev.reattach")
        self.driver = "pciback" if self.pciback_slot else self.host_driver
        self.rec.hit("nodedev.reattach:done")


class FakeUsbDevice:
    def __init__(self, rec: Recorder, bus: int, device: int, vendor: int, product: int, *, name: str = "Disk",
                 ports: str = "1") -> None:
        self.rec, self.bus, self.device, self.vendor, self.product = rec, bus, device, vendor, product
        self.label = name
        self.ports = ports

    def name(self) -> str:
        return f"usb_{self.bus}_{self.ports.replace('.', '_')}"

    def XMLDesc(self, flags: int = 0) -> str:
        self.rec.hit("nodedev.xml")
        root = etree.Element("device")
        etree.SubElement(root, "name").text = self.name()
        usb_dir = f"/sys/devices/pci0000:00/0000:00:1d.0/usb{self.bus}/{self.bus}-{self.ports}"
        etree.SubElement(root, "path").text = usb_dir
        etree.SubElement(etree.SubElement(root, "driver"), "name").text = "usb"
        cap = etree.SubElement(root, "capability", type="usb_device")
        etree.SubElement(cap, "bus").text = str(self.bus)
        etree.SubElement(cap, "device").text = str(self.device)
        etree.SubElement(cap, "product", id=f"0x{self.product:04x}").text = self.label
        etree.SubElement(cap, "vendor", id=f"0x{self.vendor:04x}").text = "Fake"
        return etree.tostring(root, encoding="unicode")


class FakeDomain:
    _ids = itertools.count(1)

    def __init__(self, rec: Recorder, conn: FakeConnection, xml: str | None = None, *, name: str = "guest1") -> None:
        self.rec, self.conn = rec, conn
        text = xml or (GOLDEN / "lab-live-q35.xml").read_text()
        self.live = etree.fromstring(text.encode())
        self.live.find("name").text = name
        self.config = etree.fromstring(etree.tostring(self.live))
        for alias in self.config.xpath("devices/*/alias[not(starts-with(@name, 'ua-'))]"):
            alias.getparent().remove(alias)  # libvirt keeps only user aliases in the definition
        self.running = True
        self.hold_unplug = False  # a guest that never lets go
        self._id = next(self._ids)
        self._slot = itertools.count(0x10)

    def snapshot(self) -> tuple[str, str]:
        return etree.tostring(self.live, encoding="unicode"), etree.tostring(self.config, encoding="unicode")

    def name(self) -> str:
        return self.live.findtext("name")

    def UUIDString(self) -> str:
        return self.live.findtext("uuid")

    def ID(self) -> int:
        return self._id if self.running else -1

    def isActive(self) -> bool:
        return self.running

    def isPersistent(self) -> bool:
        return True

    def XMLDesc(self, flags: int = 0) -> str:
        self.rec.hit("domain.xml")
        inactive = flags & libvirt.VIR_DOMAIN_XML_INACTIVE or not self.running
        return etree.tostring(self.config if inactive else self.live, encoding="unicode")

    def attachDeviceFlags(self, xml: str, flags: int) -> None:
        self.rec.hit("domain.attach")
        el = etree.fromstring(xml.encode())
        if flags & libvirt.VIR_DOMAIN_AFFECT_LIVE or (flags == 0 and self.running):
            live = etree.fromstring(xml.encode())
            if live.tag == "hostdev" and live.get("type") == "pci" and live.find("address") is None:
                etree.SubElement(live, "address", type="pci", domain="0x0000", bus=f"0x{next(self._slot):02x}",
                                 slot="0x00", function="0x0")
            self.live.find("devices").append(live)
        if flags & libvirt.VIR_DOMAIN_AFFECT_CONFIG:
            self.config.find("devices").append(el)
        self.rec.hit("domain.attach:done")

    def _remove(self, root: etree._Element, alias: str) -> bool:
        for el in root.xpath("devices/*[alias/@name=$a]", a=alias):
            el.getparent().remove(el)
            return True
        return False

    def detachDeviceAlias(self, alias: str, flags: int) -> None:
        if self.conn.driver == "Xen":
            raise libvirt_error("this function is not supported by the connection driver: "
                                "virDomainDetachDeviceAlias", libvirt.VIR_ERR_NO_SUPPORT)
        self._detach(alias, flags)

    def _detach(self, alias: str, flags: int) -> None:
        self.rec.hit("domain.detach")
        if flags & libvirt.VIR_DOMAIN_AFFECT_LIVE:
            if not self.live.xpath("devices/*[alias/@name=$a]", a=alias):
                raise libvirt_error(f"no device with alias {alias}", libvirt.VIR_ERR_DEVICE_MISSING)
            if not self.hold_unplug:
                self._remove(self.live, alias)
                if self.conn.driver != "Xen":
                    self.conn.emit_removed(self, alias)
        if flags & libvirt.VIR_DOMAIN_AFFECT_CONFIG:
            self._remove(self.config, alias)
        self.rec.hit("domain.detach:done")

    def detachDeviceFlags(self, xml: str, flags: int) -> None:
        alias = etree.fromstring(xml.encode()).find("alias")
        self._detach(alias.get("name") if alias is not None else "", flags)


class FakeConnection:
    def __init__(self, rec: Recorder | None = None, *, uri: str = "fake:///system", driver: str = "QEMU") -> None:
        self.rec = rec or Recorder()
        self.uri = uri
        # "Xen" behaves like libvirt's libxl driver: no detach by alias, no DEVICE_REMOVED (synchronous detach).
        self.driver = driver
        self.nodedevs: dict[str, FakeNodeDevice | FakeUsbDevice] = {}
        self.domains: list[FakeDomain] = []
        self._callbacks: dict[int, tuple[FakeDomain, int, Callable[..., None], object]] = {}
        self._cb_ids = itertools.count(1)

    # -- set-up helpers for tests
    def add_pci(self, bdf: Bdf, **kw: object) -> FakeNodeDevice:
        dev = FakeNodeDevice(self.rec, bdf, **kw)  # type: ignore[arg-type]
        self.nodedevs[dev.name()] = dev
        return dev

    def add_usb(self, *args: object, **kw: object) -> FakeUsbDevice:
        dev = FakeUsbDevice(self.rec, *args, **kw)  # type: ignore[arg-type]
        self.nodedevs[dev.name()] = dev
        return dev

    def add_domain(self, **kw: object) -> FakeDomain:
        dom = FakeDomain(self.rec, self, **kw)  # type: ignore[arg-type]
        self.domains.append(dom)
        return dom

    def emit_removed(self, dom: FakeDomain, alias: str) -> None:
        for cb_dom, event, cb, opaque in list(self._callbacks.values()):
            if cb_dom is dom and event == libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED:
                cb(self, dom, alias, opaque)

    # -- the libvirt API used by vhotplug
    def getURI(self) -> str:
        return self.uri

    def getType(self) -> str:
        return self.driver

    def close(self) -> int:
        return 0

    def nodeDeviceLookupByName(self, name: str) -> FakeNodeDevice | FakeUsbDevice:
        self.rec.hit("conn.nodedev_lookup")
        if name not in self.nodedevs:
            raise libvirt_error(f"no node device {name}", libvirt.VIR_ERR_NO_NODE_DEVICE)
        return self.nodedevs[name]

    def listAllDevices(self, flags: int = 0) -> list[FakeNodeDevice | FakeUsbDevice]:
        self.rec.hit("conn.list_devices")
        want_usb = flags & libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_USB_DEV
        return [d for d in self.nodedevs.values() if isinstance(d, FakeUsbDevice) == bool(want_usb)]

    def listAllDomains(self, flags: int = 0) -> list[FakeDomain]:
        self.rec.hit("conn.list_domains")
        return list(self.domains)

    def lookupByName(self, name: str) -> FakeDomain:
        for dom in self.domains:
            if dom.name() == name:
                return dom
        raise libvirt_error(f"no domain {name}", libvirt.VIR_ERR_NO_DOMAIN)

    def lookupByUUIDString(self, uuid: str) -> FakeDomain:
        for dom in self.domains:
            if dom.UUIDString() == uuid:
                return dom
        raise libvirt_error(f"no domain {uuid}", libvirt.VIR_ERR_NO_DOMAIN)

    def lookupByID(self, dom_id: int) -> FakeDomain:
        for dom in self.domains:
            if dom.ID() == dom_id:
                return dom
        raise libvirt_error(f"no domain {dom_id}", libvirt.VIR_ERR_NO_DOMAIN)

    def domainEventRegisterAny(self, dom: FakeDomain, event: int, cb: Callable[..., None], opaque: object) -> int:
        cb_id = next(self._cb_ids)
        self._callbacks[cb_id] = (dom, event, cb, opaque)
        return cb_id

    def domainEventDeregisterAny(self, cb_id: int) -> int:
        self._callbacks.pop(cb_id, None)
        return 0
