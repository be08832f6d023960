"""The libvirt connection and domain lookup, with virsh's conventions.

The URI is ``-c/--connect``, else ``LIBVIRT_DEFAULT_URI`` (libvirt reads it
itself when given ``None``), else libvirt's default. Domains are named like in
virsh: by id, UUID or name.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import libvirt

from vhotplug import errors
from vhotplug.virt.errors import silence_default_handler, translate
from vhotplug.virt.events import ensure_event_loop

#: How long a lost connection is tried again when no --timeout bounds the wait (a plain XML read, say).
RECONNECT_WINDOW = 30.0
#: Pause between two attempts to reopen (doubling from the first up to the last).
RECONNECT_BACKOFF = (0.1, 2.0)

# Domain methods that only read: after a lost connection they are asked again on the reopened one.
_READS = frozenset({"XMLDesc", "isActive", "info", "state", "vcpusFlags", "maxMemory", "memoryStats",
                    "isPersistent", "hasManagedSaveImage", "metadata", "interfaceAddresses", "getCPUStats"})


# Connection methods asked again on a reopened connection: lookups, reads, and registering for events (the
# registration died with the old connection; making it again changes nothing in a domain).
_CONN_AGAIN = frozenset({"lookupByName", "lookupByUUIDString", "lookupByID", "getType", "getMaxVcpus",
                         "getCapabilities", "getLibVersion", "getVersion", "getHostname", "listAllDomains",
                         "nodeDeviceLookupByName", "listAllDevices", "domainEventRegisterAny"})


def _open(uri: str | None) -> libvirt.virConnect:
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


class Connection:
    """A libvirt connection that survives a libvirtd restart: reopened on demand, within a bound.

    Everything else is libvirt's ``virConnect`` (attribute access goes to the current one), so every layer
    uses it as one. libvirt's close callback marks it lost the moment the daemon goes away and wakes whoever
    waits on it (``on_close``); ``reopen`` connects again with backoff until a deadline, after which domains
    looked up through it (``Domain``) are found again by UUID. Nothing is ever re-sent on the caller's
    behalf: only reads are asked again (``_READS``); a change whose answer was lost raises ConnectionLost,
    and the caller re-reads the state to learn what happened.
    """

    def __init__(self, uri: str | None, conn: libvirt.virConnect) -> None:
        self._conn = conn
        # The URI libvirt resolved (the default one included), so a reopen reaches the same daemon.
        with contextlib.suppress(libvirt.libvirtError):
            uri = conn.getURI() or uri
        self.uri = uri
        self.generation = 0  # bumped by each reopen
        self.reconnects = 0
        self._lost = threading.Event()
        self._listeners: list[Callable[[], None]] = []
        self._watch_close()

    def __getattr__(self, name: str) -> Any:
        # Calls on a dead connection: lookups and event registrations go to a reopened one (a Domain given as
        # an argument finds itself again there); anything else raises ConnectionLost, never re-sent.
        attr = getattr(self._conn, name)
        if name.startswith("_") or not callable(attr):
            return attr
        return _guarded(self, name, _CONN_AGAIN, lambda: self._conn)

    def _watch_close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError, AttributeError):
            self._conn.registerCloseCallback(self._closed, None)

    def _closed(self, _conn: object, _reason: int, _opaque: object) -> None:
        self._lost.set()
        for listener in list(self._listeners):
            listener()

    def on_close(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` (from libvirt's event thread) when the connection closes; returns the remover."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    @property
    def raw(self) -> libvirt.virConnect:
        """The current libvirt connection itself."""
        return self._conn

    def alive(self) -> bool:
        if self._lost.is_set():
            return False
        try:
            return bool(self._conn.isAlive())
        except libvirt.libvirtError:
            return False

    def reopen(self, deadline: float, *, during: str = "") -> None:
        """Connect again (libvirtd restarted or its socket closed), trying with backoff until ``deadline``.

        Raises ConnectionLost when libvirtd does not answer by then.
        """
        pause, longest = RECONNECT_BACKOFF
        last = ""
        while True:
            try:
                conn = _open(self.uri)
            except errors.ConnectionFailed as exc:
                last = exc.message
            else:
                old, self._conn = self._conn, conn
                self._lost.clear()
                self.generation += 1
                self.reconnects += 1
                with contextlib.suppress(libvirt.libvirtError, AttributeError):
                    old.unregisterCloseCallback()
                with contextlib.suppress(libvirt.libvirtError):
                    old.close()
                self._watch_close()
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                what = f" during {during}" if during else ""
                raise errors.ConnectionLost(f"lost the connection to libvirtd at {self.uri}{what} and it did not "
                                            f"come back in time ({last})")
            time.sleep(min(pause, remaining))  # bounded by the deadline; nothing to wait on while it is down
            pause = min(pause * 2, longest)

    def ensure(self, deadline: float | None = None, *, during: str = "") -> bool:
        """Reopen if the connection was lost; True when it had to (the caller's view may be stale)."""
        if self.alive():
            return False
        self.reopen(deadline if deadline is not None else time.monotonic() + RECONNECT_WINDOW, during=during)
        return True

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError, AttributeError):
            self._conn.unregisterCloseCallback()
        self._conn.close()


