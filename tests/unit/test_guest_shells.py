"""Every guest-side script on any Linux guest: dash, bash and busybox sh; no busybox-only applet; a non-root SSH
user whose privileged steps go through ``sudo -n``; the NIC's final name after udev renames it; ``--ping`` with
whatever DHCP the guest has; a CPU or memory block the guest onlined itself.

As in test_watch.py, the scripts are the real ones, run by each shell on this host against a fake sysfs in
tmp_path (its root passed as the scripts' sysroot argument). The guest's programs are small stubs on its PATH
(``sudo``, ``ip``, ``ping``, DHCP clients, ``networkctl``, ``nmcli``) that record how they were called; nothing
here runs the host's own ``ip``, DHCP client or sudo, nor writes to its /sys.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from tests.unit.test_watch import (
    SHELLS,
    SYSTEM_PATH,
    FakeSys,
    LocalSession,
    guest_bin,
    later,
    login_shell,
    reap,
)
from vhotplug import errors
from vhotplug.devices.dimm import DimmSpec
from vhotplug.errors import ExitCode
from vhotplug.guest import hotplug, ping, privilege, shell
from vhotplug.guest.probe import PROBE_SCRIPT
from vhotplug.guest.watch import WATCH_SCRIPT, Identity, start_watch
from vhotplug.ops import check
from vhotplug.ops.memory import add_dimm, remove_dimm
from vhotplug.ops.vcpu import set_vcpus

#: Every script vhotplug runs inside a guest.
GUEST_SCRIPTS = {
    "watch": WATCH_SCRIPT, "probe": PROBE_SCRIPT, "check": check.GUEST_SCRIPT, "dhcp": ping.DHCP_SCRIPT,
    "wait_equals": hotplug._WAIT_EQUALS, "wait_blocks": hotplug._WAIT_BLOCKS, "set_blocks": hotplug._SET_BLOCKS,
    "set_cpus": hotplug._SET_CPUS, "cpu_state": hotplug._CPU_STATE, "exec": privilege._EXEC,
}

# What stops a script under dash or busybox (or is undefined in POSIX sh), as checkbashisms looks for it.
BASHISMS = {
    "[[ test": r"\[\[", "${var//a/b} or ${var/a/b}": r"\$\{\w+//?", "${var:N:M}": r"\$\{\w+:[0-9]",
    "arrays": r"\w+=\(|\$\{\w+\[", "here-string": r"<<<", "$'...'": r"\$'", "function keyword": r"^\s*function\s",
    "== in test": r"\[ [^]]*==", "&> redirection": r"&>", "local": r"\blocal\s", "source": r"^\s*source\s",
    "$RANDOM/$BASH...": r"\$\{?(RANDOM|BASH\w*|SECONDS|PIPESTATUS)", "echo -e/-n": r"\becho -[en]\b",
}


# --------------------------------------------------------------------------------------------------
# every script, every shell


@pytest.mark.parametrize("name", sorted(GUEST_SCRIPTS))
def test_scripts_use_posix_sh_only(name):
    text = GUEST_SCRIPTS[name]
    found = [what for what, pattern in BASHISMS.items() if re.search(pattern, text, re.MULTILINE)]
    assert not found, f"{name}: {found}"
    assert text.startswith(shell.PREAMBLE), f"{name} does not extend PATH nor choose its nap"
    assert "usleep" not in text.removeprefix(shell.PREAMBLE), f"{name} calls usleep itself: use nap"


@pytest.mark.parametrize("sh", list(SHELLS))
@pytest.mark.parametrize("name", sorted(GUEST_SCRIPTS))
def test_every_script_parses_under_every_shell(sh, name):
    done = subprocess.run([*login_shell(sh), "-n", "-c", GUEST_SCRIPTS[name]], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0 and not done.stderr, done.stderr


def _record(bindir: Path, name: str, body: str = "") -> Path:
    """A guest program that records each call (argv, NUL-separated, after a \\x1e) in $VH_LOG, then runs body."""
    path = bindir / name
    path.write_text(f"#!/bin/sh\n{{ printf '\\036'; printf '%s\\0' {name} \"$@\"; }} >> \"$VH_LOG\"\n{body}\n")
    path.chmod(0o755)
    return path


def calls(log: Path, name: str | None = None) -> list[list[str]]:
    """What the stubs recorded, in order: each call's argv (program name first)."""
    text = log.read_text() if log.exists() else ""
    argvs = [rec.split("\0")[:-1] for rec in text.split("\x1e")[1:]]
    return [a for a in argvs if name is None or a[0] == name]


def test_busybox_naps_with_its_usleep_as_before(tmp_path):
    """busybox-static (the lab guest's) runs its applets before anything on PATH: usleep is always there."""
    script = shell.script('echo "$PATH"; command -v usleep; nap 20000 0.02 && echo napped')
    done = subprocess.run([*login_shell("busybox"), "-c", script], capture_output=True, text=True,
                          env={"PATH": str(tmp_path)}, check=True)
    assert done.stdout.split() == [f"{tmp_path}:/usr/sbin:/sbin:/usr/bin:/bin", "usleep", "napped"]


