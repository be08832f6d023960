"""Where and how to reach a guest over SSH.

Resolution order (first that applies): ``--ssh user@host[:port]`` (+ ``--ssh-key``),
the domain's own ``<metadata>`` (written by ``vhotplug lab`` or by an operator),
the domain's interface addresses as libvirt knows them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace
from pathlib import Path

import libvirt
from lxml import etree

from vhotplug import errors

METADATA_NS = "urn:vhotplug:guest:1"
METADATA_KEY = "vh"

# Used with fullmatch: with match, "$" also matched before a trailing newline ("root\n@host" was accepted).
_USER = re.compile(r"[a-z_][a-z0-9_.-]{0,31}", re.IGNORECASE)
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
# An IPv6 zone (fe80::1%eth0): an interface name or index. ipaddress takes any text after the '%'.
_ZONE = re.compile(r"[A-Za-z0-9_.:-]{1,15}")
_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class SSHTarget:
    host: str
    port: int = 22
    user: str = "root"
    key: Path | None = None
    known_hosts: Path | None = None  # None: the user's ~/.ssh/known_hosts
    source: str = "command line"  # where this target came from, for messages
    jump: SSHTarget | None = None  # reach the guest through this host (OpenSSH's ProxyJump)

    def __str__(self) -> str:
        where = f"{self.user}@{self.host}:{self.port}"
        return f"{where} via {self.jump}" if self.jump else where


def check_host(host: str) -> str:
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        addr = None
    if addr is not None:
        zone = getattr(addr, "scope_id", None)
        if zone is not None and not _ZONE.fullmatch(zone):  # "fe80::1%$(x)" or a newline parsed as an address
            raise errors.InvalidRequest(f"invalid SSH host {host!r}: the zone after '%' is not an interface name")
        return str(addr)
    if not _HOST.fullmatch(host):
        raise errors.InvalidRequest(f"invalid SSH host {host!r}")
    return host


def check_port(port: str | int) -> int:
    # Digits only: int() also took " 22", "2_2" and other scripts' digits ("٢٢").
    text = str(port)
    value = int(text) if _PORT.fullmatch(text) else -1
    if not 0 < value < 65536:
        raise errors.InvalidRequest(f"invalid SSH port {port!r}: expected 1-65535")
    return value


def check_user(user: str, where: str = "") -> str:
    if not _USER.fullmatch(user):
        raise errors.InvalidRequest(f"invalid SSH user {user!r}" + (f" in {where!r}" if where else ""))
    return user


def split_ssh_spec(spec: str) -> tuple[str | None, str, str | None]:
    """``[user@]host[:port]`` (IPv6 as ``[addr]:port``) as (user or None, host, port or None), checked where
    given; the host may still be an alias of the SSH config (checked once resolved)."""
    user: str | None = None
    rest = spec.strip()
    if "@" in rest:
        user, rest = rest.rsplit("@", 1)
        check_user(user, spec)
    port: str | None = None
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail:
            if not tail.startswith(":"):
                raise errors.InvalidRequest(f"invalid SSH target {spec!r}: expected [user@]host[:port]")
            port = tail[1:]
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:
        host = rest
    if not host:
        raise errors.InvalidRequest(f"invalid SSH target {spec!r}: expected [user@]host[:port]")
    if port is not None:
        check_port(port)
    check_host(host)
    return user, host, port


def parse_ssh_spec(spec: str) -> SSHTarget:
    """Parse ``[user@]host[:port]`` (IPv6 as ``[addr]:port``); root and port 22 unless given."""
    user, host, port = split_ssh_spec(spec)
    return SSHTarget(host=check_host(host), port=check_port(port or 22), user=user or "root")


def metadata_element(target: SSHTarget) -> etree._Element:
    """The ``<vh:guest>`` element describing how to reach the guest."""
    root = etree.Element(f"{{{METADATA_NS}}}guest", nsmap={METADATA_KEY: METADATA_NS})
    ssh = _login_element(root, "ssh", target)
    hop = target.jump
    while hop is not None:  # jump hosts, the outermost last
        _login_element(ssh, "jump", hop)
        hop = hop.jump
    return root


def _login_element(parent: etree._Element, tag: str, target: SSHTarget) -> etree._Element:
    el = etree.SubElement(parent, f"{{{METADATA_NS}}}{tag}")
    el.set("host", target.host)
    el.set("port", str(target.port))
    el.set("user", target.user)
    if target.key:
        el.set("key", str(target.key))
    if target.known_hosts:
        el.set("known-hosts", str(target.known_hosts))
    return el


def target_from_metadata(xml: str | bytes | etree._Element) -> SSHTarget | None:
    """Read the target from a domain XML document (or its ``<vh:guest>`` element)."""
    root = xml if isinstance(xml, etree._Element) else etree.fromstring(
        xml.encode() if isinstance(xml, str) else xml
    )
    found = root.xpath("//vh:guest/vh:ssh", namespaces={"vh": METADATA_NS})
    if not found:
        return None
    ssh = found[0]
    if not ssh.get("host"):
        return None
    jump = None
    for hop in reversed(ssh.findall(f"{{{METADATA_NS}}}jump")):
        if hop.get("host"):
            jump = _target_from_element(hop, jump)
    return _target_from_element(ssh, jump)


def _target_from_element(el: etree._Element, jump: SSHTarget | None) -> SSHTarget:
    key, known, user = el.get("key"), el.get("known-hosts"), el.get("user", "root")
    check_user(user, "the domain metadata")
    return SSHTarget(
        host=check_host(el.get("host", "")),
        port=check_port(el.get("port", "22")),
        user=user,
        key=Path(key) if key else None,
        known_hosts=Path(known) if known else None,
        source="domain metadata",
        jump=jump,
    )


def target_from_interfaces(dom: libvirt.virDomain) -> SSHTarget | None:
    """First IPv4 address libvirt knows for the domain (DHCP lease, then ARP)."""
    for src in (libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP):
        try:
            ifaces = dom.interfaceAddresses(src)
        except libvirt.libvirtError:
            continue
        for iface in (ifaces or {}).values():
            for addr in iface.get("addrs") or []:
                if addr.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4 and addr.get("addr"):
                    return SSHTarget(host=addr["addr"], source="interface addresses")
    return None


def resolve_target(dom: libvirt.virDomain, *, ssh: str | None, key: Path | None,
                   known_hosts: Path | None, metadata: SSHTarget | None = None,
                   jump: str | None = None) -> SSHTarget:
    """Decide where to reach the guest of ``dom``; raise GuestUnreachable when nothing says.

    ``metadata``: the target already read from the domain's metadata, if the caller has it.
    ``ssh`` and ``jump`` (``--ssh-jump``) are read as ``ssh`` reads a destination: ``[user@]host[:port]``, or an
    alias of the SSH config (:mod:`vhotplug.guest.sshconfig`); the jump host uses the guest's key and
    known_hosts file unless the config names its own.
    """
    from vhotplug.guest.sshconfig import resolve_spec  # the SSH config is read only for --ssh/--ssh-jump

    if ssh:
        target = resolve_spec(ssh)
    else:
        if metadata is None:
            try:
                metadata = target_from_metadata(dom.XMLDesc(0))
            except libvirt.libvirtError:
                metadata = None
        target = metadata or target_from_interfaces(dom)
        if target is None:
            raise errors.GuestUnreachable(
                f"do not know how to reach the guest of {dom.name()} over SSH",
                hint="pass --ssh user@host[:port] (and --ssh-key), or use a lab domain",
            )
    if key:
        target = replace(target, key=key)
    if known_hosts:
        target = replace(target, known_hosts=known_hosts)
    if jump:
        hop = resolve_spec(jump)
        # Without a key or known_hosts file of its own (from the SSH config), the hop uses the guest's.
        target = replace(target, jump=replace(hop, key=hop.key or target.key,
                                              known_hosts=hop.known_hosts or target.known_hosts,
                                              source="--ssh-jump"))
    return target