class Domain:
    """A domain looked up through a ``Connection``: found again by UUID after a reopen, reads asked again.

    A change made through it (attach, detach, setVcpus…) whose connection died raises ConnectionLost
    (never re-sent: it may have happened); the caller re-reads the state.
    """

    def __init__(self, conn: Connection, dom: libvirt.virDomain) -> None:
        self._vh_conn = conn
        self._vh_dom = dom
        self._vh_generation = conn.generation
        self._vh_uuid = dom.UUIDString()

    @property
    def raw(self) -> libvirt.virDomain:
        """The current libvirt domain object (found again after a reopen)."""
        if self._vh_generation != self._vh_conn.generation:
            try:
                self._vh_dom = self._vh_conn.raw.lookupByUUIDString(self._vh_uuid)
            except libvirt.libvirtError as exc:
                raise translate(exc, f"finding domain {self._vh_uuid} again after reconnecting") from exc
            self._vh_generation = self._vh_conn.generation
        return self._vh_dom

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.raw, name)
        if name.startswith("_") or not callable(attr):
            return attr  # e.g. _o, which libvirt's own wrappers read when given this object
        return _guarded(self._vh_conn, name, _READS, lambda: self.raw)


def _guarded(conn: Connection, name: str, again: frozenset[str], target: Callable[[], Any]) -> Callable[..., Any]:
    """``target().name`` that outlives a lost connection: asked again on a reopened one when ``name`` is in
    ``again`` (reads, lookups), else ConnectionLost (it may have happened: the caller reads the state)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(target(), name)(*args, **kwargs)
        except libvirt.libvirtError as exc:
            if conn.alive():
                raise
            if name not in again:
                raise errors.ConnectionLost(f"lost the connection to libvirtd at {conn.uri} while asking {name}: "
                                            f"{exc.get_error_message() or exc}") from exc
            conn.reopen(time.monotonic() + RECONNECT_WINDOW, during=name)
        return getattr(target(), name)(*args, **kwargs)

    return call


def open_connection(uri: str | None) -> Connection:
    """Open a read-write connection; raise ConnectionFailed with the URI in the message."""
    silence_default_handler()
    ensure_event_loop()  # must precede open() for this connection to deliver events (and its close callback)
    return Connection(uri, _open(uri))


@contextlib.contextmanager
def connection(uri: str | None) -> Iterator[Connection]:
    """Open a connection for the duration of a command and close it afterwards."""
    conn = open_connection(uri)
    try:
        yield conn
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def reopen_if_lost(obj: libvirt.virConnect | libvirt.virDomain, deadline: float, *, during: str = "") -> bool:
    """Reopen the reopenable connection behind ``obj`` (a ``Connection``, or a ``Domain`` found through one) if
    it was lost, until ``deadline``; True when it did. Plain libvirt objects (and test fakes) are left alone."""
    conn = obj._vh_conn if isinstance(obj, Domain) else obj
    return conn.ensure(deadline, during=during) if isinstance(conn, Connection) else False


def lookup_domain(conn: libvirt.virConnect, ident: str) -> libvirt.virDomain:
    """Find a domain by id, UUID or name, in that order (as virsh does)."""
    ident = ident.strip()
    if not ident:
        raise errors.InvalidRequest("domain name must not be empty")
    attempts = []
    # A domain id is a C int in libvirt: ASCII digits only (str.isdigit() also takes '²' and other scripts'
    # digits) and short enough for int() and for libvirt's binding (which overflowed on 99999999999).
    if ident.isascii() and ident.isdigit() and len(ident) <= 10 and int(ident) <= 2**31 - 1:
        attempts.append(lambda: conn.lookupByID(int(ident)))
    with contextlib.suppress(ValueError):
        uuid.UUID(ident)
        attempts.append(lambda: conn.lookupByUUIDString(ident))
    attempts.append(lambda: conn.lookupByName(ident))
    for attempt in attempts:
        try:
            found = attempt()
            return Domain(conn, found) if isinstance(conn, Connection) else found
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
    except (libvirt.libvirtError, errors.DomainNotFound):  # not found again after a reconnect: gone too
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
