"""A non-root operator (issue 12): a user of the libvirt group, not root, hot-plugs into ``qemu:///system``
domains with guest verification, while root's vhotplug runs on the same host. They share the locks (one
waits for or is refused by the other, never both proceed); each keeps its SSH connection-sharing sockets to
itself.

The test makes the user (and removes it), runs vhotplug as that user from a venv of Debian's Python that
everyone can read (root's venv Python may live under /root), and has libvirtd open its socket to the libvirt
group (as Debian's packages do through polkit, which does not run here): `make setup` starts it so, and a
libvirtd of this run's that was started otherwise is restarted so, by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from tests.conftest import REPO
from tests.lab.conftest import URI, live_aliases, own_lab, report, until
from tests.support import _SETUP_STATE, restart_libvirtd
from vhotplug.errors import ExitCode
from vhotplug.guest.ssh import GuestSession
from vhotplug.host import lock
from vhotplug.lab.manager import LabDomain

SOCKET_SETTINGS = ('unix_sock_group = "libvirt"\nunix_sock_rw_perms = "0770"\nauth_unix_rw = "none"\n')


@dataclass(frozen=True)
class Operator:
    user: str
    uid: int
    home: Path
    bin: Path
    key: Path
    known_hosts: Path

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """``vhotplug -c URI -o json ARGS`` as this user (a login environment of its own, no root anywhere)."""
        env = {"HOME": str(self.home), "PATH": f"{self.bin}:/usr/bin:/bin", "LANG": "C.UTF-8"}
        argv = ["runuser", "-u", self.user, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()),
                str(self.bin / "vhotplug"), "-c", URI, "-o", "json", *args]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")

    def run(self, *args: str, guest: bool = True, timeout: float = 300) -> tuple[int, dict, str]:
        ssh = ["--ssh-key", str(self.key), "--known-hosts", str(self.known_hosts)] if guest else []
        proc = self.popen(*args, *ssh)
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, (json.loads(out) if proc.returncode == 0 and out.strip() else {}), err


def _run(*argv: str, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=900, **kw)


@pytest.fixture(scope="module")
def op_lab(request: pytest.FixtureRequest) -> Iterator[LabDomain]:
    """A lab domain of the operator's (vCPUs and DIMMs change in it)."""
    with own_lab(request.config, "op", "non-root operator tests") as domain:
        yield domain


@pytest.fixture(scope="module")
def operator(op_lab: LabDomain, tmp_path_factory: pytest.TempPathFactory,
             request: pytest.FixtureRequest) -> Iterator[Operator]:
    started = time.monotonic()
    user = f"vhop{os.getpid()}"[:31]
    top = Path(_SETUP_STATE) / f"test-operator-{os.getpid()}"  # everyone may read it (not /tmp/pytest-of-root)
    home = top / "home"
    dist = tmp_path_factory.mktemp("operator-dist")
    try:
        top.mkdir(mode=0o755, parents=True)
        _run(sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(REPO))
        _run("/usr/bin/python3", "-m", "venv", "--system-site-packages", str(top / "venv"))
        pip = str(top / "venv" / "bin" / "pip")
        _run(pip, "install", "-q", "typer>=0.12,<0.27")
        _run(pip, "install", "-q", "--no-deps", str(next(dist.glob("vhotplug-*.whl"))))
        _run("useradd", "--no-create-home", "--home-dir", str(home), "--groups", "libvirt",
             "--shell", "/bin/sh", user)
        uid = int(_run("id", "-u", user).stdout)
        (home / ".ssh").mkdir(parents=True)
        key, known = home / ".ssh" / "id_lab", home / ".ssh" / "known_hosts"
        shutil.copyfile(op_lab.target.key, key)
        shutil.copyfile(op_lab.target.known_hosts, known)
        key.chmod(0o600)
        _run("chown", "-R", f"{user}:{user}", str(home))
        home.chmod(0o700)
        op = Operator(user, uid, home, top / "venv" / "bin", key, known)
        if subprocess.run(["runuser", "-u", user, "--", "virsh", "-c", URI, "version"], capture_output=True,
                          timeout=60).returncode != 0:
            # Ours, but started before `make setup` opened the socket to the group: restart it so (by PID).
            conf = Path(_SETUP_STATE) / "libvirtd.conf"
            conf.write_text(SOCKET_SETTINGS)
            restart_libvirtd(URI, config=conf)
            report(request.config, "libvirtd restarted with its socket opened to the libvirt group")
        report(request.config, f"operator {user} (uid {uid}, libvirt group) ready in "
                               f"{time.monotonic() - started:.1f} s")
        yield op
    finally:
        _remove_user(user)
        shutil.rmtree(top, ignore_errors=True)


def _remove_user(user: str) -> None:
    """End what runs as the test's user (its SSH sharing masters outlive its commands by a minute), then remove
    the user. Every process of that uid is this test's: the user is its own, made above."""
    found = subprocess.run(["id", "-u", user], capture_output=True, text=True, check=False)
    if found.returncode != 0:
        return  # never made
    uid, deadline = int(found.stdout), time.monotonic() + 30
    while True:
        pids = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/status") if _uid_of(p) == uid]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        done = subprocess.run(["userdel", user], capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return
        # Bounded poll: the processes just signalled take a moment to go, and nothing tells when they have.
        assert time.monotonic() < deadline, f"userdel {user}: {done.stderr.strip()} (processes {pids})"
        time.sleep(0.2)


