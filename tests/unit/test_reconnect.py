"""A libvirtd that restarts under a command: the reopenable connection, the removal wait that survives it, and
the attach whose answer was lost. The fake daemon behaves as libvirtd did on the lab: a restart closes every
client connection (its close callback fires, every call then fails with "client socket is closed"), events
sent while a client is disconnected are lost to it, and the domain's state lives on in the daemon.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import libvirt
import pytest
from lxml import etree

from tests.unit.fakevirt import libvirt_error
from vhotplug import errors
from vhotplug.devices.dimm import DimmSpec
from vhotplug.ops import attach as attach_mod
from vhotplug.ops.detach import detach_live
from vhotplug.ops.memory import add_dimm
from vhotplug.ops.vcpu import set_vcpus
from vhotplug.virt import connection as connmod
from vhotplug.virt import pending
from vhotplug.virt.connection import Connection, Domain, lookup_domain

UUID = "6f1c6cba-57f0-4e53-b9a8-2f1b1d2f0a11"
URI = "fake:///system"


class FakeDaemon:
    """libvirtd: one domain whose live XML holds device aliases; clients come and go with restarts."""

    def __init__(self) -> None:
        self.up = True
        self.aliases = {"ua-nic0"}
        self.running = True
        self.clients: list[FakeConn] = []
        self.requests: list[str] = []  # every change a client asked for, in order
        self.opens = 0
        self.vcpus = 1

    def connect(self, uri: str | None) -> FakeConn:
        if not self.up:
            raise libvirt_error("Failed to connect socket to '/run/libvirt/libvirt-sock': No such file or directory",
                                libvirt.VIR_ERR_SYSTEM_ERROR)
        self.opens += 1
        conn = FakeConn(self)
        self.clients.append(conn)
        return conn

    def stop(self) -> None:
        """libvirtd goes away: every client's socket closes (their close callbacks run, as from the event loop)."""
        self.up = False
        for client in self.clients:
            client.dead = True
            if client.close_cb is not None:
                client.close_cb(client, libvirt.VIR_CONNECT_CLOSE_REASON_EOF, None)
        self.clients = []

    def restart(self) -> None:
        """Down and straight up again (the clients stay disconnected until they reconnect)."""
        self.stop()
        self.up = True

    def emit(self, event: int, *args: object) -> None:
        for client in self.clients:
            for dom, ev, cb, opaque in list(client.callbacks.values()):
                if ev == event:
                    cb(client, dom, *args, opaque)

    def release(self, alias: str) -> None:
        """The guest lets go: gone from the live XML, then DEVICE_REMOVED to the clients connected now."""
        self.aliases.discard(alias)
        self.emit(libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, alias)

    def xml(self) -> str:
        root = etree.Element("domain")
        devices = etree.SubElement(root, "devices")
        for alias in sorted(self.aliases):
            iface = etree.SubElement(devices, "interface", type="user")
            etree.SubElement(iface, "mac", address="52:54:00:00:00:01")
            etree.SubElement(iface, "alias", name=alias)
        return etree.tostring(root, encoding="unicode")


class FakeConn:
    def __init__(self, daemon: FakeDaemon) -> None:
        self.daemon = daemon
        self.dead = False
        self.close_cb: Callable[..., None] | None = None
        self.callbacks: dict[int, tuple[object, int, Callable[..., None], object]] = {}

    def _check(self) -> None:
        if self.dead:
            raise libvirt_error("internal error: client socket is closed")

    def isAlive(self) -> int:
        return 0 if self.dead else 1

    def getURI(self) -> str:
        return URI

    def getType(self) -> str:
        self._check()
        return "QEMU"

    def registerCloseCallback(self, cb: Callable[..., None], opaque: object) -> int:
        self.close_cb = cb
        return 0

    def unregisterCloseCallback(self) -> int:
        self.close_cb = None
        return 0

    def lookupByName(self, name: str) -> FakeDom:
        self._check()
        return FakeDom(self)

    def lookupByUUIDString(self, uuid: str) -> FakeDom:
        self._check()
        if not self.daemon.running:
            raise libvirt_error("Domain not found", libvirt.VIR_ERR_NO_DOMAIN)
        return FakeDom(self)

    def domainEventRegisterAny(self, dom: object, event: int, cb: Callable[..., None], opaque: object) -> int:
        self._check()
        cb_id = len(self.callbacks) + 1
        self.callbacks[cb_id] = (dom, event, cb, opaque)
        return cb_id

    def domainEventDeregisterAny(self, cb_id: int) -> int:
        self._check()
        self.callbacks.pop(cb_id, None)
        return 0

    def close(self) -> int:
        self.dead = True
        return 0


