"""Pure logic behind vcpu/memory commands: DIMM spec, room checks, block mapping, CPU lists."""

from __future__ import annotations

import pytest
from lxml import etree

from tests.conftest import GOLDEN
from vhotplug import errors
from vhotplug.devices.dimm import dimm_spec, dimm_xml
from vhotplug.guest.hotplug import cpu_list
from vhotplug.ops.memory import check_room, dimm_blocks, layout
from vhotplug.ops.vcpu import check_target

LAB = (GOLDEN / "lab-live-q35.xml").read_text()


def test_dimm_spec_and_xml():
    spec = dimm_spec(size="256M", node=0, used_aliases={"ua-dimm0"})
    assert spec.size_bytes == 256 << 20 and spec.alias == "ua-dimm1"
    el = dimm_xml(spec)
    assert el.tag == "memory" and el.get("model") == "dimm"
    assert el.find("target/size").text == "262144" and el.find("target/size").get("unit") == "KiB"
    assert el.find("target/node").text == "0" and el.find("alias").get("name") == "ua-dimm1"


@pytest.mark.parametrize(("kw", "words"), [
    ({"size": "100M"}, "not a multiple of the guest's memory block size 128 MiB"),
    ({"size": "128M", "node": 1}, "NUMA node 1 does not exist"),
    ({"size": "128M", "id": "dimm0"}, "duplicate id"),
    ({"size": "0"}, "size"),
])
def test_dimm_spec_refusals(kw, words):
    with pytest.raises(errors.InvalidRequest, match=words):
        dimm_spec(used_aliases={"ua-dimm0"}, **kw)


def test_block_size_comes_from_the_guest():
    assert dimm_spec(size="256M", block_bytes=256 << 20).size_bytes == 256 << 20
    with pytest.raises(errors.InvalidRequest, match="256 MiB"):
        dimm_spec(size="128M", block_bytes=256 << 20)


def test_layout_of_the_lab():
    lay = layout(LAB)
    assert (lay.max_kib, lay.slots, lay.numa_cells, lay.dimms) == (2 << 20, 4, 1, 0)
    assert lay.total_kib == 512 << 10 and lay.free_slots == 4


def test_room_checks():
    lay = layout(LAB)
    check_room(lay, 128 << 20)
    with pytest.raises(errors.InvalidRequest, match="above its maxMemory of 2 GiB"):
        check_room(lay, 2 << 30)
    plain = etree.fromstring(LAB.encode())
    plain.remove(plain.find("maxMemory"))
    with pytest.raises(errors.InvalidRequest, match="no <maxMemory>") as exc:
        check_room(layout(etree.tostring(plain, encoding="unicode")), 128 << 20)
    assert "vhotplug prepare" in (exc.value.hint or "")
    full = etree.fromstring(LAB.encode())
    for _ in range(4):
        dimm = etree.SubElement(full.find("devices"), "memory", model="dimm")
        etree.SubElement(etree.SubElement(dimm, "target"), "size", unit="KiB").text = "131072"
    with pytest.raises(errors.InvalidRequest, match="all 4 slots hold a DIMM"):
        check_room(layout(etree.tostring(full, encoding="unicode")), 128 << 20)


def test_dimm_blocks_from_base_address():
    el = etree.fromstring("<memory model='dimm'><target><size unit='KiB'>262144</size></target>"
                          "<address type='dimm' slot='1' base='0x108000000'/></memory>")
    assert dimm_blocks(el, 128 << 20) == [33, 34]
    with pytest.raises(errors.VhotplugError, match="base address"):
        dimm_blocks(etree.fromstring("<memory model='dimm'><target><size>1</size></target></memory>"), 128 << 20)


def test_cpu_list_format():
    assert cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert cpu_list([3]) == "3" and cpu_list([]) == ""


def test_vcpu_targets():
    check_target(4, 4)
    with pytest.raises(errors.InvalidRequest, match="exceed the maximum of 4") as exc:
        check_target(5, 4)
    assert "vhotplug prepare" in (exc.value.hint or "")
    with pytest.raises(errors.InvalidRequest, match="at least 1 vCPU"):
        check_target(0, 4)
