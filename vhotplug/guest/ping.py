"""Ping an address through one named guest interface: proof that a hot-added NIC carries traffic.

The interface is brought up and, when it has no IPv4 address, gets one with whatever the guest has: when
its own network manager (systemd-networkd, NetworkManager) manages the interface, the address that manager
gives it is waited for; otherwise a DHCP client (busybox ``udhcpc``, ISC ``dhclient``, ``dhcpcd``, the first
found) is run so that it configures nothing, and the leased address is added as a /32 with no route: a
hot-added NIC often sits on the same prefix as the management NIC (two QEMU user-mode networks are both
10.0.2.0/24), and a second prefix route could steal the SSH session's traffic. ``ping -I IFACE`` binds to
the device, and the kernel treats the destination as on-link there. Nothing here touches the default route.

Link up, DHCP, the address and the ping need root: for another SSH user they go through sudo
(:mod:`vhotplug.guest.privilege`); reading the addresses does not.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from vhotplug import errors
from vhotplug.guest import privilege, shell
from vhotplug.guest.ssh import GuestSession, Result

IFACE_RE = re.compile(r"[A-Za-z0-9_.:-]{1,15}")

#: Seconds the guest's network manager, dhclient or dhcpcd get to come up with an address.
DHCP_WAIT = 8

# $1 interface. Prints a first line saying where the address comes from, then what to read it from:
#   "managed NAME": the guest's own manager has the interface (networkd: setup state configuring or configured;
#       NetworkManager: device state 40-100, activating or connected; or 20/30, not started on it yet, when the
#       guest has no DHCP client of its own: its automatic connection may come); its `ip -o -4 addr show` lines
#       follow once it has an address. Never fought over: a second client would race it.
#   "client NAME": a DHCP client's lease, taken with a do-nothing script so that nothing in the guest (its
#       own default.script or dhclient-script included) configures prefixes or routes; its output follows
#       (udhcpc's "lease of A obtained", dhclient's lease file, dhcpcd's test-mode variables).
#   "no-dhcp": the guest has none of them.
DHCP_SCRIPT = shell.script(r"""
i=$1
for t in /bin/true /usr/bin/true; do [ -x "$t" ] && break; done
# managed NAME: wait (bounded) for the address NAME gives the interface, print it, and end.
managed() {
  echo "managed $1"
  n=$((@WAIT@ * 5))
  while [ "$n" -gt 0 ]; do
    a=$(ip -o -4 addr show dev "$i" 2>/dev/null)
    case $a in *" inet "*) echo "$a"; exit 0 ;; esac
    n=$((n - 1)); nap 200000 0.2
  done
  exit 1
}
if command -v networkctl >/dev/null 2>&1; then
  case $(networkctl list --no-pager --no-legend "$i" 2>/dev/null) in
    *" configuring"*|*" configured"*) managed networkd ;;
  esac
fi
nm=
if command -v nmcli >/dev/null 2>&1; then
  nm=$(nmcli -t -f GENERAL.STATE device show "$i" 2>/dev/null); nm=${nm#*:}; nm=${nm%% *}
  case $nm in 4[0-9]|[5-9][0-9]|100) managed NetworkManager ;; esac
fi
if command -v udhcpc >/dev/null 2>&1; then
  echo "client udhcpc"
  exec udhcpc -i "$i" -n -q -t 5 -T 1 -s "$t" 2>&1
fi
if command -v dhclient >/dev/null 2>&1; then
  # In the foreground, in a directory of its own (lease, pid, a config that bounds its wait), stopped
  # once the lease is written: left alone it would go on renewing in the background.
  echo "client dhclient"
  d=$(mktemp -d) || exit 1
  echo "timeout @WAIT@;" > "$d/conf"
  dhclient -4 -d -sf "$t" -cf "$d/conf" -lf "$d/leases" -pf "$d/pid" "$i" > "$d/out" 2>&1 &
  p=$! n=$((@WAIT@ * 5))
  while [ "$n" -gt 0 ] && kill -0 "$p" 2>/dev/null; do
    grep -q fixed-address "$d/leases" 2>/dev/null && break
    n=$((n - 1)); nap 200000 0.2
  done
  kill "$p" 2>/dev/null; wait "$p" 2>/dev/null
  cat "$d/out" "$d/leases" 2>/dev/null
  rm -rf "$d"
  exit 0
fi
if command -v dhcpcd >/dev/null 2>&1; then
  # -T: on an offer, print the variables and exit; the interface and the system are left as they are.
  echo "client dhcpcd"
  exec dhcpcd -T -4 -t @WAIT@ "$i" 2>&1