class FakeDom:
    def __init__(self, conn: FakeConn) -> None:
        self.conn = conn

    def UUIDString(self) -> str:
        return UUID

    def ID(self) -> int:
        return 7

    def name(self) -> str:
        return "guest"

    def isActive(self) -> int:
        self.conn._check()
        return int(self.conn.daemon.running)

    def XMLDesc(self, flags: int = 0) -> str:
        self.conn._check()
        return self.conn.daemon.xml()

    def detachDeviceAlias(self, alias: str, flags: int) -> int:
        self.conn._check()
        self.conn.daemon.requests.append(f"detach {alias}")
        return 0

    def vcpusFlags(self, flags: int) -> int:
        self.conn._check()
        return 4 if flags & libvirt.VIR_DOMAIN_VCPU_MAXIMUM else self.conn.daemon.vcpus

    def setVcpusFlags(self, n: int, flags: int) -> int:
        self.conn._check()
        self.conn.daemon.requests.append(f"vcpus {n}")
        self.conn.daemon.vcpus = n
        return 0

    def attachDeviceFlags(self, xml: str, flags: int) -> int:
        self.conn._check()
        self.conn.daemon.requests.append("attach")
        self.conn.daemon.aliases.add(etree.fromstring(xml).find("alias").get("name"))
        return 0


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[FakeDaemon]:
    d = FakeDaemon()
    monkeypatch.setattr(connmod.libvirt, "open", d.connect)
    monkeypatch.setattr(connmod, "RECONNECT_BACKOFF", (0.01, 0.05))
    monkeypatch.setenv("VHOTPLUG_RUN_DIR", str(tmp_path / "run"))
    yield d


def soon(action: Callable[[], None], after: float = 0.05) -> threading.Thread:
    t = threading.Timer(after, action)
    t.start()
    return t


def opened(daemon: FakeDaemon) -> tuple[Connection, Domain]:
    conn = connmod.Connection(None, daemon.connect(None))
    dom = lookup_domain(conn, "guest")
    assert isinstance(dom, Domain)
    return conn, dom


def test_reads_are_asked_again_after_a_restart_and_the_domain_found_again(daemon: FakeDaemon) -> None:
    conn, dom = opened(daemon)
    assert conn.uri == URI  # the URI libvirt resolved, so a reopen reaches the same daemon
    daemon.stop()
    assert not conn.alive()
    soon(lambda: setattr(daemon, "up", True))
    assert "ua-nic0" in dom.XMLDesc(0)  # reopened within the window, found again by UUID
    assert conn.reconnects == 1 and conn.generation == 1 and daemon.opens == 2
    assert dom.raw.conn is conn.raw


def test_a_change_whose_answer_was_lost_is_never_sent_again(daemon: FakeDaemon) -> None:
    _conn, dom = opened(daemon)
    daemon.stop()
    daemon.up = True
    with pytest.raises(errors.ConnectionLost, match="while asking detachDeviceAlias"):
        dom.detachDeviceAlias("ua-nic0", libvirt.VIR_DOMAIN_AFFECT_LIVE)
    assert daemon.requests == []  # the dead socket took it; nothing re-sent behind the caller's back
    assert errors.ConnectionLost("x").exit_code == errors.ExitCode.CONNECTION


