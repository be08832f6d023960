"""Host passthrough: safety checks on fixture hosts, and the attach/detach flow with a fault at every step.

The flow runs against the recording fake in fakevirt.py: after any failure (a libvirt error, Ctrl-C, a guest
that never shows the device, a journal that cannot be written) the device must be back on its host driver,
the domain's live and persistent XML unchanged, and the journal empty. No real node device is ever touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import libvirt
import pytest

from tests.unit.fakevirt import FakeConnection, FakeDomain, FakeNodeDevice, libvirt_error
from tests.unit.test_host_usage import build_host
from vhotplug import errors
from vhotplug.addresses import parse_bdf, parse_usb_spec
from vhotplug.guest.watch import Seen
from vhotplug.host import journal, safety
from vhotplug.host.inventory import parse_nodedev_xml
from vhotplug.host.usage import Assignment
from vhotplug.ops import attach as attach_mod
from vhotplug.ops import passthrough

LIVE = libvirt.VIR_DOMAIN_AFFECT_LIVE
CONFIG = libvirt.VIR_DOMAIN_AFFECT_CONFIG
FREE_NIC = parse_bdf("00:04.0")  # fixture: e1000e, eth1 down, alone in its IOMMU group
_REAL_WRITE = journal._write


@pytest.fixture(autouse=True)
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VHOTPLUG_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("VHOTPLUG_RUN_DIR", str(tmp_path / "run"))
    return tmp_path


@pytest.fixture
def hostroot(tmp_path: Path) -> Path:
    root = tmp_path / "host"
    build_host(root)
    return root


def node_of(dev: FakeNodeDevice):
    return parse_nodedev_xml(dev.XMLDesc(0))


# -- safety checks on fixture hosts ------------------------------------------------------------------------


def refusals(hostroot: Path, bdf: str, *, driver: str, klass: int = 0x020000, assignments=()) -> list[str]:
    conn = FakeConnection()
    dev = conn.add_pci(parse_bdf(bdf), driver=driver, klass=klass)
    found = safety.pci_refusals(node_of(dev), facts_root=hostroot, assignments=list(assignments))
    return [f"{r.check}: {r.reason}" for r in found]


def test_root_disk_refused_naming_the_mount(hostroot):
    found = refusals(hostroot, "00:02.0", driver="virtio-pci", klass=0x010000)
    assert len(found) == 1 and found[0].startswith("host-use: the host uses 0000:00:02.0: mount / (vda1)")
    assert "holder" in found[0]  # vda2 carries the LVM volume group mounted at /srv


def test_swap_and_default_route_devices_refused(hostroot):
    assert refusals(hostroot, "00:05.0", driver="virtio-pci", klass=0x010000) == [
        "host-use: the host uses 0000:00:05.0: swap vdb1"]
    assert any("route default route via eth0" in r for r in refusals(hostroot, "00:03.0", driver="virtio-pci"))


def test_bridge_refused(hostroot):
    found = refusals(hostroot, "00:1c.0", driver="pcieport", klass=0x060400)
    assert any(r.startswith("bridge: 0000:00:1c.0 is a PCI bridge") for r in found)


def test_shared_iommu_group_refused_naming_the_members(hostroot):
    found = refusals(hostroot, "00:1f.3", driver="i801_smbus", klass=0x0C0500)
    group = [r for r in found if r.startswith("group:")]
    assert group and "0000:00:1f.0 (lpc_ich)" in group[0] and "0000:00:1f.2 (ahci: mount /home (sda1))" in group[0]


def test_already_assigned_refused(hostroot):
    taken = [Assignment("other", "live", "pci", bdf=FREE_NIC)]
    assert refusals(hostroot, "00:04.0", driver="e1000e", assignments=taken) == [
        "assigned: 0000:00:04.0 is already assigned to domain other (live)"]


def test_free_device_and_vfio_device_pass(hostroot):
    assert refusals(hostroot, "00:04.0", driver="e1000e") == []
    assert refusals(hostroot, "02:00.0", driver="vfio-pci") == []


def test_no_iommu_is_exit_6_even_with_force(hostroot):
    import shutil

    shutil.rmtree(hostroot / "sys/kernel/iommu_groups")
    conn = FakeConnection()
    dev = conn.add_pci(parse_bdf("00:02.0"), driver="virtio-pci", klass=0x010000)
    found = safety.pci_refusals(node_of(dev), facts_root=hostroot, assignments=[])
    for force in (False, True):
        with pytest.raises(safety.Refused) as info:
            safety.enforce(found, force=force, what="PCI device 0000:00:02.0")
        assert info.value.exit_code == errors.ExitCode.UNSUPPORTED
        assert "no IOMMU" in info.value.message and "intel_iommu=on" in (info.value.hint or "")
    assert "mount / (vda1)" in info.value.message or not any(r.check == "host-use" for r in info.value.refusals)


def test_force_overrides_host_use_only(hostroot):
    conn = FakeConnection()
    eth0 = conn.add_pci(parse_bdf("00:03.0"), driver="virtio-pci")
    found = safety.pci_refusals(node_of(eth0), facts_root=hostroot, assignments=[])
    with pytest.raises(safety.Refused) as info:
        safety.enforce(found, force=False, what="x")
    assert info.value.exit_code == errors.ExitCode.UNSAFE and "--force" in (info.value.hint or "")
    safety.enforce(found, force=True, what="x")  # host use only: --force lets it through
    bridge = conn.add_pci(parse_bdf("00:1c.0"), driver="pcieport", klass=0x060400)
    with pytest.raises(safety.Refused) as info:
        safety.enforce(safety.pci_refusals(node_of(bridge), facts_root=hostroot, assignments=[]), force=True,
                       what="x")
    assert [r.check for r in info.value.refusals] == ["bridge"]


def test_remote_host_use_is_unknown_and_group_from_libvirt():
    conn = FakeConnection()
    a, b = parse_bdf("03:00.0"), parse_bdf("03:00.1")
    dev = conn.add_pci(a, driver="e1000e", group=9, members=(a, b))
    conn.add_pci(b, driver="e1000e", group=9, members=(a, b))
    members = passthrough._group_members(conn, node_of(dev))
    found = safety.pci_refusals(node_of(dev), facts_root=None, assignments=[], members=members)
    assert [r.check for r in found] == ["group", "host-use-unknown"]
    assert "0000:03:00.1 (e1000e)" in found[0].reason


# -- the attach flow, with a fault at every step -------------------------------------------------------------


class FakeWatch:
    """Stands in for the in-guest watcher: result() is a recorded step that can fail too."""

    def __init__(self, rec) -> None:
        self.rec, self.started_at = rec, 0.0

    def result(self) -> Seen:
        self.rec.hit("guest.verify")
        return Seen("eth1", "e1000e", 0.05, {"pci": "0000:01:00.0", "net": "eth1"})

    def cancel(self) -> None:
        pass


def setup_flow(hostroot: Path, monkeypatch: pytest.MonkeyPatch):
    conn = FakeConnection()
    dev = conn.add_pci(FREE_NIC, driver="e1000e")
    dom = conn.add_domain()
    monkeypatch.setattr(attach_mod, "start_watch", lambda *a, **k: FakeWatch(conn.rec))
    # The journal's writes are steps too: a full disk must not leave anything half-done either.
    def write(entry):
        try:
            conn.rec.hit("journal.write")
        except OSError as exc:  # as the real writer reports a full disk
            raise errors.VhotplugError(f"cannot write the journal: {exc.strerror}") from exc
        _REAL_WRITE(entry)

    monkeypatch.setattr(journal, "_write", write)
    return conn, dev, dom


def run_attach(conn, dom, hostroot, flags=LIVE):
    plan = passthrough.plan_pci(conn, dom, FREE_NIC, managed=False, id="nic9", force=False, facts_root=hostroot,
                                live=bool(flags & LIVE))
    return passthrough.attach_hostdev(conn, dom, plan, flags=flags, session=object(), timeout=5, uri=None)


def test_attach_success_path(hostroot, monkeypatch):
    conn, dev, dom = setup_flow(hostroot, monkeypatch)
    outcome = run_attach(conn, dom, hostroot)
    assert outcome.host_detached and dev.driver == "vfio-pci"
    assert outcome.attach.guest.name == "eth1" and outcome.attach.identity == "8086:10d3"
    assert dom.live.xpath("devices/hostdev[alias/@name='ua-nic9']/@managed") == ["no"]
    # q35: vhotplug wrote the guest address itself, on the first free pcie-root-port
    assert dom.live.xpath("devices/hostdev[alias/@name='ua-nic9']/address/@bus") == ["0x06"]
    assert not dom.config.xpath("devices/hostdev")  # --live only
    assert journal.entries() == []
    calls = conn.rec.calls
    # Write-ahead: the journal records each step before the call that takes it.
    assert calls.index("nodedev.detach") > calls.index("journal.write")
    assert calls.index("domain.attach") > max(i for i, c in enumerate(calls[: calls.index("domain.attach")])
                                              if c == "journal.write")


def _success_calls(hostroot, monkeypatch, flags) -> list[str]:
    conn, _, dom = setup_flow(hostroot, monkeypatch)
    run_attach(conn, dom, hostroot, flags)
    return list(conn.rec.calls)


FAULTS = {  # what can go wrong, and at which kind of step
    "libvirt": (lambda name: libvirt_error(f"injected at {name}"), ("conn.", "nodedev.", "domain.")),
    "ctrl-c": (lambda name: KeyboardInterrupt(), ("",)),
    "guest-timeout": (lambda name: errors.Timeout(f"injected at {name}"), ("guest.",)),
    "disk-full": (lambda name: OSError(28, "No space left on device"), ("journal.",)),
}


@pytest.mark.parametrize("flags", [LIVE, LIVE | CONFIG], ids=["live", "persistent"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_fault_at_every_step_leaves_nothing_half_done(hostroot, monkeypatch, tmp_path, flags, fault):
    steps = _success_calls(hostroot, monkeypatch, flags)
    assert {"nodedev.detach", "domain.attach:done", "guest.verify", "journal.write"} <= set(steps)
    make, where_applies = FAULTS[fault]
    tried = 0
    for index, name in enumerate(steps):
        if not name.startswith(where_applies):
            continue
        tried += 1
        for entry in journal.entries():
            journal.finish(entry)
        conn, dev, dom = setup_flow(hostroot, monkeypatch)
        before = dom.snapshot()
        conn.rec.fail_at, conn.rec.fail_with = index, make
        with pytest.raises((errors.VhotplugError, KeyboardInterrupt)) as info:
            run_attach(conn, dom, hostroot, flags)
        where = f"fault {fault} at step {index} ({name}): {info.value!r}"
        assert conn.rec.calls[index] == name, where  # the run took the same path up to the fault
        assert dev.driver == "e1000e", where
        assert dom.snapshot() == before, where
        assert journal.entries() == [], where
        if fault == "ctrl-c" and "journal.write" in steps[:index]:
            assert isinstance(info.value, errors.Interrupted), where
            assert "given back" in info.value.message
    assert tried >= {"libvirt": 10, "ctrl-c": 16, "guest-timeout": 1, "disk-full": 3}[fault]


def test_failed_rollback_keeps_the_record_and_recover_finishes(hostroot, monkeypatch):
    conn, dev, dom = setup_flow(hostroot, monkeypatch)
    before = dom.snapshot()
    steps = _success_calls(hostroot, monkeypatch, LIVE)
    conn, dev, dom = setup_flow(hostroot, monkeypatch)
    conn.rec.fail_at = steps.index("guest.verify")
    conn.rec.fail_names["nodedev.reattach"] = libvirt_error("reattach broken")
    with pytest.raises(errors.RecoveryNeeded) as info:
        run_attach(conn, dom, hostroot)
    assert info.value.exit_code == errors.ExitCode.RECOVERY
    assert "reattach broken" in info.value.message and "vhotplug recover" in (info.value.hint or "")
    assert dev.driver == "vfio-pci"  # could not be given back yet
    (entry,) = journal.entries()
    assert entry.steps == [journal.HOST_DETACH, journal.GUEST_ATTACH, journal.ROLLBACK_FAILED]
    assert entry.alive  # our own process: not stale while we run
    del conn.rec.fail_names["nodedev.reattach"]
    actions = passthrough.recover_entry(conn, entry, timeout=5)
    assert actions == ["gave 0000:00:04.0 back to the host (e1000e)"]
    assert dev.driver == "e1000e" and journal.entries() == []
    assert dom.snapshot()[0] == before[0].replace("guest1", dom.name())


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_recover_undoes_a_killed_attach(hostroot, monkeypatch):
    """A run killed after the attach: the device is in the guest and on vfio-pci; recover undoes both."""
    conn, dev, dom = setup_flow(hostroot, monkeypatch)
    before = dom.snapshot()
    outcome = run_attach(conn, dom, hostroot, LIVE | CONFIG)
    entry = journal.begin(journal.Entry(op="attach", kind="pci", device=str(FREE_NIC), domain=dom.name(),
                                        domain_uuid=dom.UUIDString(), uri=None, alias=outcome.attach.alias,
                                        nodedev=FREE_NIC.nodedev_name, host_driver="e1000e",
                                        flags=LIVE | CONFIG, steps=[journal.HOST_DETACH, journal.GUEST_ATTACH]))
    entry.pid = dead_pid()
    journal._write(entry)
    (stale,) = journal.stale()
    assert "attach pci 0000:00:04.0 to guest1" in (journal.stale_warning() or "")
    actions = passthrough.recover_entry(conn, stale, timeout=5)
    assert actions == ["detached ua-nic9 from guest1", "removed ua-nic9 from the definition of guest1",
                       "gave 0000:00:04.0 back to the host (e1000e)"]
    assert dev.driver == "e1000e" and dom.snapshot() == before and journal.entries() == []
    assert journal.stale_warning() is None


def test_record_of_a_live_process_is_not_stale(hostroot):
    entry = journal.begin(journal.Entry(op="attach", kind="pci", device="x", domain="d", domain_uuid="u", uri=None,
                                        alias="ua-x"))
    assert entry.alive and journal.stale() == []
    entry.pid_start = (entry.pid_start or 0) + 1  # same PID, another process (recycled PID)
    journal._write(entry)
    assert journal.stale() and "vhotplug recover" in (journal.stale_warning() or "")


def test_unreadable_record_is_reported_not_deleted(tmp_path):
    journal.journal_dir().mkdir(parents=True)
    (journal.journal_dir() / "junk.json").write_text("{not json")
    assert journal.entries() == [] and [p.name for p in journal.unreadable()] == ["junk.json"]


# -- detach of a host device ---------------------------------------------------------------------------------


def attached(hostroot, monkeypatch):
    conn, dev, dom = setup_flow(hostroot, monkeypatch)
    before = dom.snapshot()
    run_attach(conn, dom, hostroot)
    return conn, dev, dom, before


def element_of(dom: FakeDomain, alias: str):
    return dom.live.xpath("devices/hostdev[alias/@name=$a]", a=alias)[0]


def test_detach_gives_the_device_back(hostroot, monkeypatch):
    conn, dev, dom, before = attached(hostroot, monkeypatch)
    done = passthrough.detach_hostdev(conn, dom, "nic9", element_of(dom, "ua-nic9"), live=True, config=False,
                                      session=None, timeout=5, keep_detached=False, uri=None)
    assert done.reattached and done.driver_now == "e1000e" and dev.driver == "e1000e"
    assert dom.snapshot() == before and journal.entries() == []


def test_detach_keep_detached_leaves_vfio(hostroot, monkeypatch):
    conn, _dev, dom, _ = attached(hostroot, monkeypatch)
    done = passthrough.detach_hostdev(conn, dom, "host:00:04.0", element_of(dom, "ua-nic9"), live=True,
                                      config=False, session=None, timeout=5, keep_detached=True, uri=None)
    assert not done.reattached and done.driver_now == "vfio-pci" and journal.entries() == []


def test_detach_that_the_guest_ignores_keeps_a_record_recover_finishes(hostroot, monkeypatch):
    conn, dev, dom, before = attached(hostroot, monkeypatch)
    dom.hold_unplug = True
    with pytest.raises(errors.Timeout) as info:
        passthrough.detach_hostdev(conn, dom, "nic9", element_of(dom, "ua-nic9"), live=True, config=False,
                                   session=None, timeout=0.2, keep_detached=False, uri=None)
    assert "still attached" in info.value.message and dev.driver == "vfio-pci"
    (entry,) = journal.entries()
    # The guest lets go later (libvirt emits DEVICE_REMOVED); the run that asked is gone by then.
    dom.hold_unplug = False
    dom._remove(dom.live, "ua-nic9")
    entry.pid = dead_pid()
    journal._write(entry)
    assert passthrough.recover_entry(conn, journal.stale()[0], timeout=5) == [
        "gave 0000:00:04.0 back to the host (e1000e)"]
    assert dev.driver == "e1000e" and dom.snapshot() == before and journal.entries() == []


def test_detach_refusing_keep_detached_for_managed(hostroot, monkeypatch):
    conn, _dev, dom, _ = attached(hostroot, monkeypatch)
    el = element_of(dom, "ua-nic9")
    el.set("managed", "yes")
    with pytest.raises(errors.InvalidRequest, match="libvirt gives a managed one back"):
        passthrough.detach_hostdev(conn, dom, "nic9", el, live=True, config=False, session=None, timeout=5,
                                   keep_detached=True, uri=None)
    assert journal.entries() == []


# -- USB ------------------------------------------------------------------------------------------------------


def test_usb_ambiguous_vendor_product_lists_candidates(monkeypatch):
    conn = FakeConnection()
    dom = conn.add_domain()
    conn.add_usb(1, 4, 0x0781, 0x5567, name="Cruzer A", ports="1")
    conn.add_usb(1, 5, 0x0781, 0x5567, name="Cruzer B", ports="2")
    with pytest.raises(errors.InvalidRequest) as info:
        passthrough.plan_usb(conn, dom, parse_usb_spec("host:0781:5567"), id=None, force=False, facts_root=None)
    assert "several USB devices match 0781:5567" in info.value.message
    assert "host:001.004 0781:5567" in info.value.message and "host:001.005 0781:5567" in info.value.message
    assert "domain.attach" not in conn.rec.calls


def test_usb_by_address_attaches_with_ids_and_address(monkeypatch):
    conn = FakeConnection()
    dom = conn.add_domain()
    conn.add_usb(1, 4, 0x0781, 0x5567, ports="1")
    conn.add_usb(1, 5, 0x0781, 0x5567, ports="2")
    plan = passthrough.plan_usb(conn, dom, parse_usb_spec("host:001.005"), id="stick", force=True,
                                facts_root=None)
    out = passthrough.attach_hostdev(conn, dom, plan, flags=LIVE, session=None, timeout=5, uri=None)
    el = element_of(dom, "ua-stick")
    assert el.get("type") == "usb" and el.find("source/vendor").get("id") == "0x0781"
    assert el.find("source/address").attrib == {"bus": "1", "device": "5"}
    assert out.plan.identity.value == "0781:5567" and [r.check for r in out.plan.refusals_overridden] == [
        "host-use-unknown"]
    assert journal.entries() == []


def test_usb_root_hub_refused():
    conn = FakeConnection()
    dom = conn.add_domain()
    conn.add_usb(1, 1, 0x1D6B, 0x0002, name="root hub", ports="0")
    with pytest.raises(safety.Refused) as info:
        passthrough.plan_usb(conn, dom, parse_usb_spec("001.001"), id=None, force=True, facts_root=None)
    assert info.value.exit_code == errors.ExitCode.UNSAFE and "is a hub" in info.value.message


# -- the real host: read-only -----------------------------------------------------------------------------------


def test_real_host_root_device_refused_even_with_force():
    """This machine's root disk: refused for host use (naming /) and, here, for want of an IOMMU."""
    from tests.unit.test_host_usage import root_fs_pci_function

    bdf = root_fs_pci_function()
    if bdf is None:
        pytest.skip("/ is not on a PCI block device here")
    conn = FakeConnection()
    dev = conn.add_pci(parse_bdf(bdf), driver="virtio-pci", klass=0x010000, host_owned=True)
    dev.group = None
    found = safety.pci_refusals(node_of(dev), facts_root=Path("/"), assignments=[])
    host = [r for r in found if r.check == "host-use"]
    assert host and "mount / (" in host[0].reason
    if not os.listdir("/sys/kernel/iommu_groups") if os.path.isdir("/sys/kernel/iommu_groups") else True:
        with pytest.raises(safety.Refused) as info:
            safety.enforce(found, force=True, what=bdf)
        assert info.value.exit_code == errors.ExitCode.UNSUPPORTED