fi
# No client of its own (RHEL 9: the internal DHCP of NetworkManager only): NetworkManager has the interface but has
# not started on it yet (20 unavailable, 30 disconnected).
case $nm in 20|30) managed NetworkManager ;; esac
echo no-dhcp
""").replace("@WAIT@", str(DHCP_WAIT))  # our constant: the interface is never pasted in

# A lease as each client shows it: udhcpc's message, dhclient's lease file (or -v's "bound to"),
# dhcpcd -T's variables (bash prints them bare, dash quoted) or its "offered" message.
_LEASE_RES = [re.compile(p) for p in (r"lease of (\S+) obtained", r"fixed-address (\S+?);", r"bound to (\S+) ",
                                      r"new_ip_address='?([0-9.]+)", r"offered (\S+) from")]
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
    """The leased address in a DHCP client's output (udhcpc, dhclient, dhcpcd), if any (validated)."""
    for pattern in _LEASE_RES:
        match = pattern.search(output)
        if match is None:
            continue
        try:
            return str(ipaddress.IPv4Address(match.group(1)))
        except ValueError:
            return None
    return None


def parse_dhcp(output: str) -> tuple[str, str]:
    """(how, who) from :data:`DHCP_SCRIPT`'s first line: ("managed", "networkd"), ("client", "dhclient"),
    ("none", ""); output without such a line is a client's own (udhcpc, as this script printed before)."""
    first = output.lstrip().split("\n", 1)[0].split()
    if first[:1] == ["no-dhcp"]:
        return "none", ""
    if len(first) == 2 and first[0] in ("managed", "client"):
        return first[0], first[1]
    return "client", "udhcpc"


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

    Brings the link up; when the interface has no IPv4 address, waits for the one the guest's network
    manager gives it or leases one by DHCP (added as a /32, never a route); then runs
    ``ping -c COUNT -W 2 -I IFACE ADDR``. Each step that needs root goes through sudo for another user.
    Raises errors.GuestCommandFailed with ping's output when nothing was received.
    """
    check_iface(iface)
    ip = check_address(addr)
    if not 1 <= count <= 100:
        raise errors.InvalidRequest(f"ping count must be 1..100, not {count}")
    deadline = time.monotonic() + timeout

    def run(argv: list[str], what: str, *, root: bool = True, check: bool = True) -> Result:
        command = privilege.command_argv(session, argv, privileged=root)
        return session.run(command, timeout=_remaining(deadline, what), check=check)

    run(["ip", "link", "set", "dev", iface, "up"], "link up")
    shown = run(["ip", "-o", f"-{ip.version}", "addr", "show", "dev", iface], "reading addresses", root=False).stdout
    sources = parse_addresses(shown, ip.version)
    if not sources and ip.version == 4:
        sources = _get_address(session, iface, deadline, run)

    # -W 2: busybox waits that long for replies after the last probe, so a lost reply costs
    # 2 s, not ping's default 10; whatever is left of the caller's budget bounds the whole run.
    out = run(["ping", "-c", str(count), "-W", "2", "-I", iface, str(ip)], "ping", check=False)
    text = out.stdout + out.stderr
    sent, received, avg = parse_ping(text) if _SUMMARY_RE.search(text) else (0, 0, None)
    if received == 0:
        raise errors.GuestCommandFailed(
            f"no reply from {ip} through {iface} (exit {out.status}): {text.strip()[-400:] or 'no output'}")
    return PingResult(sent, received, avg, sources[0] if sources else "")


def _get_address(session: GuestSession, iface: str, deadline: float, run: Callable[..., Result]) -> list[str]:
    """An IPv4 address for ``iface``, from the guest's network manager or a DHCP lease added as a /32."""
    argv = privilege.script_argv(session, DHCP_SCRIPT, iface, privileged=True)
    dhcp = session.run(argv, timeout=_remaining(deadline, "DHCP"), check=False)
    how, who = parse_dhcp(dhcp.stdout)
    if how == "none":
        raise errors.GuestCommandFailed(
            f"{iface} has no IPv4 address and the guest has no DHCP client to get one (looked for udhcpc, dhclient "
            f"and dhcpcd; neither networkd nor NetworkManager manages {iface})",
            hint=f"configure an address on {iface} in the guest first, or install a DHCP client")
    if how == "managed":
        # The guest's own manager configured it (its routes are its own business); nothing is added here.
        found = parse_addresses(dhcp.stdout, 4)
        if not found:
            raise errors.GuestCommandFailed(f"{who} manages {iface} in the guest but gave it no IPv4 address "
                                            f"within {DHCP_WAIT} s: {dhcp.stderr.strip()[-300:] or 'no error output'}")
        return found
    lease = parse_lease(dhcp.stdout)
    if lease is None:
        raise errors.GuestCommandFailed(f"DHCP on {iface} ({who}) got no lease: {dhcp.stdout.strip()[-300:]}")
    # /32 on purpose: no prefix route that could compete with the management NIC's.
    run(["ip", "addr", "add", f"{lease}/32", "dev", iface], "adding the address")
    return [lease]
