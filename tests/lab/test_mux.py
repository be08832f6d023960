"""Connection sharing against the real lab guest: the first session starts a master, later ones use it,
commands and watchers work through it, and the master ends by itself when idle."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhotplug.guest import mux
from vhotplug.guest.ssh import GuestSession
from vhotplug.guest.watch import Identity, wait_for

PERSIST = 3.0


@pytest.fixture
def sharing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    run = Path(tempfile.mkdtemp(prefix="vhmux-lab-", dir="/tmp"))  # Unix socket paths must stay short
    monkeypatch.setenv("VHOTPLUG_RUN_DIR", str(run))
    monkeypatch.setenv("VHOTPLUG_SSH_PERSIST", str(PERSIST))
    yield run
    shutil.rmtree(run, ignore_errors=True)


def poll(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.05)


def exited(pid: int) -> bool:
    """The master has ended (this test process started it, so reap it if it is our zombie)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child (or reaped already)
        return not Path(f"/proc/{pid}").exists()
    return done == pid


def master_pid(path: Path) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        pid, _uid, _gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid


def test_first_session_starts_a_master_later_ones_share_it(lab, sharing):
    target = lab.info.target
    path = mux.socket_path(target)
    assert path is not None and not path.exists()
    with GuestSession(target, share=True) as first:
        assert not first.shared  # nobody to share with yet: it logged in itself
        assert first.run(["cat", "/proc/sys/kernel/hostname"]).status == 0
    poll(lambda: mux.attach(target) is not None, 30, "the master answers")
    pid = master_pid(path)
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:3] == [b"-m", b"vhotplug.guest.mux"]
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"

    started = time.monotonic()
    with GuestSession(target, share=True) as second:
        assert second.shared
        connect_ms = (time.monotonic() - started) * 1000
        r = second.run_script("echo out; echo err >&2; exit 3", check=False)
        assert (r.status, r.stdout, r.stderr) == (3, "out\n", "err\n")
        # A watcher through the master: an absent NIC is reported absent at once.
        seen = wait_for(second, Identity("nic", "52:54:00:ff:ff:01"), present=False, timeout=5)
        assert seen.name == ""
        big = second.run(["sh", "-c", "i=0; while [ $i -lt 3000 ]; do echo line$i; i=$((i+1)); done"])
        assert big.stdout.splitlines()[-1] == "line2999" and len(big.stdout.splitlines()) == 3000
    assert connect_ms < 50, f"attaching to the master took {connect_ms:.0f} ms"

    # A different known_hosts file is a different login: never shared.
    other = type(target)(target.host, target.port, target.user, target.key, target.known_hosts.with_name("nope"))
    assert mux.socket_path(other) != path and mux.attach(other) is None

    # Idle for PERSIST seconds: the master leaves, and removes its socket.
    poll(lambda: exited(pid), PERSIST + 30, "the idle master exits")
    assert not path.exists()


def test_a_dead_master_is_replaced_and_commands_still_run(lab, sharing):
    target = lab.info.target
    with GuestSession(target, share=True):
        pass
    poll(lambda: mux.attach(target) is not None, 30, "the master answers")
    path = mux.socket_path(target)
    pid = master_pid(path)
    os.kill(pid, 15)  # we started it (through GuestSession): end it by its PID
    poll(lambda: exited(pid), 30, "the master ends")
    with GuestSession(target, share=True) as s:
        assert not s.shared  # nobody answers any more: this one logs in itself
        assert s.run(["true"]).status == 0
    poll(lambda: mux.attach(target) is not None and master_pid(path) != pid, 30, "a new master answers")
    new = master_pid(path)
    os.kill(new, 15)
    poll(lambda: exited(new), 30, "the new master ends")
    assert not path.exists()  # a terminated master removes its socket
