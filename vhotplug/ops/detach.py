"""Detach that really waits: event registered first, never re-sent, confirmed in the live XML and the guest."""

from __future__ import annotations

import time
from dataclasses import dataclass

import libvirt
from lxml import etree

from vhotplug import errors
from vhotplug.guest.ssh import GuestSession
from vhotplug.guest.watch import Identity, Seen, start_watch
from vhotplug.virt import pending
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

    def to_dict(self) -> dict[str, object]:
        doc: dict[str, object] = {"alias": self.alias, "kind": self.kind, "identity": self.identity,
                                  "live": self.live, "config": self.config, "was_pending": self.was_pending}
        if self.libvirt_seconds is not None:
            doc["libvirt_seconds"] = round(self.libvirt_seconds, 4)
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


def detach_live(conn: libvirt.virConnect, dom: libvirt.virDomain, alias: str, *,
                timeout: float) -> tuple[float, bool]:
    """Ask the running guest to release ``alias`` and wait for the outcome.

    Returns (seconds until removed, whether an earlier request was still pending).
    Raises Timeout when the guest did not release it (it is still attached), and
    LibvirtFailure on DEVICE_REMOVAL_FAILED. A driver without removal events (Xen) is
    asked with the device's XML and answers when the call returns.
    """
    if not flavor_of(conn).removal_event:
        return _detach_live_sync(dom, alias, timeout=timeout), False
    uuid, dom_id = dom.UUIDString(), dom.ID()
    start = time.monotonic()
    with DeviceRemovalWaiter(conn, dom, alias) as waiter:  # registered before asking
        since = pending.pending_since(uuid, dom_id, alias)
        was_pending = since is not None
        if not was_pending:
            pending.record(uuid, dom_id, alias)
            try:
                dom.detachDeviceAlias(alias, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            except libvirt.libvirtError as exc:
                pending.clear(uuid, alias)
                raise translate(exc, f"detaching {alias}") from exc
        # An earlier request may have completed before this waiter existed: libvirt
        # drops the device from the live XML before it emits the event, so a check
        # made after registering cannot miss it.
        outcome = "removed" if was_pending and not is_attached(dom, alias) else waiter.wait(timeout)
    elapsed = time.monotonic() - start
    still_there = is_attached(dom, alias)
    if outcome == "failed" and still_there:
        pending.clear(uuid, alias)
        raise errors.LibvirtFailure(f"the guest refused to release {alias} (DEVICE_REMOVAL_FAILED): "
                                    "it is still attached")
    if still_there:
        asked = f" (asked {time.time() - since:.0f} s ago, not re-sent)" if since is not None else ""
        raise errors.Timeout(
            f"the guest did not release {alias} within {timeout:g} s{asked}: it is still attached",
            hint="the request stays pending; `vhotplug detach` again waits for it without re-sending",
        )
    pending.clear(uuid, alias)
    return elapsed, was_pending


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


def is_attached(dom: libvirt.virDomain, alias: str, *, inactive: bool = False) -> bool:
    """True when device ``alias`` is in the live XML (or, ``inactive``, the persistent definition)."""
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
    libvirt_seconds, was_pending, seen, gone_after = None, False, None, None
    if live:
        watch = start_watch(session, identity, present=False, timeout=timeout) if session and identity else None
        asked = time.monotonic()
        try:
            libvirt_seconds, was_pending = detach_live(conn, dom, device.alias, timeout=timeout)
        except BaseException:
            if watch:
                watch.cancel()
            raise
        if watch:
            seen = watch.result()
            gone_after = max(0.0, watch.started_at + seen.guest_seconds - asked)
    if config_element is not None:
        try:
            dom.detachDeviceFlags(etree.tostring(config_element, encoding="unicode"),
                                  libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        except libvirt.libvirtError as exc:
            raise translate(exc, f"removing {device.alias} from the persistent definition") from exc
    ident = identity.value if identity else device.identity
    return DetachOutcome(device.alias, device.kind, ident, live, config, libvirt_seconds, was_pending, seen,
                         gone_after)
