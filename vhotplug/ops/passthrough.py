"""Give a host PCI or USB device to a running guest and take it back, with nothing ever left half-done.

Attach (PCI, unmanaged): lock → check → journal → host detach (vfio-pci) → attach → verify in the guest.
Any failure or Ctrl-C after a step undoes the steps taken, newest first: the guest gives the device back
(waiting for it), then the host driver gets it back. Only when that undo fails too does the journal keep
the record, and ``vhotplug recover`` finishes the job later (every command reports such records).

Detach (PCI, unmanaged): lock → journal → detach from the guest and wait → host reattach (unless
``keep_detached``). With ``managed`` hostdevs libvirt moves the function between drivers itself and
vhotplug takes no host step. USB hostdevs have no host step at all (QEMU opens the device through usbfs).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
from lxml import etree

from vhotplug import errors
from vhotplug.addresses import Bdf, UsbByAddress, UsbDevice, UsbSpec, parse_bdf
from vhotplug.devices.hostdev import (
    pci_hostdev_spec,
    pci_hostdev_xml,
    usb_hostdev_spec,
    usb_hostdev_xml,
)
from vhotplug.guest.ssh import GuestSession
from vhotplug.guest.watch import Identity
from vhotplug.host import journal, lock, nodedev, safety
from vhotplug.host.facts import HostFacts, facts_for_uri
from vhotplug.host.inventory import NodeDev, parse_nodedev_xml
from vhotplug.host.sysfs import Sysfs
from vhotplug.host.usage import GroupMember, domain_assignments
from vhotplug.ops.attach import ROLLBACK_TIMEOUT, AttachOutcome, attach_device
from vhotplug.ops.detach import DetachOutcome, detach_device, detach_live, is_attached, remove_from_config
from vhotplug.virt.connection import domain_xml, still_running
from vhotplug.virt.devices import source_bdf, used_names
from vhotplug.virt.errors import translate
from vhotplug.virt.flavor import Flavor, flavor_of, xen_guest_kind, xen_passthrough_on
from vhotplug.virt.slots import check_pci_room, place_on_q35


@dataclass
class HostdevPlan:
    """Everything decided before the first change: which device, its XML, how the guest will see it."""

    kind: str  # "pci" or "usb"
    label: str  # "PCI device 0000:06:10.1 [8086:100e]"
    device: str  # for the journal: "0000:06:10.1" or "002.004"
    element: etree._Element
    alias: str
    identity: Identity | None
    managed: bool
    lock_keys: list[str]
    node: NodeDev
    nodedev: libvirt.virNodeDevice | None = None  # PCI only
    refusals_overridden: list[safety.Refusal] = field(default_factory=list)

    @property
    def host_driver(self) -> str | None:
        return self.node.driver


@dataclass(frozen=True)
class PassthroughOutcome:
    attach: AttachOutcome
    plan: HostdevPlan
    host_detached: bool  # vhotplug took it from its host driver

    def to_dict(self) -> dict[str, object]:
        doc = self.attach.to_dict()
        doc["host"] = {"device": self.plan.device, "label": self.plan.label, "driver_before": self.plan.host_driver,
                       "detached_by_vhotplug": self.host_detached, "managed": self.plan.managed,
                       "forced_past": [r.to_dict() for r in self.plan.refusals_overridden]}
        return doc


# -- planning (read-only) ------------------------------------------------------------------------------------


def facts_root_for(conn: libvirt.virConnect, override: Path | None = None) -> HostFacts:
    """Where to read the hypervisor host's own facts: ``override``, ``/`` when local, a copy over SSH, or none."""
    if override is not None:
        return HostFacts(override)
    try:
        uri = conn.getURI()
    except libvirt.libvirtError as exc:
        return HostFacts(None, f"the connection's URI is unknown: {exc}")
    return facts_for_uri(uri)


def _group_members(conn: libvirt.virConnect, node: NodeDev) -> list[GroupMember]:
    """The IOMMU group's other functions as libvirt reports them (for hosts whose sysfs we cannot read)."""
    members = []
    for bdf in node.iommu_members:
        if bdf == node.bdf:
            continue
        try:
            other = parse_nodedev_xml(conn.nodeDeviceLookupByName(bdf.nodedev_name).XMLDesc(0))
        except libvirt.libvirtError:
            other = None
        code = other.class_code if other else None
        members.append(GroupMember(bdf, other.driver if other else "unknown",
                                   code is not None and (code >> 8) in (0x0604, 0x0609)))
    return members


