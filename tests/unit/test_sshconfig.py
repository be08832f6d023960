"""--ssh ALIAS read as ``ssh ALIAS`` would: the OpenSSH client config (vhotplug.guest.sshconfig)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vhotplug import errors
from vhotplug.guest.sshconfig import resolve_spec
from vhotplug.guest.target import SSHTarget, resolve_target

CONFIG = """
Host lab
    HostName 127.0.0.1
    Port 40022
    User ops
    IdentityFile ~/keys/id_lab
    UserKnownHostsFile ~/keys/known_hosts
Host inner
    HostName 169.254.7.2
    Port 22
    ProxyJump lab
Host deep
    HostName 169.254.7.3
    ProxyJump root@169.254.7.1:2200,inner
Host loop
    ProxyJump loop
Host *.bad
    HostName $(reboot)
"""


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config"
    path.write_text(CONFIG)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("VHOTPLUG_SSH_CONFIG", str(path))
    return path


def test_an_alias_takes_host_port_user_key_and_known_hosts(config: Path, tmp_path: Path) -> None:
    t = resolve_spec("lab")
    assert (t.host, t.port, t.user) == ("127.0.0.1", 40022, "ops")
    assert t.key == tmp_path / "keys" / "id_lab" and t.known_hosts == tmp_path / "keys" / "known_hosts"
    assert t.jump is None and "Host lab" in t.source


def test_the_command_line_wins_as_with_ssh(config: Path) -> None:
    t = resolve_spec("root@lab:2222")
    assert (t.host, t.port, t.user) == ("127.0.0.1", 2222, "root")


def test_proxyjump_aliases_and_hops_chain_first_hop_first(config: Path) -> None:
    inner = resolve_spec("inner")
    assert (inner.host, inner.port, inner.user) == ("169.254.7.2", 22, "root")
    assert inner.jump is not None and (inner.jump.host, inner.jump.port, inner.jump.user) == ("127.0.0.1", 40022,
                                                                                              "ops")
    deep = resolve_spec("deep")
    # ProxyJump A,B: A is reached first, B through A, the guest through B; B's own ProxyJump (inner's: lab) gives
    # way to the chain, as with OpenSSH (ssh -J A,B reaches B with -J A).
    assert deep.jump.jump.port == 2200
    chain = []
    hop: SSHTarget | None = deep
    while hop is not None:
        chain.append(hop.host)
        hop = hop.jump
    assert chain == ["169.254.7.3", "169.254.7.2", "169.254.7.1"]
    assert str(deep).count(" via ") == 2


def test_a_proxyjump_loop_is_refused(config: Path) -> None:
    with pytest.raises(errors.InvalidRequest, match="hops deep"):
        resolve_spec("loop")


def test_values_from_the_config_are_checked_like_the_command_line(config: Path) -> None:
    with pytest.raises(errors.InvalidRequest, match="invalid SSH host"):
        resolve_spec("x.bad")


def test_a_plain_target_needs_no_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/config: nothing is read, paramiko not needed
    monkeypatch.delenv("VHOTPLUG_SSH_CONFIG", raising=False)
    t = resolve_spec("root@127.0.0.1:2222")
    assert (t.host, t.port, t.user, t.key, t.source) == ("127.0.0.1", 2222, "root", None, "command line")


def test_a_named_config_that_is_missing_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VHOTPLUG_SSH_CONFIG", str(tmp_path / "nope"))
    with pytest.raises(errors.InvalidRequest, match="does not exist"):
        resolve_spec("lab")


def test_ssh_key_known_hosts_and_ssh_jump_override_the_config(config: Path, tmp_path: Path) -> None:
    key, known = tmp_path / "other_key", tmp_path / "other_known"
    t = resolve_target(None, ssh="inner", key=key, known_hosts=known, jump="lab")  # type: ignore[arg-type]
    assert t.key == key and t.known_hosts == known
    assert t.jump is not None and t.jump.port == 40022 and t.jump.source == "--ssh-jump"
    assert t.jump.key == tmp_path / "keys" / "id_lab"  # the hop's own IdentityFile from the config


def test_global_ssh_config_option_reaches_the_guest_layer(cli, config: Path, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    other = tmp_path / "other_config"
    other.write_text("Host lab\n    HostName 127.0.0.1\n    Port 1\n")
    monkeypatch.delenv("VHOTPLUG_SSH_CONFIG")
    r = cli("--ssh-config", str(other), "-c", "test:///default", "list", "test", "--guest", "--ssh", "lab")
    # The named file's port 1, not the default config's 40022 (refused before connecting: no known_hosts here).
    assert r.code == 8 and "root@127.0.0.1:1 " in r.err, r.err
