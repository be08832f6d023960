"""libvirt's event loop in a background thread, and waiters for device-removal events.

The default event implementation must be registered before the connection is
opened; ``open_connection`` does that. Waiters are registered *before* the
action they wait for (Nova's pattern), so an event can never be missed.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Literal

import libvirt

_lock = threading.Lock()
_started = False

Outcome = Literal["removed", "failed", "timeout"]


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
    """

    def __init__(self, conn: libvirt.virConnect, dom: libvirt.virDomain, *aliases: str) -> None:
        self.aliases = set(aliases)
        self.outcomes: dict[str, Outcome] = {}
        self._done = threading.Event()
        self._conn = conn
        self._ids = [
            conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_removed, None),
            conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED, self._on_failed, None),
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

    @property
    def outcome(self) -> Outcome:
        """The worst outcome so far over all aliases: failed, then timeout (still waiting), then removed."""
        if "failed" in self.outcomes.values():
            return "failed"
        return "removed" if set(self.outcomes) == self.aliases else "timeout"

    def wait(self, timeout: float) -> Outcome:
        """Wait until every alias has an outcome, or ``timeout`` seconds; return ``outcome``."""
        self._done.wait(timeout)
        return self.outcome

    def close(self) -> None:
        for cb_id in self._ids:
            # A connection that is already gone has nothing left to deregister.
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.domainEventDeregisterAny(cb_id)
        self._ids = []

    def __enter__(self) -> DeviceRemovalWaiter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
