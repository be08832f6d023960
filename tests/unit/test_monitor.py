"""`vhotplug info pci|usb`: the monitor parsers on answers captured from the lab, and the CLI around them."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import libvirt
import pytest

from tests.conftest import GOLDEN
from vhotplug import errors
from vhotplug.cli import info_cmd
from vhotplug.errors import ExitCode
from vhotplug.virt import monitor

# Captured from a lab guest (q35, QEMU 7.2, libvirt 9.0) with ua-capnic (virtio, on root port pci.6),
# ua-cape1k (e1000, on the pcie-to-pci-bridge pci.14 behind root port pci.1), two USB disks and a USB tablet.
PCI_LAB = (GOLDEN / "query-pci-lab.json").read_text()
USB_LAB = (GOLDEN / "info-usb-lab.txt").read_text()


def by_address(functions: list[monitor.PciFunction]) -> dict[str, monitor.PciFunction]:
    return {f.address: f for f in functions}


def test_query_pci_lab_capture():
    functions = monitor.parse_query_pci(PCI_LAB)
    found = by_address(functions)
    assert len(found) == len(functions) == 25  # every function once, none lost in the recursion
    assert [f.address for f in functions] == sorted(f.address for f in functions)

    nic = found["07:00.0"]  # guest bus 7: libvirt's XML calls the same bus 6
    assert (nic.qdev_id, nic.vendor_device, nic.class_desc, nic.class_hex) == (
        "ua-capnic", "1af4:1041", "Ethernet controller", "0200")
    assert (nic.bridge, nic.bridge_id) == ("00:01.5", "pci.6")
    assert found["00:01.5"].secondary_bus == 7

    mgmt = found["00:1e.0"]  # the lab's management NIC comes from <qemu:commandline>: QEMU has no id for it
    assert (mgmt.vendor_device, mgmt.class_name, mgmt.qdev_id, mgmt.bridge) == (
        "1af4:1000", "Ethernet controller", None, None)

    balloon = found["05:00.0"]  # QEMU has no name for class 0x00ff: the code stands in
    assert (balloon.qdev_id, balloon.class_desc, balloon.class_name) == ("balloon0", None, "class 00ff")
    assert found["00:00.0"].class_name == "Host bridge" and found["00:00.0"].qdev_id is None


def test_query_pci_recurses_through_nested_bridges():
    found = by_address(monitor.parse_query_pci(PCI_LAB))
    e1000 = found["02:01.0"]  # root port pci.1 -> pcie-to-pci-bridge pci.14 -> e1000
    assert (e1000.qdev_id, e1000.vendor_device) == ("ua-cape1k", "8086:100e")
    assert (e1000.bridge, e1000.bridge_id) == ("01:00.0", "pci.14")
    bridge = found["01:00.0"]
    assert (bridge.qdev_id, bridge.vendor_device, bridge.secondary_bus) == ("pci.14", "1b36:000e", 2)
    assert (bridge.bridge, bridge.bridge_id) == ("00:01.0", "pci.1")


def _dev(bus: int, slot: int, qdev_id: str, cls: int = 0x0200, **extra: object) -> dict[str, object]:
    return {"bus": bus, "slot": slot, "function": 0, "qdev_id": qdev_id,
            "class_info": {"class": cls}, "id": {"vendor": 0x1af4, "device": 0x1041}, **extra}


def test_query_pci_three_levels_and_two_root_buses():
    leaf = _dev(3, 0, "deep")
    mid = _dev(2, 0, "mid", 0x0604, pci_bridge={"bus": {"secondary": 3}, "devices": [leaf]})
    top = _dev(0, 1, "top", 0x0604, pci_bridge={"bus": {"secondary": 2}, "devices": [mid]})
    empty = _dev(0, 2, "empty", 0x0604, pci_bridge={"bus": {"secondary": 4}})  # no "devices" key at all
    other_root = _dev(0x80, 0, "onpxb")
    reply = json.dumps({"return": [{"bus": 0, "devices": [top, empty]},
                                   {"bus": 0x80, "devices": [other_root]}], "id": "libvirt-1"})
    found = by_address(monitor.parse_query_pci(reply))
    assert set(found) == {"00:01.0", "00:02.0", "02:00.0", "03:00.0", "80:00.0"}
    assert found["03:00.0"].bridge_id == "mid" and found["02:00.0"].bridge_id == "top"
    assert found["80:00.0"].bridge is None and found["00:02.0"].secondary_bus == 4
    assert found["03:00.0"].class_name == "class 0200"


def test_pci_to_dict_is_what_json_shows():
    d = by_address(monitor.parse_query_pci(PCI_LAB))["07:00.0"].to_dict()
    assert d == {"address": "07:00.0", "bus": 7, "slot": 0, "function": 0, "vendor_device": "1af4:1041",
                 "class": "0200", "class_desc": "Ethernet controller", "qdev_id": "ua-capnic",
                 "bridge": "00:01.5", "bridge_id": "pci.6", "secondary_bus": None}


@pytest.mark.parametrize(("text", "words"), [
    ('{"id":"libvirt-451","error":{"class":"CommandNotFound","desc":"The command query-pci has not been found"}}',
     "QEMU refused query-pci: The command query-pci has not been found"),
    ("Device 0.1, Port 1", "not JSON"),
    ('{"return": {"bus": 0}}', "no list of buses"),
    ('{"return": [{"bus": 0, "devices": [{"bus": 0, "slot": 1}]}]}', "malformed device entry"),
])
def test_query_pci_bad_answers_are_errors_not_tracebacks(text, words):
    with pytest.raises(errors.LibvirtFailure) as exc:
        monitor.parse_query_pci(text)
    assert words in exc.value.message


def test_info_usb_lab_capture():
    rows = monitor.parse_info_usb(USB_LAB)
    assert all(r.parsed for r in rows)
    assert [r.to_dict() for r in rows] == [
        {"device": "0.1", "port": "1", "speed": "5000 Mb/s", "product": "QEMU USB MSD", "id": "ua-capusb"},
        # attached a moment earlier: the guest had not yet given it an address
        {"device": "0.0", "port": "2", "speed": "5000 Mb/s", "product": "QEMU USB MSD", "id": "ua-capusb2"},
        {"device": "0.0", "port": "3", "speed": "480 Mb/s", "product": "QEMU USB Tablet", "id": "input2"},
    ]


@pytest.mark.parametrize("text", ["", "\r\n", "  \n\n"])
def test_info_usb_empty_answer_means_no_devices(text):
    assert monitor.parse_info_usb(text) == []


def test_info_usb_odd_lines_are_kept():
    text = ("USB support not enabled\r\n"
            "  Device 1.3, Port 1.2, Speed 12 Mb/s, Product Logitech, Inc. USB Receiver, ID: hostdev0\r\n"
            "  Device 0.2, Port 4, Speed 1.5 Mb/s, Product QEMU USB Keyboard\r\n"
            "  Device 0.4, Port 5, Speed ? Mb/s\r\n")
    rows = monitor.parse_info_usb(text)
    assert [r.parsed for r in rows] == [False, True, True, False]
    assert rows[0].raw == "USB support not enabled" and rows[0].to_dict()["device"] is None
    assert (rows[1].port, rows[1].product, rows[1].id) == ("1.2", "Logitech, Inc. USB Receiver", "hostdev0")
    assert (rows[2].speed, rows[2].product, rows[2].id) == ("1.5 Mb/s", "QEMU USB Keyboard", None)
    assert rows[3].raw == "Device 0.4, Port 5, Speed ? Mb/s"


# ---- the CLI around them: rendering from canned monitor answers, refusals from libvirt's test driver


@pytest.fixture
def canned(monkeypatch):
    """Let `info` run against the test driver's running domain, the monitor answering from ``answers``."""
    canned = SimpleNamespace(answers={}, asked=[])

    def command(dom, cmd, *, hmp):
        canned.asked.append((cmd, hmp))
        return canned.answers[cmd]

    monkeypatch.setattr(info_cmd, "_running_qemu_domain", lambda conn, domain, what: conn.lookupByName(domain))
    monkeypatch.setattr(monitor, "_command", command)
    return canned


