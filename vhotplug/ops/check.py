"""What can be hot-plugged into a domain now, and why not: read from libvirt's XML and, when reachable,
from the guest kernel.

Read-only. Each answer is a :class:`Row`: ok or not possible, the facts behind it,
and what to do about it. The evaluation is pure (XML text and the guest script's
output in, rows out) so it is tested without a hypervisor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lxml import etree

from vhotplug import errors
from vhotplug.guest import shell
from vhotplug.guest.probe import parse_cpu_list
from vhotplug.guest.ssh import GuestSession
from vhotplug.ops.prepare import parse_xml, size_kib, slot_devices, vcpu_counts
from vhotplug.units import format_size
from vhotplug.virt.flavor import QEMU, Flavor, xen_guest_kind, xen_passthrough_on
from vhotplug.virt.slots import pci_room

# The seed's list of the guest kernel options hot-plug depends on.
KERNEL_OPTIONS = (
    "CONFIG_HOTPLUG", "CONFIG_HOTPLUG_PCI_PCIE", "CONFIG_HOTPLUG_PCI", "CONFIG_HOTPLUG_PCI_ACPI",
    "CONFIG_MEMORY_HOTPLUG", "CONFIG_MEMORY_HOTREMOVE", "CONFIG_HOTPLUG_CPU", "CONFIG_ACPI_HOTPLUG_CPU",
    "CONFIG_ACPI_HOTPLUG_MEMORY",
)

# One round trip. The kernel config when one is readable (/boot, else /proc/config.gz),
# and always the sysfs evidence, which is all a kernel booted from an initramfs without
# /boot offers. Fixed text: nothing from the user goes in. POSIX sh (dash, bash, busybox).
GUEST_SCRIPT = shell.script(r"""
rel=$(uname -r)
echo '[kernel]'
echo "release $rel"
pat='^(# )?CONFIG_[A-Z0-9_]*(HOTPLUG|HOTREMOVE)[A-Z0-9_]*[= ]'
if [ -r "/boot/config-$rel" ]; then
  echo "[config /boot/config-$rel]"
  grep -E "$pat" "/boot/config-$rel"
elif [ -r /proc/config.gz ] && command -v zcat >/dev/null 2>&1; then
  echo '[config /proc/config.gz]'
  zcat /proc/config.gz | grep -E "$pat"
