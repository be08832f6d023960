"""--ssh ALIAS through an OpenSSH client config the test writes (issue 13, "OpenSSH's habits"): HostName, Port,
User, IdentityFile, UserKnownHostsFile and ProxyJump, checked on the real lab guest."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lab.conftest import URI, live_aliases


def test_ssh_alias_with_proxyjump_from_an_ssh_config(lab, cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``vhinner`` is the guest's own sshd as the guest sees it (127.0.0.1:22), reached through ``vhlab`` (the
    forward on this machine). Host keys are checked strictly, so only the lab guest's sshd, reached from inside
    the guest, can pass: a login that skipped the jump would meet this machine's port 22 (nothing, or another
    key) and fail."""
    t = lab.info.target
    pinned = t.known_hosts.read_text().split()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{t.port} {pinned[1]} {pinned[2]}\n127.0.0.1 {pinned[1]} {pinned[2]}\n")
    config = tmp_path / "config"
    login = f"    User root\n    IdentityFile {t.key}\n    UserKnownHostsFile {known}\n"
    config.write_text(f"Host vhlab\n    HostName 127.0.0.1\n    Port {t.port}\n{login}"
                      f"Host vhinner\n    HostName 127.0.0.1\n    Port 22\n    ProxyJump vhlab\n{login}")
    monkeypatch.setenv("VHOTPLUG_SSH_PERSIST", "0")  # this command's own login is what is tested
    monkeypatch.setenv("VHOTPLUG_RUN_DIR", str(tmp_path / "run"))
    r = cli("--ssh-config", str(config), "-c", URI, "-o", "json", "attach", "nic", lab.name,
            "--mac", "52:54:00:fa:06:01", "--id", "cfg", "--ssh", "vhinner")
    assert r.code == 0, r.err
    assert r.json()["attached"]["guest"]["driver"] == "virtio_net"
    r = cli("--ssh-config", str(config), "-c", URI, "-o", "json", "detach", lab.name, "cfg", "--ssh", "vhinner")
    assert r.code == 0, r.err
    assert "guest_gone_seconds" in r.json()["detached"] and "ua-cfg" not in live_aliases(lab.name)
