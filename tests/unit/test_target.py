"""Where the guest is: --ssh spellings and the domain metadata round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from vhotplug import errors
from vhotplug.guest.target import (
    SSHTarget,
    metadata_element,
    parse_ssh_spec,
    resolve_target,
    target_from_metadata,
)


@pytest.mark.parametrize(("spec", "user", "host", "port"), [
    ("10.0.0.5", "root", "10.0.0.5", 22),
    ("admin@guest.example:2222", "admin", "guest.example", 2222),
    ("root@[::1]:2200", "root", "::1", 2200),
    ("[fe80::1]", "root", "fe80::1", 22),
])
def test_parse_ssh_spec(spec, user, host, port):
    t = parse_ssh_spec(spec)
    assert (t.user, t.host, t.port) == (user, host, port)


@pytest.mark.parametrize("spec", ["", "root@", "a b@host", "host:0", "host:70000", "host:x", "ho;st",
                                  "$(reboot)@h", "host name", "[::1]x"])
def test_parse_ssh_spec_refuses(spec):
    with pytest.raises(errors.InvalidRequest):
        parse_ssh_spec(spec)


def test_metadata_round_trip():
    t = SSHTarget("127.0.0.1", 40222, "root", Path("/var/lib/k"), Path("/var/lib/kh"))
    domain = etree.fromstring("<domain><metadata/></domain>")
    domain.find("metadata").append(metadata_element(t))
    back = target_from_metadata(etree.tostring(domain))
    assert back is not None
    assert (back.host, back.port, back.user, back.key, back.known_hosts) == (
        t.host, t.port, t.user, t.key, t.known_hosts)
    assert back.source == "domain metadata"


def test_metadata_absent_or_tampered():
    assert target_from_metadata("<domain><metadata/></domain>") is None
    bad = ("<domain><metadata><vh:guest xmlns:vh='urn:vhotplug:guest:1'>"
           "<vh:ssh host='x;reboot' port='22'/></vh:guest></metadata></domain>")
    with pytest.raises(errors.InvalidRequest):
        target_from_metadata(bad)


def test_metadata_round_trip_with_jump_hosts():
    outer = SSHTarget("127.0.0.1", 40100, "root", Path("/k1"), Path("/kh1"))
    middle = SSHTarget("127.0.0.1", 40200, "admin", Path("/k2"), Path("/kh2"), jump=outer)
    t = SSHTarget("127.0.0.1", 2222, "root", Path("/k3"), Path("/kh3"), jump=middle)
    domain = etree.fromstring("<domain><metadata/></domain>")
    domain.find("metadata").append(metadata_element(t))
    back = target_from_metadata(etree.tostring(domain))
    assert str(back) == "root@127.0.0.1:2222 via admin@127.0.0.1:40200 via root@127.0.0.1:40100"
    assert back.jump.key == Path("/k2") and back.jump.jump.known_hosts == Path("/kh1")
    assert back.jump.jump.jump is None


def test_metadata_jump_is_validated():
    bad = ("<domain><metadata><vh:guest xmlns:vh='urn:vhotplug:guest:1'>"
           "<vh:ssh host='127.0.0.1' port='22'><vh:jump host='127.0.0.1' port='99999'/></vh:ssh>"
           "</vh:guest></metadata></domain>")
    with pytest.raises(errors.InvalidRequest, match="invalid SSH port"):
        target_from_metadata(bad)


def test_resolve_target_with_ssh_jump():
    class Dom:
        def XMLDesc(self, flags: int = 0) -> str:
            return "<domain><name>d</name><metadata/></domain>"

        def name(self) -> str:
            return "d"

    t = resolve_target(Dom(), ssh="root@10.0.0.5", key=Path("/k"), known_hosts=Path("/kh"),
                       jump="admin@127.0.0.1:2200")
    assert str(t) == "root@10.0.0.5:22 via admin@127.0.0.1:2200"
    assert t.jump.key == Path("/k") and t.jump.known_hosts == Path("/kh")
    with pytest.raises(errors.InvalidRequest):
        resolve_target(Dom(), ssh="root@10.0.0.5", key=None, known_hosts=None, jump="a b@host")