def test_detach_wait_survives_a_restart_and_sees_a_release_it_missed(daemon: FakeDaemon) -> None:
    """The reported case: libvirtd restarted during `detach --timeout 25`; the guest let go while it was down."""
    conn, dom = opened(daemon)

    def restart_and_release() -> None:
        daemon.stop()
        daemon.release("ua-nic0")  # no client connected: this DEVICE_REMOVED reaches nobody
        time.sleep(0.2)
        daemon.up = True

    soon(restart_and_release, 0.1)
    released = detach_live(conn, dom, "ua-nic0", timeout=10)
    assert not released.was_pending and 0.1 <= released.seconds < 5 and released.reconnects == 1
    assert daemon.requests == ["detach ua-nic0"]  # asked once, before the restart
    assert conn.reconnects == 1
    assert pending.pending_since(UUID, 7, "ua-nic0") is None


def test_detach_wait_gets_the_event_on_the_reopened_connection(daemon: FakeDaemon) -> None:
    conn, dom = opened(daemon)
    soon(daemon.restart, 0.05)
    soon(lambda: daemon.release("ua-nic0"), 0.6)  # after the reconnect: delivered by the new registration
    seconds = detach_live(conn, dom, "ua-nic0", timeout=10).seconds
    assert seconds >= 0.5 and daemon.requests == ["detach ua-nic0"] and conn.reconnects == 1


def test_a_guest_that_holds_on_is_reported_still_attached_after_a_restart(daemon: FakeDaemon) -> None:
    conn, dom = opened(daemon)
    soon(daemon.restart, 0.05)
    with pytest.raises(errors.Timeout) as exc:
        detach_live(conn, dom, "ua-nic0", timeout=0.8)
    assert "it is still attached" in exc.value.message and "reconnected to 1x" in exc.value.message
    assert pending.pending_since(UUID, 7, "ua-nic0") is not None  # stays pending: a second detach only waits
    assert daemon.requests == ["detach ua-nic0"]


def test_libvirtd_that_stays_down_is_reported_with_the_request_pending(daemon: FakeDaemon) -> None:
    conn, dom = opened(daemon)
    soon(daemon.stop, 0.05)
    started = time.monotonic()
    with pytest.raises(errors.ConnectionLost) as exc:
        detach_live(conn, dom, "ua-nic0", timeout=0.6)
    assert time.monotonic() - started < 3  # bounded by --timeout, not a hang
    assert "whether the guest released ua-nic0 is unknown" in exc.value.message
    assert "stays pending" in exc.value.message and "client socket is closed" not in exc.value.message
    assert pending.pending_since(UUID, 7, "ua-nic0") is not None


def test_a_domain_that_stops_during_the_wait_ends_it_with_that_truth(daemon: FakeDaemon) -> None:
    conn, dom = opened(daemon)

    def qemu_ends() -> None:
        daemon.running = False
        daemon.emit(libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, libvirt.VIR_DOMAIN_EVENT_STOPPED, 0)

    soon(qemu_ends, 0.05)
    started = time.monotonic()
    with pytest.raises(errors.LibvirtFailure, match="the domain stopped while the guest was releasing ua-nic0"):
        detach_live(conn, dom, "ua-nic0", timeout=30)
    assert time.monotonic() - started < 5  # woken by the event, not by the timeout
    assert pending.pending_since(UUID, 7, "ua-nic0") is None


def _nic(alias: str) -> etree._Element:
    el = etree.Element("interface", type="user")
    etree.SubElement(el, "alias", name=alias)
    return el


def _dimm_attach(conn: Connection, dom: Domain, alias: str) -> str:
    """``memory add --config``'s libvirt part (the live part needs a guest): returns the alias it added."""
    spec = DimmSpec(128 << 20, 0, alias)
    xml = etree.Element("memory", model="dimm")
    etree.SubElement(xml, "alias", name=alias)
    return add_dimm(conn, dom, spec, xml, flags=libvirt.VIR_DOMAIN_AFFECT_CONFIG, live=False, session=None,
                    online_type="online_movable", block_bytes=128 << 20, timeout=5).alias


def _nic_attach(conn: Connection, dom: Domain, alias: str) -> str:
    outcome = attach_mod.attach_device(conn, dom, _nic(alias), flags=libvirt.VIR_DOMAIN_AFFECT_LIVE, identity=None,
                                       session=None, timeout=5)
    assert outcome.live
    return outcome.alias


