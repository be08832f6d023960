"""Ping an address through one named guest interface: proof that a hot-added NIC carries traffic.

The interface is brought up and, when it has no IPv4 address, given one by DHCP (busybox
``udhcpc``). The leased address is added as a /32 with no route: a hot-added NIC often sits
on the same prefix as the management NIC (two QEMU user-mode networks are both 10.0.2.0/24),
and a second prefix route could steal the SSH session's traffic. ``ping -I IFACE`` binds to
the device, and the kernel treats the destination as on-link there.
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass

from vhotplug import errors
from vhotplug.guest.ssh import GuestSession

IFACE_RE = re.compile(r"[A-Za-z0-9_.:-]{1,15}")

# $1 interface. Runs udhcpc with a do-nothing script, so nothing in the guest (its own
# default.script included) gets to configure prefixes or routes; we only read the lease.
DHCP_SCRIPT = r"""
command -v udhcpc >/dev/null 2>&1 || { echo "no-udhcpc"; exit 0; }
for t in /bin/true /usr/bin/true; do [ -x "$t" ] && break; done
exec udhcpc -i "$1" -n -q -t 5 -T 1 -s "$t" 2>&1
"""

_LEASE_RE = re.compile(r"lease of (\S+) obtained")
_SUMMARY_RE = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_RTT_RE = re.compile(r"(?:round-trip|rtt) min/avg/max(?:/mdev)? = [\d.]+/([\d.]+)/")


@dataclass(frozen=True)
class PingResult:
    sent: int
    received: int
    rtt_ms_avg: float | None  # None when nothing came back
    source_addr: str  # the interface's address used as source ("" if it had none of that family)


def parse_ping(output: str) -> tuple[int, int, float | None]:
    """(sent, received, average RTT in ms) from busybox or iputils ping output."""
    summary = _SUMMARY_RE.search(output)
    if summary is None:
        raise errors.GuestCommandFailed(f"no ping summary in the guest's output: {output.strip()[-300:]!r}")
    rtt = _RTT_RE.search(output)
    return int(summary.group(1)), int(summary.group(2)), float(rtt.group(1)) if rtt else None


def parse_lease(output: str) -> str | None:
    """The address in udhcpc's ``lease of A.B.C.D obtained`` line, if any (validated)."""
    match = _LEASE_RE.search(output)
    if match is None:
        return None
    try:
        return str(ipaddress.IPv4Address(match.group(1)))
    except ValueError:
        return None


def parse_addresses(output: str, family: int) -> list[str]:
    """Addresses (without prefix length) from ``ip -o addr show`` lines of one family (4 or 6)."""
    word = "inet" if family == 4 else "inet6"
    found: list[str] = []
    for line in output.splitlines():
        f = line.split()
        if word in f:
            i = f.index(word)
            if i + 1 < len(f):
                found.append(f[i + 1].split("/")[0])
    return found


def check_iface(iface: str) -> str:
    """Validate an interface name as the kernel allows it (at most 15 characters)."""
    if not IFACE_RE.fullmatch(iface) or iface in (".", ".."):
        raise errors.InvalidRequest(f"not an interface name: {iface!r}",
                                    hint="1 to 15 characters from A-Z a-z 0-9 _ . : -")
    return iface


def check_address(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address to ping, or :class:`errors.InvalidRequest` (callers check it before changing anything)."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise errors.InvalidRequest(f"not an IP address: {addr!r}") from None
    # ipaddress takes any text as an IPv6 zone ("fe80::1%$(reboot)", a newline, a NUL); it reached the
    # guest's ping as one quoted word, but sshd cuts a command at a NUL. Zones are interface names.
    zone = getattr(ip, "scope_id", None)
    if zone is not None and (not IFACE_RE.fullmatch(zone) or zone in (".", "..")):
        raise errors.InvalidRequest(f"not an IP address: {addr!r} (the zone after '%' is not an interface name)")
    return ip


def _remaining(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise errors.Timeout(f"ran out of time before {what}")
    return left


def ping_through(session: GuestSession, iface: str, addr: str, *, count: int = 3,
                 timeout: float = 15) -> PingResult:
    """Ping ``addr`` from the guest bound to interface ``iface``; raise if no reply came back.

    Brings the link up, leases an IPv4 address by DHCP when the interface has none (added as
    a /32, never a route), then runs ``ping -c COUNT -W 2 -I IFACE ADDR``. Raises
    errors.GuestCommandFailed with ping's output when nothing was received.
    """
    check_iface(iface)
    ip = check_address(addr)
    if not 1 <= count <= 100:
        raise errors.InvalidRequest(f"ping count must be 1..100, not {count}")
    deadline = time.monotonic() + timeout

    session.run(["ip", "link", "set", "dev", iface, "up"], timeout=_remaining(deadline, "link up"))
    shown = session.run(["ip", "-o", f"-{ip.version}", "addr", "show", "dev", iface],
                        timeout=_remaining(deadline, "reading addresses")).stdout
    sources = parse_addresses(shown, ip.version)
    if not sources and ip.version == 4:
        dhcp = session.run(["sh", "-c", DHCP_SCRIPT, "sh", iface], timeout=_remaining(deadline, "DHCP"),
                           check=False)
        if dhcp.stdout.strip() == "no-udhcpc":
            raise errors.GuestCommandFailed(f"{iface} has no IPv4 address and the guest has no udhcpc to get one",
                                            hint=f"configure an address on {iface} in the guest first")
        lease = parse_lease(dhcp.stdout)
        if lease is None:
            raise errors.GuestCommandFailed(f"DHCP on {iface} got no lease: {dhcp.stdout.strip()[-300:]}")
        # /32 on purpose: no prefix route that could compete with the management NIC's.
        session.run(["ip", "addr", "add", f"{lease}/32", "dev", iface],
                    timeout=_remaining(deadline, "adding the address"))
        sources = [lease]

    # -W 2: busybox waits that long for replies after the last probe, so a lost reply costs
    # 2 s, not ping's default 10; whatever is left of the caller's budget bounds the whole run.
    argv = ["ping", "-c", str(count), "-W", "2", "-I", iface, str(ip)]
    out = session.run(argv, timeout=_remaining(deadline, "ping"), check=False)
    text = out.stdout + out.stderr
    sent, received, avg = parse_ping(text) if _SUMMARY_RE.search(text) else (0, 0, None)
    if received == 0:
        raise errors.GuestCommandFailed(
            f"no reply from {ip} through {iface} (exit {out.status}): {text.strip()[-400:] or 'no output'}")
    return PingResult(sent, received, avg, sources[0] if sources else "")
