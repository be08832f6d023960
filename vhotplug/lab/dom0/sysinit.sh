#!/bin/sh
# dom0 sysinit: run by busybox init after switch_root. The Xen control plane comes up before the
# daemons (libvirtd's Xen driver needs xenstored).
. /etc/vhotplug-l1/base.sh
# Xen's backends, the bridge and loop devices for domU disks.
for m in xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xen-blkback xen-netback xen-pciback \
         loop bridge tun; do
    modprobe "$m" || log "modprobe $m failed"
done
log "xen modules loaded"
mount -t xenfs xenfs /proc/xen || log "xenfs mount failed"
X=$(ls -d /usr/lib/xen-[0-9]*/bin | tail -n 1)
mkdir -p /run/xenstored /run/xen /var/log/xen /var/lib/xen
"$X/xenstored" --pid-file /run/xenstored.pid || log "xenstored failed"
"$X/xen-init-dom0" || log "xen-init-dom0 failed"
# Each domU's console is logged in dom0 (guest-NAME.log): what a failed domU boot printed.
"$X/xenconsoled" --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/libvirt/xen-console \
    || log "xenconsoled failed"
# The domUs' management network: a bridge with a link-local address only. dom0 routes nothing
# between it and its management NIC: a domU reaches dom0 and nothing else.
echo 0 >/proc/sys/net/ipv4/ip_forward
ip link add xenbr0 type bridge && ip addr add 169.254.100.1/16 dev xenbr0 && ip link set xenbr0 up \
    || log "bridge xenbr0 failed"
# e1000e drives the spare NIC dom0 gives away (it must be on its own driver before and after a passthrough).
modprobe e1000e || log "modprobe e1000e failed"
log "sysinit done: $(cat /sys/hypervisor/type 2>/dev/null) $(cat /sys/hypervisor/version/major 2>/dev/null).$(cat /sys/hypervisor/version/minor 2>/dev/null)"
