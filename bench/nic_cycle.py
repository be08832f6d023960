"""Benchmark: the full NIC cycle on the lab, vhotplug vs. a hand-written virsh + ssh loop.

One cycle = attach a user-mode virtio NIC -> the guest shows it -> detach -> gone in the guest.
Both methods run in the same process, on the same lab domain, alternating cycle by cycle so
drift in the machine's load hits both alike. Run with `make bench` (boots its own lab domain).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lxml import etree

from vhotplug.lab import manager
from vhotplug.virt.connection import connection

HERE = Path(__file__).resolve().parent
VHOTPLUG = [sys.executable, "-m", "vhotplug"]


def nic_xml(mac: str, alias: str) -> str:
    iface = etree.Element("interface", type="user")
    etree.SubElement(iface, "mac", address=mac)
    etree.SubElement(iface, "model", type="virtio")
    etree.SubElement(iface, "alias", name=alias)
    return etree.tostring(iface, encoding="unicode")


def run(cmd: list[str]) -> tuple[float, str]:
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"benchmark step failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr}")
    return elapsed, done.stdout


def vhotplug_cycle(uri: str, dom: str, i: int) -> dict[str, float]:
    mac = f"52:54:00:be:{i // 256:02x}:{i % 256:02x}"
    t_att, out = run([*VHOTPLUG, "-c", uri, "-o", "json", "attach", "nic", dom, "--id", f"bench{i}", "--mac", mac])
    att = json.loads(out)["attached"]
    t_det, out = run([*VHOTPLUG, "-c", uri, "-o", "json", "detach", dom, f"bench{i}"])
    det = json.loads(out)["detached"]
    return {"cycle": t_att + t_det, "attach": t_att, "detach": t_det,
            "guest_seen": att["guest_seen_seconds"], "verified": att["verified_seconds"],
            "guest_gone": det["guest_gone_seconds"]}


def virsh_cycle(uri: str, dom: str, i: int, target, tmp: Path, control: Path | None = None) -> float:
    mac = f"52:54:00:{'bf' if control is None else 'bd'}:{i // 256:02x}:{i % 256:02x}"
    xml = tmp / f"nic{i}-{control is not None}.xml"
    xml.write_text(nic_xml(mac, f"ua-shell{i}"))
    elapsed, _ = run([str(HERE / "virsh_cycle.sh"), uri, dom, str(xml), mac, str(target.port), str(target.key),
                      str(target.known_hosts), str(control or "")])
    return elapsed


def stop_ssh_master(control: Path, target) -> None:
    """End the OpenSSH master this run started, through its own control socket."""
    if control.exists():
        subprocess.run(["ssh", "-q", "-o", f"ControlPath={control}", "-O", "exit", "-p", str(target.port),
                        "root@127.0.0.1"], capture_output=True, timeout=30, check=False)


def summary(name: str, values: list[float]) -> str:
    return (f"{name:<34} median {statistics.median(values) * 1000:8.1f} ms   "
            f"min {min(values) * 1000:8.1f}   max {max(values) * 1000:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--uri", default=os.environ.get("VHOTPLUG_TEST_URI", "qemu:///system"))
    args = parser.parse_args()
    name = f"vhl-bench-{os.getpid()}"
    with connection(args.uri) as conn:
        up = manager.up(conn, name)
    print(f"lab {name}: booted to SSH in {up.boot_seconds:.1f} s; {args.cycles} cycles per method")
    target = up.domain.target
    rows: list[dict[str, float]] = []
    shell: list[float] = []
    shared: list[float] = []
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        control = Path(tmp) / "cm.sock"
        try:
            for i in range(args.cycles):
                rows.append(vhotplug_cycle(args.uri, name, i))
                shell.append(virsh_cycle(args.uri, name, i, target, Path(tmp)))
                shared.append(virsh_cycle(args.uri, name, i, target, Path(tmp), control))
        finally:
            stop_ssh_master(control, target)
            with connection(args.uri) as conn:
                manager.down(conn, name)
    col = {k: [r[k] for r in rows] for k in rows[0]}
    lag = [v - g for v, g in zip(col["verified"], col["guest_seen"], strict=True)]
    print(summary("vhotplug attach+detach (2 processes)", col["cycle"]))
    print(summary("virsh + ssh poll loop", shell))
    print(summary("virsh + ssh loop, ControlPersist", shared))
    print(summary("  vhotplug attach process", col["attach"]))
    print(summary("  vhotplug detach process", col["detach"]))
    print(summary("  guest saw the NIC after attach", col["guest_seen"]))
    print(summary("  guest dropped it after detach", col["guest_gone"]))
    print(summary("  attach verified after guest saw", lag))
    ratio = statistics.median(col["cycle"]) / statistics.median(shell)
    print(f"ratio vhotplug/virsh-loop (median cycle): {ratio:.2f}  "
          f"({'faster' if ratio < 1 else 'slower'} than the shell loop)")
    ratio = statistics.median(col["cycle"]) / statistics.median(shared)
    print(f"ratio vhotplug/virsh-loop with ControlPersist: {ratio:.2f}  "
          f"({'faster' if ratio < 1 else 'slower'})")
    print("(vhotplug shares its guest SSH connection between commands, like ControlPersist; its first cycle "
          "starts that master)")


if __name__ == "__main__":
    main()