@pytest.mark.parametrize("attach", [_nic_attach, _dimm_attach], ids=["nic", "dimm"])
@pytest.mark.parametrize("attached", [True, False])
def test_an_attach_whose_answer_was_lost_is_read_back(daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch,
                                                      attached: bool, attach) -> None:  # type: ignore[no-untyped-def]
    """libvirtd died during the attach call: after reconnecting, the XML says whether it happened."""
    conn, dom = opened(daemon)
    real = FakeDom.attachDeviceFlags

    def attach_then_die(self: FakeDom, xml: str, flags: int) -> int:
        if attached:
            real(self, xml, flags)
        daemon.restart()
        raise libvirt_error("internal error: client socket is closed")

    monkeypatch.setattr(FakeDom, "attachDeviceFlags", attach_then_die)
    if attached:
        assert attach(conn, dom, "ua-new") == "ua-new"
    else:
        with pytest.raises(errors.LibvirtFailure, match="ua-new is not attached: nothing changed"):
            attach(conn, dom, "ua-new")
    assert conn.reconnects == 1


BUSY_MSG = "internal error: unable to execute QEMU command 'device_del': guest is busy (power indicator blinking)"


@pytest.mark.parametrize(("refusals", "timeout"), [(2, 10.0), (1000, 0.6)], ids=["then-taken", "stays-busy"])
def test_qemu_busy_refusal_is_asked_again_within_the_timeout(daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch,
                                                             refusals: int, timeout: float) -> None:
    """QEMU >= 6.2 refuses an unplug that follows a plug too quickly; it took nothing, so asking again re-sends
    nothing. Bounded by --timeout; a guest that stays busy gets QEMU's own words and the count."""
    conn, dom = opened(daemon)
    monkeypatch.setattr("vhotplug.ops.detach.BUSY_BACKOFF", (0.05, 0.1))
    real, left = FakeDom.detachDeviceAlias, [refusals]

    def busy_first(self: FakeDom, alias: str, flags: int) -> int:
        if left[0]:
            left[0] -= 1
            daemon.requests.append("refused")
            raise libvirt_error(BUSY_MSG, libvirt.VIR_ERR_OPERATION_FAILED)
        real(self, alias, flags)
        daemon.release(alias)
        return 0

    monkeypatch.setattr(FakeDom, "detachDeviceAlias", busy_first)
    if refusals == 2:
        released = detach_live(conn, dom, "ua-nic0", timeout=timeout)
        assert released.busy_refusals == 2 and daemon.requests == ["refused", "refused", "detach ua-nic0"]
    else:
        started = time.monotonic()
        with pytest.raises(errors.LibvirtFailure, match=r"guest is busy.*refused \d+ times in a row") as exc:
            detach_live(conn, dom, "ua-nic0", timeout=timeout)
        assert time.monotonic() - started < timeout + 0.5 and "detach ua-nic0" not in daemon.requests
        assert exc.value.exit_code == errors.ExitCode.FAILURE
        assert pending.pending_since(UUID, 7, "ua-nic0") is None  # nothing was taken: nothing pending


@pytest.mark.parametrize("applied", [True, False])
def test_a_vcpu_change_whose_answer_was_lost_is_read_back(daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch,
                                                          applied: bool) -> None:
    conn, dom = opened(daemon)
    real = FakeDom.setVcpusFlags

    def set_then_die(self: FakeDom, n: int, flags: int) -> int:
        if applied:
            real(self, n, flags)
        daemon.restart()
        raise libvirt_error("internal error: client socket is closed")

    monkeypatch.setattr(FakeDom, "setVcpusFlags", set_then_die)
    if applied:
        outcome = set_vcpus(conn, dom, 2, live=True, config=False, session=None, timeout=5)
        assert (outcome.before, outcome.after) == (1, 2)
    else:
        with pytest.raises(errors.LibvirtFailure, match="reconnected, the domain has 1: not changed"):
            set_vcpus(conn, dom, 2, live=True, config=False, session=None, timeout=5)
    assert conn.reconnects == 1 and daemon.vcpus == (2 if applied else 1)
