"""Benchmark: the full NIC cycle on the lab, vhotplug vs. a hand-written virsh + ssh loop.

One cycle = attach a NIC -> the guest shows it -> detach -> gone in the guest. On QEMU/KVM (default)
a user-mode virtio NIC on the lab guest; with ``--xen`` a netfront on xenbr0 of the PV lab guest in
the Xen lab (libxl over xen+ssh, the guest behind dom0). The methods run in the same process, on the
same domain, alternating cycle by cycle so drift in the machine's load hits them alike. Run with
`make bench` / `make bench-xen` (each boots its own domains and removes them).
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

from vhotplug.cli.lab_cmd import _ssh_options
from vhotplug.lab import manager
from vhotplug.virt.connection import connection

HERE = Path(__file__).resolve().parent
VHOTPLUG = [sys.executable, "-m", "vhotplug"]


def nic_xml(mac: str, alias: str, *, xen: bool = False) -> str:
    iface = etree.Element("interface", type="bridge" if xen else "user")
    etree.SubElement(iface, "mac", address=mac)
    if xen:
        etree.SubElement(iface, "source", bridge="xenbr0")
    else:
        etree.SubElement(iface, "model", type="virtio")
    etree.SubElement(iface, "alias", name=alias)
    return etree.tostring(iface, encoding="unicode")


def mac_for(tag: str, i: int, xen: bool) -> str:
    oui = "00:16:3e" if xen else "52:54:00"
    return f"{oui}:{tag}:{i // 256:02x}:{i % 256:02x}"


def run(cmd: list[str]) -> tuple[float, str]:
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"benchmark step failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr}")
    return elapsed, done.stdout


def vhotplug_cycle(uri: str, dom: str, i: int, xen: bool = False) -> dict[str, float]:
    mac = mac_for("be", i, xen)
    source = ["--bridge", "xenbr0"] if xen else []
    t_att, out = run([*VHOTPLUG, "-c", uri, "-o", "json", "attach", "nic", dom, "--id", f"bench{i}", "--mac", mac,
                      *source])
    att = json.loads(out)["attached"]
    t_det, out = run([*VHOTPLUG, "-c", uri, "-o", "json", "detach", dom, f"bench{i}"])
    det = json.loads(out)["detached"]
    return {"cycle": t_att + t_det, "attach": t_att, "detach": t_det,
            "guest_seen": att["guest_seen_seconds"], "verified": att["verified_seconds"],
            "guest_gone": det["guest_gone_seconds"]}


def proxy_command(target) -> str:
    """The ProxyCommand that reaches a guest behind its jump host (as `vhotplug lab ssh` builds it)."""
    opts = _ssh_options(target)
    return next(o.split("=", 1)[1] for o in opts if o.startswith("ProxyCommand=")) if target.jump else ""


def virsh_cycle(uri: str, dom: str, i: int, target, tmp: Path, control: Path | None = None,
                xen: bool = False) -> float:
    mac = mac_for("bf" if control is None else "bd", i, xen)
    xml = tmp / f"nic{i}-{control is not None}.xml"
    xml.write_text(nic_xml(mac, f"ua-shell{i}", xen=xen))
    elapsed, _ = run([str(HERE / "virsh_cycle.sh"), uri, dom, str(xml), mac, target.host, str(target.port),
                      str(target.key), str(target.known_hosts), str(control or ""), proxy_command(target)])
    return elapsed


def stop_ssh_master(control: Path, target) -> None:
    """End the OpenSSH master this run started, through its own control socket."""
    if control.exists():
        subprocess.run(["ssh", "-q", "-o", f"ControlPath={control}", "-O", "exit", "-p", str(target.port),
                        f"root@{target.host}"], capture_output=True, timeout=30, check=False)


def summary(name: str, values: list[float]) -> str:
    return (f"{name:<34} median {statistics.median(values) * 1000:8.1f} ms   "
            f"min {min(values) * 1000:8.1f}   max {max(values) * 1000:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--uri", default=os.environ.get("VHOTPLUG_TEST_URI", "qemu:///system"))
    parser.add_argument("--xen", action="store_true", help="on the Xen lab's PV guest (boots the Xen lab too)")
    args = parser.parse_args()
    name = f"vhl-bench-{os.getpid()}"
    xen_name = f"vhx-bench-{os.getpid()}"
    host_uri = args.uri
    if args.xen:
        from vhotplug.lab import xen

        with connection(host_uri) as conn:
            lab = xen.up_xen(conn, xen_name, timeout=300)
        print(f"Xen lab {xen_name}: libvirtd in dom0 answered after {lab.libvirt_seconds:.1f} s")
        args.uri = lab.uri
    try:
        bench(args, name)
    finally:
        if args.xen:
            with connection(host_uri) as conn:
                manager.down(conn, xen_name)


def bench(args: argparse.Namespace, name: str) -> None:
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
                rows.append(vhotplug_cycle(args.uri, name, i, args.xen))
                shell.append(virsh_cycle(args.uri, name, i, target, Path(tmp), xen=args.xen))
                shared.append(virsh_cycle(args.uri, name, i, target, Path(tmp), control, xen=args.xen))
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
