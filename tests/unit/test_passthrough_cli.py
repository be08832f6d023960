"""``vhotplug attach pci|usb``, ``detach`` of host devices and ``recover`` through the CLI, on the recording fake.

Also two real processes attaching the same host device at once: exactly one proceeds, the other fails
fast naming the holder's PID (or waits with --wait-lock).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.fakevirt import FakeConnection
from tests.unit.test_host_usage import build_host
from vhotplug.addresses import parse_bdf
from vhotplug.cli import detach_cmd, hostdev_cmd, main, recover_cmd
from vhotplug.host import journal
from vhotplug.ops import passthrough

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("VHOTPLUG_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("VHOTPLUG_RUN_DIR", str(tmp_path / "run"))
    hostroot = tmp_path / "host"
    build_host(hostroot)
    conn = FakeConnection()
    conn.add_pci(parse_bdf("00:04.0"), driver="e1000e")  # free: eth1 down, alone in its group
    conn.add_pci(parse_bdf("00:02.0"), driver="virtio-pci", klass=0x010000, host_owned=True)  # the root disk
    dom = conn.add_domain()

    @contextlib.contextmanager
    def fake_connection(uri: str | None):
        yield conn

    for module in (hostdev_cmd, detach_cmd, recover_cmd):
        monkeypatch.setattr(module, "connection", fake_connection)
    real = passthrough.facts_root_for
    monkeypatch.setattr(passthrough, "facts_root_for", lambda c, override=None: real(c, hostroot))
    return conn, dom, hostroot


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main.run(list(args))
    out, err = capsys.readouterr()
    return code, out, err


MUTATING = {"nodedev.detach", "nodedev.reattach", "domain.attach", "domain.detach"}


def test_root_disk_refused_before_any_change(env, capsys):
    conn, dom, _ = env
    before = dom.snapshot()
    code, out, err = cli(capsys, "attach", "pci", "guest1", "00:02.0", "--live", "--no-verify")
    assert code == 14, err
    assert "the host uses 0000:00:02.0: mount / (vda1)" in err and "Traceback" not in err
    assert "--force overrides the host-use check only" in err and out == ""
    assert MUTATING.isdisjoint(conn.rec.calls) and dom.snapshot() == before and journal.entries() == []


def test_attach_and_detach_pci_through_the_cli(env, capsys):
    conn, dom, _ = env
    before = dom.snapshot()
    code, out, err = cli(capsys, "-o", "json", "attach", "pci", "guest1", "0000:00:04.0", "--live", "--no-verify",
                         "--id", "nic7")
    assert code == 0, err
    doc = json.loads(out)["attached"]
    assert doc["alias"] == "ua-nic7" and doc["identity"] == "8086:10d3"
    assert doc["host"]["driver_before"] == "e1000e" and doc["host"]["detached_by_vhotplug"] is True
    assert conn.nodedevs["pci_0000_00_04_0"].driver == "vfio-pci"
    code, out, err = cli(capsys, "detach", "guest1", "nic7", "--live", "--no-verify")
    assert code == 0, err
    assert "host: given back to its driver (e1000e)" in out
    assert conn.nodedevs["pci_0000_00_04_0"].driver == "e1000e" and dom.snapshot() == before
    assert journal.entries() == []


def test_second_attach_of_an_assigned_device_is_refused(env, capsys):
    _conn, _dom, _ = env
    assert cli(capsys, "attach", "pci", "guest1", "00:04.0", "--live", "--no-verify")[0] == 0
    code, _, err = cli(capsys, "attach", "pci", "guest1", "00:04.0", "--live", "--no-verify")
    assert code == 14 and "already assigned to domain guest1 (live)" in err


def test_print_xml_changes_nothing_and_skips_checks(env, capsys):
    conn, _dom, _ = env
    code, out, _ = cli(capsys, "attach", "pci", "guest1", "00:02.0", "--print-xml")
    assert code == 0 and "<hostdev mode=\"subsystem\" type=\"pci\" managed=\"no\">" in out
    assert "bus=\"0x00\" slot=\"0x02\" function=\"0x0\"" in out
    code, out, _ = cli(capsys, "attach", "pci", "guest1", "00:04.0", "--config", "--print-xml")
    assert code == 0 and 'managed="yes"' in out  # the definition changes: libvirt manages it at boot
    assert MUTATING.isdisjoint(conn.rec.calls)


def test_keep_detached_refused_for_a_virtual_device(env, capsys):
    code, _, err = cli(capsys, "detach", "guest1", "net0", "--keep-detached")
    assert code == 5 and "--keep-detached is for host PCI devices" in err


def test_stale_record_is_reported_by_other_commands_and_recovered(env, capsys):
    conn, dom, _ = env
    before = dom.snapshot()
    assert cli(capsys, "attach", "pci", "guest1", "00:04.0", "--live", "--no-verify", "--id", "k")[0] == 0
    # As if the run had been killed just after the attach: the record remains, its process is gone.
    entry = journal.begin(journal.Entry(op="attach", kind="pci", device="0000:00:04.0", domain="guest1",
                                        domain_uuid=dom.UUIDString(), uri=None, alias="ua-k",
                                        nodedev="pci_0000_00_04_0", host_driver="e1000e", flags=1,
                                        steps=[journal.HOST_DETACH, journal.GUEST_ATTACH]))
    entry.pid = 999_999_999
    journal._write(entry)
    code, _, err = cli(capsys, "-c", "test:///default", "list", "no-such-domain")
    assert code == 3 and "warning: an interrupted operation may be half-done: attach pci 0000:00:04.0" in err
    assert "run `vhotplug recover`" in err
    code, out, err = cli(capsys, "recover", "--dry-run")
    assert code == 0 and "found: attach pci 0000:00:04.0 to guest1" in out and journal.entries()
    code, out, err = cli(capsys, "recover")
    assert code == 0, err
    assert "detached ua-k from guest1" in out and "gave 0000:00:04.0 back to the host (e1000e)" in out
    assert journal.entries() == [] and dom.snapshot() == before
    assert conn.nodedevs["pci_0000_00_04_0"].driver == "e1000e"
    code, out, err = cli(capsys, "recover")
    assert code == 0 and "nothing to recover" in out and "warning" not in err


# -- two processes, one device ----------------------------------------------------------------------------------


def spawn(hostroot: Path, gate: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "tests.unit.passthrough_worker", str(hostroot), str(gate),
                             "attach", "pci", "guest1", "00:04.0", "--live", "--no-verify", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_file(path: Path, proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"worker ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_two_concurrent_attaches_exactly_one_proceeds(env, tmp_path):
    _, _, hostroot = env
    gate = tmp_path / "gate"
    gate.mkdir()
    first = spawn(hostroot, gate)
    try:
        wait_for_file(gate / f"in-{first.pid}", first)  # first holds the locks, inside the host detach
        second = spawn(hostroot, gate)
        out2, err2 = second.communicate(timeout=60)
        assert second.returncode == 13, err2
        assert "busy: domain-" in err2 and f"held by PID {first.pid}" in err2
        assert "attached" not in out2 and not (gate / f"in-{second.pid}").exists()
    finally:
        (gate / "go").touch()
        out1, err1 = first.communicate(timeout=60)
    assert first.returncode == 0, err1
    assert "attached PCI device 0000:00:04.0 [8086:10d3] as ua-pci0 to guest1" in out1


def test_wait_lock_waits_for_the_holder(env, tmp_path):
    _, _, hostroot = env
    gate = tmp_path / "gate"
    gate.mkdir()
    first = spawn(hostroot, gate)
    try:
        wait_for_file(gate / f"in-{first.pid}", first)
        second = spawn(hostroot, gate, "--wait-lock")
    finally:
        (gate / "go").touch()
    _out1, err1 = first.communicate(timeout=60)
    _out2, err2 = second.communicate(timeout=60)
    assert first.returncode == 0 and second.returncode == 0, (err1, err2)
    left_first = float((gate / f"out-{first.pid}").read_text())
    entered_second = float((gate / f"in-{second.pid}").read_text())
    assert entered_second > left_first  # it got in only after the first had done its host detach (under lock)
