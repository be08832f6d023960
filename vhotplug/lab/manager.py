"""Lab lifecycle: build the image, define and boot lab domains, find and remove them.

Only domains carrying vhotplug's lab marker in their metadata are ever
destroyed or undefined here; a name that belongs to another domain is refused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import libvirt
from lxml import etree

from vhotplug import errors
from vhotplug.guest.ssh import wait_for_ssh
from vhotplug.guest.target import METADATA_NS, SSHTarget, target_from_metadata
from vhotplug.lab import DEFAULT_NAME, xenpv
from vhotplug.lab import image as lab_image
from vhotplug.lab.domain import Accel, LabSpec, Machine, build_domain_xml, check_name
from vhotplug.virt.errors import translate
from vhotplug.virt.flavor import flavor_of

#: Where a lab guest inside a remote hypervisor writes its serial console (that host's libvirt log dir).
REMOTE_LOG_DIR = Path("/var/log/libvirt/qemu")


def lab_root() -> Path:
    """Where lab files live: readable by the QEMU process (not under /root)."""
    return Path(os.environ.get("VHOTPLUG_LAB_DIR", "/var/lib/vhotplug/lab"))


def image_dir() -> Path:
    return lab_root() / "image"


def domain_dir(name: str) -> Path:
    return lab_root() / "domains" / check_name(name)


@dataclass(frozen=True)
class LabDomain:
    name: str
    state: str
    target: SSHTarget | None
    machine: str
    accel: str
    serial_log: str
    plain: bool = False  # defined without hot-plug room (`lab up --plain`)
    kind: str = "guest"  # "guest" (the lab guest) or "l1" (the nested lab's hypervisor)
    uri: str | None = None  # an L1's libvirt URI (qemu+ssh://...)

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name, "kind": self.kind, "state": self.state, "machine": self.machine,
            "accel": self.accel, "plain": self.plain, "uri": self.uri,
            "ssh": str(self.target) if self.target else None,
            "key": str(self.target.key) if self.target and self.target.key else None,
            "known_hosts": str(self.target.known_hosts) if self.target and self.target.known_hosts else None,
            "serial_log": self.serial_log,
        }


@dataclass(frozen=True)
class UpResult:
    domain: LabDomain
    boot_seconds: float
    already_running: bool


STATES = {
    libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off", libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}


def _lab_info(dom: libvirt.virDomain) -> LabDomain | None:
    """The lab description of ``dom``, or None if it is not a lab domain."""
    try:
        xml = dom.XMLDesc(0)
        state = STATES.get(dom.state()[0], "unknown")
    except libvirt.libvirtError:
        return None  # vanished meanwhile
    root = etree.fromstring(xml.encode())
    lab = root.xpath("//vh:guest/vh:lab", namespaces={"vh": METADATA_NS})
    if not lab:
        return None
    return LabDomain(dom.name(), state, target_from_metadata(root), lab[0].get("machine", "?"),
                     lab[0].get("accel", "?"), lab[0].get("serial-log", ""), plain=lab[0].get("plain") == "yes",
                     kind=lab[0].get("kind", "guest"), uri=lab[0].get("uri"))


def list_labs(conn: libvirt.virConnect) -> list[LabDomain]:
    try:
        domains = conn.listAllDomains(0)
    except libvirt.libvirtError as exc:
        raise translate(exc, "listing domains") from exc
    return sorted((info for d in domains if (info := _lab_info(d))), key=lambda i: i.name)


def find_domain(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    """Domain ``name``, or None when there is none."""
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise translate(exc) from exc


def _require_lab(dom: libvirt.virDomain) -> LabDomain:
    info = _lab_info(dom)
    if info is None:
        raise errors.InvalidRequest(
            f"domain {dom.name()!r} exists and is not a vhotplug lab domain: refusing to touch it",
            hint="choose another --name",
        )
    return info


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def known_hosts_line(host: str, port: int, host_key_pub: str) -> str:
    """A known_hosts entry the way OpenSSH and paramiko look it up: ``host`` on port 22, else ``[host]:port``."""
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {host_key_pub}\n"


def serial_tail(path: str | Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        text = Path(path).read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])
    return "(no serial output)"


def build(*, kver: str | None = None, force: bool = False) -> lab_image.GuestImage:
    """Build (or reuse) the lab guest image."""
    root = lab_root()
    root.mkdir(parents=True, exist_ok=True)
    # QEMU runs as an unprivileged user (libvirt-qemu on Debian): it must be able to
    # reach the kernel, initrd and serial log through every directory on the way.
    for path in (root, *root.parents):
        if path.stat().st_mode & 0o001 == 0:
            raise errors.LabError(
                f"lab directory {root} is not reachable by the QEMU process: {path} is not world-searchable",
                hint="set VHOTPLUG_LAB_DIR to a directory under /var/lib or /srv",
            )
    return lab_image.build_image(image_dir(), kver=kver, force=force)


def _spec(name: str, machine: Machine, accel: Accel, kernel: Path, initrd: Path, key: Path,
          image_id: str, plain: bool = False, jump: SSHTarget | None = None, xen_host: str | None = None) -> LabSpec:
    ddir = domain_dir(name)
    if xen_host is not None:
        # A Xen PV domU: its own address on dom0's bridge, port 22, its console logged by dom0's xenconsoled.
        target = SSHTarget(xen_host, xenpv.SSH_PORT, "root", key, ddir / "known_hosts", source="lab metadata",
                           jump=jump)
        serial = xenpv.console_log(name)
    else:
        # The forward is chosen now, free at this moment; SSH is bound to loopback only. For a lab inside
        # a remote hypervisor (the nested lab's L2) the forward is on that host's loopback, reached through
        # it as a jump host; a port free here is very likely free there too (the hypervisor runs little).
        target = SSHTarget("127.0.0.1", free_port(), "root", key, ddir / "known_hosts", source="lab metadata",
                           jump=jump)
        # Inside a remote hypervisor the lab directory is read-only (the nested L1 sees it over 9p): the
        # serial log goes to that host's own libvirt log directory instead.
        serial = REMOTE_LOG_DIR / f"{name}-serial.log" if jump else ddir / "serial.log"
    return LabSpec(name=name, kernel=kernel, initrd=initrd, serial_log=serial, ssh=target,
                   machine=machine, accel=accel, image_id=image_id, plain=plain)


@dataclass(frozen=True)
class _Flavour:
    """How the lab guest is defined on a hypervisor: its shape and its domain XML."""

    machine: Machine
    accel: Accel
    xml: Callable[[LabSpec], str]
    xen: bool = False


def _flavour(conn: libvirt.virConnect, machine: Machine, accel: Accel, plain: bool) -> _Flavour:
    """The one place the connection's driver decides (virt/flavor.py): a Xen PV domU under Xen, else the
    QEMU/KVM guest."""
    if flavor_of(conn).name != "xen":
        return _Flavour(machine, accel, build_domain_xml)
    if plain:
        raise errors.Unsupported("`lab up --plain` is for QEMU/KVM lab guests; a Xen lab guest is a PV domU",
                                 hint="leave out --plain")
    return _Flavour(xenpv.MACHINE, xenpv.ACCEL, xenpv.build_xenpv_xml, xen=True)


def planned_xml(name: str, *, machine: Machine, accel: Accel, plain: bool = False) -> str:
    """The domain XML ``up`` would define, without building anything or touching libvirt."""
    try:
        img = lab_image.load_image(image_dir())
        kernel, initrd, key, kver = img.kernel, img.initrd, img.client_key, img.kver
    except errors.LabError:  # not built yet: show where the files will be
        d = image_dir()
        kernel, initrd, key, kver = d / "vmlinuz", d / "initrd.img", d / "id_lab", ""
    return build_domain_xml(_spec(check_name(name), machine, accel, kernel, initrd, key, kver, plain))


def down(conn: libvirt.virConnect, name: str) -> bool:
    """Destroy and undefine lab domain ``name`` and remove its files here; False if there was none."""
    dom = find_domain(conn, check_name(name))
    if dom is None:
        return False
    _require_lab(dom)
    try:
        if dom.isActive():
            dom.destroy()
        if dom.isPersistent():
            dom.undefine()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise translate(exc, f"removing lab domain {name}") from exc
    # Its known_hosts, serial log, ssh wrapper and scratch disks: nothing else uses them once it is gone.
    shutil.rmtree(domain_dir(name), ignore_errors=True)
    return True


def up(conn: libvirt.virConnect, name: str = DEFAULT_NAME, *, machine: Machine = "q35", accel: Accel = "qemu",
       timeout: float = 180.0, kver: str | None = None, plain: bool = False) -> UpResult:
    """Boot lab domain ``name`` (building what is missing) and wait until its SSH answers.

    ``plain`` defines it without hot-plug room (no maxMemory/NUMA cell, 1 vCPU of 1,
    one free root port): the domain ``vhotplug prepare`` is proven on.
    """
    check_name(name)
    img = build(kver=kver)
    flavour = _flavour(conn, machine, accel, plain)
    dom = find_domain(conn, name)
    if dom is not None:
        info = _require_lab(dom)
        same_shape = (info.machine == flavour.machine and info.accel == flavour.accel and info.plain == plain
                      and info.kind == "guest")
        if info.state == "running" and info.target and same_shape:
            with contextlib.suppress(errors.GuestUnreachable, errors.Timeout, errors.GuestHostKeyError):
                slow = info.target.jump is not None  # nested: one handshake takes seconds
                wait_for_ssh(info.target, deadline=time.monotonic() + (60 if slow else 5),
                             attempt_timeout=30.0 if slow else 2.0)
                return UpResult(info, 0.0, already_running=True)
        down(conn, name)  # stale, unreachable or different shape: start afresh

    jump = remote_jump(conn)
    xen_host = xenpv.pick_address(lab.target.host for lab in list_labs(conn) if lab.target) if flavour.xen else None
    spec = _spec(name, flavour.machine, flavour.accel, img.kernel, img.initrd, img.client_key, img.kver, plain, jump,
                 xen_host)
    domain_dir(name).mkdir(parents=True, exist_ok=True)
    if jump is None and not flavour.xen:
        spec.serial_log.unlink(missing_ok=True)
    assert spec.ssh.known_hosts is not None
    spec.ssh.known_hosts.write_text(known_hosts_line(spec.ssh.host, spec.ssh.port, img.host_key_pub))
    serial, target = spec.serial_log, spec.ssh
    dom, started = define_and_start(conn, flavour.xml(spec), f"lab domain {name}")
    try:
        # Through a jump host into a guest under nested TCG, one SSH handshake takes seconds.
        wait_for_ssh(target, deadline=started + timeout, attempt_timeout=30.0 if jump else 2.0)
    except errors.VhotplugError as exc:
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        raise errors.LabError(
            f"lab guest {name} did not answer SSH within {timeout:g} s ({exc}); "
            f"last serial output ({serial}):\n{serial_tail(serial)}",
            hint="the domain was stopped and left defined; `vhotplug lab down` removes it",
        ) from exc
    booted = time.monotonic() - started
    info = _lab_info(dom)
    assert info is not None
    return UpResult(info, booted, already_running=False)


def define_and_start(conn: libvirt.virConnect, xml: str, what: str) -> tuple[libvirt.virDomain, float]:
    """Define and start a lab domain; (the domain, ``time.monotonic()`` when it was started)."""
    try:
        dom = conn.defineXML(xml)
    except libvirt.libvirtError as exc:
        raise translate(exc, f"defining {what}") from exc
    started = time.monotonic()
    try:
        dom.create()
    except libvirt.libvirtError as exc:
        err = translate(exc, f"starting {what}")
        raise errors.LabError(err.message, hint="see the libvirt/QEMU message above") from exc
    return dom, started


def remote_jump(conn: libvirt.virConnect) -> SSHTarget | None:
    """For a hypervisor reached over SSH (``qemu+ssh://``), that login: the jump host into its guests.

    Its lab guests' SSH forwards are on *its* loopback; the host reaches them through it, with the
    URI's user, port, key and ``known_hosts=`` file (libvirt's ssh transport ignores that parameter).
    """
    from vhotplug.host.facts import ssh_target_from_uri  # only for remote URIs
    from vhotplug.host.inventory import is_local_uri

    try:
        uri = conn.getURI()
    except libvirt.libvirtError:
        return None
    if is_local_uri(uri):
        return None
    target = ssh_target_from_uri(uri)
    return replace(target, source="the libvirt URI") if target else None


def status(conn: libvirt.virConnect, name: str | None = None) -> list[LabDomain]:
    labs = list_labs(conn)
    if name is None:
        return labs
    found = [lab for lab in labs if lab.name == name]
    if not found:
        raise errors.NotFound(f"no lab domain named {name!r}", hint="`vhotplug lab up --name NAME` creates one")
    return found
