"""Attach a device, then prove it in the guest; roll back if the guest never shows it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import libvirt
from lxml import etree

from vhotplug import errors
from vhotplug.guest.ssh import GuestSession
from vhotplug.guest.watch import Identity, Seen, start_watch
from vhotplug.ops.detach import detach_live, is_attached, remove_from_config
from vhotplug.virt.connection import RECONNECT_WINDOW, domain_xml, reopen_if_lost, still_running
from vhotplug.virt.devices import find_device
from vhotplug.virt.errors import translate
from vhotplug.virt.flavor import flavor_of


@dataclass(frozen=True)
class AttachOutcome:
    alias: str
    kind: str
    identity: str
    address: str  # guest address libvirt gave it ("-" for a config-only attach, or none shown: Xen PV)
    libvirt_seconds: float  # the attach call itself
    guest: Seen | None = None
    guest_seen_seconds: float | None = None  # attach call -> the guest showed it (guest clock)
    verified_seconds: float | None = None  # attach call -> vhotplug knew
    live: bool = True  # the running domain got it (else only its definition)

    def to_dict(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "alias": self.alias, "kind": self.kind, "identity": self.identity, "address": self.address,
            "libvirt_seconds": round(self.libvirt_seconds, 4),
        }
        if self.guest is not None:
            doc["guest"] = {"name": self.guest.name, "driver": self.guest.driver, **self.guest.detail}
            doc["guest_seen_seconds"] = round(self.guest_seen_seconds or 0.0, 4)
            doc["verified_seconds"] = round(self.verified_seconds or 0.0, 4)
        return doc


def attach_device(conn: libvirt.virConnect, dom: libvirt.virDomain, device: etree._Element, *, flags: int,
                  identity: Identity | None, session: GuestSession | None, timeout: float,
                  before_attach: Callable[[], None] | None = None) -> AttachOutcome:
    """Attach ``device`` with ``flags``; with a ``session``, wait until the guest shows ``identity``.

    The guest watch starts before the attach (so nothing is missed); if the guest
    does not show the device in time, the device is detached again and Timeout raised.
    ``before_attach`` runs just before the libvirt call (the passthrough journal's write-ahead step).
    """
    xml = etree.tostring(device, encoding="unicode")
    alias_el = device.find("alias")
    alias = alias_el.get("name", "") if alias_el is not None else ""
    watch = (start_watch(session, identity, present=True, timeout=timeout, worth_it=lambda: still_running(dom))
             if session and identity else None)
    try:
        if before_attach is not None:
            before_attach()
        called = time.monotonic()
        try:
            dom.attachDeviceFlags(xml, flags)
        except errors.ConnectionLost as exc:
            attached_after_all(dom, alias, flags, timeout, exc)  # or raises: it did not happen
    except libvirt.libvirtError as exc:
        if watch:
            watch.cancel()
        err = translate(exc, f"attaching {device.tag} {alias}")
        if flavor_of(conn).name == "xen" and err.hint is None:
            # libxl's own error says only "failed"; its reason (a missing image or bridge, ...) is logged.
            err.hint = ("libxl logs the reason on the Xen host, in /var/log/libvirt/libxl/libxl-driver.log "
                        "(e.g. an image path or bridge that does not exist there)")
        raise err from exc
    except BaseException:
        if watch:
            watch.cancel()
        raise
    libvirt_seconds = time.monotonic() - called
    live = bool(flags & libvirt.VIR_DOMAIN_AFFECT_LIVE) or (flags == 0 and dom.isActive())
    address = "-"
    if live:
        with contextlib.suppress(errors.DeviceNotFound):  # already gone again: the verify will say so
            address = find_device(domain_xml(dom), alias)[0].address
    shown = identity.value if identity else "-"
    if watch is None:
        return AttachOutcome(alias, device.tag, shown, address, libvirt_seconds, live=live)
    try:
        seen = watch.result()
    except errors.GuestUnreachable as exc:
        if not still_running(dom):  # QEMU ended (killed, crashed, destroyed) while the guest was checked
            kept = " (the definition keeps it)" if flags & libvirt.VIR_DOMAIN_AFFECT_CONFIG else ""
            raise errors.LibvirtFailure(
                f"the domain stopped while the guest was being checked for {device.tag} {alias}: the device went "
                f"with the running domain{kept}") from exc
        # Not rolled back: the guest could not be asked, and libvirt says the device is there.
        where = f" at {address}" if address != "-" else ""
        raise errors.GuestUnreachable(
            f"{exc.message}; libvirt shows {device.tag} {alias} attached{where}: left attached, unverified",
            hint=f"`vhotplug list DOMAIN --guest` shows it once the guest answers; `vhotplug detach DOMAIN {alias}` "
                 "removes it",
        ) from exc
    except errors.Timeout as exc:
        _roll_back(conn, dom, alias, flags, timeout)
        raise errors.Timeout(
            f"the guest did not show {device.tag} {alias} ({shown}) within {timeout:g} s; "
            "it was detached again (rolled back)",
            hint="check the guest's drivers (`vhotplug list DOMAIN --guest`) or raise --timeout",
        ) from exc
    verified = time.monotonic() - called
    seen_after = watch.started_at + seen.guest_seconds - called
    return AttachOutcome(alias, device.tag, shown, address, libvirt_seconds, seen,
                         max(0.0, seen_after), verified, live)


def attached_after_all(dom: libvirt.virDomain, alias: str, flags: int, timeout: float,
                       lost: errors.ConnectionLost) -> None:
    """libvirtd went away during the attach call: reconnect and read back whether the device is there.

    Returns when it is (the verify goes on as usual); raises LibvirtFailure saying nothing changed when not.
    """
    deadline = time.monotonic() + max(timeout, RECONNECT_WINDOW)
    try:
        reopen_if_lost(dom, deadline, during=f"the attach of {alias}")
        live = bool(flags & libvirt.VIR_DOMAIN_AFFECT_LIVE) or (flags == 0 and dom.isActive())
        there = is_attached(dom, alias, inactive=not live, deadline=deadline)
    except errors.ConnectionLost as exc:
        raise errors.ConnectionLost(f"{exc.message}: whether {alias} was attached is unknown",
                                    hint=f"once libvirtd answers, `vhotplug list DOMAIN` shows whether {alias} "
                                         "is there") from lost
    if not there:
        raise errors.LibvirtFailure(f"libvirtd went away during the attach of {alias}; reconnected, "
                                    f"{alias} is not attached: nothing changed") from lost


#: A rollback waits at least this long for the guest to let go: a short --timeout was for seeing the device.
ROLLBACK_TIMEOUT = 30.0


def _roll_back(conn: libvirt.virConnect, dom: libvirt.virDomain, alias: str, flags: int, timeout: float) -> None:
    try:
        detach_live(conn, dom, alias, timeout=max(timeout, ROLLBACK_TIMEOUT))
        if flags & libvirt.VIR_DOMAIN_AFFECT_CONFIG:
            remove_from_config(conn, dom, alias)
    except (errors.VhotplugError, libvirt.libvirtError) as exc:
        if not flags & libvirt.VIR_DOMAIN_AFFECT_CONFIG and not still_running(dom):
            return  # the domain stopped meanwhile (destroyed, crashed): the device went with it
        raise errors.VhotplugError(
            f"the guest did not show {alias} and rolling it back failed too: {exc}",
            hint=f"the device may still be attached: `vhotplug detach DOMAIN {alias}`",
        ) from exc
