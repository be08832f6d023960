"""The lab itself: it boots, is reachable only with a verified host key, and behaves idempotently."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import libvirt
from lxml import etree

from tests.lab.conftest import URI, remove_stale_test_labs, report, stopped_domain
from vhotplug.errors import ExitCode
from vhotplug.guest.ssh import GuestSession
from vhotplug.lab import manager
from vhotplug.lab.domain import mgmt_mac

VHOTPLUG = [sys.executable, "-m", "vhotplug"]


def test_guest_view_of_a_fresh_lab(lab, cli):
    r = cli("-c", URI, "-o", "json", "list", lab.name, "--guest")
    assert r.code == 0, r.err
    guest = r.json()["guest"]
    mgmt = [n for n in guest["net"] if n["mac"] == mgmt_mac(lab.name)]
    assert mgmt and mgmt[0]["driver"] == "virtio_net" and mgmt[0]["state"] == "up"
    assert any(p["vendor_device"].startswith("1af4:") and p["driver"] == "virtio-pci" for p in guest["pci"])
    # One vCPU of four, as defined; nothing in the guest onlines more by itself.
    assert guest["cpus_online"] == "0" and guest["cpus_possible"] == "0-3"
    assert 300 * 1024 < guest["memtotal_kib"] <= 512 * 1024
    assert guest["memory_block_bytes"] == 128 << 20


def test_guest_has_no_hotplug_helper(lab):
    """Onlining CPUs/memory is vhotplug's job: no udev/mdev in the guest may do it first."""
    with GuestSession(lab.info.target) as s:
        # Absent (kernel without a uevent helper) or empty: either way nothing is called on hot-add.
        helper = s.run_script("cat /proc/sys/kernel/hotplug 2>/dev/null || true").stdout.strip()
        assert helper == ""
        procs = s.run_script("cat /proc/[0-9]*/comm").stdout.split()
    assert "dropbear" in procs
    assert not {"udevd", "systemd-udevd", "mdev"} & set(procs)


def test_lab_up_is_idempotent(lab, cli):
    start = time.monotonic()
    r = cli("-c", URI, "lab", "up", "--name", lab.name)
    assert r.code == 0, r.err
    assert "already running" in r.out and time.monotonic() - start < 15


def test_lab_status(lab, cli):
    rows = cli("-c", URI, "-o", "json", "lab", "status", "--name", lab.name).json()
    assert rows[0]["state"] == "running" and rows[0]["machine"] == "q35"
    assert rows[0]["ssh"] == str(lab.info.target)
    table = cli("-c", URI, "lab", "status").out
    assert lab.name in table and "running" in table


def test_lab_ssh_runs_a_command(lab):
    done = subprocess.run([*VHOTPLUG, "-c", URI, "lab", "ssh", "--name", lab.name, "cat", "/proc/sys/kernel/hostname"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "vhotplug-lab"


def test_unknown_host_key_is_refused(lab, cli, tmp_path):
    t = lab.info.target
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    r = cli("-c", URI, "list", lab.name, "--guest", "--known-hosts", str(empty))
    assert r.code == ExitCode.GUEST_HOST_KEY, r.err
    assert "is not in" in r.err and "Traceback" not in r.err
    # A different key recorded for the same host:port is a mismatch, also refused.
    other = "AAAAC3NzaC1lZDI1NTE5AAAAIGb0Yk0JmQ1m0v6bq1cK3s7bJ0o8vR1m3H8z3c1bJ0o8"
    empty.write_text(f"[{t.host}]:{t.port} ssh-ed25519 {other}\n")
    r = cli("-c", URI, "list", lab.name, "--guest", "--known-hosts", str(empty))
    assert r.code == ExitCode.GUEST_HOST_KEY and "does not match" in r.err


def test_accept_new_host_key_records_it(lab, cli, tmp_path):
    known = tmp_path / "kh"
    r = cli("-c", URI, "list", lab.name, "--guest", "--known-hosts", str(known), "--accept-new-host-key")
    assert r.code == 0, r.err
    recorded = known.read_text().split()
    lab_key = Path(str(lab.info.target.known_hosts)).read_text().split()
    assert recorded[1:] == lab_key[1:]


def test_refuses_to_touch_a_foreign_domain(lab, cli, conn):
    name = f"{lab.name}-foreign"
    with stopped_domain(conn, name):
        for args in (("lab", "up", "--name", name), ("lab", "down", "--name", name)):
            r = cli("-c", URI, *args)
            assert r.code == ExitCode.INVALID and "not a vhotplug lab domain" in r.err
        assert conn.lookupByName(name).isPersistent()

def test_pc_machine_boots(request, cli, conn):
    name = f"vhl-pc-{os.getpid()}"
    try:
        r = cli("-c", URI, "-o", "json", "lab", "up", "--name", name, "--machine", "pc")
        assert r.code == 0, r.err
        up = r.json()
        report(request.config, f"\nlab {name}: booted to SSH in {up['boot_seconds']:.1f} s (pc/i440fx, TCG)")
        xml = etree.fromstring(conn.lookupByName(name).XMLDesc(0).encode())
        assert "pc" in xml.find("os/type").get("machine")
        guest = cli("-c", URI, "-o", "json", "list", name, "--guest").json()["guest"]
        assert any(n["mac"] == mgmt_mac(name) for n in guest["net"])
    finally:
        assert cli("-c", URI, "lab", "down", "--name", name).code == 0
    assert not manager.domain_dir(name).exists()  # its files went with it
    try:
        conn.lookupByName(name)
        raise AssertionError("lab down left the domain defined")
    except libvirt.libvirtError as exc:
        assert exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN


def test_stale_test_labs_of_killed_runs_are_removed(conn):
    """A reused machine may keep lab domains of a killed test run: they go, live runs' domains stay."""
    dead = subprocess.Popen(["true"])  # a PID that has certainly exited
    dead.wait()
    names = {"dead": f"vhl-test-{dead.pid}", "live": "vhl-test-1"}  # PID 1 is always alive
    for name in names.values():
        conn.defineXML(manager.planned_xml(name, machine="q35", accel="qemu"))
    try:
        removed = remove_stale_test_labs(conn)
        assert names["dead"] in removed and names["live"] not in removed
        assert names["live"] in {d.name() for d in conn.listAllDomains(0)}
        assert names["dead"] not in {d.name() for d in conn.listAllDomains(0)}
    finally:
        for name in names.values():
            manager.down(conn, name)
