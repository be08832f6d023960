"""The hot-pluggable devices of a domain, read from its XML (libvirt's view).

Pure functions on the XML text: no connection needed, so they are tested on
golden inputs and used on live XML alike.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from lxml import etree

from vhotplug import errors
from vhotplug.addresses import Bdf

# Device elements libvirt can attach/detach on a running QEMU domain. Controllers
# and the balloon are infrastructure, not payload, and are left out.
HOTPLUG_KINDS = ("disk", "interface", "hostdev", "memory", "redirdev", "rng", "input",
                 "watchdog", "vsock", "shmem", "filesystem")


@dataclass(frozen=True)
class Device:
    kind: str  # disk, interface, hostdev, memory, ...
    alias: str  # libvirt alias (ua-NAME for user aliases)
    address: str  # guest address: PCI 0000:01:00.0, usb 0.1, drive 0:0:0:0, dimm slot 0
    model: str  # bus/model: virtio, e1000, pci, usb, dimm, ...
    source: str  # where it comes from on the host
    identity: str  # what the guest can see it by: MAC, target dev, vendor:product

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _hex(value: str | None, width: int) -> str:
    if value is None:
        return "0" * width
    return f"{int(value, 0):0{width}x}"


def format_address(addr: etree._Element | None) -> str:
    """A device's guest address in the spelling users know from lspci/virsh."""
    if addr is None:
        return "-"
    kind = addr.get("type", "")
    if kind == "pci":
        return (f"{_hex(addr.get('domain'), 4)}:{_hex(addr.get('bus'), 2)}:"
                f"{_hex(addr.get('slot'), 2)}.{int(addr.get('function', '0'), 0):x}")
    if kind == "drive":
        parts = (addr.get(k, "0") for k in ("controller", "bus", "target", "unit"))
        return "drive " + ":".join(parts)
    if kind == "usb":
        return f"usb {addr.get('bus', '0')}.{addr.get('port', '?')}"
    if kind == "dimm":
        return f"dimm slot {addr.get('slot', '?')}"
    attrs = " ".join(f"{k}={v}" for k, v in addr.attrib.items() if k != "type")
    return f"{kind} {attrs}".strip()


def _with_type(addr: etree._Element, kind: str) -> etree._Element:
    """Host addresses inside <source> carry no type attribute; format them as ``kind``."""
    typed = etree.Element("address", addr.attrib)
    typed.set("type", kind)
    return typed


def _source(el: etree._Element) -> str:
    src = el.find("source")
    if src is None:
        return "-"
    for key in ("file", "dev", "network", "bridge", "dir", "name", "path", "mode"):
        if src.get(key):
            return src.get(key, "")
    if src.get("pool"):
        return f"{src.get('pool')}/{src.get('volume', '')}"
    return "-"


def xml_number(text: str | None) -> int | None:
    """libvirt's numbers in device XML: hex with 0x, else decimal; None when absent or not a number."""
    if text is None:
        return None
    text = text.strip()
    try:
        return int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        return None


def source_bdf(el: etree._Element) -> Bdf | None:
    """The host PCI address a ``<hostdev type='pci'>`` (or ``<interface type='hostdev'>``) takes, or None."""
    if el.tag == "hostdev" and el.get("type") != "pci":
        return None
    addr = el.find("source/address")
    if addr is None:
        return None
    dom, bus, slot, fn = (xml_number(addr.get(k)) for k in ("domain", "bus", "slot", "function"))
    if bus is None or slot is None or fn is None:
        return None
    return Bdf(dom or 0, bus, slot, fn)


def _hostdev(el: etree._Element) -> tuple[str, str, str]:
    kind = el.get("type", el.get("mode", "?"))
    src = el.find("source")
    if src is None:
        return kind, "-", "-"
    addr = src.find("address")
    vendor, product = src.find("vendor"), src.find("product")
    if vendor is not None and product is not None:
        ident = f"{_hex(vendor.get('id'), 4)}:{_hex(product.get('id'), 4)}"
        return kind, ident if addr is None else f"{ident} at {addr.get('bus')}.{addr.get('device')}", ident
    if addr is not None and kind == "pci":
        return kind, format_address(_with_type(addr, "pci")), "-"
    if addr is not None and kind == "usb":
        return kind, f"{addr.get('bus')}.{addr.get('device')}", "-"
    return kind, _source(el), "-"


