"""Parsing the guest probe's output (the script itself runs on the lab in tests/lab)."""

from __future__ import annotations

from vhotplug.guest.probe import parse_cpu_list, parse_probe

SAMPLE = """\
[pci]
0000:00:00.0 0x8086 0x29c0 0x060000 -
0000:01:00.0 0x1af4 0x1041 0x020000 virtio-pci
[net]
eth0 52:54:00:aa:bb:01 up virtio_net virtio0
[block]
vda 2097152 0 vh-data
sr0 0 1 -
[cpu]
online 0-1,3
present 0-3
possible 0-3
[memory]
memtotal_kib 481234
block_size 0x8000000
blocks_online 4
blocks_offline 1
"""


def test_parse_probe():
    v = parse_probe(SAMPLE)
    assert [p.vendor_device for p in v.pci] == ["8086:29c0", "1af4:1041"]
    assert v.pci[1].driver == "virtio-pci" and v.pci[0].driver == "-"
    assert v.net[0].mac == "52:54:00:aa:bb:01" and v.net[0].driver == "virtio_net"
    assert v.block[0].size_bytes == 1 << 30 and v.block[0].serial == "vh-data" and v.block[1].readonly
    assert v.online_cpu_count == 3 and v.cpus_present == "0-3"
    assert v.memtotal_kib == 481234 and v.memory_block_bytes == 128 << 20
    assert (v.memory_blocks_online, v.memory_blocks_offline) == (4, 1)


def test_parse_probe_tolerates_missing_sections():
    v = parse_probe("[cpu]\nonline 0\n")
    assert v.pci == [] and v.online_cpu_count == 1 and v.memtotal_kib == 0


def test_cpu_list():
    assert parse_cpu_list("0-2,5,7-8") == [0, 1, 2, 5, 7, 8]
    assert parse_cpu_list("") == []
