"""vCPU hot-plug ending in a state libvirt and the guest agree on.

Add: libvirt plugs the vCPUs, the guest shows them present, vhotplug onlines them and
checks the online set and /proc/cpuinfo. Remove: the guest offlines them first, then
libvirt unplugs; libvirt gives up after its own 5 s ("vcpu unplug request timed out")
even when the guest did eject the CPU, so the outcome is reconciled from the guest and the
live XML, and a disagreement is reported as such (exit code 12), never as success.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import libvirt
from lxml import etree

from vhotplug import errors
from vhotplug.guest import hotplug, privilege
from vhotplug.guest.hotplug import SYS_CPU, cpu_list
from vhotplug.guest.ssh import GuestSession
from vhotplug.virt.connection import RECONNECT_WINDOW, reopen_if_lost
from vhotplug.virt.errors import translate
from vhotplug.virt.events import DeviceRemovalWaiter
from vhotplug.virt.flavor import flavor_of


@dataclass(frozen=True)
class VcpuOutcome:
    before: int
    after: int  # what libvirt counts now (live, or config for --config only)
    live: bool
    config: bool
    guest_online: str = ""
    guest_cpuinfo: int | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    onlined_by: str = ""  # added CPUs: "guest" (it onlined them itself: udev rules) or "vhotplug"; else ""

    def to_dict(self) -> dict[str, object]:
        doc: dict[str, object] = {"before": self.before, "after": self.after, "live": self.live,
                                  "config": self.config, "seconds": round(self.seconds, 3)}
        if self.guest_online:
            doc["guest"] = {"online": self.guest_online, "cpuinfo": self.guest_cpuinfo}
        if self.onlined_by:
            doc["onlined_by"] = self.onlined_by
        if self.notes:
            doc["notes"] = self.notes
        return doc


def counts(dom: libvirt.virDomain, *, live: bool) -> tuple[int, int]:
    """(current, maximum) vCPUs of the running domain (``live``) or of its definition."""
    flag = libvirt.VIR_DOMAIN_AFFECT_LIVE if live else libvirt.VIR_DOMAIN_AFFECT_CONFIG
    try:
        return dom.vcpusFlags(flag), dom.vcpusFlags(flag | libvirt.VIR_DOMAIN_VCPU_MAXIMUM)
    except libvirt.libvirtError as exc:
        raise translate(exc, "reading the vCPU counts") from exc


def host_cap(conn: libvirt.virConnect) -> int | None:
    """The most vCPUs the hypervisor lets a running guest have, where that is below any definition's
    maximum: libxl caps them at the host's CPUs. None: no such cap (QEMU)."""
    if flavor_of(conn).name != "xen":
        return None
    try:
        return int(conn.getMaxVcpus(None))
    except libvirt.libvirtError:
        return None


def check_host_cap(conn: libvirt.virConnect, n: int) -> None:
    cap = host_cap(conn)
    if cap is not None and n > cap:
        raise errors.InvalidRequest(
            f"requested vCPUs ({n}) exceed the {cap} that {flavor_of(conn).label} allows a running guest on this "
            "host (its physical CPU count)", hint=f"ask for at most {cap}")


def check_target(n: int, maximum: int) -> None:
    if n < 1:
        raise errors.InvalidRequest(f"a domain needs at least 1 vCPU, not {n}")
    if n > maximum:
        raise errors.InvalidRequest(
            f"requested vCPUs ({n}) exceed the maximum of {maximum} for this domain",
            hint="raise the maximum with `vhotplug prepare DOMAIN --max-vcpus N` (takes effect at next boot)",
        )


def _unplug_aliases(dom: libvirt.virDomain, count: int) -> list[str]:
    """Aliases of the vCPUs libvirt removes first: the enabled hot-pluggable ones, last plugged first."""
    root = etree.fromstring(dom.XMLDesc(0).encode())
    vcpus = [v for v in root.iterfind("vcpus/vcpu") if v.get("enabled") == "yes" and v.get("hotpluggable") == "yes"]
    vcpus.sort(key=lambda v: int(v.get("order", "0")), reverse=True)
    return [f"vcpu{v.get('id')}" for v in vcpus[:count]]


def _vcpu_enabled(dom: libvirt.virDomain, alias: str) -> bool:
    """Whether vCPU ``alias`` (vcpuN) is still enabled in the live XML (vCPUs carry no <alias> there)."""
    root = etree.fromstring(dom.XMLDesc(0).encode())
    return bool(root.xpath("vcpus/vcpu[@id=$i][@enabled='yes']", i=alias.removeprefix("vcpu")))


