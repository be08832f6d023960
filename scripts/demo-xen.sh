#!/usr/bin/env bash
# The seed's Xen test plan (section 1.4) and the other hot-plugs, for real, on Xen: vhotplug boots the Xen lab
# (Xen 4.17 + a dom0 with libvirt's Xen driver, as a TCG guest here) and the ordinary lab guest as a PV domU in
# it, then drives everything over xen+ssh with vhotplug commands only, showing the domU's own view before and
# after. Both stay up at the end (the commands that remove them are printed).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
vh=$here/.venv/bin/vhotplug
xen=${XEN_NAME:-vhotplug-xen}
domu=${DOMU_NAME:-vhotplug-xenpv}

step() { printf '\n\033[1m$ %s\033[0m\n' "${*#"$here/.venv/bin/"}"; "$@"; }
json() { "$here/.venv/bin/python" -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
guest() { echo "--- in the domU: $1"; "$vh" -c "$uri" lab ssh --name "$domu" "$2"; }

step "$vh" lab build
step "$vh" lab up --xen --name "$xen"
uri=$("$vh" -o json lab status --name "$xen" | json 'd[0]["uri"]')
echo "libvirt in dom0: $uri"
step "$vh" -c "$uri" lab up --name "$domu"

echo; echo "=== what the PV domU can take (libxl), and its own view before ==="
step "$vh" -c "$uri" check "$domu"
guest "PCI functions, network interfaces, disks, CPUs" \
    'cat /sys/hypervisor/type; ls /sys/bus/pci/devices; ls /sys/class/net; ls /sys/block; cat /sys/devices/system/cpu/online'

echo; echo "=== Xen plan 1.4: dom0's e1000e -> the domU (xl pci-assignable-add + pci-attach), ping -I through it ==="
step "$vh" -c "$uri" host list --pci
step "$vh" -c "$uri" attach pci "$domu" 01:00.0 --id passnic --ping 10.0.2.2 --timeout 60
guest "lspci -k / ethtool -i" \
    'for d in /sys/bus/pci/devices/*; do echo "${d##*/} $(cat $d/vendor):$(cat $d/device) $(basename $(readlink $d/driver)) $(ls $d/net)"; done'
step "$vh" -c "$uri" detach "$domu" passnic --timeout 60
step "$vh" -c "$uri" host list --pci

echo; echo "=== a paravirtual NIC on xenbr0 ==="
step "$vh" -c "$uri" attach nic "$domu" --bridge xenbr0 --id vnic
guest "interfaces" 'ls /sys/class/net'
step "$vh" -c "$uri" detach "$domu" vnic

echo; echo "=== a disk: a raw file in dom0 through blkback (phy), xvdX in the domU ==="
"$vh" lab ssh --name "$xen" 'mkdir -p /var/lib/xen && truncate -s 64M /var/lib/xen/demo.img'
step "$vh" -c "$uri" attach disk "$domu" /var/lib/xen/demo.img --id xdisk
guest "disks (fdisk -l: name and sectors)" 'for b in /sys/block/xvd*; do echo "${b##*/} $(cat $b/size)"; done'
step "$vh" -c "$uri" detach "$domu" xdisk

echo; echo "=== vCPUs and the balloon ==="
step "$vh" -c "$uri" vcpu set "$domu" 2
step "$vh" -c "$uri" vcpu set "$domu" 1
step "$vh" -c "$uri" memory balloon "$domu" 200M
step "$vh" -c "$uri" memory balloon "$domu" 256M

echo; echo "=== what libxl cannot do is refused before anything changes ==="
rc=0; step "$vh" -c "$uri" memory add "$domu" 128M || rc=$?; echo "(exit $rc)"
rc=0; step "$vh" -c "$uri" attach nic "$domu" --user || rc=$?; echo "(exit $rc)"

echo
echo "The Xen lab and its domU stay up. Remove them with:"
echo "  $vh -c '$uri' lab down --name $domu && $vh lab down --name $xen"
