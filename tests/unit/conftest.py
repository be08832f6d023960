"""Shared by the unit tests of the lab's hypervisor guests (the nested lab's L1, the Xen lab's dom0)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vhotplug.guest.target import METADATA_NS
from vhotplug.lab.nested import L1Image

#: XPath namespaces of a lab domain's XML: vhotplug's metadata and QEMU's command line.
NS = {"vh": METADATA_NS, "qemu": "http://libvirt.org/schemas/domain/qemu/1.0"}
#: libvirt's domain schema, where libvirt-daemon is installed.
DOMAIN_RNG = Path("/usr/share/libvirt/schemas/domain.rng")


@pytest.fixture
def lab_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty lab directory (``$VHOTPLUG_LAB_DIR``) for this test."""
    root = tmp_path / "lab"
    monkeypatch.setenv("VHOTPLUG_LAB_DIR", str(root))
    return root


def fake_l1_image(lab: Path, kind: str) -> L1Image:
    """An L1 image as build_image would describe it in ``lab/KIND``, without building anything."""
    d = lab / kind
    return L1Image("6.1.0-test", d / "vmlinuz-6.1.0-test", d / "initrd.img", "ecdsa-sha2-nistp256 AAAAtest",
                   d / "id_lab", "0123456789abcdef")