@pytest.mark.parametrize("sh", ["dash", "bash"])
def test_preamble_extends_path_and_naps_with_usleep_else_sleep(tmp_path, sh):
    """usleep where the guest has one, else sleep with a fraction; chosen once. (Stubs show which ran: busybox's
    own shell would run its applets instead, see above.)"""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _record(bindir, "sleep")
    log = tmp_path / "log"
    script = shell.script('echo "$PATH"; nap 20000 0.02; nap 200000 0.2')
    env = {"PATH": str(bindir), "VH_LOG": str(log)}
    out = subprocess.run([*login_shell(sh), "-c", script], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == f"{bindir}:/usr/sbin:/sbin:/usr/bin:/bin"
    assert calls(log) == [["sleep", "0.02"], ["sleep", "0.2"]]
    _record(bindir, "usleep")
    log.unlink()
    subprocess.run([*login_shell(sh), "-c", script], capture_output=True, env=env, check=True)
    assert calls(log) == [["usleep", "20000"], ["usleep", "200000"]]


@pytest.mark.parametrize("sh", list(SHELLS))
def test_guest_kernel_check_runs_under_every_shell(sh):
    """check's script reads the host's own /sys, /proc and /boot here: read-only, as in test_check.py."""
    done = subprocess.run([*login_shell(sh), "-c", check.GUEST_SCRIPT], capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 0, done.stderr
    kernel = check.parse_guest(done.stdout)
    assert kernel.release and {"pciehp", "acpiphp", "memory", "cpuhp_states", "cpus_possible"} <= set(kernel.sysfs)


# --------------------------------------------------------------------------------------------------
# a guest: its sh, stubs on its PATH, a fake sysfs, and an SSH user (root, or ops with sudo)


@dataclass(frozen=True)
class Target:
    user: str

    def __str__(self) -> str:
        return f"{self.user}@guest"


class Guest(LocalSession):
    """A LocalSession as SSH user ``user``, used as a context manager like GuestSession."""

    def __init__(self, bindir: Path, sh: str, tmp: Path) -> None:
        super().__init__(bindir, sh)
        self.bindir = bindir
        self.log = tmp / "log"
        self.state = tmp / "state"
        self.state.mkdir()
        self.env.update(VH_LOG=str(self.log), VH_STATE=str(self.state), VH_BIN=str(bindir), VH_SUDO="allow")
        self.target = Target("root")  # type: ignore[assignment]

    def as_user(self, user: str, sudo: str = "allow") -> Guest:
        self.target = Target(user)  # type: ignore[assignment]
        self.env["VH_SUDO"] = sudo
        return self

    def stub(self, name: str, body: str = "") -> Path:
        return _record(self.bindir, name, body)

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


# sudo as the guest's, with a NOPASSWD rule (VH_SUDO=allow) or one that wants a password: runs "/bin/sh" as the
# shell under test. A call without -n would have prompted: it fails too, so the tests see every call is -n.
SUDO = """case $VH_SUDO in password) echo "sudo: a password is required" >&2; exit 1 ;; esac
[ "$1" = -n ] || { echo "sudo: a terminal is required to read the password" >&2; exit 1; }
shift
if [ "$1" = /bin/sh ]; then shift; exec "$VH_BIN/sh" "$@"; fi
exec "$@"
"""

# ip as far as ping.py uses it: the interface's IPv4 address lives in $VH_STATE/addr4.
IP = """case "$*" in
  "link set dev "*" up") ;;
  "-o -4 addr show dev "*) cat "$VH_STATE/addr4" 2>/dev/null || : ;;
  "-o -6 addr show dev "*) ;;
  "addr add "*" dev "*) printf '3: %s    inet %s scope global %s\\n' "$5" "$3" "$5" > "$VH_STATE/addr4" ;;
  *) echo "ip (stub): unexpected: $*" >&2; exit 2 ;;
esac
"""

PING = """echo "PING $8 ($8): 56 data bytes"
echo "3 packets transmitted, 3 packets received, 0% packet loss"
echo "round-trip min/avg/max = 0.5/0.7/0.9 ms"
"""


@pytest.fixture(params=list(SHELLS))
def guest(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Guest, FakeSys]]:
    bindir = guest_bin(tmp_path / "bin", request.param)
    session = Guest(bindir, request.param, tmp_path)
    session.stub("sudo", SUDO)
    sysfs = FakeSys(tmp_path / "guest root $(x) ;'")
    yield session, sysfs
    sysfs.stop()
    reap(session)


def sudo_calls(session: Guest) -> list[list[str]]:
    return [argv[1:] for argv in calls(session.log, "sudo")]


# --------------------------------------------------------------------------------------------------
# privileged steps and sudo


def test_root_runs_everything_as_it_is(guest):
    session, _ = guest
    assert privilege.command_argv(session, ["ip", "link"], privileged=True) == ["ip", "link"]
    assert privilege.script_argv(session, "true", "a", privileged=True) == ["sh", "-c", "true", "sh", "a"]
    privilege.require(session, "online the new CPUs")
    assert session.ran == [] and not session.log.exists()  # a root login is asked nothing


def test_another_user_gets_sudo_n_for_privileged_steps_only(guest):
    session, _ = guest
    session.as_user("ops")
    assert privilege.command_argv(session, ["ip", "link"], privileged=True) == [
        "sudo", "-n", "/bin/sh", "-c", privilege._EXEC, "sh", "ip", "link"]
    assert privilege.command_argv(session, ["ip", "-o"], privileged=False) == [
        "sh", "-c", privilege._EXEC, "sh", "ip", "-o"]  # as the user, with the system directories on PATH
    assert privilege.script_argv(session, "true", "a", privileged=True) == [
        "sudo", "-n", "/bin/sh", "-c", "true", "sh", "a"]
    privilege.require(session, "online the new CPUs")
    assert sudo_calls(session) == [["-n", "/bin/sh", "-c", "exit 0"]]


def test_sudo_wanting_a_password_is_one_line_naming_the_rule(guest):
    session, _ = guest
    session.as_user("ops", sudo="password")
    with pytest.raises(errors.GuestPrivilege) as exc:
        privilege.require(session, "online the new CPUs")
    err = exc.value
    assert err.exit_code == ExitCode.GUEST_PRIVILEGE == 16
    assert err.message == ("guest user ops cannot online the new CPUs as root: sudo -n refused: sudo: a password is "
                           "required; the guest's sudoers needs: ops ALL=(root) NOPASSWD: /bin/sh")
    assert "\n" not in err.message and err.hint is None


def test_a_sudo_that_requires_a_tty_names_that_default_too(guest):
    session, _ = guest
    session.stub("sudo", 'echo "sudo: sorry, you must have a tty to run sudo" >&2; exit 1')
    session.as_user("ops")
    with pytest.raises(errors.GuestPrivilege, match=r"must have a tty to run sudo; the guest's sudoers needs: ops "
                                                    r"ALL=\(root\) NOPASSWD: /bin/sh and Defaults:ops !requiretty$"):
        privilege.require(session, "offline CPUs")


def test_a_guest_without_sudo_is_said_so(guest):
    session, _ = guest
    (session.bindir / "sudo").unlink()  # the login shell's PATH is the guest's bindir only
    session.as_user("ops")
    with pytest.raises(errors.GuestPrivilege, match=r"cannot offline CPUs as root: the guest has no sudo \(.*not "
                                                    r"found.*\); the guest's sudoers needs: ops ALL=\(root\) "):
        privilege.require(session, "offline CPUs")


# --------------------------------------------------------------------------------------------------
# CPUs and memory blocks, in a fake sysfs


def cpus(sysfs: FakeSys, online: dict[int, str], present: str) -> Path:
    cpu = sysfs.root / "sys/devices/system/cpu"
    cpu.mkdir(parents=True, exist_ok=True)
    for c, state in online.items():
        (cpu / f"cpu{c}").mkdir(parents=True, exist_ok=True)
        (cpu / f"cpu{c}/online").write_text(f"{state}\n")
    (cpu / "present").write_text(f"{present}\n")
    (cpu / "online").write_text("0\n")
    return cpu


def blocks(sysfs: FakeSys, states: dict[int, str]) -> Path:
    mem = sysfs.root / "sys/devices/system/memory"
    for b, state in states.items():
        (mem / f"memory{b}").mkdir(parents=True, exist_ok=True)
        (mem / f"memory{b}/state").write_text(f"{state}\n")
    return mem


@pytest.mark.parametrize("user", ["root", "ops"])
def test_cpus_onlined_by_vhotplug_or_already_by_the_guest(guest, user):
    session, sysfs = guest
    session.as_user(user)
    cpu = cpus(sysfs, {1: "0", 2: "1"}, "0-2")  # cpu2: the guest's udev rule was first
    by = hotplug.set_cpus_online(session, [1, 2], True, sysroot=str(sysfs.root))
    assert by == {1: "vhotplug", 2: "guest"} and hotplug.onlined_by(by.values()) == "vhotplug"
    assert (cpu / "cpu1/online").read_text().strip() == "1"
    assert hotplug.onlined_by(hotplug.set_cpus_online(session, [1, 2], True, sysroot=str(sysfs.root)).values()) \
        == "guest"
    assert hotplug.set_cpus_online(session, [2], False, sysroot=str(sysfs.root)) == {2: "vhotplug"}
    assert (cpu / "cpu2/online").read_text().strip() == "0"
    through_sudo = [argv[3] for argv in sudo_calls(session)]
    assert through_sudo == ([hotplug._SET_CPUS] * 3 if user == "ops" else [])


def test_a_cpu_the_guest_refuses_is_named(guest):
    session, sysfs = guest
    cpu = cpus(sysfs, {1: "0"}, "0-2")
    (cpu / "cpu2/online").mkdir(parents=True)  # a write the kernel refuses
    with pytest.raises(errors.GuestCommandFailed, match=r"could not online CPU\(s\) 2: .*online"):
        hotplug.set_cpus_online(session, [1, 2], True, sysroot=str(sysfs.root))
    assert (cpu / "cpu1/online").read_text().strip() == "1"  # the others still done


@pytest.mark.parametrize("user", ["root", "ops"])
def test_memory_blocks_onlined_by_vhotplug_or_already_by_the_guest(guest, user):
    session, sysfs = guest
    session.as_user(user)
    mem = blocks(sysfs, {32: "offline", 33: "online"})
    placed = hotplug.set_blocks(session, [32, 33], "online_movable", sysroot=str(sysfs.root))
    assert placed == {32: hotplug.BlockState("online_movable", "vhotplug"), 33: hotplug.BlockState("online", "guest")}
    (mem / "memory32/state").write_text("online\n")  # what the kernel shows once it is online
    assert hotplug.onlined_by(b.by for b in hotplug.set_blocks(session, [32, 33], "online",
                                                               sysroot=str(sysfs.root)).values()) == "guest"
    assert hotplug.set_blocks(session, [32], "offline", sysroot=str(sysfs.root))[32].by == "vhotplug"
    assert len(sudo_calls(session)) == (3 if user == "ops" else 0)


def test_a_block_the_guest_refuses_is_named(guest):
    session, sysfs = guest
    mem = blocks(sysfs, {32: "online"})
    (mem / "memory33/state").mkdir(parents=True)  # offlining memory still in use: refused
    with pytest.raises(errors.GuestCommandFailed, match=r"could not set memory block\(s\) 33 offline \(now: "
                                                        r"32 offline, 33 \?\): .*state"):
        hotplug.set_blocks(session, [32, 33], "offline", sysroot=str(sysfs.root))


def test_waits_and_state_read_the_tree(guest):
    session, sysfs = guest
    root = str(sysfs.root)
    cpu = cpus(sysfs, {1: "0"}, "0")
    later(0.15, lambda: (cpu / "present").write_text("0-1\n"))
    reached, seen, took = hotplug.wait_equals(session, f"{hotplug.SYS_CPU}/present", "0-1", timeout=5, sysroot=root)
    assert reached and seen == "0-1" and 0.1 <= took < 4
    assert hotplug.wait_equals(session, f"{hotplug.SYS_CPU}/present", "0-3", timeout=0.2, sysroot=root)[:2] == (
        False, "0-1")
    later(0.15, lambda: blocks(sysfs, {40: "offline"}))
    assert 0.1 <= hotplug.wait_blocks(session, [40], timeout=5, sysroot=root) < 4
    with pytest.raises(errors.Timeout, match=r"memory blocks 41 within 0\.2 s"):
        hotplug.wait_blocks(session, [41], timeout=0.2, sysroot=root)
    (cpu / "online").write_text("0-1\n")
    (sysfs.root / "proc/cpuinfo").write_text("processor\t: 0\n\nprocessor\t: 1\n\n")
    (sysfs.root / "proc/meminfo").write_text("MemTotal:        1001 kB\nMemFree:  5 kB\n")
    assert hotplug.state(session, sysroot=root) == hotplug.CpuMemState([0, 1], [0, 1], 2, 1001)
    assert session.log.exists() is False  # reading needs no sudo


# --------------------------------------------------------------------------------------------------
# vcpu set / memory add with the guest's half of the job: onlined by the guest, or refused before any change


class FakeConn:
    def getType(self) -> str:
        return "QEMU"


class UdevGuestDom:
    """libvirt and QEMU for a guest whose udev rules online hot-added CPUs and memory themselves (RHEL)."""

    def __init__(self, sysfs: FakeSys) -> None:
        self.root = sysfs.root
        self.vcpus = 1
        self.calls: list[str] = []
        self.dimms: list[str] = []
        cpus(sysfs, {}, "0")
        (self.root / "sys/devices/system/cpu/online").write_text("0\n")
        self._proc(1, 1 << 20)

    def _proc(self, ncpu: int, memtotal: int) -> None:
        (self.root / "proc/cpuinfo").write_text("".join(f"processor\t: {i}\n\n" for i in range(ncpu)))
        (self.root / "proc/meminfo").write_text(f"MemTotal:       {memtotal} kB\n")
        self.memtotal = memtotal

    def vcpusFlags(self, flags: int) -> int:
        return 4 if flags & libvirt.VIR_DOMAIN_VCPU_MAXIMUM else self.vcpus

    def setVcpusFlags(self, n: int, flags: int) -> int:
        self.calls.append(f"vcpus {n}")
        cpu = self.root / "sys/devices/system/cpu"
        for c in range(self.vcpus, n):  # present, and at once online: the guest's own rule
            (cpu / f"cpu{c}").mkdir(exist_ok=True)
            (cpu / f"cpu{c}/online").write_text("1\n")
        (cpu / "present").write_text(f"0-{n - 1}\n")
        (cpu / "online").write_text(f"0-{n - 1}\n")
        self.vcpus = n
        self._proc(n, self.memtotal)
        return 0

    def attachDeviceFlags(self, xml: str, flags: int) -> int:
        self.calls.append("attach")
        self.dimms.append(etree.fromstring(xml).find("alias").get("name"))
        blocks_dir = self.root / "sys/devices/system/memory/memory32"
        blocks_dir.mkdir(parents=True)
        (blocks_dir / "state").write_text("online\n")  # auto_online_blocks / the udev rule
        self._proc(self.vcpus, self.memtotal + 131072)
        return 0

    def XMLDesc(self, flags: int = 0) -> str:
        dimms = "".join(f"<memory model='dimm'><target><size unit='KiB'>131072</size><node>0</node></target>"
                        f"<alias name='{a}'/><address type='dimm' slot='0' base='0x100000000'/></memory>"
                        for a in self.dimms)
        return f"<domain type='kvm'><name>guest</name><devices>{dimms}</devices></domain>"


@pytest.fixture
def in_tree(monkeypatch, guest):
    """vhotplug's guest steps read and write the fake tree: each hotplug function gets its sysroot."""
    session, sysfs = guest
    for name in ("state", "wait_equals", "set_cpus_online", "wait_blocks", "set_blocks"):
        monkeypatch.setattr(hotplug, name, functools.partial(getattr(hotplug, name), sysroot=str(sysfs.root)))
    return session, sysfs


@pytest.mark.parametrize("user", ["root", "ops"])
def test_vcpus_the_guest_onlined_itself_are_success_said_so(in_tree, user):
    session, sysfs = in_tree
    session.as_user(user)
    dom = UdevGuestDom(sysfs)
    outcome = set_vcpus(FakeConn(), dom, 3, live=True, config=False, session=session, timeout=5)
    doc = outcome.to_dict()
    assert (doc["before"], doc["after"], doc["onlined_by"]) == (1, 3, "guest")
    assert doc["guest"] == {"online": "0-2", "cpuinfo": 3}  # the existing fields, unchanged


def test_vcpu_change_refused_before_libvirt_is_asked_when_sudo_wants_a_password(in_tree):
    session, sysfs = in_tree
    session.as_user("ops", sudo="password")
    dom = UdevGuestDom(sysfs)
    with pytest.raises(errors.GuestPrivilege, match=r"cannot online the new CPUs as root.*NOPASSWD: /bin/sh"):
        set_vcpus(FakeConn(), dom, 3, live=True, config=False, session=session, timeout=5)
    assert dom.calls == [] and dom.vcpus == 1


def _dimm() -> tuple[DimmSpec, etree._Element]:
    spec = DimmSpec(128 << 20, 0, "ua-dimm0")
    xml = etree.Element("memory", model="dimm")
    etree.SubElement(xml, "alias", name="ua-dimm0")
    return spec, xml


def test_memory_the_guest_onlined_itself_is_success_said_so(in_tree):
    session, sysfs = in_tree
    session.as_user("ops")
    dom = UdevGuestDom(sysfs)
    spec, xml = _dimm()
    outcome = add_dimm(FakeConn(), dom, spec, xml, flags=libvirt.VIR_DOMAIN_AFFECT_LIVE, live=True, session=session,
                       online_type="online_movable", block_bytes=128 << 20, timeout=5)
    doc = outcome.to_dict()
    assert doc["blocks"] == [32] and doc["onlined_by"] == "guest"
    assert doc["guest"]["memtotal_after_kib"] - doc["guest"]["memtotal_before_kib"] == 131072


def test_memory_add_and_remove_refused_before_any_change_when_sudo_wants_a_password(in_tree):
    session, sysfs = in_tree
    session.as_user("ops", sudo="password")
    dom = UdevGuestDom(sysfs)
    spec, xml = _dimm()
    with pytest.raises(errors.GuestPrivilege, match="cannot online the new memory blocks as root"):
        add_dimm(FakeConn(), dom, spec, xml, flags=libvirt.VIR_DOMAIN_AFFECT_LIVE, live=True, session=session,
                 online_type="online_movable", block_bytes=128 << 20, timeout=5)
    assert dom.calls == []
    dom.dimms.append("ua-dimm0")
    blocks(sysfs, {32: "online"})
    with pytest.raises(errors.GuestPrivilege, match="cannot offline the DIMM's memory blocks as root"):
        remove_dimm(FakeConn(), dom, "dimm0", session=session, block_bytes=128 << 20, timeout=5)
    assert (sysfs.root / "sys/devices/system/memory/memory32/state").read_text() == "online\n"


def test_cli_exit_code_16_and_one_line_with_the_domain_unchanged(in_tree, cli, monkeypatch, tmp_path):
    """`vhotplug vcpu remove` as a guest user whose sudo wants a password (libvirt's test driver)."""
    session, _ = in_tree
    session.as_user("ops", sudo="password")
    monkeypatch.setenv("VHOTPLUG_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("VHOTPLUG_STATE_DIR", str(tmp_path / "journal"))
    monkeypatch.setattr("vhotplug.cli.vcpu_cmd.open_guest", lambda *a, **k: session)
    asked: list[int] = []
    real = libvirt.virDomain.setVcpusFlags
    monkeypatch.setattr(libvirt.virDomain, "setVcpusFlags", lambda self, n, flags=0: asked.append(n) or real(self, n,
                                                                                                            flags))
    r = cli("-c", "test:///default", "vcpu", "remove", "test")
    assert r.code == ExitCode.GUEST_PRIVILEGE
    assert r.err == ("vhotplug: error: guest user ops cannot offline CPUs as root: sudo -n refused: sudo: a password "
                     "is required; the guest's sudoers needs: ops ALL=(root) NOPASSWD: /bin/sh\n")
    assert asked == []


# --------------------------------------------------------------------------------------------------
# the NIC's final name: udev renames it a moment after it appears


def tune(monkeypatch: pytest.MonkeyPatch, old: str, new: str) -> None:
    """The watcher with one of its constants changed (waits shorter or longer than the real ones)."""
    assert old in WATCH_SCRIPT
    monkeypatch.setattr("vhotplug.guest.watch.WATCH_SCRIPT", WATCH_SCRIPT.replace(old, new))


def udev(sysfs: FakeSys, *, queue: bool = False) -> Path:
    run = sysfs.root / "run/udev"
    (run / "data").mkdir(parents=True, exist_ok=True)
    (run / "control").touch()  # systemd-udevd's control socket: udev runs here
    if queue:
        (run / "queue").touch()  # events still being processed
    return run


def nic(sysfs: FakeSys, name: str, mac: str, pci: str, ifindex: int) -> Path:
    dev = sysfs.add_nic(name, mac, pci)
    (sysfs.root / "sys/class/net" / name / "ifindex").write_text(f"{ifindex}\n")
    return dev


def rename(sysfs: FakeSys, old: str, new: str) -> None:
    """What udev's rename does to sysfs: the interface's directory and its /sys/class/net entry change name."""
    link = sysfs.root / "sys/class/net" / old
    target = link.resolve()
    moved = target.with_name(new)
    target.rename(moved)
    (link.parent / new).symlink_to(os.path.relpath(moved, link.parent))
    link.unlink()


def test_a_nic_udev_renames_is_reported_by_its_final_name(guest):
    session, sysfs = guest
    run = udev(sysfs)
    with start_watch(session, Identity("nic", "52:54:00:12:34:56"), present=True, timeout=10,
                     sysroot=str(sysfs.root)) as w:
        (run / "queue").touch()  # the kernel's add event is in udev's queue
        nic(sysfs, "eth0", "52:54:00:12:34:56", "0000:08:00.0", 5)

        def udev_done() -> None:  # renames, writes its database entry, empties its queue
            rename(sysfs, "eth0", "enp8s0")
            (run / "data/n5").touch()
            (run / "queue").unlink()

        later(1.0, udev_done).join()
        seen = w.result()
    assert (seen.name, seen.driver, seen.detail["renamed_from"]) == ("enp8s0", "virtio_net", "eth0")
    assert seen.detail["pci"] == "0000:08:00.0"
    assert seen.guest_seconds < 0.8  # when it first showed, not when its name settled


def test_a_rename_by_a_udev_keeping_no_database_is_followed(guest, monkeypatch):
    """No database entry, no queue: the name is followed until it has held for the settle time (1 s here)."""
    session, sysfs = guest
    tune(monkeypatch, "settle_cs=20 ", "settle_cs=100 ")
    udev(sysfs)
    with start_watch(session, Identity("nic", "52:54:00:12:34:56"), present=True, timeout=10,
                     sysroot=str(sysfs.root)) as w:
        nic(sysfs, "eth0", "52:54:00:12:34:56", "0000:08:00.0", 5)
        later(0.1, lambda: rename(sysfs, "eth0", "ens8")).join()
        seen = w.result()
    assert (seen.name, seen.detail["renamed_from"]) == ("ens8", "eth0")


def test_a_nic_udev_is_done_with_is_reported_at_once(guest):
    session, sysfs = guest
    run = udev(sysfs)
    nic(sysfs, "enp8s0", "52:54:00:12:34:56", "0000:08:00.0", 5)
    (run / "data/n5").touch()
    with start_watch(session, Identity("nic", "52:54:00:12:34:56"), present=True, timeout=10,
                     sysroot=str(sysfs.root)) as w:
        seen = w.result()
    assert seen.name == "enp8s0" and seen.detail["polls"] == "1" and "renamed_from" not in seen.detail


def test_a_udev_keeping_no_database_entry_costs_the_settle_time_only(guest, monkeypatch):
    """Ended by the name holding, not by the rename grace (10 s here)."""
    session, sysfs = guest
    tune(monkeypatch, "rename_cs=200\n", "rename_cs=1000\n")
    udev(sysfs)
    nic(sysfs, "eth0", "52:54:00:12:34:56", "0000:08:00.0", 5)
    started = time.monotonic()
    with start_watch(session, Identity("nic", "52:54:00:12:34:56"), present=True, timeout=10,
                     sysroot=str(sysfs.root)) as w:
        seen = w.result()
    assert seen.name == "eth0" and "renamed_from" not in seen.detail
    assert int(seen.detail["polls"]) > 3 and time.monotonic() - started < 5


def test_a_busy_udev_is_waited_for_at_most_the_rename_grace(guest, monkeypatch):
    session, sysfs = guest
    tune(monkeypatch, "rename_cs=200\n", "rename_cs=40\n")
    udev(sysfs, queue=True)
    nic(sysfs, "eth0", "52:54:00:12:34:56", "0000:08:00.0", 5)
    started = time.monotonic()
    with start_watch(session, Identity("nic", "52:54:00:12:34:56"), present=True, timeout=10,
                     sysroot=str(sysfs.root)) as w:
        seen = w.result()
    assert seen.name == "eth0" and 0.35 <= time.monotonic() - started < 3


def test_a_passed_through_nic_reports_its_interface_s_final_name(guest):
    session, sysfs = guest
    run = udev(sysfs, queue=True)  # the add events are in udev's queue
    with start_watch(session, Identity("pci", "8086:100e"), present=True, timeout=10, sysroot=str(sysfs.root)) as w:
        func = sysfs.add_pci("0000:07:00.0", "8086:100e", driver="e1000", parent="0000:00:02.6")
        sysfs.add_netdev(func, "eth1")
        (sysfs.root / "sys/class/net/eth1/ifindex").write_text("7\n")

        def udev_done() -> None:
            net = func / "net"
            (net / "eth1").rename(net / "enp7s0")
            (sysfs.root / "sys/class/net/eth1").unlink()
            (sysfs.root / "sys/class/net/enp7s0").symlink_to(os.path.relpath(net / "enp7s0",
                                                                              sysfs.root / "sys/class/net"))
            (run / "data/n7").touch()
            (run / "queue").unlink()

        later(0.3, udev_done).join()
        seen = w.result()
    assert (seen.name, seen.detail["net"], seen.detail["renamed_from"]) == ("0000:07:00.0", "enp7s0", "eth1")


# --------------------------------------------------------------------------------------------------
# --ping with whatever the guest has


@pytest.fixture(params=["dash", "bash"])
def net(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Guest, FakeSys]]:
    """The guest's network programs as stubs: ip, ping, and networkctl with networkd not running.

    dash and bash only: busybox-static's shell runs its own applets (ip, ping, udhcpc) before anything on PATH, so
    under it these steps would reach this host's real network. busybox runs the DHCP script below, read-only.
    """
    session = Guest(guest_bin(tmp_path / "bin", request.param), request.param, tmp_path)
    session.stub("sudo", SUDO)
    for program in ("dhclient", "dhcpcd", "nmcli", "udhcpc"):
        found = [d for d in SYSTEM_PATH if os.path.exists(f"{d}/{program}")]
        assert not found, f"this host has {program} in {found}: the DHCP choice would not be the stubs'"
    session.stub("ip", IP)
    session.stub("ping", PING)
    session.stub("networkctl", NETWORKCTL)
    return session


NETWORKCTL = """[ -n "$VH_NETWORKD" ] || { echo "Failed to connect to bus" >&2; exit 1; }
echo "  3 $4 ether routable $VH_NETWORKD"
"""


def test_dhcp_script_under_busybox_leaves_a_managed_interface_to_its_manager(tmp_path):
    """Read-only on this host: networkd (a stub) manages "lo", whose address busybox's own ip applet reads."""
    bindir = guest_bin(tmp_path / "bin", "busybox")
    log = tmp_path / "log"
    _record(bindir, "networkctl", NETWORKCTL)
    env = {"PATH": str(bindir), "VH_LOG": str(log), "VH_NETWORKD": "configured"}
    done = subprocess.run([*login_shell("busybox"), "-c", ping.DHCP_SCRIPT, "sh", "lo"], capture_output=True,
                          text=True, env=env, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert ping.parse_dhcp(done.stdout) == ("managed", "networkd")
    assert "127.0.0.1" in ping.parse_addresses(done.stdout, 4)
    assert calls(log) == [["networkctl", "list", "--no-pager", "--no-legend", "lo"]]


def no_route_moved(session: Guest) -> None:
    assert all("route" not in argv for argv in calls(session.log, "ip"))


def test_ping_with_udhcpc_adds_its_lease_as_a_32(net):
    session = net
    session.stub("udhcpc", 'echo "udhcpc: lease of 10.0.2.15 obtained from 10.0.2.2, lease time 86400"')
    result = ping.ping_through(session, "eth1", "10.0.2.2")
    assert (result.received, result.source_addr) == (3, "10.0.2.15")
    (udhcpc,) = calls(session.log, "udhcpc")
    assert udhcpc[1:5] == ["-i", "eth1", "-n", "-q"] and udhcpc[-1] in ("/bin/true", "/usr/bin/true")
    assert ["ip", "addr", "add", "10.0.2.15/32", "dev", "eth1"] in calls(session.log, "ip")
    assert calls(session.log, "ping") == [["ping", "-c", "3", "-W", "2", "-I", "eth1", "10.0.2.2"]]
    no_route_moved(session)


DHCLIENT = """while [ "$#" -gt 1 ]; do case $1 in -lf) lf=$2 ;; esac; shift; done
echo $$ > "$VH_STATE/dhclient.pid"
echo "$lf" > "$VH_STATE/dhclient.lf"
sleep 0.1
printf 'lease {\\n  interface "%s";\\n  fixed-address 10.0.2.16;\\n}\\n' "$1" > "$lf"
echo "DHCPACK of 10.0.2.16 from 10.0.2.2"
exec sleep 30
"""


def test_ping_with_dhclient_takes_its_lease_and_stops_it(net):
    session = net
    session.stub("dhclient", DHCLIENT)
    assert ping.ping_through(session, "eth1", "10.0.2.2").source_addr == "10.0.2.16"
    (dhclient,) = calls(session.log, "dhclient")
    assert dhclient[1:4] == ["-4", "-d", "-sf"] and dhclient[4] in ("/bin/true", "/usr/bin/true")
    assert dhclient[-1] == "eth1"
    pid = int((session.state / "dhclient.pid").read_text())
    with pytest.raises(ProcessLookupError):  # stopped (and reaped): no dhclient left renewing in the background
        os.kill(pid, 0)
    assert not Path((session.state / "dhclient.lf").read_text().strip()).parent.exists()  # its directory removed
    assert ["ip", "addr", "add", "10.0.2.16/32", "dev", "eth1"] in calls(session.log, "ip")
    no_route_moved(session)


def test_ping_with_dhcpcd_in_test_mode(net):
    session = net
    session.stub("dhcpcd", "echo \"new_ip_address='10.0.2.17'\"; echo \"new_routers='10.0.2.2'\"")
    assert ping.ping_through(session, "eth1", "10.0.2.2").source_addr == "10.0.2.17"
    assert calls(session.log, "dhcpcd") == [["dhcpcd", "-T", "-4", "-t", str(ping.DHCP_WAIT), "eth1"]]
    assert ["ip", "addr", "add", "10.0.2.17/32", "dev", "eth1"] in calls(session.log, "ip")


@pytest.mark.parametrize("manager", ["networkd", "NetworkManager"])
def test_ping_waits_for_the_guest_s_own_manager_and_adds_nothing(net, manager):
    session = net
    session.stub("dhclient", DHCLIENT)  # there, but a second client would race the manager
    if manager == "networkd":
        session.env["VH_NETWORKD"] = "configuring"
    else:
        session.stub("nmcli", 'echo "GENERAL.STATE:70 (connecting (getting IP configuration))"')
    later(0.3, lambda: (session.state / "addr4").write_text("3: eth1    inet 10.0.2.18/24 brd 10.0.2.255 scope "
                                                            "global dynamic eth1\n"))
    assert ping.ping_through(session, "eth1", "10.0.2.2").source_addr == "10.0.2.18"
    assert calls(session.log, "dhclient") == []
    assert all(argv[1:3] != ["addr", "add"] for argv in calls(session.log, "ip"))
    no_route_moved(session)


def test_ping_runs_its_own_client_when_networkmanager_does_not_manage_the_nic(net):
    session = net
    session.stub("nmcli", 'echo "GENERAL.STATE:10 (unmanaged)"')
    session.stub("dhclient", DHCLIENT)
    assert ping.ping_through(session, "eth1", "10.0.2.2").source_addr == "10.0.2.16"


def test_ping_without_a_client_waits_for_networkmanager_to_start_on_the_nic(net):
    """RHEL 9: no DHCP client of its own; NetworkManager has the new NIC, not yet connected."""
    session = net
    session.stub("nmcli", 'echo "GENERAL.STATE:30 (disconnected)"')
    later(0.3, lambda: (session.state / "addr4").write_text("3: eth1    inet 10.0.2.19/24 scope global eth1\n"))
    assert ping.ping_through(session, "eth1", "10.0.2.2").source_addr == "10.0.2.19"
    assert all(argv[1:3] != ["addr", "add"] for argv in calls(session.log, "ip"))


def test_ping_without_any_dhcp_says_what_it_looked_for(net):
    session = net
    with pytest.raises(errors.GuestCommandFailed, match=r"no DHCP client to get one \(looked for udhcpc, dhclient and "
                                                        r"dhcpcd; neither networkd nor NetworkManager manages eth1\)"):
        ping.ping_through(session, "eth1", "10.0.2.2")
    assert calls(session.log, "ping") == []


def test_ping_as_another_user_runs_each_privileged_step_through_sudo(net):
    session = net
    session.as_user("ops")
    session.stub("dhclient", DHCLIENT)
    assert ping.ping_through(session, "eth1", "10.0.2.2").source_addr == "10.0.2.16"
    via_sudo = sudo_calls(session)
    assert all(argv[:4] == ["-n", "/bin/sh", "-c", argv[3]] for argv in via_sudo)
    assert [argv[5:] for argv in via_sudo] == [
        ["ip", "link", "set", "dev", "eth1", "up"], ["eth1"],  # the DHCP script, its interface an argument
        ["ip", "addr", "add", "10.0.2.16/32", "dev", "eth1"], ["ping", "-c", "3", "-W", "2", "-I", "eth1", "10.0.2.2"]]
    assert via_sudo[1][3] == ping.DHCP_SCRIPT
    assert ["ip", "-o", "-4", "addr", "show", "dev", "eth1"] in calls(session.log, "ip")  # read as the user


def test_every_guest_script_fits_dropbears_command_line() -> None:
    """dropbear refuses an exec request over MAX_COMMAND bytes (the lab guest's sshd): the watcher once grew to
    9.7 kB with its comments and every watch failed to start ("cannot start the watcher"). Each script of
    vhotplug's, with generous room for its arguments, stays under it."""
    import shlex as _shlex

    from vhotplug.guest import hotplug, ping, privilege, probe, watch

    scripts = {f"{mod.__name__}.{name}": value for mod in (watch, probe, hotplug, ping, privilege)
               for name, value in vars(mod).items()
               if isinstance(value, str) and value.startswith(shell.PREAMBLE.splitlines()[0])}
    assert len(scripts) >= 4, sorted(scripts)
    for name, text in scripts.items():
        line = "exec " + _shlex.join(["sh", "-c", text, "sh", *["x" * 64] * 8])
        assert len(line.encode()) < shell.MAX_COMMAND, (name, len(line))
    assert len(watch.watch_command(watch.Identity("pci", "8086:100e"), present=True, timeout=3600,
                                   initial=",".join(["0000:00:1f.7"] * 32)).encode()) < shell.MAX_COMMAND
