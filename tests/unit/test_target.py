"""Where the guest is: --ssh spellings and the domain metadata round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from vhotplug import errors
from vhotplug.guest.target import SSHTarget, metadata_element, parse_ssh_spec, target_from_metadata


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
