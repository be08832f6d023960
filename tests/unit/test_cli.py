"""The CLI boundary: exit codes and one-line messages, no tracebacks (libvirt's test driver, no daemon)."""

from __future__ import annotations

import socket

import libvirt
import pytest

from tests.conftest import GOLDEN
from vhotplug.errors import ExitCode
from vhotplug.host import lock

TEST_URI = "test:///default"
NONIC_URI = f"test://{GOLDEN / 'testnode.xml'}"


def test_version(cli):
    r = cli("--version")
    assert r.code == 0 and r.out.startswith("vhotplug ")


def test_help_lists_command_groups(cli):
    r = cli("--help")
    assert r.code == 0
    for word in ("list", "lab", "--connect", "--output"):
        assert word in r.out


def test_list_table_and_json_agree(cli):
    table = cli("-c", TEST_URI, "list", "test")
    assert table.code == 0, table.err
    assert "aa:bb:cc:dd:ee:ff" in table.out and "vda" in table.out
    doc = cli("-c", TEST_URI, "-o", "json", "list", "test").json()
    assert doc["domain"] == "test"
    by_kind = {d["kind"]: d for d in doc["devices"]}
    assert by_kind["interface"]["identity"] == "aa:bb:cc:dd:ee:ff"
    assert by_kind["interface"]["address"] == "0000:00:01.0"
    assert by_kind["disk"]["identity"] == "vda" and by_kind["disk"]["source"] == "/guest/diskimage1"
    for dev in doc["devices"]:  # every JSON fact is in the table too
        assert dev["identity"] in table.out and dev["address"] in table.out


def test_domain_by_id_and_uuid(cli):
    for ident in ("1", "6695eb01-f6a4-8304-79aa-97f2502e193f"):
        assert cli("-c", TEST_URI, "-o", "json", "list", ident).json()["domain"] == "test"


def test_unknown_domain(cli):
    r = cli("-c", TEST_URI, "list", "nosuch")
    assert r.code == ExitCode.NOT_FOUND
    assert r.err.startswith("vhotplug: error: domain not found") and "Traceback" not in r.err


def test_bad_uri(cli):
    r = cli("-c", "nosuchdriver:///x", "list", "test")
    assert r.code == ExitCode.CONNECTION
    assert "cannot connect to nosuchdriver:///x" in r.err and "Traceback" not in r.err


def test_libvirtd_down(cli, tmp_path):
    # A daemon that is not running is a socket nobody listens on.
    r = cli("-c", f"qemu+unix:///system?socket={tmp_path}/libvirt-sock", "list", "x")
    assert r.code == ExitCode.CONNECTION
    assert "cannot connect" in r.err and "hint:" in r.err and "Traceback" not in r.err


def test_default_uri_from_environment(cli, monkeypatch):
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", TEST_URI)
    assert cli("-o", "json", "list", "test").json()["domain"] == "test"


def test_guest_unreachable(cli):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = cli("-c", TEST_URI, "list", "test", "--guest", "--ssh", f"root@127.0.0.1:{port}",
            "--accept-new-host-key", "--known-hosts", "/dev/null")
    assert r.code == ExitCode.GUEST_UNREACHABLE, r.err
    assert "cannot reach guest at root@127.0.0.1" in r.err and "Traceback" not in r.err


def test_guest_target_unknown(cli):
    r = cli("-c", NONIC_URI, "list", "nonic", "--guest")
    assert r.code == ExitCode.GUEST_UNREACHABLE, r.err
    assert "do not know how to reach the guest" in r.err and "--ssh" in r.err


def test_bad_ssh_spec_is_a_refusal(cli):
    r = cli("-c", TEST_URI, "list", "test", "--guest", "--ssh", "root@bad host:22")
    assert r.code == ExitCode.INVALID and "invalid SSH" in r.err


def test_usage_error_exit_code(cli):
    r = cli("list")
    assert r.code == ExitCode.USAGE and "Missing argument" in r.err


def test_bad_output_format(cli):
    assert cli("-o", "yaml", "list", "x").code == ExitCode.USAGE


def test_debug_shows_traceback(cli):
    r = cli("--debug", "-c", TEST_URI, "list", "nosuch")
    assert r.code == ExitCode.NOT_FOUND and "Traceback" in r.err


def test_lab_print_xml_changes_nothing(cli):
    r = cli("lab", "up", "--name", "vhl-printonly", "--print-xml")
    assert r.code == 0 and "<name>vhl-printonly</name>" in r.out


def test_lab_bad_machine(cli):
    r = cli("lab", "up", "--machine", "isapc", "--print-xml")
    assert r.code == ExitCode.INVALID and "expected q35 or pc" in r.err


def test_real_process_exit_codes():
    """The console entry skips interpreter teardown: exit codes and output must survive that."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "vhotplug", "-c", TEST_URI, "list", "nosuch"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == ExitCode.NOT_FOUND and done.stderr.startswith("vhotplug: error: domain not found")
    done = subprocess.run([sys.executable, "-m", "vhotplug", "-c", TEST_URI, "-o", "json", "list", "test"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and '"domain": "test"' in done.stdout


# -- one vhotplug at a time per domain ------------------------------------------------------------------------

LOCKED_COMMANDS = [
    ("attach", "nic", "test", "--config"),
    ("attach", "disk", "test", "--size", "16M", "--config"),
    ("vcpu", "set", "test", "2", "--config"),
    ("memory", "balloon", "test", "512M", "--no-verify"),
    ("detach", "test", "ua-none", "--config"),
]


@pytest.mark.parametrize("args", LOCKED_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_changing_commands_take_the_domain_lock(cli, tmp_path, monkeypatch, args):
    monkeypatch.setenv("VHOTPLUG_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("VHOTPLUG_IMAGE_DIR", str(tmp_path / "images"))
    uuid = libvirt.open(TEST_URI).lookupByName("test").UUIDString()
    with lock.acquire([lock.domain_key(uuid)]):
        r = cli("-c", TEST_URI, *args)
    assert r.code == 13, r.err
    assert f"busy: domain-{uuid} is held by this process" in r.err and "--wait-lock" in r.err
    assert not (tmp_path / "images").exists()  # refused before anything was made
