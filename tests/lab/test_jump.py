"""ProxyJump: reach a guest through a jump host, host keys checked at both hops.

The lab guest serves as its own jump host: the first hop is its forward on 127.0.0.1, the second its
dropbear on its own 127.0.0.1:22, reached by a forwarded channel. The same mechanism reaches an L2 guest
through its L1 hypervisor in the nested lab.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import paramiko
import pytest

from tests.lab.conftest import URI
from vhotplug import errors
from vhotplug.guest.ssh import GuestSession
from vhotplug.guest.target import SSHTarget


@pytest.fixture
def inner_known_hosts(lab, tmp_path: Path) -> Path:
    """A known_hosts file with the lab's key for both hops: [127.0.0.1]:PORT (jump) and 127.0.0.1 (inner)."""
    target = lab.info.target
    line = target.known_hosts.read_text().strip()
    key = line.split(None, 1)[1]
    path = tmp_path / "known_hosts"
    path.write_text(f"{line}\n127.0.0.1 {key}\n")
    return path


def inner(lab, known: Path) -> SSHTarget:
    jump = replace(lab.info.target, known_hosts=known)
    return SSHTarget("127.0.0.1", 22, "root", lab.info.target.key, known, source="test", jump=jump)


def test_session_through_a_jump_host(lab, inner_known_hosts):
    target = inner(lab, inner_known_hosts)
    assert str(target) == f"root@127.0.0.1:22 via root@127.0.0.1:{lab.info.target.port}"
    with GuestSession(target) as s:
        r = s.run(["sh", "-c", "echo $SSH_CONNECTION"])
    # dropbear saw the second hop arrive from the guest's own loopback, on port 22.
    fields = r.stdout.split()
    assert fields[0] == "127.0.0.1" and fields[2:] == ["127.0.0.1", "22"], r.stdout


def test_inner_host_key_is_checked_too(lab, inner_known_hosts, tmp_path):
    wrong = tmp_path / "wrong_known_hosts"
    jump_line = inner_known_hosts.read_text().splitlines()[0]
    other = paramiko.ECDSAKey.generate(bits=256)  # a real key, just not the guest's
    wrong.write_text(f"{jump_line}\n127.0.0.1 {other.get_name()} {other.get_base64()}\n")
    target = inner(lab, wrong)
    with pytest.raises(errors.GuestHostKeyError, match="does not match"):
        GuestSession(target).connect()


def test_cli_list_guest_through_a_jump_host(lab, cli, inner_known_hosts):
    t = lab.info.target
    r = cli("-c", URI, "-o", "json", "list", lab.name, "--guest", "--ssh", "root@127.0.0.1:22",
            "--ssh-jump", f"root@127.0.0.1:{t.port}", "--ssh-key", str(t.key), "--known-hosts", str(inner_known_hosts))
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert any(n["mac"] for n in doc["guest"]["net"])


def test_unreachable_second_hop_is_named(lab, inner_known_hosts):
    target = replace(inner(lab, inner_known_hosts), port=2)
    with pytest.raises(errors.GuestUnreachable, match=r"cannot reach 127\.0\.0\.1:2\b"):
        GuestSession(target).connect()