def test_info_pci_table_and_json_agree(cli, canned):
    canned.answers[monitor.QUERY_PCI] = PCI_LAB
    table = cli("-c", "test:///default", "info", "pci", "test")
    assert table.code == 0, table.err
    assert "PCI functions of test (QEMU query-pci" in table.out
    line = next(ln for ln in table.out.splitlines() if ln.startswith("07:00.0"))
    assert line.split() == ["07:00.0", "1af4:1041", "Ethernet", "controller", "ua-capnic", "pci.6"]
    doc = cli("-c", "test:///default", "-o", "json", "info", "pci", "test").json()
    assert doc["domain"] == "test" and len(doc["functions"]) == 25
    assert {f["qdev_id"] for f in doc["functions"]} >= {"ua-capnic", "ua-cape1k", "pci.14", None}
    for f in doc["functions"]:  # every JSON row is in the table
        assert f["address"] in table.out and (f["qdev_id"] or "-") in table.out
    assert canned.asked == [(monitor.QUERY_PCI, False)] * 2  # QMP, not HMP


def test_info_usb_table_json_and_empty(cli, canned):
    canned.answers[monitor.INFO_USB] = USB_LAB
    table = cli("-c", "test:///default", "info", "usb", "test")
    assert table.code == 0, table.err
    line = next(ln for ln in table.out.splitlines() if "ua-capusb2" in ln)
    assert line.split() == ["0.0", "2", "5000", "Mb/s", "QEMU", "USB", "MSD", "ua-capusb2"]
    doc = cli("-c", "test:///default", "-o", "json", "info", "usb", "test").json()
    assert [d["id"] for d in doc["devices"]] == ["ua-capusb", "ua-capusb2", "input2"] and doc["unparsed"] == []
    assert canned.asked[-1] == (monitor.INFO_USB, True)  # HMP

    canned.answers[monitor.INFO_USB] = ""
    empty = cli("-c", "test:///default", "info", "usb", "test")
    assert empty.code == 0 and empty.out.strip() == "No USB devices in test (QEMU info usb answered nothing)."
    assert cli("-c", "test:///default", "-o", "json", "info", "usb", "test").json()["devices"] == []


