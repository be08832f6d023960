"""Make a domain's persistent definition hotplug-ready: room for vCPUs, DIMMs and PCIe devices.

QEMU fixes the hot-plug room when it starts: the maximum vCPU count, ``maxMemory``
with its DIMM slots (plus a NUMA cell, without which QEMU refuses memory hot-plug),
and the pcie-root-ports a q35 machine offers. ``prepare`` edits the definition only;
the room appears at the domain's next boot.

The edits are pure functions on an lxml tree (testable on golden XML); each returns
what it changed, or None when the definition already has what was asked, so that a
second run finds nothing to do.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field

import libvirt
from lxml import etree

from vhotplug import errors
from vhotplug.units import format_size, parse_size, unit_scale
from vhotplug.virt.errors import translate
from vhotplug.virt.flavor import Flavor, flavor_of
from vhotplug.virt.slots import pci_room

MAX_SLOTS = 255  # the most DIMM slots accepted (QEMU's ACPI memory hot-plug stops at 256)
DEFAULT_SLOTS = 4
DEFAULT_MAX_FACTOR = 4  # max memory = memory x 4 when only --slots is given
MAX_ROUNDING_KIB = 128 * 1024  # the guest onlines memory in 128 MiB blocks (x86-64)
MAX_PCI_INDEX = 255  # a PCI controller index is a bus number
_SLOT_MODELS = "devices/memory[@model='dimm' or @model='nvdimm']"  # the device kinds that take a maxMemory slot

OPTIONS_HINT = ("give at least one of --max-vcpus N, --max-memory SIZE, --slots N, --pcie-ports N, "
                "--xen-passthrough (e.g. vhotplug prepare DOMAIN --max-vcpus 4 --max-memory 4G --slots 4 "
                "--pcie-ports 4)")


@dataclass(frozen=True)
class PrepareRequest:
    """What room to make. ``None`` leaves that part of the definition as it is."""

    max_vcpus: int | None = None
    max_memory_kib: int | None = None
    slots: int | None = None
    pcie_ports: int | None = None
    xen_passthrough: bool = False  # Xen: start with PCI passthrough on, so PCI devices can be hot-plugged


@dataclass(frozen=True)
class Change:
    what: str  # vcpu, maxMemory, numa, pcie-root-port
    before: str
    after: str

    def __str__(self) -> str:
        return f"{self.what}: {self.before} -> {self.after}"

    def to_dict(self) -> dict[str, str]:
        return {"what": self.what, "before": self.before, "after": self.after}


@dataclass
class Plan:
    root: etree._Element  # the new definition
    changes: list[Change] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.changes)


def make_request(*, max_vcpus: int | None = None, max_memory: str | None = None, slots: int | None = None,
                 pcie_ports: int | None = None, xen_passthrough: bool = False) -> PrepareRequest:
    """Validate the options that do not depend on the domain; refuse an empty request."""
    if max_vcpus is None and max_memory is None and slots is None and pcie_ports is None and not xen_passthrough:
        raise errors.InvalidRequest("nothing to prepare: no option given", hint=OPTIONS_HINT)
    if max_vcpus is not None and max_vcpus < 1:
        raise errors.InvalidRequest(f"invalid --max-vcpus {max_vcpus}: a domain needs at least 1 vCPU")
    if slots is not None and not 1 <= slots <= MAX_SLOTS:
        raise errors.InvalidRequest(f"invalid --slots {slots}: expected 1-{MAX_SLOTS}")
    if pcie_ports is not None and pcie_ports < 0:
        raise errors.InvalidRequest(f"invalid --pcie-ports {pcie_ports}: expected 0 or more")
    max_kib = None
    if max_memory is not None:
        nbytes = parse_size(max_memory)
        if nbytes % 1024:
            raise errors.InvalidRequest(f"invalid --max-memory {max_memory!r}: not a whole number of KiB",
                                        hint="libvirt counts memory in KiB: use e.g. 4G or 4096M")
        max_kib = nbytes // 1024
    return PrepareRequest(max_vcpus, max_kib, slots, pcie_ports, xen_passthrough)


# -- reading the definition ------------------------------------------------

def parse_xml(xml: str | bytes) -> etree._Element:
    """Parse domain XML so that it re-indents cleanly (blank text dropped, nothing fetched)."""
    parser = etree.XMLParser(remove_blank_text=True, resolve_entities=False, no_network=True)
    return etree.fromstring(xml.encode() if isinstance(xml, str) else xml, parser)


def to_text(root: etree._Element) -> str:
    """Serialize a (copy of a) domain, indented the same way every time so that diffs show only edits."""
    doc = copy.deepcopy(root)
    etree.indent(doc, space="  ")
    return etree.tostring(doc, encoding="unicode") + "\n"


def size_kib(el: etree._Element | None, *, attr: str | None = None) -> int:
    """A libvirt scaled size (element text, or attribute ``attr``) in KiB; ``unit`` defaults to KiB."""
    if el is None:
        return 0
    raw = el.get(attr) if attr else el.text
    scale = unit_scale(el.get("unit", "KiB"))
    try:
        value = int((raw or "").strip())
    except ValueError as exc:
        raise errors.InvalidRequest(f"cannot read <{el.tag}> size {raw!r} in the domain XML") from exc
    if scale is None:
        raise errors.InvalidRequest(f"unknown unit {el.get('unit')!r} on <{el.tag}> in the domain XML")
    return value * scale // 1024


def vcpu_counts(root: etree._Element) -> tuple[int, int]:
    """(current, maximum) vCPUs as the XML says: ``<vcpu current='C'>N</vcpu>``."""
    vcpu = root.find("vcpu")
    if vcpu is None:
        return 1, 1  # libvirt's default
    maximum = int((vcpu.text or "1").strip())
    return int(vcpu.get("current", maximum)), maximum


def slot_devices(root: etree._Element) -> list[etree._Element]:
    """The devices that each take one of maxMemory's slots."""
    return list(root.xpath(_SLOT_MODELS))


