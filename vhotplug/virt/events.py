"""libvirt's event loop in a background thread, and waiters for device-removal events.

The default event implementation must be registered before the connection is
opened; ``open_connection`` does that. Waiters are registered *before* the
action they wait for (Nova's pattern), so an event can never be missed.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Literal

import libvirt
from lxml import etree

_lock = threading.Lock()
_started = False

Outcome = Literal["removed", "failed", "timeout", "stopped"]


def ensure_event_loop() -> None:
    """Register libvirt's default event loop once and run it in a daemon thread."""
    global _started
    with _lock:
        if _started:
            return
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run, name="libvirt-events", daemon=True).start()
        _started = True


def _run() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


class DeviceRemovalWaiter:
    """Waits for DEVICE_REMOVED or DEVICE_REMOVAL_FAILED of one or more device aliases of one domain.

    One registration per event for all aliases: libvirt refuses a second registration of
    the same callback on the same domain ("event callback already tracked").

    It also wakes when the domain stops (QEMU ended: outcome "stopped", the devices went with it) and when
    the connection closes under it (libvirtd restarted): given a reopenable connection
    (``virt.connection.Connection``), ``wait`` connects again within the same bound, registers again and
    looks at the live XML for what it missed meanwhile (``present``), so a restart costs no event.
    """

    def __init__(self, conn: libvirt.virConnect, dom: libvirt.virDomain, *aliases: str,
                 present: Callable[[str], bool] | None = None) -> None:
        self.aliases = set(aliases)
        self.outcomes: dict[str, Outcome] = {}
        self.stopped = False
        self.reconnects = 0
        self._done = threading.Event()
        self._conn = conn
        self._dom = dom
        self._present = present or self._in_live_xml
        self._ids: list[int] = []
        self._register()
        on_close = getattr(conn, "on_close", None)  # a reopenable Connection tells when it closes
        self._unlisten = on_close(self._done.set) if on_close is not None else None

    def _register(self) -> None:
        conn, dom = self._conn, self._dom
        self._ids = [
            conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_removed, None),
            conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED, self._on_failed, None),
            conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None),
        ]

    def _record(self, alias: str, outcome: Outcome) -> None:
        if alias in self.aliases:
            self.outcomes[alias] = outcome
            if set(self.outcomes) == self.aliases:
                self._done.set()

    def _on_removed(self, _conn: object, _dom: object, alias: str, _opaque: object) -> None:
        self._record(alias, "removed")

    def _on_failed(self, _conn: object, _dom: object, alias: str, _opaque: object) -> None:
        self._record(alias, "failed")

    def _on_lifecycle(self, _conn: object, _dom: object, event: int, _detail: int, _opaque: object) -> None:
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            self.stopped = True
            self._done.set()

    def _in_live_xml(self, alias: str) -> bool:
        root = etree.fromstring(self._dom.XMLDesc(0).encode())
        return bool(root.xpath("devices/*/alias[@name=$a]", a=alias))

    @property
    def outcome(self) -> Outcome:
        """The worst outcome so far over all aliases: failed, then timeout (still waiting), then removed;
        "stopped" when the domain stopped first."""
        if "failed" in self.outcomes.values():
            return "failed"
        if set(self.outcomes) == self.aliases:
            return "removed"
        return "stopped" if self.stopped else "timeout"

    def _lost(self) -> bool:
        alive = getattr(self._conn, "alive", None)
        return alive is not None and not alive()

    def wait(self, timeout: float) -> Outcome:
        """Wait until every alias has an outcome (or the domain stopped), or ``timeout`` seconds; return
        ``outcome``. A lost connection is reopened within the same ``timeout`` (ConnectionLost if not)."""
        deadline = time.monotonic() + timeout
        while True:
            self._done.wait(max(0.0, deadline - time.monotonic()))
            if self.outcome != "timeout" or not self._lost():
                return self.outcome
            self._done.clear()
            self._ids = []  # they died with the old connection
            self._conn.reopen(deadline, during=f"the wait for {', '.join(sorted(self.aliases))}")
            self.reconnects += 1
            self._register()  # registered again before looking, so nothing falls in between
            if not self._dom.isActive():
                self.stopped = True
            for alias in self.aliases - set(self.outcomes):
                if not self._present(alias):
                    self._record(alias, "removed")

    def close(self) -> None:
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        for cb_id in self._ids:
            # A connection that is already gone has nothing left to deregister.
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.domainEventDeregisterAny(cb_id)
        self._ids = []

    def __enter__(self) -> DeviceRemovalWaiter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
