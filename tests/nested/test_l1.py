"""L1 itself: libvirtd answers over its URI, it owns an e1000 and a USB tablet to give away, up_l1 reuses it."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from dataclasses import replace
from pathlib import Path

import libvirt
import paramiko
import pytest
from lxml import etree

from tests.nested.conftest import remove_stale_l1s, report
from vhotplug import errors
from vhotplug.cli.main import run
from vhotplug.guest.ssh import GuestSession
from vhotplug.lab import manager, nested
from vhotplug.lab.nested import L1
from vhotplug.virt.connection import open_connection


def test_libvirt_answers_over_the_uri_and_it_is_l1(l1: L1, l1_conn: libvirt.virConnect) -> None:
    assert l1_conn.getVersion() > 0 and l1_conn.getLibVersion() > 0
    assert l1_conn.getHostname() == "vhotplug-l1"  # L1's libvirtd, not this machine's
    assert l1_conn.listAllDomains(0) == []  # a private, empty libvirt state: nothing of the host shows through
    assert l1.boot_seconds > 0 and l1.libvirt_seconds >= l1.boot_seconds


def test_l1_is_a_lab_domain_on_the_host(l1: L1, host_conn: libvirt.virConnect) -> None:
    labs = {lab.name: lab for lab in manager.list_labs(host_conn)}
    assert labs[l1.name].state == "running"
    assert labs[l1.name].target == replace(l1.target, source="domain metadata")
    found = nested.find_l1(host_conn, l1.name)
    assert found is not None
    assert (found.uri, found.target, found.state) == (l1.uri, l1.target, "running")


def test_e1000_is_alone_in_its_iommu_group_on_e1000(l1_conn: libvirt.virConnect) -> None:
    dev = etree.fromstring(l1_conn.nodeDeviceLookupByName(nested.E1000_NODEDEV).XMLDesc(0).encode())
    assert dev.findtext("driver/name") == "e1000"
    cap = dev.find("capability[@type='pci']")
    assert (cap.find("vendor").get("id"), cap.find("product").get("id")) == ("0x8086", "0x100e")
    group = cap.find("iommuGroup")
    assert group is not None and group.get("number", "").isdigit()
    members = [(a.get("bus"), a.get("slot"), a.get("function")) for a in group.findall("address")]
    assert members == [("0x00", "0x05", "0x0")]


def test_usb_tablet_is_a_usb_node_device(l1_conn: libvirt.virConnect) -> None:
    """libvirt lists USB devices only with udev's IDs: L1 runs udevd with one rule for that."""
    found = []
    for dev in l1_conn.listAllDevices(libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_USB_DEV):
        cap = etree.fromstring(dev.XMLDesc(0).encode()).find("capability[@type='usb_device']")
        found.append((int(cap.find("vendor").get("id"), 16), int(cap.find("product").get("id"), 16)))
    assert nested.TABLET_IDS in found, found


def test_host_list_over_the_uri(l1: L1, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                request: pytest.FixtureRequest) -> None:
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    capsys.readouterr()
    started = time.monotonic()
    code = run(["-c", l1.uri, "-o", "json", "host", "list", "--pci"])
    took = time.monotonic() - started
    out, err = capsys.readouterr()
    assert code == 0, err
    report(request.config, f"vhotplug host list --pci over the L1 URI: {took:.2f} s")
    inv = json.loads(out)
    by_addr = {d["address"]: d for d in inv["devices"]}
    e1000 = by_addr["0000:00:05.0"]
    assert e1000["driver"] == "e1000" and e1000["iommu_group"] is not None
    assert e1000["iommu_group_members"] == []
    # Host facts were read over SSH from L1 (the URI carries L1's known_hosts): its management NIC
    # (virtio-net at 00:1e.0) carries L1's default route, the e1000 is free to give away.
    assert inv["host_facts"] == "snapshot" and inv["iommu"]["present"] is True
    mgmt = by_addr["0000:00:1e.0"]
    assert mgmt["host_use_checked"] and any(u["kind"] in ("net", "route") for u in mgmt["used_by"]), mgmt
    assert e1000["host_use_checked"] and e1000["used_by"] == []


