"""Host facts copied from another host: the snapshot script's output rebuilt locally gives the same answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_host_usage import IPV4, build_host, root_fs_pci_function
from vhotplug.addresses import parse_bdf
from vhotplug.host import facts, snapshot
from vhotplug.host.sysfs import Sysfs
from vhotplug.host.usage import HostUse

FIXTURE_BDFS = ["00:02.0", "00:03.0", "00:04.0", "00:05.0", "00:06.0", "00:1c.0", "01:00.0", "00:1f.0", "00:1f.2",
                "00:1f.3", "02:00.0"]


def run_script(root: str) -> dict:
    out = subprocess.run([sys.executable, "-c", snapshot.SNAPSHOT_SCRIPT, root], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return json.loads(out)


def test_fixture_host_round_trips(tmp_path):
    build_host(tmp_path / "host")
    doc = run_script(str(tmp_path / "host"))
    doc["ipv4"] = IPV4  # the fixture's addresses, as `ip` on that host would report them
    copy = snapshot.materialize(doc, tmp_path / "copy")
    original, rebuilt = HostUse(tmp_path / "host", ipv4=IPV4), HostUse(copy)
    for bdf in FIXTURE_BDFS:
        assert rebuilt.pci_usages(bdf) == original.pci_usages(bdf), bdf
        assert rebuilt.group_members(bdf) == original.group_members(bdf), bdf
    assert Sysfs(copy).iommu_status().groups == Sysfs(tmp_path / "host").iommu_status().groups
    assert Sysfs(copy).pci_class(parse_bdf("00:1c.0")) == 0x060400


def test_real_host_snapshot_still_names_the_root_mount(tmp_path):
    bdf = root_fs_pci_function()
    if bdf is None:
        pytest.skip("/ is not on a PCI block device here")
    doc = run_script("")
    assert doc["ipv4"] is not None  # read with `ip` on the host itself
    copy = snapshot.materialize(doc, tmp_path / "copy")
    used = HostUse(copy).pci_usages(bdf)
    assert any(u.kind == "mount" and u.detail.startswith("/ (") for u in used), used
    assert HostUse(copy).pci_usages(bdf) == HostUse("/").pci_usages(bdf)


@pytest.mark.parametrize("doc", [
    {"version": 1, "files": {"/../../etc/evil": "x"}},
    {"version": 1, "links": {"/sys/block/vda": "../../../../../../../etc"}},
    {"version": 2},
])
def test_a_hostile_snapshot_cannot_reach_outside(tmp_path, doc):
    with pytest.raises(ValueError):
        snapshot.materialize(doc, tmp_path / "copy")
    assert not (tmp_path / "etc").exists()


def test_absolute_link_targets_are_rerooted(tmp_path):
    doc = {"version": 1, "dirs": ["/sys/devices/x"], "links": {"/sys/block/vda": "/sys/devices/x"}, "files": {}}
    copy = snapshot.materialize(doc, tmp_path / "copy")
    assert (copy / "sys/block/vda").resolve() == (copy / "sys/devices/x").resolve()
    assert snapshot.read_ipv4(copy) is None


# -- where the facts come from -------------------------------------------------------------------------------


def test_ssh_uri_gives_the_same_login_as_libvirt():
    t = facts.ssh_target_from_uri("qemu+ssh://admin@127.0.0.1:2222/system?keyfile=/k/id&known_hosts=/k/kh")
    assert (t.user, t.host, t.port, t.key, t.known_hosts) == ("admin", "127.0.0.1", 2222, Path("/k/id"),
                                                              Path("/k/kh"))
    default = facts.ssh_target_from_uri("qemu+ssh://hv1.example/system")
    assert default.port == 22 and default.key is None
    assert facts.ssh_target_from_uri("qemu+tls://hv1.example/system") is None
    assert facts.ssh_target_from_uri("qemu:///system") is None


def test_facts_for_local_test_and_tls_uris():
    assert facts.facts_for_uri("qemu:///system").root == Path("/")
    for uri in ("test:///default", "qemu+tls://hv1.example/system"):
        found = facts.facts_for_uri(uri)
        assert found.root is None and "not reached over SSH" in (found.why_not or "")


class LocalShell:
    """Stands in for the SSH session to the hypervisor: runs the same command line here."""

    def __init__(self, target, **_kw) -> None:
        self.target = target

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def run_script(self, script: str, *, timeout: float, check: bool):
        from vhotplug.guest.ssh import Result

        done = subprocess.run(["sh", "-c", script.replace("python3", sys.executable, 1)], capture_output=True,
                              text=True, timeout=timeout)
        return Result(done.returncode, done.stdout, done.stderr)


def test_remote_snapshot_is_materialized_and_cleaned_up(monkeypatch):
    import vhotplug.guest.ssh as ssh

    monkeypatch.setattr(ssh, "GuestSession", LocalShell)
    found = facts.facts_for_uri("qemu+ssh://root@127.0.0.1:2222/system?keyfile=/k")
    assert found.root is not None and found.root != Path("/") and found.root.is_dir()
    bdf = root_fs_pci_function()
    if bdf is not None:
        assert any(u.kind == "mount" for u in HostUse(found.root).pci_usages(bdf))
    facts.cleanup()
    assert not found.root.exists()


def test_remote_snapshot_failure_is_a_reason_not_a_crash(monkeypatch):
    import vhotplug.guest.ssh as ssh

    class NoPython(LocalShell):
        def run_script(self, script: str, *, timeout: float, check: bool):
            from vhotplug.guest.ssh import Result

            return Result(127, "", "sh: python3: not found")

    monkeypatch.setattr(ssh, "GuestSession", NoPython)
    found = facts.facts_for_uri("qemu+ssh://root@127.0.0.1:2222/system")
    assert found.root is None and "python3: not found" in found.why_not
