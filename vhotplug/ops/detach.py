"""Detach that really waits: event registered first, never re-sent, confirmed in the live XML and the guest."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import libvirt
from lxml import etree

from vhotplug import errors
from vhotplug.guest.ssh import GuestSession
from vhotplug.guest.watch import Identity, Seen, start_watch
from vhotplug.virt import pending
from vhotplug.virt.connection import reopen_if_lost, still_running
from vhotplug.virt.devices import Device, find_device
from vhotplug.virt.errors import translate
from vhotplug.virt.events import DeviceRemovalWaiter
from vhotplug.virt.flavor import flavor_of

#: How often a synchronous driver's (Xen's) removal is looked for in the live XML.
SYNC_POLL = 0.1


@dataclass(frozen=True)
class DetachOutcome:
    alias: str
    kind: str
    identity: str
    live: bool
    config: bool
    libvirt_seconds: float | None = None  # request -> DEVICE_REMOVED (live)
    was_pending: bool = False  # an earlier request was still in progress: not re-sent
    guest: Seen | None = None
    guest_gone_seconds: float | None = None
    busy_refusals: int = 0  # QEMU said "guest is busy" this often before it took the request
    reconnects: int = 0  # libvirtd went away and was reconnected to this often during the wait

    def to_dict(self) -> dict[str, object]:
        doc: dict[str, object] = {"alias": self.alias, "kind": self.kind, "identity": self.identity,
                                  "live": self.live, "config": self.config, "was_pending": self.was_pending}
        if self.libvirt_seconds is not None:
            doc["libvirt_seconds"] = round(self.libvirt_seconds, 4)
        if self.busy_refusals:
            doc["busy_refusals"] = self.busy_refusals
        if self.reconnects:
            doc["reconnects"] = self.reconnects
        if self.guest is not None:
            doc["guest_gone_seconds"] = round(self.guest_gone_seconds or 0.0, 4)
        return doc


def identity_of(device: Device, element: etree._Element) -> Identity | None:
    """What the guest can recognise this device by, if anything."""
    if device.kind == "interface" and device.identity not in ("", "-"):
        return Identity("nic", device.identity.lower())
    serial = element.findtext("serial")
    if device.kind == "disk" and serial:
        return Identity("disk", serial)
    target = element.find("target")
    if device.kind == "disk" and target is not None and target.get("bus") == "xen":  # no serial: by name
        return Identity("blockdev", target.get("dev", ""))
    return None


class Released(NamedTuple):
    """How a live detach ended well."""

    seconds: float  # request -> removed
    was_pending: bool  # an earlier request was still pending: waited for, not re-sent
    busy_refusals: int = 0
    reconnects: int = 0


#: What QEMU (>= 6.2) says to a PCIe unplug while the slot's previous hot-plug is still in progress.
BUSY = "guest is busy"
#: First and longest pause before asking again after such a refusal.
BUSY_BACKOFF = (0.25, 2.0)


def _ask(dom: libvirt.virDomain, alias: str, deadline: float) -> int:
    """``detachDeviceAlias``, asked again (bounded by ``deadline``) while QEMU refuses it because the guest is
    still busy with the slot's previous hot-plug ("guest is busy (power indicator blinking)", seen when an
    unplug follows a plug too quickly). QEMU took nothing then, so asking again re-sends nothing. Returns how
    many refusals there were."""
    pause, refusals = BUSY_BACKOFF[0], 0
    while True:
        try:
            dom.detachDeviceAlias(alias, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            return refusals
        except libvirt.libvirtError as exc:
            if BUSY not in (exc.get_error_message() or "") or time.monotonic() + pause >= deadline:
                err = translate(exc, f"detaching {alias}")
                if refusals:
                    err.message += f" (refused {refusals + 1} times in a row: the guest stayed busy)"
                raise err from exc
        refusals += 1
        time.sleep(pause)  # bounded by the deadline; QEMU sends no event when the indicator stops blinking
        pause = min(pause * 2, BUSY_BACKOFF[1])


def detach_live(conn: libvirt.virConnect, dom: libvirt.virDomain, alias: str, *,
                timeout: float) -> Released:
    """Ask the running guest to release ``alias`` and wait for the outcome.

    Returns how it ended (``Released``). QEMU's "guest is busy" refusal is asked again within ``timeout``.
    Raises Timeout when the guest did not release it (it is still attached), and
    LibvirtFailure on DEVICE_REMOVAL_FAILED or when the domain stopped meanwhile. A libvirtd
    that restarts during the wait is reconnected to within ``timeout`` and the wait goes on
    (ConnectionLost, saying the request is pending, when it does not come back). A driver
    without removal events (Xen) is asked with the device's XML and answers when the call returns.
    """
    start = time.monotonic()
    deadline = start + timeout
    # A caller that waited before (an attach's guest check) may hold a connection libvirtd closed meanwhile.
    reopen_if_lost(conn, deadline, during=f"the detach of {alias}")
    if not flavor_of(conn).removal_event:
        return Released(_detach_live_sync(dom, alias, timeout=timeout), False)
    uuid, dom_id = dom.UUIDString(), dom.ID()
    with DeviceRemovalWaiter(conn, dom, alias) as waiter:  # registered before asking
        since = pending.pending_since(uuid, dom_id, alias)
        was_pending = since is not None
        refusals = 0
        if not was_pending:
            pending.record(uuid, dom_id, alias)
            since = time.time()
            try:
                refusals = _ask(dom, alias, deadline)
            except errors.ConnectionLost:
                # Whether libvirtd got the request is unknown: it stays recorded (never re-sent) and the
                # wait below, on a reopened connection, finds out what became of the device.
                pass
            except errors.VhotplugError:
                pending.clear(uuid, alias)
                raise
        # An earlier request may have completed before this waiter existed: libvirt
        # drops the device from the live XML before it emits the event, so a check
        # made after registering cannot miss it.
        try:
            outcome = ("removed" if was_pending and not is_attached(dom, alias, deadline=deadline)
                       else waiter.wait(max(0.0, deadline - time.monotonic())))
        except errors.ConnectionLost as exc:
            raise errors.ConnectionLost(
                f"{exc.message}: whether the guest released {alias} is unknown; the detach request "
                f"(sent {time.time() - since:.0f} s ago) stays pending",
                hint="`vhotplug detach` again, once libvirtd answers, waits for that request without re-sending",
            ) from exc
    elapsed = time.monotonic() - start
    if outcome == "stopped" or not still_running(dom):
        pending.clear(uuid, alias)
        raise errors.LibvirtFailure(
            f"the domain stopped while the guest was releasing {alias}: the device went with the running "
            "domain (its definition, if it has one, is unchanged)")
    still_there = is_attached(dom, alias, deadline=deadline)
    if outcome == "failed" and still_there:
        pending.clear(uuid, alias)
        raise errors.LibvirtFailure(f"the guest refused to release {alias} (DEVICE_REMOVAL_FAILED): "
                                    "it is still attached")
    if still_there:
        asked = f" (asked {time.time() - since:.0f} s ago, not re-sent)" if was_pending else ""
        raise errors.Timeout(
            f"the guest did not release {alias} within {timeout:g} s{asked}: it is still attached"
            + (_reconnected(waiter.reconnects)),
            hint="the request stays pending; `vhotplug detach` again waits for it without re-sending",
        )
    pending.clear(uuid, alias)
    return Released(elapsed, was_pending, refusals, waiter.reconnects)


def _reconnected(times: int) -> str:
    return f" (libvirtd went away and was reconnected to {times}x meanwhile)" if times else ""


def _detach_live_sync(dom: libvirt.virDomain, alias: str, *, timeout: float) -> float:
    """Detach by full XML (no alias API) and confirm in the live XML: libxl removes it within the call."""
    try:
        element = find_device(dom.XMLDesc(0), alias)[1]
    except libvirt.libvirtError as exc:
        raise translate(exc) from exc
    start = time.monotonic()
    try:
        dom.detachDeviceFlags(etree.tostring(element, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError as exc:
        raise translate(exc, f"detaching {alias}") from exc
    deadline = start + timeout
    while is_attached(dom, alias):
        if time.monotonic() >= deadline:
            raise errors.Timeout(f"{alias} was still in the live XML {timeout:g} s after the detach call returned",
                                 hint="`vhotplug detach` again asks once more")
        time.sleep(SYNC_POLL)  # bounded by the deadline; no event exists to wait on
    return time.monotonic() - start


def remove_from_config(conn: libvirt.virConnect, dom: libvirt.virDomain, alias: str) -> None:
    """Remove device ``alias`` from the persistent definition (by alias, or by its XML where there is no alias API)."""
    if flavor_of(conn).detach_by_alias:
        dom.detachDeviceAlias(alias, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        return
    try:
        element = find_device(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), alias)[1]
    except errors.DeviceNotFound:
        return  # not there: nothing to remove
    dom.detachDeviceFlags(etree.tostring(element, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_CONFIG)


def _find_first(xml: str, refs: list[str]) -> etree._Element:
    for ref in refs:
        try:
            return find_device(xml, ref)[1]
        except errors.DeviceNotFound:
            continue
    raise errors.DeviceNotFound(f"none of {refs} found")


def _completed_earlier(dom: libvirt.virDomain, ref: str) -> str | None:
    """The alias of an earlier pending detach of ``ref`` that the guest has completed since, if any."""
    uuid, dom_id = dom.UUIDString(), dom.ID()
    for alias in (ref, f"ua-{ref}"):
        if pending.pending_since(uuid, dom_id, alias) is not None:
            pending.clear(uuid, alias)
            return alias
    return None


def is_attached(dom: libvirt.virDomain, alias: str, *, inactive: bool = False, deadline: float | None = None) -> bool:
    """True when device ``alias`` is in the live XML (or, ``inactive``, the persistent definition).

    A lost connection is reopened first, until ``deadline`` when given (so the answer is libvirt's current one).
    """
    if deadline is not None:
        reopen_if_lost(dom, deadline, during=f"looking for {alias}")
    try:
        find_device(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0), alias)
    except errors.DeviceNotFound:
        return False
    except libvirt.libvirtError as exc:
        raise translate(exc) from exc
    return True


def detach_device(conn: libvirt.virConnect, dom: libvirt.virDomain, ref: str, *, live: bool, config: bool,
                  session: GuestSession | None, timeout: float, identity: Identity | None = None) -> DetachOutcome:
    """Detach the device ``ref`` names from the live domain and/or its definition.

    The live part goes first and must succeed before the definition is changed,
    so a guest that does not let go leaves both as they were.
    """
    try:
        xml = dom.XMLDesc(0 if live else libvirt.VIR_DOMAIN_XML_INACTIVE)
        config_xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) if config else ""
    except libvirt.libvirtError as exc:
        raise translate(exc) from exc
    try:
        device, element = find_device(xml, ref)
    except errors.DeviceNotFound:
        done = _completed_earlier(dom, ref) if live else None
        if done is None:
            raise
        return DetachOutcome(done, "device", "-", live=True, config=False, was_pending=True)
    config_element = None
    if config:
        # Only user aliases (ua-*) are stored in the definition; libvirt's own (net0) are live-only,
        # so the definition's copy is found by alias first, then by what identifies it (MAC, target).
        refs = [device.alias, device.identity] if live else [ref]
        try:
            config_element = _find_first(config_xml, [r for r in refs if r not in ("", "-")])
        except errors.DeviceNotFound as exc:
            raise errors.DeviceNotFound(f"{ref!r} is not in the persistent definition",
                                        hint="use --live to detach it from the running guest only") from exc
    identity = identity or identity_of(device, element)
    libvirt_seconds, seen, gone_after = None, None, None
    released = Released(0.0, False)
    if live:
        watch = (start_watch(session, identity, present=False, timeout=timeout, worth_it=lambda: still_running(dom))
                 if session and identity else None)
        asked = time.monotonic()
        try:
            released = detach_live(conn, dom, device.alias, timeout=timeout)
            libvirt_seconds = released.seconds
        except BaseException:
            if watch:
                watch.cancel()
            raise
        if watch:
            try:
                seen = watch.result()
            except errors.GuestUnreachable as exc:
                raise errors.GuestUnreachable(
                    f"{exc.message}; libvirt removed {device.alias} (gone from the live XML), the guest could "
                    "not be asked whether it is gone there too") from exc
            gone_after = max(0.0, watch.started_at + seen.guest_seconds - asked)
    if config_element is not None:
        try:
            dom.detachDeviceFlags(etree.tostring(config_element, encoding="unicode"),
                                  libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        except libvirt.libvirtError as exc:
            raise translate(exc, f"removing {device.alias} from the persistent definition") from exc
    ident = identity.value if identity else device.identity
    return DetachOutcome(device.alias, device.kind, ident, live, config, libvirt_seconds, released.was_pending, seen,
                         gone_after, released.busy_refusals, released.reconnects)