def plan_pci(conn: libvirt.virConnect, dom: libvirt.virDomain, bdf: Bdf, *, managed: bool, id: str | None,
             force: bool, facts_root: Path | None, check: bool = True, live: bool = False,
             facts_note: str | None = None) -> HostdevPlan:
    """Look the function up and run every safety check; raise (nothing changed) when one says no.

    ``check=False`` (for ``--print-xml``, which changes nothing) skips the checks. ``live``: the device
    goes into the running domain, so it needs a free slot now (on q35 vhotplug writes the address).
    """
    flavor = flavor_of(conn)
    if flavor.name == "xen":
        check_xen_pci_guest(dom, flavor, live=live)
    dev, node = nodedev.lookup_pci(conn, bdf)
    label = safety.describe_pci(bdf, node)
    refusals: list[safety.Refusal] = []
    if check:
        refusals = safety.pci_refusals(node, facts_root=facts_root, assignments=domain_assignments(conn),
                                       members=None if facts_root is not None else _group_members(conn, node),
                                       facts_note=facts_note, iommu_visible=flavor.host_iommu_visible)
        safety.enforce(refusals, force=force, what=label)
    used = used_names(domain_xml(dom), domain_xml(dom, inactive=True))
    spec = pci_hostdev_spec(bdf, vendor=node.vendor_id, product=node.product_id, managed=managed, id=id,
                            used_aliases=used.aliases)
    identity = Identity("pci", spec.ids) if spec.ids else None
    element = pci_hostdev_xml(spec)
    if live and flavor.name == "qemu":  # Xen picks the guest's (PV: virtual) PCI address itself
        live_xml = domain_xml(dom)
        address = place_on_q35(live_xml, what=label)
        if address is not None:
            element.append(address)
        else:
            check_pci_room(live_xml, conventional=False, what=label)
    return HostdevPlan("pci", label, str(bdf), element, spec.alias, identity, managed,
                       [lock.domain_key(dom.UUIDString()), lock.pci_key(bdf)], node, dev,
                       [r for r in refusals if r.forceable])


def check_xen_pci_guest(dom: libvirt.virDomain, flavor: Flavor, *, live: bool) -> None:
    """Refuse (nothing changed) a Xen guest that cannot take a PCI device: PVH, or a running guest
    started without passthrough (Xen sets up a guest's IOMMU context only at its creation)."""
    xml = domain_xml(dom)
    kind = xen_guest_kind(xml)
    if kind == "pvh":
        raise flavor.unsupported(f"pass a PCI device through to {dom.name()}: it is a PVH guest, and Xen 4.17 "
                                 "has no PCI passthrough for PVH",
                                 hint="use a PV or HVM guest for passthrough")
    if live and not xen_passthrough_on(xml) and not etree.fromstring(xml.encode()).xpath(
            "devices/hostdev[@type='pci']"):
        raise flavor.unsupported(
            f"hot-plug a PCI device into {dom.name()}: it was started without PCI passthrough "
            "(<features><xen><passthrough state='on'/>), which Xen sets up only when a guest is created",
            hint=f"vhotplug prepare {dom.name()} --xen-passthrough, then stop and start the domain")


def check_usb_supported(conn: libvirt.virConnect) -> None:
    """Refuse USB passthrough where the driver has none vhotplug can use (Xen), before looking for the device."""
    flavor = flavor_of(conn)
    if not flavor.usb_hostdev:
        raise flavor.unsupported("pass a host USB device through with vhotplug: libvirt's libxl driver needs a "
                                 "pvusb controller in the guest, which it does not hot-plug",
                                 hint="give the guest a PCI USB controller with `attach pci` instead")


