"""Slow and vanishing guests on the real lab (issue 12): vhotplug reaches the lab guest through a forward the
test controls (tests.support.StallingForward) that holds the guest's SSH banner back, or cuts every connection
in the middle of a guest check. Outcomes are checked in libvirt's live XML and inside the guest.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.lab.conftest import E1000_KO, live_aliases, report, until
from tests.lab.conftest import vhotplug as _vhotplug
from tests.support import StallingForward
from vhotplug.errors import ExitCode
from vhotplug.guest.ssh import GuestSession


def ssh_args(lab, forward: StallingForward, tmp_path: Path) -> list[str]:
    """--ssh options that go through ``forward``, with the guest's pinned key listed under its port."""
    t = lab.info.target
    pinned = t.known_hosts.read_text().split()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{forward.port} {pinned[1]} {pinned[2]}\n")
    return ["--ssh", f"{t.user}@127.0.0.1:{forward.port}", "--ssh-key", str(t.key), "--known-hosts", str(known)]


def vhotplug(run_dir: Path, *args: str):  # type: ignore[no-untyped-def]
    # Connection sharing off: each command's own login is what is being tested.
    return _vhotplug(run_dir, *args, env={"VHOTPLUG_SSH_PERSIST": "0"})


def test_a_guest_whose_banner_takes_20_s_is_verified_within_timeout_60(lab, run_dir, given_back, tmp_path,
                                                                       request):
    """paramiko's own banner limit (15 s) made slow nested guests fail CI; the login now waits as long as
    --timeout allows."""
    port = lab.info.target.port
    with StallingForward(port, banner_delay=20.0) as forward:
        started = time.monotonic()
        given_back.append("ua-slow")
        proc = vhotplug(run_dir, "attach", "nic", lab.name, "--mac", "52:54:00:fa:03:01", "--id", "slow",
                        "--timeout", "60", *ssh_args(lab, forward, tmp_path))
        out, err = proc.communicate(timeout=180)
        took = time.monotonic() - started
    assert proc.returncode == 0, err
    att = json.loads(out)["attached"]
    assert att["guest"]["driver"] == "virtio_net" and "ua-slow" in live_aliases(lab.name)
    assert 20 <= took < 60, took  # waited for the banner, and no longer than --timeout
    report(request.config, f"guest SSH banner held back 20 s: attach verified in {took:.1f} s (--timeout 60)")


def test_a_connection_cut_mid_watch_is_resumed_and_the_attach_verified(lab, run_dir, given_back, tmp_path,
                                                                       request):
    """Every SSH connection cut while the attach waits in the guest (the guest's e1000 driver unloaded keeps it
    waiting); vhotplug logs in again, watches on and reports the NIC once the driver is back."""
    with GuestSession(lab.info.target) as s:
        s.run(["sh", "-c", "! grep -q '^e1000 ' /proc/modules || rmmod e1000"])
    given_back.append("ua-cut")
    with StallingForward(lab.info.target.port) as forward:
        proc = vhotplug(run_dir, "attach", "nic", lab.name, "--model", "e1000", "--mac", "52:54:00:fa:03:02",
                        "--id", "cut", "--timeout", "60", *ssh_args(lab, forward, tmp_path))
        until("the attach call", lambda: "ua-cut" in live_aliases(lab.name))
        cut = forward.sever()
        with GuestSession(lab.info.target) as s:  # the driver comes back (not through the forward)
            s.run(["sh", "-c", f"insmod {E1000_KO}"])
        out, err = proc.communicate(timeout=120)
        logins = forward.accepted
    assert cut >= 1 and logins >= 2  # the watch's connection was cut, and it logged in again
    assert proc.returncode == 0, err
    att = json.loads(out)["attached"]
    assert att["guest"]["driver"] == "e1000" and att["guest"]["resumed"] == "1"
    report(request.config, f"SSH cut mid-watch ({cut} connection(s)): resumed, e1000 seen "
                           f"{att['guest_seen_seconds']:.1f} s after the attach call")


def test_a_guest_that_cannot_be_reached_again_is_reported_with_libvirts_view(lab, run_dir, given_back,
                                                                             tmp_path):
    """The forward is gone for good mid-watch: exit 7, and the message says what libvirt shows (attached,
    unverified), so nothing is left unexplained."""
    with GuestSession(lab.info.target) as s:
        s.run(["sh", "-c", "! grep -q '^e1000 ' /proc/modules || rmmod e1000"])
    given_back.append("ua-gone")
    forward = StallingForward(lab.info.target.port)
    proc = vhotplug(run_dir, "attach", "nic", lab.name, "--model", "e1000", "--mac", "52:54:00:fa:03:03",
                    "--id", "gone", "--timeout", "8", *ssh_args(lab, forward, tmp_path))
    until("the attach call", lambda: "ua-gone" in live_aliases(lab.name))
    forward.close()
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.GUEST_UNREACHABLE, err
    assert "could not log in again in time" in err and "libvirt shows interface ua-gone attached" in err, err
    assert "ua-gone" in live_aliases(lab.name)  # as reported

