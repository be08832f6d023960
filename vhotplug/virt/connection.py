"""The libvirt connection and domain lookup, with virsh's conventions.

The URI is ``-c/--connect``, else ``LIBVIRT_DEFAULT_URI`` (libvirt reads it
itself when given ``None``), else libvirt's default. Domains are named like in
virsh: by id, UUID or name.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import libvirt

from vhotplug import errors
from vhotplug.virt.errors import silence_default_handler, translate
from vhotplug.virt.events import ensure_event_loop


def open_connection(uri: str | None) -> libvirt.virConnect:
    """Open a read-write connection; raise ConnectionFailed with the URI in the message."""
    silence_default_handler()
    ensure_event_loop()  # must precede open() for this connection to deliver events
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        shown = uri or "the default URI"
        raise errors.ConnectionFailed(
            f"cannot connect to {shown}: {exc.get_error_message() or exc}",
            hint="check -c/--connect or LIBVIRT_DEFAULT_URI, and that libvirtd is running",
        ) from exc
    if conn is None:  # pragma: no cover - old bindings returned None instead of raising
        raise errors.ConnectionFailed(f"cannot connect to {uri or 'the default URI'}")
    return conn


@contextlib.contextmanager
def connection(uri: str | None) -> Iterator[libvirt.virConnect]:
    """Open a connection for the duration of a command and close it afterwards."""
    conn = open_connection(uri)
    try:
        yield conn
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def lookup_domain(conn: libvirt.virConnect, ident: str) -> libvirt.virDomain:
    """Find a domain by id, UUID or name, in that order (as virsh does)."""
    ident = ident.strip()
    if not ident:
        raise errors.InvalidRequest("domain name must not be empty")
    attempts = []
    if ident.isdigit():
        attempts.append(lambda: conn.lookupByID(int(ident)))
    with contextlib.suppress(ValueError):
        uuid.UUID(ident)
        attempts.append(lambda: conn.lookupByUUIDString(ident))
    attempts.append(lambda: conn.lookupByName(ident))
    for attempt in attempts:
        try:
            return attempt()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise translate(exc, f"looking up domain {ident!r}") from exc
    raise errors.DomainNotFound(f"domain not found: no domain with matching name, id or UUID {ident!r}")


def affect_flags(*, live: bool, config: bool, current: bool, persistent: bool = False,
                 running: bool) -> int:
    """Compute VIR_DOMAIN_AFFECT_* flags from virsh-style options, in one place.

    As in virsh: ``--persistent`` is config plus live when the domain runs;
    ``--current`` (also: no option) is live if running, else config;
    ``--current`` cannot be combined with the others; ``--live`` needs a running domain.
    """
    if current and (live or config or persistent):
        raise errors.InvalidRequest("--current cannot be combined with --live, --config or --persistent")
    if persistent:
        config = True
        live = live or running
    if live and not running:
        raise errors.OperationInvalid("--live needs a running domain; use --config to change the definition")
    flags = 0
    if live:
        flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
    if config:
        flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
    return flags  # 0 == VIR_DOMAIN_AFFECT_CURRENT


def domain_xml(dom: libvirt.virDomain, *, inactive: bool = False) -> str:
    """The domain's XML: live when running (unless ``inactive``), else the definition."""
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
    try:
        return dom.XMLDesc(flags)
    except libvirt.libvirtError as exc:
        raise translate(exc, f"reading the XML of {dom.name()}") from exc


def is_running(dom: libvirt.virDomain) -> bool:
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError as exc:
        raise translate(exc) from exc


def still_running(dom: libvirt.virDomain) -> bool:
    """Whether the domain runs now; False too when it vanished meanwhile (for waits and rollbacks)."""
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False


@dataclass(frozen=True)
class Affect:
    """What a change touches: the libvirt flags, and whether that means the live domain and/or its definition."""

    flags: int
    live: bool
    config: bool


def resolve_affect(dom: libvirt.virDomain, *, live: bool, config: bool, current: bool,
                   persistent: bool = False) -> Affect:
    """``affect_flags`` for ``dom``'s state, with ``--current`` (flags 0) spelled out as live or config."""
    running = is_running(dom)
    flags = affect_flags(live=live, config=config, current=current, persistent=persistent, running=running)
    return Affect(flags,
                  live=bool(flags & libvirt.VIR_DOMAIN_AFFECT_LIVE) or (flags == 0 and running),
                  config=bool(flags & libvirt.VIR_DOMAIN_AFFECT_CONFIG) or (flags == 0 and not running))