def set_vcpus(conn: libvirt.virConnect, dom: libvirt.virDomain, n: int, *, live: bool, config: bool,
              session: GuestSession | None, timeout: float) -> VcpuOutcome:
    """Set the vCPU count; with a session, finish the job in the guest and verify it."""
    start = time.monotonic()
    if config:
        cur_cfg, max_cfg = counts(dom, live=False)
        check_target(n, max_cfg)
    if not live:
        try:
            dom.setVcpusFlags(n, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        except libvirt.libvirtError as exc:
            raise translate(exc, "setting the vCPUs of the definition") from exc
        return VcpuOutcome(cur_cfg, n, False, True, seconds=time.monotonic() - start)

    cur, maximum = counts(dom, live=True)
    check_target(n, maximum)
    check_host_cap(conn, n)
    if session is not None and n != cur:
        # Before libvirt is asked: a user whose sudo wants a password must not leave CPUs half-done.
        privilege.require(session, "online the new CPUs" if n > cur else "offline CPUs")
    outcome = (_grow if n > cur else _shrink)(conn, dom, cur, n, session, timeout) if n != cur else None
    if config:
        try:
            dom.setVcpusFlags(n, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        except libvirt.libvirtError as exc:
            raise translate(exc, "setting the vCPUs of the definition") from exc
    if outcome is None:
        online = ""
        info = None
        if session:
            st = hotplug.state(session)
            online, info = cpu_list(st.online), st.cpuinfo
        return VcpuOutcome(cur, cur, True, config, online, info, time.monotonic() - start, ["nothing to change"])
    online, cpuinfo, notes, by = outcome
    return VcpuOutcome(cur, n, True, config, online, cpuinfo, time.monotonic() - start, notes, by)


def _grow(conn: libvirt.virConnect, dom: libvirt.virDomain, cur: int, n: int, session: GuestSession | None,
          timeout: float) -> tuple[str, int | None, list[str], str]:
    try:
        dom.setVcpusFlags(n, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except errors.ConnectionLost as exc:
        # libvirtd went away during the call: whether QEMU added them is read back once it answers again.
        reopen_if_lost(dom, time.monotonic() + max(timeout, RECONNECT_WINDOW), during=f"vCPUs {cur} -> {n}")
        if (now := counts(dom, live=True)[0]) != n:
            raise errors.LibvirtFailure(f"libvirtd went away while adding vCPUs {cur} -> {n}; reconnected, the "
                                        f"domain has {now}: not changed") from exc
    except libvirt.libvirtError as exc:
        raise translate(exc, f"hot-adding vCPUs {cur} -> {n}") from exc
    if session is None:
        return "", None, [], ""
    want = cpu_list(range(n))
    reached, seen, _ = hotplug.wait_equals(session, f"{SYS_CPU}/present", want, timeout=timeout)
    if not reached:
        raise errors.Inconsistent(f"libvirt added vCPUs ({n} now) but the guest shows CPUs {seen or '?'} present, "
                                  f"not {want}, after {timeout:g} s")
    # A guest may online them itself (RHEL's udev rules): already online counts, and is said so.
    by = hotplug.set_cpus_online(session, range(cur, n), True)
    st = hotplug.state(session)
    if cpu_list(st.online) != want or st.cpuinfo != n:
        raise errors.Inconsistent(f"the guest has CPUs {cpu_list(st.online)} online ({st.cpuinfo} in /proc/cpuinfo), "
                                  f"expected {want}")
    return want, st.cpuinfo, [], hotplug.onlined_by(by.values())


def _shrink(conn: libvirt.virConnect, dom: libvirt.virDomain, cur: int, n: int, session: GuestSession | None,
            timeout: float) -> tuple[str, int | None, list[str], str]:
    notes: list[str] = []
    if session is not None:
        # The guest lets go first: an online CPU being ejected is the guest's decision to refuse.
        hotplug.set_cpus_online(session, range(n, cur), False)
    deadline = time.monotonic() + timeout
    aliases = _unplug_aliases(dom, cur - n)
    with DeviceRemovalWaiter(conn, dom, *aliases, present=lambda a: _vcpu_enabled(dom, a)) as waiter:  # before asking
        try:
            dom.setVcpusFlags(n, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except errors.ConnectionLost as exc:
            # Whether libvirt asked QEMU is unknown: the waiter reconnects, and the counts below say.
            notes.append(f"libvirt: {exc.message}")
            waiter.wait(max(0.0, deadline - time.monotonic()))
        except libvirt.libvirtError as exc:
            err = translate(exc, f"hot-removing vCPUs {cur} -> {n}")
            if not isinstance(err, errors.Timeout):
                raise err from exc
            notes.append(f"libvirt: {exc.get_error_message()}")
            waiter.wait(max(0.0, deadline - time.monotonic()))  # QEMU may still finish: wait, bounded
    libvirt_now = counts(dom, live=True)[0]
    if session is None:
        if libvirt_now != n:
            raise errors.Timeout(f"libvirt still counts {libvirt_now} vCPUs, not {n}: the unplug did not complete")
        return "", None, notes, ""
    want = cpu_list(range(n))
    reached, seen, _ = hotplug.wait_equals(session, f"{SYS_CPU}/present", want,
                                           timeout=max(1.0, deadline - time.monotonic()))
    st = hotplug.state(session)
    if libvirt_now == n and reached:
        return cpu_list(st.online), st.cpuinfo, notes, ""
    raise errors.Inconsistent(
        f"libvirt and the guest disagree after removing vCPUs {cur} -> {n}: libvirt counts {libvirt_now} "
        f"(live XML), the guest shows CPUs {seen or cpu_list(st.present)} present and {cpu_list(st.online)} online "
        f"({st.cpuinfo} in /proc/cpuinfo)",
        hint="libvirt's live count is stale when QEMU never confirmed the unplug; a restart of the domain "
             "brings both back in line",
    )
