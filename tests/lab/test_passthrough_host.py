"""Passthrough against the real libvirtd and this machine's real PCI devices: refused, never touched.

This machine's PCI devices are its own root disk and network, and it has no IOMMU. ``attach pci`` of the
root disk's function must be refused before anything changes, naming ``/``, and ``--force`` must not help
(no IOMMU). A tripwire on every libvirt call that could change a node device or a domain fails the test
outright if vhotplug ever gets that far.
"""

from __future__ import annotations

import json
from pathlib import Path

import libvirt
import pytest

from tests.unit.test_host_usage import root_fs_pci_function
from vhotplug.cli import main

TRIPWIRES = [(libvirt.virNodeDevice, "detachFlags"), (libvirt.virNodeDevice, "dettach"),
             (libvirt.virNodeDevice, "reAttach"), (libvirt.virNodeDevice, "reset"),
             (libvirt.virDomain, "attachDeviceFlags"), (libvirt.virDomain, "attachDevice"),
             (libvirt.virDomain, "detachDeviceFlags"), (libvirt.virDomain, "detachDeviceAlias")]


@pytest.fixture
def tripwire(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VHOTPLUG_STATE_DIR", str(tmp_path / "state"))
    for cls, name in TRIPWIRES:
        def fail(*_a: object, _name: str = f"{cls.__name__}.{name}", **_k: object) -> None:
            pytest.fail(f"vhotplug called {_name} while refusing a host device")
        monkeypatch.setattr(cls, name, fail)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main.run(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_root_disk_is_refused_naming_root_even_with_force(lab, tripwire, capsys):
    bdf = root_fs_pci_function()
    assert bdf is not None, "this machine's / is expected on a PCI disk (virtio)"
    before = libvirt.open(lab.uri).lookupByName(lab.name).XMLDesc(0)
    for extra in ((), ("--force",)):
        code, out, err = run(capsys, "-c", lab.uri, "attach", "pci", lab.name, bdf, "--live", "--no-verify", *extra)
        assert code == 6, err  # no IOMMU on this machine: the host cannot do it
        assert f"refusing to give PCI device {bdf}" in err and "the host has no IOMMU" in err
        assert "mount / (" in err  # it says the host boots from it (with --force: as the check set aside)
        if extra:
            assert "--force set aside: the host uses" in err
        assert "intel_iommu=on" in err and "Traceback" not in err and out == ""
    code, out, err = run(capsys, "-c", lab.uri, "-o", "json", "host", "list", "--pci")
    doc = json.loads(out)
    mine = next(d for d in doc["devices"] if d["address"] == bdf)
    assert mine["driver"] not in ("vfio-pci", None)  # still on its host driver
    assert libvirt.open(lab.uri).lookupByName(lab.name).XMLDesc(0) == before


def test_unknown_host_device_is_not_found(lab, tripwire, capsys):
    code, _, err = run(capsys, "-c", lab.uri, "attach", "pci", lab.name, "0000:7f:1f.7", "--live", "--no-verify")
    assert code == 3 and "no PCI device 0000:7f:1f.7 on the host" in err


def test_usb_spec_that_matches_nothing_lists_what_there_is(lab, tripwire, capsys):
    code, _, err = run(capsys, "-c", lab.uri, "attach", "usb", lab.name, "host:dead:beef", "--live", "--no-verify")
    assert code == 3 and "no USB device matches dead:beef" in err