def _describe(el: etree._Element) -> Device:
    kind = el.tag
    alias_el = el.find("alias")
    alias = alias_el.get("name", "-") if alias_el is not None else "-"
    address = format_address(el.find("address"))
    model, source, identity = "-", _source(el), "-"
    if kind == "disk":
        target = el.find("target")
        model = target.get("bus", "-") if target is not None else "-"
        identity = target.get("dev", "-") if target is not None else "-"
        if el.get("device") not in (None, "disk"):
            model = f"{model} {el.get('device')}"
    elif kind == "interface":
        model_el, mac = el.find("model"), el.find("mac")
        model = model_el.get("type", "-") if model_el is not None else "-"
        identity = mac.get("address", "-") if mac is not None else "-"
        if source == "-":
            source = el.get("type", "-")
    elif kind == "hostdev":
        model, source, identity = _hostdev(el)
    elif kind == "memory":
        model = el.get("model", "-")
        size = el.find("target/size")
        node = el.find("target/node")
        if size is not None:
            source = f"{size.text} {size.get('unit', 'KiB')}" + (f" node {node.text}" if node is not None else "")
    else:
        model = el.get("model") or el.get("bus") or el.get("type") or "-"
        if kind == "input":
            model = f"{el.get('type', '?')} {el.get('bus', '')}".strip()
    return Device(kind, alias, address, model, source, identity)


def hotpluggable_devices(xml: str | bytes) -> list[Device]:
    """Every hot-pluggable device in a domain XML document, in document order."""
    return [dev for dev, _ in device_elements(xml)]

_PCI_REF = re.compile(r"^(?:(?P<dom>[0-9a-fA-F]{4}):)?(?P<bus>[0-9a-fA-F]{2}):(?P<slot>[0-9a-fA-F]{2})\.(?P<fn>[0-7])$")
_MAC_REF = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def _normalize_pci(ref: str) -> str | None:
    m = _PCI_REF.match(ref)
    if not m:
        return None
    return f"{(m['dom'] or '0000').lower()}:{m['bus'].lower()}:{m['slot'].lower()}.{m['fn']}"


def device_elements(xml: str | bytes) -> list[tuple[Device, etree._Element]]:
    """Hot-pluggable devices with their XML elements."""
    root = etree.fromstring(xml.encode() if isinstance(xml, str) else xml)
    devices = root.find("devices")
    if devices is None:
        return []
    found = []
    for el in devices:
        if not isinstance(el.tag, str) or el.tag not in HOTPLUG_KINDS:
            continue
        if el.tag == "input" and el.get("bus") in ("ps2", None):
            continue
        found.append((_describe(el), el))
    return found


def find_device(xml: str | bytes, ref: str) -> tuple[Device, etree._Element]:
    """The one device ``ref`` names: id/alias, MAC, target (vdb, sda) or guest PCI address.

    Raises DeviceNotFound (with what there is) or InvalidRequest when ``ref`` is ambiguous.
    """
    ref = ref.strip()
    candidates = device_elements(xml)
    if ref[:5].lower() == "host:":
        matches = _by_host_source(candidates, ref[5:].strip().lower())
    else:
        pci = _normalize_pci(ref)
        mac = ref.lower() if _MAC_REF.match(ref) else None
        matches = [
            (dev, el) for dev, el in candidates
            if dev.alias in (ref, f"ua-{ref}")
            or (mac is not None and dev.identity.lower() == mac)
            or (dev.kind == "disk" and dev.identity == ref)
            or (pci is not None and dev.address == pci)
        ]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        known = ", ".join(sorted({d.alias for d, _ in candidates if d.alias != "-"})) or "none"
        raise errors.DeviceNotFound(
            f"no device {ref!r} in the domain (known aliases: {known})",
            hint="name a device by its id/alias, MAC, target (vdb, sda), guest PCI address, or a host device as "
                 "host:BDF / host:VENDOR:PRODUCT; see `vhotplug list`",
        )
    names = ", ".join(f"{d.kind} {d.alias}" for d, _ in matches)
    raise errors.InvalidRequest(f"{ref!r} names several devices ({names}): use the alias")


def _by_host_source(candidates: list[tuple[Device, etree._Element]],
                    spec: str) -> list[tuple[Device, etree._Element]]:
    """Host devices given to the guest whose host address (``06:10.1``) or vendor:product matches ``spec``."""
    pci = _normalize_pci(spec)
    return [(dev, el) for dev, el in candidates if dev.kind == "hostdev" and (
        (pci is not None and dev.source == pci) or (dev.identity not in ("", "-") and dev.identity == spec))]


@dataclass(frozen=True)
class UsedNames:
    """Names already taken in a domain: a new device must not reuse any of them."""

    aliases: frozenset[str]
    macs: frozenset[str]
    targets: frozenset[str]


def used_names(*xmls: str | bytes) -> UsedNames:
    """Aliases, MACs and disk targets used in any of the given domain XML documents."""
    aliases: set[str] = set()
    macs: set[str] = set()
    targets: set[str] = set()
    for xml in filter(None, xmls):
        root = etree.fromstring(xml.encode() if isinstance(xml, str) else xml)
        aliases.update(root.xpath("devices/*/alias/@name"))
        macs.update(m.lower() for m in root.xpath("devices/interface/mac/@address"))
        targets.update(root.xpath("devices/disk/target/@dev"))
    return UsedNames(frozenset(aliases), frozenset(macs), frozenset(targets))