def test_lab_dir_is_seen_fresh_and_read_only_inside_l1(l1: L1) -> None:
    """L2 guests boot from files under the lab directory: L1 sees them as the host has them now."""
    probe = manager.domain_dir(l1.name) / f"probe-{uuid.uuid4().hex}"
    tmp = probe.with_name(f"{probe.name}.tmp")
    cat = ["cat", str(probe)]
    try:
        with GuestSession(l1.target) as session:
            assert session.run(cat, timeout=30, check=False).status != 0  # looked up before it exists
            for text in ("first\n", "second\n"):
                tmp.write_text(text)
                os.chmod(tmp, 0o644)  # L1 reads the share with QEMU's (libvirt-qemu's) rights
                tmp.replace(probe)  # a new inode, as an image rebuild makes
                assert session.run(cat, timeout=30).stdout == text
            # L1 cannot write into the host's lab directory; its guests' logs go to its own file system.
            touch = session.run(["touch", f"{probe}.l1"], timeout=30, check=False)
            assert touch.status != 0 and "Read-only file system" in touch.stderr
            log = f"{nested.GUEST_LOG_DIR}/{probe.name}.log"
            assert session.run(["sh", "-c", f"echo ok > {log} && cat {log} && rm {log}"], timeout=30).stdout == "ok\n"
    finally:
        probe.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


def test_wrapper_pins_l1_host_key(l1: L1, tmp_path: Path) -> None:
    """The URI's wrapper trusts only the host key in its own known_hosts file."""
    assert l1.target.key is not None and l1.target.known_hosts is not None
    wrong = tmp_path / "known_hosts"
    other = paramiko.ECDSAKey.generate(bits=256)
    wrong.write_text(f"[127.0.0.1]:{l1.target.port} {other.get_name()} {other.get_base64()}\n")
    wrapper = nested.write_ssh_wrapper(tmp_path / "ssh-wrapper", key=l1.target.key, known_hosts=wrong)
    with pytest.raises(errors.ConnectionFailed):
        open_connection(nested.l1_uri(l1.target.port, key=l1.target.key, known_hosts=wrong, wrapper=wrapper))
    # The same wrapper with L1's real known_hosts connects: only the key made the difference.
    good = nested.write_ssh_wrapper(tmp_path / "ssh-wrapper", key=l1.target.key, known_hosts=l1.target.known_hosts)
    conn = open_connection(nested.l1_uri(l1.target.port, key=l1.target.key, known_hosts=l1.target.known_hosts,
                                         wrapper=good))
    try:
        assert conn.getHostname() == "vhotplug-l1"
    finally:
        conn.close()


def test_up_l1_again_reuses_the_running_l1(l1: L1, host_conn: libvirt.virConnect,
                                           request: pytest.FixtureRequest) -> None:
    qemu_id = host_conn.lookupByName(l1.name).ID()
    started = time.monotonic()
    again = nested.up_l1(host_conn, l1.name)
    took = time.monotonic() - started
    report(request.config, f"up_l1 on the running L1 (reused): {took:.2f} s")
    assert (again.target.port, again.uri, again.state) == (l1.target.port, l1.uri, "running")
    assert again.boot_seconds == 0.0
    assert host_conn.lookupByName(l1.name).ID() == qemu_id  # the same QEMU process, not a reboot
    assert took < nested.REUSE_SSH_SECONDS + nested.REUSE_LIBVIRT_SECONDS


def test_stale_l1_of_a_killed_run_is_removed(host_conn: libvirt.virConnect) -> None:
    """Only lab-marked L1s named after a dead pytest PID go; a foreign domain of such a name stays."""
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: its PID is gone
    stale, foreign = f"vhn-l1-{proc.pid}", f"vhn-l1-{proc.pid + 1_000_000}"
    host_conn.defineXML(nested.l1_xml(stale, manager.free_port()))
    plain = etree.Element("domain", type="qemu")
    etree.SubElement(plain, "name").text = foreign
    etree.SubElement(plain, "memory", unit="MiB").text = "64"
    etree.SubElement(etree.SubElement(plain, "os"), "type", arch="x86_64", machine="q35").text = "hvm"
    host_conn.defineXML(etree.tostring(plain, encoding="unicode"))
    try:
        removed = remove_stale_l1s(host_conn)
        assert stale in removed and foreign not in removed
        assert nested.find_l1(host_conn, stale) is None
        assert host_conn.lookupByName(foreign).name() == foreign
    finally:
        for name in (stale, foreign):
            try:
                host_conn.lookupByName(name).undefine()
            except libvirt.libvirtError as exc:
                assert exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