def plan_usb(conn: libvirt.virConnect, dom: libvirt.virDomain, spec: UsbSpec, *, id: str | None, force: bool,
             facts_root: Path | None, check: bool = True, facts_note: str | None = None) -> HostdevPlan:
    """Find the one USB device ``spec`` names and check it; raise (nothing changed) when it may not go."""
    check_usb_supported(conn)
    node = nodedev.find_usb(conn, spec)
    address = f"{node.bus or 0:03d}.{node.device or 0:03d}"
    label = f"USB device {address} [{node.vendor_id or 0:04x}:{node.product_id or 0:04x}]"
    usb_class = None
    if facts_root is not None and node.path:
        udir = Sysfs(facts_root).path(node.path)
        usb_class = Sysfs(facts_root).usb_class(udir) if udir.exists() else None
    refusals: list[safety.Refusal] = []
    if check:
        refusals = safety.usb_refusals(node, facts_root=facts_root, assignments=domain_assignments(conn),
                                       usb_class=usb_class, facts_note=facts_note)
        safety.enforce(refusals, force=force, what=label)
    used = used_names(domain_xml(dom), domain_xml(dom, inactive=True))
    by_address = isinstance(spec, UsbByAddress)
    hspec = usb_hostdev_spec(vendor=node.vendor_id or 0, product=node.product_id or 0,
                             bus=node.bus if by_address else None, device=node.device if by_address else None,
                             id=id, used_aliases=used.aliases)
    device_key = lock.usb_key(UsbDevice(node.bus or 0, node.device or 0, node.vendor_id or 0, node.product_id or 0))
    return HostdevPlan("usb", label, address, usb_hostdev_xml(hspec), hspec.alias, Identity("usb", hspec.ids),
                       True, [lock.domain_key(dom.UUIDString()), device_key], node, None,
                       [r for r in refusals if r.forceable])


# -- attach --------------------------------------------------------------------------------------------------


def attach_hostdev(conn: libvirt.virConnect, dom: libvirt.virDomain, plan: HostdevPlan, *, flags: int,
                   session: GuestSession | None, timeout: float, uri: str | None) -> PassthroughOutcome:
    """Take the device from the host (unmanaged PCI), attach it, verify it; undo everything on any failure.

    The caller holds ``plan.lock_keys``.
    """
    entry = journal.begin(journal.Entry(
        op="attach", kind=plan.kind, device=plan.device, domain=dom.name(), domain_uuid=dom.UUIDString(),
        uri=uri, alias=plan.alias, nodedev=plan.node.name, host_driver=plan.host_driver, managed=plan.managed,
        flags=flags))
    host_detached = False
    try:
        if plan.kind == "pci" and not plan.managed and not nodedev.on_passthrough_driver(plan.host_driver):
            assert plan.nodedev is not None
            journal.step(entry, journal.HOST_DETACH)
            nodedev.detach_from_host(plan.nodedev)
            host_detached = True
        outcome = attach_device(conn, dom, plan.element, flags=flags, identity=plan.identity, session=session,
                                timeout=timeout, before_attach=lambda: journal.step(entry, journal.GUEST_ATTACH))
    except BaseException as exc:
        _undo_attach(conn, dom, plan, entry, flags=flags, timeout=timeout, cause=exc)
        if isinstance(exc, errors.VhotplugError) and host_detached:
            exc.message += f"; {plan.label} is back on the host ({_where_now(plan)})"
        if isinstance(exc, KeyboardInterrupt):
            raise errors.Interrupted(f"interrupted: {plan.label} was given back ({_where_now(plan)}), "
                                     f"nothing is attached to {dom.name()}") from exc
        raise
    journal.finish(entry)
    return PassthroughOutcome(outcome, plan, host_detached)


