#!/usr/bin/env bash
# The seed's Xen test plan (section 1.4) and the other hot-plugs, for real, on Xen: vhotplug boots the Xen lab
# (Xen 4.17 + a dom0 with libvirt's Xen driver, as a TCG guest here) and the ordinary lab guest as a PV domU in
# it, then drives everything over xen+ssh with vhotplug commands only, showing the domU's own view before and
# after. Both stay up at the end (the commands that remove them are printed). As with virsh, the URI is given
# once, in LIBVIRT_DEFAULT_URI; the Xen lab itself is a domain of this machine's libvirt (-c qemu:///system).
set -euo pipefail
source "$(dirname "$0")/demo-lib.sh"
xen=${XEN_NAME:-vhotplug-xen}
domu=${DOMU_NAME:-vhotplug-xenpv}

here_uri=qemu:///system
view='echo "hypervisor: $(cat /sys/hypervisor/type)"; echo "PCI: $(ls /sys/bus/pci/devices)";
  for d in /sys/bus/pci/devices/*; do [ -e $d/vendor ] && echo "  ${d##*/} $(cut -c3- $d/vendor):$(cut -c3- $d/device) driver=$(basename $(readlink $d/driver)) net=$(ls $d/net 2>/dev/null)"; done;
  echo "net: $(ls /sys/class/net | tr "\n" " ")"; echo "disks: $(cd /sys/block && for b in xvd*; do [ -e $b ] && echo "$b ($(cat $b/size) sectors)"; done)";
  echo "CPUs online: $(cat /sys/devices/system/cpu/online)"; grep MemTotal /proc/meminfo'
guest() { echo "--- the domU's own view: $1"; "$vh" lab ssh --name "$domu" "$view"; }

step "$vh" -c "$here_uri" lab build
step "$vh" -c "$here_uri" lab up --xen --name "$xen"
uri=$("$vh" -c "$here_uri" -o json lab status --name "$xen" | json 'd[0]["uri"]')
export LIBVIRT_DEFAULT_URI=$uri
echo "LIBVIRT_DEFAULT_URI=$uri   (libvirt in dom0, over SSH)"
step "$vh" lab up --name "$domu"

echo; echo "=== what the PV domU can take (libxl), and its own view before ==="
step "$vh" check "$domu"
guest "before"

echo; echo "=== Xen plan 1.4: dom0's e1000e -> the domU (xl pci-assignable-add + pci-attach), ping -I through it ==="
step "$vh" host list --pci
step "$vh" attach pci "$domu" 01:00.0 --id passnic --ping 10.0.2.2 --timeout 60
guest "lspci -k / ethtool -i: the e1000e, bound, with its interface"
step "$vh" detach "$domu" passnic --timeout 60
step "$vh" host list --pci

echo; echo "=== a paravirtual NIC on xenbr0 ==="
step "$vh" attach nic "$domu" --bridge xenbr0 --id vnic
guest "a new interface"
step "$vh" detach "$domu" vnic

echo; echo "=== a disk: a raw file in dom0 through blkback (phy), xvdX in the domU ==="
"$vh" -c "$here_uri" lab ssh --name "$xen" 'mkdir -p /var/lib/xen && truncate -s 64M /var/lib/xen/demo.img'
step "$vh" attach disk "$domu" /var/lib/xen/demo.img --id xdisk
guest "fdisk -l: the new disk"
step "$vh" detach "$domu" xdisk

echo; echo "=== vCPUs and the balloon ==="
step "$vh" vcpu set "$domu" 2
step "$vh" vcpu set "$domu" 1
step "$vh" memory balloon "$domu" 200M
step "$vh" memory balloon "$domu" 256M
guest "after: back as before"

echo; echo "=== what libxl cannot do is refused before anything changes ==="
rc=0; step "$vh" memory add "$domu" 128M || rc=$?; echo "(exit $rc)"
rc=0; step "$vh" attach nic "$domu" --user || rc=$?; echo "(exit $rc)"

echo
echo "The Xen lab and its domU stay up. Remove them with:"
echo "  LIBVIRT_DEFAULT_URI='$uri' $vh lab down --name $domu; $vh -c $here_uri lab down --name $xen"