def dimm_kib(root: etree._Element) -> int:
    """Memory held by DIMMs (``<memory>`` counts it, NUMA cells do not)."""
    return sum(size_kib(d.find("target/size")) for d in slot_devices(root))


def parse_cpuset(text: str) -> set[int]:
    """libvirt's cpuset syntax: ``0-3,5,^2``."""
    cpus: set[int] = set()
    excluded: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        target = excluded if part.startswith("^") else cpus
        lo, _, hi = part.lstrip("^").partition("-")
        try:
            target.update(range(int(lo), int(hi or lo) + 1))
        except ValueError as exc:
            raise errors.InvalidRequest(f"cannot read the cpuset {text!r} in the domain XML") from exc
    return cpus - excluded


def format_cpuset(cpus: set[int]) -> str:
    """The shortest range list for ``cpus``: ``{0,1,2,5}`` -> ``0-2,5``."""
    ranges: list[list[int]] = []
    for n in sorted(cpus):
        if ranges and ranges[-1][1] == n - 1:
            ranges[-1][1] = n
        else:
            ranges.append([n, n])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


# -- edits --------------------------------------------------------------

def _insert_after(root: etree._Element, el: etree._Element, *anchors: str) -> None:
    """Place a new top-level element after the first anchor present (libvirt reads any order; people don't)."""
    for tag in anchors:
        found = root.find(tag)
        if found is not None:
            found.addnext(el)
            return
    root.append(el)


def set_max_vcpus(root: etree._Element, n: int) -> Change | None:
    """``<vcpu current='C'>n</vcpu>``, keeping the current count C; topology and ``<vcpus>`` follow."""
    current, maximum = vcpu_counts(root)
    if n < 1:
        raise errors.InvalidRequest(f"invalid --max-vcpus {n}: a domain needs at least 1 vCPU")
    if n < current:
        raise errors.InvalidRequest(
            f"--max-vcpus {n} is below the {current} vCPUs the domain boots with",
            hint="the maximum must be at least the current count; lower the current count first (virsh setvcpus "
                 "--config) or give a larger --max-vcpus",
        )
    if n == maximum:
        return None
    _check_vcpupin(root, n)
    _fit_topology(root, n)
    _fit_vcpus_list(root, maximum, n)
    vcpu = root.find("vcpu")
    if vcpu is None:
        vcpu = etree.Element("vcpu", placement="static")
        _insert_after(root, vcpu, "currentMemory", "memory")
    vcpu.text = str(n)
    if current == n:
        vcpu.attrib.pop("current", None)  # libvirt's own spelling when nothing is left to add
    else:
        vcpu.set("current", str(current))
    return Change("vcpu", f"{current} of {maximum}", f"{current} of {n}")