def test_driver_read_while_the_link_is_missing_is_read_again():
    """libvirt fails to describe a function while it moves between drivers; that is transient."""
    from vhotplug.host import nodedev

    conn = FakeConnection()
    dev = conn.add_pci(FREE_NIC, driver="vfio-pci")
    conn.rec.fail_names["nodedev.xml"] = libvirt_error("cannot resolve driver link: No such file or directory")
    calls = []
    real_hit = conn.rec.hit

    def hit(name):
        calls.append(name)
        if len(calls) == 3:  # the link is back after two failed reads
            conn.rec.fail_names.clear()
        real_hit(name)

    conn.rec.hit = hit
    assert nodedev.current_driver(dev) == "vfio-pci" and len(calls) == 3
    conn.rec.fail_names["nodedev.xml"] = libvirt_error("gone for good")
    with pytest.raises(errors.LibvirtFailure, match="gone for good"):
        nodedev.current_driver(dev)  # bounded: gives up after DRIVER_SETTLE


@pytest.mark.parametrize("flags", [LIVE, 0], ids=["live", "current"])  # 0: no option, the CLI's default
def test_domain_stopping_during_the_rollback_is_not_a_failed_rollback(hostroot, monkeypatch, flags):
    """Destroyed between the rollback's "is it running" and its detach: the device went with the domain, so
    the undo continues (host reattach) instead of ending in exit 15 (seen with the nested lab's L2)."""
    conn, dev, dom = setup_flow(hostroot, monkeypatch)
    conn.rec.fail_names["guest.verify"] = errors.Timeout("injected: the guest never showed it")

    def destroyed_meanwhile(alias: str, flags: int) -> None:
        dom.running = False
        raise libvirt_error("Requested operation is not valid: domain is not running",
                            libvirt.VIR_ERR_OPERATION_INVALID)

    monkeypatch.setattr(dom, "detachDeviceAlias", destroyed_meanwhile)
    with pytest.raises(errors.Timeout) as info:
        run_attach(conn, dom, hostroot, flags)
    assert "back on the host" in info.value.message
    assert dev.driver == "e1000e" and journal.entries() == []
