#!/usr/bin/env bash
# The seed's passthrough scenarios, for real, one level down. This machine has no IOMMU, so vhotplug boots
# L1: a hypervisor guest with a virtual Intel IOMMU and its own libvirtd, reached from here over qemu+ssh.
# L2 (the ordinary lab guest) runs inside L1. Then, with vhotplug commands only: L1's host devices and who
# uses them -> its own devices refused -> its e1000 handed to L2 (vfio-pci), checked in L2 with a ping ->
# handed back -> a USB device the same way. L1 and L2 stay up at the end (`make lab-down`-style commands
# are printed).
set -euo pipefail
source "$(dirname "$0")/demo-lib.sh"
l1=${L1_NAME:-vhotplug-l1}
l2=${L2_NAME:-vhotplug-l2}


step "$vh" lab build
step "$vh" lab up --nested --name "$l1"
uri=$("$vh" -o json lab status --name "$l1" | json 'd[0]["uri"]')
echo "L1's libvirt: $uri"

echo; echo "=== L1's host devices, as vhotplug sees them over qemu+ssh (host use read inside L1) ==="
step "$vh" -c "$uri" host list

step "$vh" -c "$uri" lab up --name "$l2" --timeout 400
echo; echo "=== before: L2's own view ==="
step "$vh" -c "$uri" list "$l2" --guest

echo; echo "=== L1's own devices are refused (its root filesystem share, its management NIC) ==="
mgmt=$("$vh" -c "$uri" -o json host list --pci | json \
    'next(x["address"] for x in d["devices"] if any("default route" in u["detail"] for u in x["used_by"]))')
rc=0; step "$vh" -c "$uri" attach pci "$l2" "$mgmt" || rc=$?
echo "(exit $rc: refused before anything changed)"

echo; echo "=== NIC passthrough (seed 1.2(1), Xen plan 1.4): e1000 from L1 to L2, ping through it ==="
step "$vh" -c "$uri" attach pci "$l2" 00:05.0 --id passnic --ping 10.0.2.2 --timeout 60
step "$vh" -c "$uri" list "$l2" --guest
step "$vh" -c "$uri" detach "$l2" passnic --timeout 60
step "$vh" -c "$uri" host list --pci

echo; echo "=== USB passthrough (seed 1.2(2)): L1's USB tablet by vendor:product ==="
step "$vh" -c "$uri" host list --usb
step "$vh" -c "$uri" attach usb "$l2" host:0627:0001 --id passusb --timeout 60
step "$vh" -c "$uri" detach "$l2" passusb --timeout 60

echo
echo "L1 and L2 stay up. Remove them with:"
echo "  $vh -c '$uri' lab down --name $l2 && $vh lab down --name $l1"