fi
yn() { if [ -e "$1" ]; then echo yes; else echo no; fi; }
echo '[sysfs]'
n=0; for s in /sys/bus/pci/slots/*; do [ -e "$s" ] && n=$((n+1)); done
echo "pci_slots $n"
p=no; { [ -e /sys/module/pciehp ] || [ -e /sys/bus/pci_express/drivers/pciehp ]; } && p=yes
echo "pciehp $p"
echo "acpiphp $(yn /sys/module/acpiphp)"
echo "memory $(yn /sys/devices/system/memory)"
n=0; for m in /sys/devices/system/memory/memory*; do [ -e "$m/state" ] && n=$((n+1)); done
echo "memory_blocks $n"
n=0; for c in /sys/devices/system/cpu/cpu[0-9]*; do [ -e "$c/online" ] && n=$((n+1)); done
echo "cpu_online_files $n"
echo "cpuhp_states $(yn /sys/devices/system/cpu/hotplug/states)"
echo "cpus_present $(cat /sys/devices/system/cpu/present 2>/dev/null)"
echo "cpus_possible $(cat /sys/devices/system/cpu/possible 2>/dev/null)"
""")


@dataclass(frozen=True)
class Row:
    item: str  # pci, vcpu, memory, balloon, usb, scsi, guest-pci, guest-memory, guest-cpu (or guest)
    ok: bool | None  # None: could not be told (the guest was not reachable)
    detail: str  # the facts, or the reason it is not possible
    fix: str = ""  # what to do when it is not possible
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "unknown" if self.ok is None else "ok" if self.ok else "not possible"

    def to_dict(self) -> dict[str, Any]:
        return {"item": self.item, "status": self.status, "ok": self.ok, "detail": self.detail, "fix": self.fix,
                "facts": self.facts}


# -- libvirt's side -----------------------------------------------------

@dataclass(frozen=True)
class DomainFacts:
    machine: str
    pcie: bool
    free_root_ports: int
    free_bridge_slots: int
    vcpus_current: int
    vcpus_max: int
    memory_kib: int
    max_memory_kib: int | None
    slots: int
    slots_used: int
    numa_cells: int
    balloon: str | None  # memballoon model, None when absent or 'none'
    usb: list[str]  # USB controller models
    scsi: list[str]  # SCSI controller models
    current_memory_kib: int = 0
    xen_kind: str = ""  # pv, pvh or hvm for a Xen domain (read from any domain XML; meaningful on Xen only)
    xen_passthrough: bool = False  # <features><xen><passthrough state='on'/>, or a PCI hostdev already there

    @property
    def memory_room_kib(self) -> int:
        return max(0, (self.max_memory_kib or 0) - self.memory_kib)


def domain_facts(xml: str | bytes | etree._Element) -> DomainFacts:
    """The hot-plug relevant facts of a domain XML (live or definition)."""
    root = xml if isinstance(xml, etree._Element) else parse_xml(xml)
    room = pci_room(etree.tostring(root))
    current, maximum = vcpu_counts(root)
    max_el = root.find("maxMemory")
    balloon = root.find("devices/memballoon")
    model = balloon.get("model") if balloon is not None else None
    os_type = root.find("os/type")
    return DomainFacts(
        machine=os_type.get("machine", "") if os_type is not None else "",
        pcie=room.pcie,
        free_root_ports=room.free_root_ports,
        free_bridge_slots=room.free_bridge_slots,
        vcpus_current=current,
        vcpus_max=maximum,
        memory_kib=size_kib(root.find("memory")),
        max_memory_kib=size_kib(max_el) if max_el is not None else None,
        slots=int(max_el.get("slots", "0")) if max_el is not None else 0,
        slots_used=len(slot_devices(root)),
        numa_cells=len(root.findall("cpu/numa/cell")),
        balloon=model if model and model != "none" else None,
        usb=[c.get("model", "default") for c in root.iterfind("devices/controller[@type='usb']")
             if c.get("model") != "none"],
        scsi=[c.get("model", "default") for c in root.iterfind("devices/controller[@type='scsi']")],
        current_memory_kib=size_kib(root.find("currentMemory")) if root.find("currentMemory") is not None else 0,
        xen_kind=xen_guest_kind(root),
        xen_passthrough=xen_passthrough_on(root) or bool(root.xpath("devices/hostdev[@type='pci']")),
    )


def _xen_rows(name: str, f: DomainFacts, config: DomainFacts | None, flavor: Flavor,
              vcpu_cap: int | None) -> list[Row]:
    """What libvirt's libxl driver can hot-plug into this Xen domain (measured on Xen 4.17, PV guests)."""
    kind = f.xen_kind.upper()
    if f.xen_kind == "pvh":
        pci = Row("pci", False, "PVH guest: Xen 4.17 has no PCI passthrough for PVH", "use a PV or HVM guest",
                  {"xen_kind": f.xen_kind, "passthrough": False})
    elif f.xen_passthrough:
        pci = Row("pci", True, f"{kind} guest started with PCI passthrough on: host PCI functions can be "
                  "hot-plugged (`attach pci`, through pciback)", facts={"xen_kind": f.xen_kind, "passthrough": True})
    else:
        fix = (_restart_fix("passthrough on") if config is not None and config.xen_passthrough else
               f"vhotplug prepare {name} --xen-passthrough, then stop and start the domain")
        pci = Row("pci", False, f"{kind} guest started without PCI passthrough: Xen sets it up only when a guest "
                  "is created", fix, {"xen_kind": f.xen_kind, "passthrough": False})
    nic = Row("nic", True, "paravirtual NICs (netfront) on a bridge or libvirt network; no user-mode networking, "
              "no emulated models", facts={"sources": list(flavor.nic_sources)})
    disk = Row("disk", True, "paravirtual disks (blkfront, bus xen, xvdX): raw images or block devices on the Xen "
               "host; no qcow2, no virtio/SCSI/SATA/USB buses", facts={"buses": list(flavor.disk_buses)})
    memory = Row("memory", False, "libxl has no memory devices (DIMMs)",
                 f"use the balloon: vhotplug memory balloon {name} SIZE (up to {format_size(f.memory_kib * 1024)})",
                 {"dimm": False})
    current = f.current_memory_kib or f.memory_kib
    balloon = Row("balloon", True, f"Xen balloon: {format_size(current * 1024)} of "
                  f"{format_size(f.memory_kib * 1024)}", facts={"current_kib": current, "max_kib": f.memory_kib})
    usb = Row("usb", False, "vhotplug passes no USB devices to Xen guests (libxl needs a pvusb controller)",
              "pass a PCI USB controller with `attach pci`", {"models": []})
    scsi = Row("scsi", False, "no SCSI disks: a PV guest has no device model", "use a xen-bus disk (the default)",
               {"models": []})
    return [pci, nic, disk, _vcpu_row(name, f, config, vcpu_cap), memory, balloon, usb, scsi]


def _restart_fix(what: str) -> str:
    return f"the definition already has {what}: stop and start the domain for it to take effect"


def evaluate_domain(name: str, live: DomainFacts, config: DomainFacts | None = None,
                    flavor: Flavor = QEMU, vcpu_cap: int | None = None) -> list[Row]:
    """Rows for what libvirt and the hypervisor allow now. ``config``: the definition, when it differs from
    ``live`` (a running domain), so that a prepared-but-not-restarted domain is told to restart."""
    if flavor.name == "xen":
        return _xen_rows(name, live, config, flavor, vcpu_cap)
    return [_pci_row(name, live, config), _vcpu_row(name, live, config), _memory_row(name, live, config),
            _balloon_row(live), _usb_row(live), _scsi_row(live)]


def _pci_row(name: str, f: DomainFacts, config: DomainFacts | None) -> Row:
    facts = {"machine": f.machine, "pcie": f.pcie, "free_root_ports": f.free_root_ports,
             "free_conventional_slots": f.free_bridge_slots}
    if f.pcie:
        machine = "q35" if f.machine in ("", "q35") else f"q35 ({f.machine})"
        detail = (f"{machine}: {f.free_root_ports} free pcie-root-port(s), "
                  f"{f.free_bridge_slots} free conventional slot(s)")
        if f.free_root_ports:
            return Row("pci", True, detail, facts=facts)
        if config and config.free_root_ports:
            fix = _restart_fix(f"{config.free_root_ports} free pcie-root-port(s)")
        else:
            fix = f"vhotplug prepare {name} --pcie-ports 4 (takes effect at the next boot)"
        return Row("pci", False, f"no free pcie-root-port: PCIe devices (virtio, e1000e) cannot be hot-plugged; "
                   f"{detail}", fix, facts)
    detail = f"{f.machine or 'pc'} (conventional PCI): {f.free_bridge_slots} free slot(s) on pci.0/pci-bridges"
    if f.free_bridge_slots:
        return Row("pci", True, detail, facts=facts)
    return Row("pci", False, f"no free PCI slot: {detail}",
               "add a <controller type='pci' model='pci-bridge'/> to the definition (next boot)", facts)


def _vcpu_row(name: str, f: DomainFacts, config: DomainFacts | None, cap: int | None = None) -> Row:
    top = min(f.vcpus_max, cap) if cap is not None else f.vcpus_max
    room = top - f.vcpus_current
    facts: dict[str, Any] = {"current": f.vcpus_current, "max": f.vcpus_max, "room": room}
    if cap is not None:
        facts["host_cap"] = cap
    detail = f"{f.vcpus_current}/{f.vcpus_max} vCPUs"
    if top < f.vcpus_max:
        detail += f", at most {cap} while running (the host's CPUs)"
    if room > 0:
        return Row("vcpu", True, f"{detail}: {room} more can be hot-added", facts=facts)
    if top < f.vcpus_max:
        return Row("vcpu", False, f"{detail}: the host's limit is reached", "a host with more CPUs", facts)
    if config and config.vcpus_max > f.vcpus_max:
        fix = _restart_fix(f"a maximum of {config.vcpus_max} vCPUs")
    else:
        fix = f"vhotplug prepare {name} --max-vcpus {max(4, f.vcpus_max * 2)} (takes effect at the next boot)"
    return Row("vcpu", False, f"{detail}: the maximum is reached", fix, facts)


def _memory_row(name: str, f: DomainFacts, config: DomainFacts | None) -> Row:
    free_slots = max(0, f.slots - f.slots_used)
    facts = {"max_memory_kib": f.max_memory_kib, "memory_kib": f.memory_kib, "room_kib": f.memory_room_kib,
             "slots": f.slots, "slots_used": f.slots_used, "slots_free": free_slots, "numa_cells": f.numa_cells}
    prepare_fix = f"vhotplug prepare {name} --max-memory {_suggest_max(f)} --slots 4 (takes effect at the next boot)"
    ready_config = config is not None and config.max_memory_kib is not None and config.numa_cells > 0
    fix = _restart_fix("maxMemory and a NUMA cell") if ready_config else prepare_fix
    if f.max_memory_kib is None:
        return Row("memory", False, "no <maxMemory>: memory hot-plug is not enabled", fix, facts)
    if not f.numa_cells:
        return Row("memory", False, "no NUMA cell: QEMU refuses memory hot-plug without one", fix, facts)
    detail = (f"maxMemory {format_size(f.max_memory_kib * 1024)}, {f.slots_used}/{f.slots} DIMM slots used, "
              f"{format_size(f.memory_room_kib * 1024)} room, {f.numa_cells} NUMA cell(s)")
    if not free_slots:
        return Row("memory", False, f"every DIMM slot is used: {detail}",
                   f"remove a DIMM (vhotplug memory remove), or vhotplug prepare {name} --slots {f.slots * 2}", facts)
    if not f.memory_room_kib:
        return Row("memory", False, f"no room below maxMemory: {detail}",
                   f"vhotplug prepare {name} --max-memory {_suggest_max(f)} (takes effect at the next boot)", facts)
    return Row("memory", True, detail, facts=facts)


def _suggest_max(f: DomainFacts) -> str:
    mib = max(f.memory_kib * 4, (f.max_memory_kib or 0) * 2) // 1024
    mib = -(-mib // 128) * 128
    return f"{mib // 1024}G" if mib % 1024 == 0 else f"{mib}M"


def _balloon_row(f: DomainFacts) -> Row:
    if f.balloon:
        return Row("balloon", True, f"memballoon model {f.balloon}: memory can be returned and given back "
                   f"up to {format_size(f.memory_kib * 1024)}", facts={"model": f.balloon})
    return Row("balloon", False, "no memory balloon (memballoon absent or model 'none')",
               "add <memballoon model='virtio'/> to the definition (next boot)", {"model": None})


def _usb_row(f: DomainFacts) -> Row:
    if f.usb:
        return Row("usb", True, f"USB controller: {', '.join(f.usb)} (USB disks can be hot-plugged)",
                   facts={"models": f.usb})
    return Row("usb", False, "no USB controller: `attach disk --bus usb` has nowhere to go",
               "add <controller type='usb' model='qemu-xhci'/> to the definition (next boot)", {"models": []})


def _scsi_row(f: DomainFacts) -> Row:
    if f.scsi:
        return Row("scsi", True, f"SCSI controller: {', '.join(f.scsi)} (SCSI disks can be hot-plugged)",
                   facts={"models": f.scsi})
    return Row("scsi", False, "no SCSI controller: a SCSI disk would first need one hot-plugged (a free PCI slot)",
               "add <controller type='scsi' model='virtio-scsi'/> to the definition (next boot)", {"models": []})


# -- the guest's side ---------------------------------------------------

@dataclass
class GuestKernel:
    release: str = ""
    config_source: str | None = None  # the file read, None when no config was readable
    config: dict[str, str] = field(default_factory=dict)  # CONFIG_X -> y / m / n (n: "is not set")
    sysfs: dict[str, str] = field(default_factory=dict)

    def option(self, name: str) -> str:
        """y, m, n, or "absent" (not in the config at all)."""
        return self.config.get(name, "absent")

    def to_dict(self) -> dict[str, Any]:
        return {"release": self.release, "source": self.config_source or "sysfs",
                "config": {k: self.option(k) for k in KERNEL_OPTIONS} if self.config_source else {},
                "sysfs": self.sysfs}


def parse_guest(output: str) -> GuestKernel:
    """Parse :data:`GUEST_SCRIPT`'s output."""
    kernel = GuestKernel()
    section = ""
    for raw in output.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section, _, arg = line[1:-1].partition(" ")
            if section == "config":
                kernel.config_source = arg or "config"
            continue
        if section == "kernel" and line.startswith("release "):
            kernel.release = line.split(None, 1)[1]
        elif section == "config":
            if line.startswith("# ") and line.endswith(" is not set"):
                kernel.config[line[2:-len(" is not set")].strip()] = "n"
            elif "=" in line:
                key, _, value = line.partition("=")
                kernel.config[key.strip()] = value.strip().strip('"')
        elif section == "sysfs":
            key, _, value = line.partition(" ")
            kernel.sysfs[key] = value.strip()
    return kernel


def _on(value: str) -> bool:
    return value in ("y", "m")


def evaluate_guest(kernel: GuestKernel) -> list[Row]:
    """Rows for the guest kernel's hot-plug support, from its config, else from sysfs evidence."""
    if kernel.config_source:
        return _guest_rows_from_config(kernel)
    return _guest_rows_from_sysfs(kernel)


def _opts(kernel: GuestKernel, *names: str) -> str:
    return ", ".join(f"{n}={kernel.option(n)}" for n in names)


def _guest_rows_from_config(k: GuestKernel) -> list[Row]:
    src = f"from {k.config_source}"
    # CONFIG_HOTPLUG left the kernel in 3.7 (always on since): only an explicit "not set" counts against.
    base_ok = k.option("CONFIG_HOTPLUG") != "n"
    rebuild = "use a guest kernel built with these options (or load the module)"
    facts = {"source": k.config_source, "release": k.release}

    pci_ok = base_ok and _on(k.option("CONFIG_HOTPLUG_PCI")) and (
        _on(k.option("CONFIG_HOTPLUG_PCI_PCIE")) or _on(k.option("CONFIG_HOTPLUG_PCI_ACPI")))
    pci_opts = _opts(k, "CONFIG_HOTPLUG_PCI", "CONFIG_HOTPLUG_PCI_PCIE", "CONFIG_HOTPLUG_PCI_ACPI")
    pci = Row("guest-pci", pci_ok, f"{pci_opts} ({src})",
              "" if pci_ok else f"{rebuild}: CONFIG_HOTPLUG_PCI_PCIE (q35) / CONFIG_HOTPLUG_PCI_ACPI", facts)
    mem_ok = base_ok and _on(k.option("CONFIG_MEMORY_HOTPLUG")) and _on(k.option("CONFIG_ACPI_HOTPLUG_MEMORY"))
    removable = "; DIMMs can be removed" if _on(k.option("CONFIG_MEMORY_HOTREMOVE")) else "; DIMMs cannot be removed"
    mem = Row("guest-memory", mem_ok,
              f"{_opts(k, 'CONFIG_MEMORY_HOTPLUG', 'CONFIG_ACPI_HOTPLUG_MEMORY', 'CONFIG_MEMORY_HOTREMOVE')}"
              f"{removable if mem_ok else ''} ({src})",
              "" if mem_ok else f"{rebuild}: CONFIG_MEMORY_HOTPLUG and CONFIG_ACPI_HOTPLUG_MEMORY", facts)
    cpu_ok = base_ok and _on(k.option("CONFIG_HOTPLUG_CPU")) and _on(k.option("CONFIG_ACPI_HOTPLUG_CPU"))
    cpu = Row("guest-cpu", cpu_ok, f"{_opts(k, 'CONFIG_HOTPLUG_CPU', 'CONFIG_ACPI_HOTPLUG_CPU')} ({src})",
              "" if cpu_ok else f"{rebuild}: CONFIG_HOTPLUG_CPU and CONFIG_ACPI_HOTPLUG_CPU", facts)
    return [pci, mem, cpu]


def _guest_rows_from_sysfs(k: GuestKernel) -> list[Row]:
    s = k.sysfs
    src = "sysfs"  # no kernel config was readable (no /boot/config-*, no /proc/config.gz)
    facts: dict[str, Any] = {"source": "sysfs", "release": k.release}

    pciehp, acpiphp = s.get("pciehp") == "yes", s.get("acpiphp") == "yes"
    drivers = [d for d, present in (("pciehp", pciehp), ("acpiphp", acpiphp)) if present]
    pci_facts = {**facts, "pciehp": pciehp, "acpiphp": acpiphp, "pci_slots": _int(s.get("pci_slots"))}
    pci = Row("guest-pci", bool(drivers),
              f"{' and '.join(drivers) or 'neither pciehp nor acpiphp'} present, "
              f"{pci_facts['pci_slots']} hot-plug slot(s) in /sys/bus/pci/slots ({src})",
              "" if drivers else "load pciehp (q35) or acpiphp (pc), or use a kernel with CONFIG_HOTPLUG_PCI_PCIE",
              pci_facts)

    mem_present = s.get("memory") == "yes"
    mem_facts = {**facts, "memory_sysfs": mem_present, "memory_blocks": _int(s.get("memory_blocks"))}
    mem = Row("guest-memory", mem_present,
              (f"/sys/devices/system/memory present ({mem_facts['memory_blocks']} blocks) ({src})" if mem_present
               else f"no /sys/devices/system/memory: the kernel lacks CONFIG_MEMORY_HOTPLUG ({src})"),
              "" if mem_present else "use a guest kernel with CONFIG_MEMORY_HOTPLUG and CONFIG_ACPI_HOTPLUG_MEMORY",
              mem_facts)

    # cpuN/online exists for present, hot-pluggable CPUs only; hotplug/states is created only by a kernel
    # with CONFIG_HOTPLUG_CPU, so it also answers for a guest that has a single CPU so far.
    online_files, states = _int(s.get("cpu_online_files")), s.get("cpuhp_states") == "yes"
    possible = len(parse_cpu_list(s.get("cpus_possible", "")))
    cpu_ok = online_files > 0 or states
    cpu_facts = {**facts, "cpu_online_files": online_files, "cpuhp_states": states,
                 "cpus_present": s.get("cpus_present", ""), "cpus_possible": s.get("cpus_possible", "")}
    evidence = []
    if online_files:
        evidence.append(f"{online_files} cpuN/online file(s)")
    if states:
        evidence.append("/sys/devices/system/cpu/hotplug/states")
    cpu = Row("guest-cpu", cpu_ok,
              (f"{' and '.join(evidence)} present; the kernel can use up to {possible} CPU(s) "
               f"(possible {s.get('cpus_possible') or '?'}) ({src})" if cpu_ok
               else f"no cpuN/online files and no hotplug/states: the kernel lacks CONFIG_HOTPLUG_CPU ({src})"),
              "" if cpu_ok else "use a guest kernel with CONFIG_HOTPLUG_CPU and CONFIG_ACPI_HOTPLUG_CPU", cpu_facts)
    return [pci, mem, cpu]


def _int(value: str | None) -> int:
    try:
        return int(value or "0")
    except ValueError:
        return 0


def guest_kernel(session: GuestSession) -> GuestKernel:
    """Run the fixed script in the guest and parse it."""
    return parse_guest(session.run_script(shell.sh_command(GUEST_SCRIPT), timeout=30).stdout)


# -- the whole report ---------------------------------------------------

@dataclass
class CheckReport:
    domain: str
    running: bool
    rows: list[Row]
    guest: GuestKernel | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "running": self.running,
                "xml": "live" if self.running else "inactive",
                "rows": [r.to_dict() for r in self.rows],
                "guest": self.guest.to_dict() if self.guest else None}

    def row(self, item: str) -> Row:
        return next(r for r in self.rows if r.item == item)


def check(name: str, *, running: bool, live_xml: str, config_xml: str | None,
          session: GuestSession | None, guest_note: Row | None = None, flavor: Flavor = QEMU,
          vcpu_cap: int | None = None) -> CheckReport:
    """Evaluate libvirt's XML (live, and the definition of a running domain) and, with a session, the guest."""
    config = domain_facts(config_xml) if config_xml is not None else None
    report = CheckReport(name, running, evaluate_domain(name, domain_facts(live_xml), config, flavor, vcpu_cap))
    if session is not None:
        report.guest = guest_kernel(session)
        report.rows.extend(evaluate_guest(report.guest))
    elif guest_note is not None:
        report.rows.append(guest_note)
    return report


def guest_not_checked(reason: str, fix: str = "", *, error: errors.VhotplugError | None = None) -> Row:
    """The row saying the guest kernel was not looked at, and why."""
    if error is not None:
        return Row("guest", None, f"guest not checked: {error.message}", fix or (error.hint or ""))
    return Row("guest", None, f"guest not checked: {reason}", fix)