def _check_vcpupin(root: etree._Element, n: int) -> None:
    for pin in root.iterfind("cputune/vcpupin"):
        if int(pin.get("vcpu", "0")) >= n:
            raise errors.InvalidRequest(
                f"<cputune> pins vCPU {pin.get('vcpu')}, which --max-vcpus {n} would remove",
                hint="remove that <vcpupin> first (virsh edit), or give a larger --max-vcpus",
            )


def _fit_topology(root: etree._Element, n: int) -> None:
    """libvirt refuses a topology whose product differs from the maximum: scale the sockets."""
    topo = root.find("cpu/topology")
    if topo is None:
        return
    per_socket = 1
    for attr in ("dies", "clusters", "cores", "threads"):
        per_socket *= int(topo.get(attr, "1"))
    if n % per_socket:
        raise errors.InvalidRequest(
            f"--max-vcpus {n} does not fit the CPU topology: each socket holds {per_socket} vCPUs "
            f"(dies x cores x threads)",
            hint=f"give a multiple of {per_socket}, or change <cpu><topology> first",
        )
    topo.set("sockets", str(n // per_socket))


def _fit_vcpus_list(root: etree._Element, old_max: int, n: int) -> None:
    """Extend or trim the per-vCPU ``<vcpus>`` list; new ones are disabled and hot-pluggable."""
    vcpus = root.find("vcpus")
    if vcpus is None:
        return
    for v in list(vcpus):
        if int(v.get("id", "0")) >= n:
            if v.get("enabled") == "yes":
                raise errors.InvalidRequest(f"vCPU {v.get('id')} is enabled at boot: --max-vcpus {n} would remove it")
            vcpus.remove(v)
    for i in range(old_max, n):
        etree.SubElement(vcpus, "vcpu", id=str(i), enabled="no", hotpluggable="yes")


def set_max_memory(root: etree._Element, max_kib: int | None, slots: int | None) -> Change | None:
    """``<maxMemory slots='S' unit='KiB'>``; the value not asked for is kept, or defaulted when absent."""
    if max_kib is None and slots is None:
        return None
    memory_kib = size_kib(root.find("memory"))
    el = root.find("maxMemory")
    old_kib = size_kib(el) if el is not None else None
    old_slots = int(el.get("slots", "0")) if el is not None else None
    if max_kib is None:
        max_kib = old_kib or _round_up(memory_kib * DEFAULT_MAX_FACTOR, MAX_ROUNDING_KIB)
    if slots is None:
        slots = old_slots or DEFAULT_SLOTS
    if not 1 <= slots <= MAX_SLOTS:
        raise errors.InvalidRequest(f"invalid --slots {slots}: expected 1-{MAX_SLOTS}")
    if max_kib < memory_kib:
        raise errors.InvalidRequest(
            f"--max-memory {format_size(max_kib * 1024)} is below the domain's memory "
            f"{format_size(memory_kib * 1024)}",
            hint="the maximum must be at least the memory the domain has (DIMMs included)",
        )
    used = len(slot_devices(root))
    if slots < used:
        raise errors.InvalidRequest(f"--slots {slots} is fewer than the {used} DIMMs the domain already has")
    if (old_kib, old_slots) == (max_kib, slots):
        return None
    if el is None:
        el = etree.Element("maxMemory")
        mem = root.find("memory")
        if mem is not None:
            mem.addprevious(el)
        else:
            _insert_after(root, el, "metadata", "description", "title", "uuid", "name")
    el.set("slots", str(slots))
    el.set("unit", "KiB")
    el.text = str(max_kib)
    before = "none" if old_kib is None else f"{format_size(old_kib * 1024)} with {old_slots} slots"
    return Change("maxMemory", before, f"{format_size(max_kib * 1024)} with {slots} slots")


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def ensure_numa(root: etree._Element) -> Change | None:
    """Memory hot-plug needs a NUMA cell: add cell 0 with every vCPU and the boot memory, when none exists."""
    if root.find("maxMemory") is None or root.find("cpu/numa/cell") is not None:
        return None
    _, maximum = vcpu_counts(root)
    cell_kib = size_kib(root.find("memory")) - dimm_kib(root)
    cpu = root.find("cpu")
    if cpu is None:
        cpu = etree.Element("cpu")
        _insert_after(root, cpu, "features", "os")
    numa = cpu.find("numa")
    if numa is None:
        numa = etree.SubElement(cpu, "numa")
    cpus = format_cpuset(set(range(maximum)))
    etree.SubElement(numa, "cell", id="0", cpus=cpus, memory=str(cell_kib), unit="KiB")
    return Change("numa", "no cell", f"cell 0 (vCPUs {cpus}, {format_size(cell_kib * 1024)})")


def cover_vcpus(root: etree._Element) -> Change | None:
    """Make the NUMA cells name every vCPU 0..max-1, widening the last cell; refuse what cannot be fixed so."""
    cells = root.findall("cpu/numa/cell")
    if not cells:
        return None
    _, maximum = vcpu_counts(root)
    listed: set[int] = set()
    for cell in cells:
        cpus = parse_cpuset(cell.get("cpus", ""))
        beyond = sorted(c for c in cpus if c >= maximum)
        if beyond:
            raise errors.InvalidRequest(
                f"NUMA cell {cell.get('id')} lists vCPU(s) {format_cpuset(set(beyond))}, beyond the maximum of "
                f"{maximum} vCPUs",
                hint="edit the cells' cpus= first (virsh edit), or give a larger --max-vcpus",
            )
        listed |= cpus
    missing = set(range(maximum)) - listed
    if not missing:
        return None
    last = cells[-1]
    old = last.get("cpus", "")
    new = format_cpuset(parse_cpuset(old) | missing)
    last.set("cpus", new)
    return Change("numa", f"cell {last.get('id')} vCPUs {old or 'none'}", f"cell {last.get('id')} vCPUs {new}")


def ensure_root_ports(root: etree._Element, want_free: int) -> Change | None:
    """On q35, add pcie-root-port controllers until ``want_free`` are free (slots.py's rule)."""
    controllers = root.findall("devices/controller[@type='pci']")
    if not any(c.get("model") == "pcie-root" for c in controllers):
        if want_free == 0:
            return None
        raise errors.InvalidRequest(
            "--pcie-ports needs a PCIe machine (q35): this domain has no pcie-root",
            hint="on an i440fx (pc) machine, devices hot-plug into pci.0 or a pci-bridge: no root ports needed",
        )
    free = pci_room(etree.tostring(root)).free_root_ports
    if free >= want_free:
        return None
    add = want_free - free
    next_index = max(int(c.get("index", "0")) for c in controllers) + 1
    if next_index + add - 1 > MAX_PCI_INDEX:
        raise errors.InvalidRequest(
            f"cannot add {add} pcie-root-ports: PCI controller indexes would pass {MAX_PCI_INDEX}",
            hint="ask for fewer --pcie-ports",
        )
    anchor = controllers[-1]
    for index in range(next_index, next_index + add):
        port = etree.Element("controller", type="pci", index=str(index), model="pcie-root-port")
        anchor.addnext(port)
        anchor = port
    return Change("pcie-root-port", f"{free} free", f"{want_free} free ({add} added)")


def ensure_xen_passthrough(root: etree._Element) -> Change | None:
    """``<features><xen><passthrough state='on'/>``: Xen sets up a guest for PCI devices only at its creation."""
    features = root.find("features")
    if features is None:
        features = etree.Element("features")
        _insert_after(root, features, "os")
    xen = features.find("xen")
    if xen is None:
        xen = etree.SubElement(features, "xen")
    el = xen.find("passthrough")
    before = el.get("state", "default") if el is not None else "default"
    if before == "on":
        return None
    if el is None:
        el = etree.SubElement(xen, "passthrough")
    el.set("state", "on")
    return Change("xen passthrough", before, "on")


def check_request(req: PrepareRequest, flavor: Flavor, name: str) -> None:
    """Refuse what the domain's hypervisor has no room to make, before anything is read or changed."""
    if flavor.name == "xen":
        if req.max_memory_kib is not None or req.slots is not None:
            raise flavor.unsupported("hot-plug memory devices, so --max-memory/--slots have nothing to prepare",
                                     hint=f"the balloon needs no preparing: vhotplug memory balloon {name} SIZE")
        if req.pcie_ports is not None:
            raise flavor.unsupported("take --pcie-ports: a PV guest's PCI devices need no slots",
                                     hint=f"vhotplug prepare {name} --xen-passthrough")
    elif req.xen_passthrough:
        raise errors.InvalidRequest(f"--xen-passthrough is for Xen domains; {name} runs on {flavor.label}")


def plan(root: etree._Element, req: PrepareRequest) -> Plan:
    """The edited definition and what changed; ``root`` is left untouched."""
    new = copy.deepcopy(root)
    steps = []
    if req.xen_passthrough:
        steps.append(ensure_xen_passthrough(new))
    if req.max_vcpus is not None:
        steps.append(set_max_vcpus(new, req.max_vcpus))
    steps.append(set_max_memory(new, req.max_memory_kib, req.slots))
    steps.append(ensure_numa(new))
    steps.append(cover_vcpus(new))
    if req.pcie_ports is not None:
        steps.append(ensure_root_ports(new, req.pcie_ports))
    return Plan(new, [c for c in steps if c is not None])


def unified_diff(old: etree._Element, new: etree._Element, name: str) -> str:
    """A unified diff of two definitions, both serialized the same way."""
    lines = difflib.unified_diff(to_text(old).splitlines(keepends=True), to_text(new).splitlines(keepends=True),
                                 fromfile=f"{name} (definition)", tofile=f"{name} (prepared)")
    return "".join(lines)


# -- against libvirt -------------------------------------------------------

@dataclass(frozen=True)
class PrepareOutcome:
    domain: str
    running: bool
    changes: list[Change]
    defined: bool  # the new definition was handed to libvirt
    diff: str | None = None  # --print-xml only ("" when there is nothing to change)

    def to_dict(self) -> dict[str, object]:
        doc: dict[str, object] = {"domain": self.domain, "running": self.running, "defined": self.defined,
                                  "changes": [c.to_dict() for c in self.changes],
                                  "already_ready": not self.changes,
                                  "next_boot": self.defined and self.running}  # the live domain kept its shape
        if self.diff is not None:
            doc["diff"] = self.diff
        return doc


def prepare_domain(conn: libvirt.virConnect, dom: libvirt.virDomain, req: PrepareRequest, *,
                   dry_run: bool = False) -> PrepareOutcome:
    """Edit the persistent definition of ``dom`` as ``req`` asks; with ``dry_run`` only diff it.

    The running domain is never touched: the new room appears at its next boot.
    """
    check_request(req, flavor_of(conn), dom.name())
    try:
        name = dom.name()
        persistent = bool(dom.isPersistent())
        running = bool(dom.isActive())
        # SECURE: the definition goes back to libvirt, and without it graphics passwords
        # would be dropped from it. A dry run only shows a diff, so it leaves them out.
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE | (0 if dry_run else libvirt.VIR_DOMAIN_XML_SECURE)
        old = parse_xml(dom.XMLDesc(flags))
    except libvirt.libvirtError as exc:
        raise translate(exc, "reading the domain definition") from exc
    if not persistent:
        raise errors.InvalidRequest(f"domain {name} is transient: it has no persistent definition to prepare",
                                    hint="define it first (virsh dumpxml DOMAIN > f.xml; virsh define f.xml)")
    result = plan(old, req)
    if dry_run:
        return PrepareOutcome(name, running, result.changes, False, unified_diff(old, result.root, name))
    if not result.changed:
        return PrepareOutcome(name, running, [], False)
    try:
        conn.defineXML(to_text(result.root))
    except libvirt.libvirtError as exc:
        raise translate(exc, f"defining the prepared domain {name} (nothing was changed)") from exc
    return PrepareOutcome(name, running, result.changes, True)