def _where_now(plan: HostdevPlan) -> str:
    if plan.kind != "pci":
        return "it stays on the host"
    return f"on its host driver {plan.host_driver}" if plan.host_driver else "bound to no driver, as before"


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """Ctrl-C while undoing would leave exactly the half-done state the undo removes: hold it off."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _later(_sig: int, _frame: object) -> None:
        print("vhotplug: rolling back first; the command ends when that is done", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, _later)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _undo_attach(conn: libvirt.virConnect, dom: libvirt.virDomain, plan: HostdevPlan, entry: journal.Entry, *,
                 flags: int, timeout: float, cause: BaseException) -> None:
    """Undo the steps the journal says were begun; keep the record and raise RecoveryNeeded if that fails."""
    problems: list[str] = []
    with _shielded():
        if journal.GUEST_ATTACH in entry.steps:
            problems += _take_from_guest(conn, dom, plan.alias, flags=flags, timeout=max(timeout, ROLLBACK_TIMEOUT))
        if journal.HOST_DETACH in entry.steps and not problems and plan.nodedev is not None:
            problems += _give_back_to_host(conn, plan.nodedev)
    if not problems:
        journal.finish(entry)
        return
    with contextlib.suppress(errors.VhotplugError):
        journal.step(entry, journal.ROLLBACK_FAILED, "; ".join(problems))
    raise errors.RecoveryNeeded(
        f"{cause or type(cause).__name__}; rolling back failed too: {'; '.join(problems)}",
        hint="the journal keeps what is left to undo: run `vhotplug recover`",
    ) from cause


def _take_from_guest(conn: libvirt.virConnect, dom: libvirt.virDomain, alias: str, *, flags: int,
                     timeout: float) -> list[str]:
    try:
        if dom.isActive() and is_attached(dom, alias, inactive=False):
            detach_live(conn, dom, alias, timeout=timeout)
        if flags & libvirt.VIR_DOMAIN_AFFECT_CONFIG and dom.isPersistent() and is_attached(dom, alias, inactive=True):
            remove_from_config(conn, dom, alias)
    except (libvirt.libvirtError, errors.VhotplugError) as exc:
        if not flags & libvirt.VIR_DOMAIN_AFFECT_CONFIG and not still_running(dom):
            return []  # the domain stopped meanwhile (destroyed, crashed): the device went with it
        err = translate(exc) if isinstance(exc, libvirt.libvirtError) else exc
        return [f"detaching {alias} from {dom.name()}: {err}"]
    return []



def _give_back_to_host(conn: libvirt.virConnect, dev: libvirt.virNodeDevice) -> list[str]:
    try:
        dev = nodedev.current(conn, dev)  # libvirtd may have restarted since it was looked up
        if nodedev.on_passthrough_driver(nodedev.current_driver(dev)):
            nodedev.reattach_to_host(conn, dev)
    except errors.VhotplugError as exc:
        return [str(exc)]
    return []


# -- detach --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostdevDetach:
    detach: DetachOutcome
    kind: str
    reattached: bool
    driver_now: str | None

    def to_dict(self) -> dict[str, object]:
        doc = self.detach.to_dict()
        doc["host"] = {"reattached": self.reattached, "driver_now": self.driver_now}
        return doc


def hostdev_facts(conn: libvirt.virConnect, element: etree._Element) -> tuple[str, NodeDev | None,
                                                                               libvirt.virNodeDevice | None]:
    """(kind, host node device facts, node device) of a ``<hostdev>`` element in a domain's XML."""
    kind = element.get("type", "")
    if (bdf := source_bdf(element)) is not None:
        try:
            dev, node = nodedev.lookup_pci(conn, bdf)
        except errors.DeviceNotFound:
            return kind, None, None
        return kind, node, dev
    return kind, None, None


def hostdev_identity(element: etree._Element, node: NodeDev | None) -> Identity | None:
    """How the guest sees a hostdev: PCI vendor:device (from the host's node device), USB vendor:product."""
    if element.get("type") == "pci" and node and node.vendor_id is not None and node.product_id is not None:
        return Identity("pci", f"{node.vendor_id:04x}:{node.product_id:04x}")
    vendor, product = element.find("source/vendor"), element.find("source/product")
    if element.get("type") == "usb" and vendor is not None and product is not None:
        return Identity("usb", f"{int(vendor.get('id', '0'), 0):04x}:{int(product.get('id', '0'), 0):04x}")
    return None