def test_info_usb_shows_lines_it_did_not_understand(cli, canned):
    canned.answers[monitor.INFO_USB] = USB_LAB + "USB support not enabled\r\n"
    r = cli("-c", "test:///default", "info", "usb", "test")
    assert r.code == 0 and "ua-capusb" in r.out
    assert "not understood as devices" in r.out and "  USB support not enabled" in r.out
    doc = cli("-c", "test:///default", "-o", "json", "info", "usb", "test").json()
    assert doc["unparsed"] == ["USB support not enabled"] and len(doc["devices"]) == 3
    canned.answers[monitor.INFO_USB] = "USB support not enabled\r\n"
    r = cli("-c", "test:///default", "info", "usb", "test")
    assert "No USB devices" not in r.out and "USB support not enabled" in r.out


@pytest.mark.parametrize("what", ["pci", "usb"])
def test_info_refuses_a_domain_qemu_does_not_run(cli, what):
    r = cli("-c", "test:///default", "info", what, "test")
    assert r.code == ExitCode.UNSUPPORTED
    lines = [ln for ln in r.err.splitlines() if not ln.startswith("vhotplug: warning:")]  # global, not ours
    assert lines == [f"vhotplug: error: `vhotplug info {what}` reads QEMU's monitor: test is a TEST domain, "
                     "not a QEMU one"]


def test_info_unknown_domain(cli):
    r = cli("-c", "test:///default", "info", "pci", "nosuch")
    assert r.code == ExitCode.NOT_FOUND and "Traceback" not in r.err


def test_monitor_libvirt_error_is_translated(monkeypatch):
    import libvirt_qemu

    class FakeDom:
        def name(self) -> str:
            return "dom"

    def refuse(dom, cmd, flags):
        err = libvirt.libvirtError("requested operation is not valid: domain is not running")
        err.err = (libvirt.VIR_ERR_OPERATION_INVALID, 0, "requested operation is not valid: domain is not running",
                   0, "", None, None, 0, 0)
        raise err

    monkeypatch.setattr(libvirt_qemu, "qemuMonitorCommand", refuse)
    with pytest.raises(errors.OperationInvalid) as exc:
        monitor.query_pci(FakeDom())
    assert "asking QEMU's monitor" in exc.value.message and "not running" in exc.value.message


def test_help_says_it_reads_the_monitor_and_taints(cli):
    for what in ("pci", "usb"):
        r = cli("info", what, "--help")
        text = " ".join(r.out.split())
        assert r.code == 0
        assert "qemu-monitor-command" in text and 'tainted ("custom-monitor")' in text and "Read-only" in text


def test_cli_startup_does_not_import_libvirt_qemu():
    code = "import sys, vhotplug.cli.main; assert 'libvirt_qemu' not in sys.modules, 'imported at startup'"
    subprocess.run([sys.executable, "-c", code], check=True)