def _uid_of(status: Path) -> int | None:
    try:
        found = re.search(r"^Uid:\s+(\d+)", status.read_text(), re.M)
    except OSError:
        return None
    return int(found[1]) if found else None


def test_operator_hot_plugs_with_guest_verification(op_lab, operator, request):
    """Everything libvirt lets a libvirt-group member do, verified in the guest: NIC, disk, DIMM, balloon, vCPUs."""
    name, started = op_lab.name, time.monotonic()
    code, doc, err = operator.run("attach", "nic", name, "--mac", "52:54:00:fa:05:01", "--id", "opn")
    assert code == 0, err
    assert doc["attached"]["guest"]["driver"] == "virtio_net" and "ua-opn" in live_aliases(name)
    code, doc, err = operator.run("detach", name, "opn")
    assert code == 0 and "guest_gone_seconds" in doc["detached"], err
    assert "ua-opn" not in live_aliases(name)

    images = Path(_SETUP_STATE) / "test-images"
    images.mkdir(parents=True, exist_ok=True)
    image = images / f"op-{os.getpid()}.img"
    with image.open("wb") as fh:
        fh.truncate(32 << 20)
    image.chmod(0o644)
    try:
        code, doc, err = operator.run("attach", "disk", name, str(image), "--bus", "scsi", "--id", "opd",
                                      "--readonly")
        assert code == 0, err
        assert doc["attached"]["identity"] == "vh-opd" and doc["attached"]["guest"]["name"].startswith("sd")
        code, doc, err = operator.run("detach", name, "opd")
        assert code == 0, err
    finally:
        image.unlink()

    code, doc, err = operator.run("memory", "add", name, "128M", "--id", "opm")
    assert code == 0, err
    assert "ua-opm" in live_aliases(name)
    code, doc, err = operator.run("memory", "remove", name, "opm")
    assert code == 0, err
    assert "ua-opm" not in live_aliases(name)

    code, doc, err = operator.run("memory", "balloon", name, "200M")
    assert code == 0, err
    code, doc, err = operator.run("vcpu", "set", name, "2")
    assert code == 0, err
    assert doc["vcpus"]["after"] == 2 and doc["vcpus"]["guest"]["online"] == "0-1"
    with GuestSession(op_lab.target) as s:
        assert s.run(["cat", "/sys/devices/system/cpu/online"]).stdout.strip() == "0-1"

    # Its SSH connection-sharing sockets are its own, in a directory nobody else may enter.
    private = Path("/run/vhotplug") / f"ssh-{operator.uid}"
    st = private.stat()
    assert st.st_uid == operator.uid and (st.st_mode & 0o077) == 0
    report(request.config, f"operator: NIC, disk, DIMM, balloon and vCPU with guest checks in "
                           f"{time.monotonic() - started:.1f} s, as uid {operator.uid}")


def test_root_and_operator_share_the_domain_lock(op_lab, operator):
    """Root holds the domain (its lock file made by root): the operator is refused at once with root's PID,
    or with --wait-lock waits and goes on only when root lets go. Never both."""
    conn = libvirt.open(URI)
    try:
        uuid = conn.lookupByName(op_lab.name).UUIDString()
    finally:
        conn.close()
    held = lock.acquire([lock.domain_key(uuid)])
    try:
        code, _doc, err = operator.run("attach", "nic", op_lab.name, "--id", "opl", "--no-verify", guest=False)
        assert code == ExitCode.BUSY, err
        assert f"PID {os.getpid()}" in err and "Traceback" not in err, err
        waiting = operator.popen("attach", "nic", op_lab.name, "--id", "opl", "--no-verify", "--wait-lock")
        time.sleep(2.0)  # the operator's process must still be waiting, having changed nothing
        assert waiting.poll() is None and "ua-opl" not in live_aliases(op_lab.name)
    finally:
        held.release()
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert json.loads(out)["attached"]["alias"] == "ua-opl" and "ua-opl" in live_aliases(op_lab.name)
    # The other way round: the operator's lock (a file it may have made) refuses root.
    paused = libvirt.open(URI)
    dom = paused.lookupByName(op_lab.name)
    dom.suspend()
    try:
        detaching = operator.popen("detach", op_lab.name, "opl", "--no-verify", "--timeout", "60")
        until("the operator's detach request", lambda: bool(list(Path("/run/vhotplug/pending-detach").glob(
            f"*{uuid}*ua-opl*"))), 60)
        root_try = subprocess.run([sys.executable, "-m", "vhotplug", "-c", URI, "attach", "nic", op_lab.name,
                                   "--id", "opr", "--no-verify"], capture_output=True, text=True, timeout=120)
        assert root_try.returncode == ExitCode.BUSY, root_try.stderr
        holder = re.search(r"is held by PID (\d+)", root_try.stderr)
        assert holder, root_try.stderr  # the operator wrote its PID into a lock file root may have made
        status = Path(f"/proc/{holder[1]}/status").read_text()
        assert re.search(rf"^Uid:\s+{operator.uid}\s", status, re.M), status  # the operator's process
    finally:
        dom.resume()
        paused.close()
    _out, err = detaching.communicate(timeout=120)
    assert detaching.returncode == 0, err
    assert "ua-opl" not in live_aliases(op_lab.name) and "ua-opr" not in live_aliases(op_lab.name)