def detach_hostdev(conn: libvirt.virConnect, dom: libvirt.virDomain, ref: str, element: etree._Element, *,
                   live: bool, config: bool, session: GuestSession | None, timeout: float, keep_detached: bool,
                   uri: str | None) -> HostdevDetach:
    """Detach a hostdev and wait, then give an unmanaged PCI function back to its host driver.

    The caller holds the domain's and the device's locks.
    """
    kind, node, dev = hostdev_facts(conn, element)
    managed = element.get("managed") == "yes"
    if keep_detached and (kind != "pci" or managed):
        raise errors.InvalidRequest(
            "--keep-detached applies to unmanaged PCI host devices only"
            + (": libvirt gives a managed one back to the host itself" if kind == "pci" else ""))
    host_step = kind == "pci" and not managed and live and not keep_detached and dev is not None
    alias_el = element.find("alias")
    entry = journal.begin(journal.Entry(
        op="detach", kind=kind, device=str(node.bdf) if node and node.bdf else ref, domain=dom.name(),
        domain_uuid=dom.UUIDString(), uri=uri, alias=alias_el.get("name", ref) if alias_el is not None else ref,
        nodedev=node.name if node else None, host_driver=node.driver if node else None, managed=managed,
        flags=(libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0) | (libvirt.VIR_DOMAIN_AFFECT_CONFIG if config else 0),
        keep_detached=keep_detached, steps=[journal.GUEST_DETACH]))
    try:
        outcome = detach_device(conn, dom, ref, live=live, config=config, session=session, timeout=timeout,
                                identity=hostdev_identity(element, node))
    except (errors.Timeout, KeyboardInterrupt):
        # The request may still be pending in the guest and complete later, leaving the function on
        # vfio-pci with nobody to give it back: the record stays for `vhotplug recover`.
        raise
    except BaseException:
        # Refused or failed: the device is where it was, nothing half-done on the host side.
        journal.finish(entry)
        raise
    reattached, driver_now = False, node.driver if node else None
    if dev is not None:
        dev = nodedev.current(conn, dev)  # libvirtd may have restarted during the wait
    if host_step and dev is not None:
        journal.step(entry, journal.HOST_REATTACH)
        with _shielded():
            problems = _give_back_to_host(conn, dev)
        if problems:
            raise errors.RecoveryNeeded(
                f"detached {entry.alias} from {dom.name()}, but giving it back to the host failed: {problems[0]}",
                hint="the journal keeps it: run `vhotplug recover`")
        reattached, driver_now = True, nodedev.current_driver(dev)
    elif dev is not None:
        driver_now = nodedev.current_driver(dev)
    journal.finish(entry)
    return HostdevDetach(outcome, kind, reattached, driver_now)


# -- recover -------------------------------------------------------------------------------------------------


def recover_entry(conn: libvirt.virConnect, entry: journal.Entry, *, timeout: float) -> list[str]:
    """Finish a dead run's operation by looking at the real state; the actions taken, for the report.

    An interrupted attach is undone (the user never got a success); an interrupted detach is completed
    (that is what was asked). The record is removed only when nothing is left to do.
    """
    actions: list[str] = []
    dom = _domain(conn, entry.domain_uuid)
    if dom is not None and dom.isActive() and is_attached(dom, entry.alias, inactive=False) and (
            entry.op == "attach" or journal.GUEST_DETACH in entry.steps):
            detach_live(conn, dom, entry.alias, timeout=timeout)
            actions.append(f"detached {entry.alias} from {entry.domain}")
    if (dom is not None and entry.op == "attach" and entry.flags & libvirt.VIR_DOMAIN_AFFECT_CONFIG
            and dom.isPersistent() and is_attached(dom, entry.alias, inactive=True)):
        remove_from_config(conn, dom, entry.alias)
        actions.append(f"removed {entry.alias} from the definition of {entry.domain}")
    wants_host_back = (journal.HOST_DETACH in entry.steps if entry.op == "attach"
                       else journal.HOST_REATTACH in entry.steps or (entry.kind == "pci" and not entry.managed
                                                                     and not entry.keep_detached))
    if entry.kind == "pci" and entry.nodedev and wants_host_back and entry.host_driver:
        try:
            dev = conn.nodeDeviceLookupByName(entry.nodedev)
        except libvirt.libvirtError as exc:
            raise translate(exc, f"looking up {entry.nodedev}") from exc
        if nodedev.on_passthrough_driver(nodedev.current_driver(dev)):
            nodedev.reattach_to_host(conn, dev)
            actions.append(f"gave {entry.device} back to the host ({nodedev.current_driver(dev) or 'no driver'})")
    journal.finish(entry)
    return actions


def _domain(conn: libvirt.virConnect, uuid: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise translate(exc, "looking up the journal's domain") from exc


def entry_lock_keys(entry: journal.Entry) -> list[str]:
    keys = [lock.domain_key(entry.domain_uuid)]
    if entry.kind == "pci" and entry.nodedev:
        with contextlib.suppress(errors.InvalidRequest):
            keys.append(lock.pci_key(parse_bdf(entry.nodedev)))
    return keys
