"""libvirt's view of the hot-pluggable devices, on a golden domain XML."""

from __future__ import annotations

import json

from lxml import etree

from tests.conftest import GOLDEN, golden
from vhotplug.virt.devices import format_address, hotpluggable_devices


def test_devices_golden():
    devices = hotpluggable_devices((GOLDEN / "devices-in.xml").read_text())
    golden("devices-out.json", json.dumps([d.to_dict() for d in devices], indent=2) + "\n")


def test_infrastructure_is_not_listed():
    kinds = [d.kind for d in hotpluggable_devices((GOLDEN / "devices-in.xml").read_text())]
    assert "controller" not in kinds and "memballoon" not in kinds
    assert kinds.count("input") == 1  # the USB tablet, not the PS/2 mouse


def test_identities_users_know():
    by_alias = {d.alias: d for d in hotpluggable_devices((GOLDEN / "devices-in.xml").read_text())}
    assert by_alias["ua-mynic"].identity == "52:54:00:12:34:56"
    assert by_alias["ua-mynic"].model == "e1000e" and by_alias["ua-mynic"].source == "user"
    assert by_alias["ua-sata"].source == "0000:06:10.1"
    assert by_alias["hostdev1"].identity == "0781:5567"
    assert by_alias["hostdev2"].source == "2.4"
    assert by_alias["ua-dimm0"].source == "131072 KiB node 0"
    assert by_alias["ua-data"].address == "0000:05:00.0"


def test_address_spellings():
    def addr(xml: str) -> str:
        return format_address(etree.fromstring(xml))

    assert addr("<address type='pci' domain='0x0000' bus='0x0a' slot='0x1f' function='0x7'/>") == "0000:0a:1f.7"
    assert addr("<address type='drive' controller='0' bus='0' target='1' unit='2'/>") == "drive 0:0:1:2"
    assert addr("<address type='usb' bus='0' port='1.2'/>") == "usb 0.1.2"
    assert format_address(None) == "-"


def test_no_devices_element():
    assert hotpluggable_devices("<domain><name>x</name></domain>") == []
