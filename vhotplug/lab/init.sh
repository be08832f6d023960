#!/bin/sh
# /init of the vhotplug lab guest (busybox sh, PID 1 until it execs busybox init).
#
# A fixed file: vhotplug.lab.image copies it verbatim into the initramfs.
# Every step prints one "vhotplug-lab: ..." line to the console (ttyS0),
# which the host keeps as a file for debugging boots.
#
# Deliberately absent: no uevent/hotplug helper, no mdev daemon, nothing that
# onlines CPUs or memory. Hot-added CPUs and memory blocks stay offline until
# vhotplug itself onlines them, so tests can see that it did.

PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
umask 022

log() { echo "vhotplug-lab: $*"; }

log "init starting"

mkdir -p /proc /sys /dev /run /tmp /var /root
mount -t proc -o nosuid,nodev,noexec proc /proc || log "mount /proc failed"
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || log "mount /sys failed"
grep -q ' /dev devtmpfs ' /proc/mounts || mount -t devtmpfs -o mode=0755,nosuid devtmpfs /dev \
    || log "mount devtmpfs on /dev failed"
# From here on the console is the devtmpfs node, whatever the kernel handed us.
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts /dev/pts || log "mount /dev/pts failed"
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run || log "mount /run failed"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp || log "mount /tmp failed"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm || log "mount /dev/shm failed"
log "filesystems mounted"

kver=$(uname -r)
# load_modules LIST WHAT: insmod every module named in LIST, in order.
load_modules() {
    loaded=0
    failed=0
    if [ ! -r "$1" ]; then
        log "ERROR: no module list $1 (image built for another kernel?)"
        return
    fi
    while read -r ko; do
        case "$ko" in '' | '#'*) continue ;; esac
        if out=$(insmod "$ko" 2>&1); then
            loaded=$((loaded + 1))
        else
            failed=$((failed + 1))
            log "insmod ${ko##*/} failed: $out"
        fi
    done <"$1"
    log "$2: $loaded loaded, $failed failed"
}
load_modules "/lib/modules/$kver/vhotplug-modules.order" modules
# A Xen PV domU: its network, disks and PCI devices come through the Xen front ends.
if [ "$(cat /sys/hypervisor/type 2>/dev/null)" = xen ]; then
    load_modules "/lib/modules/$kver/vhotplug-xen-modules.order" "xen modules"
fi

hostname vhotplug-lab
ip link set lo up && log "lo up"

# The management address: QEMU user networking's by default; a Xen PV domU gets a link-local one on
# dom0's bridge (vhotplug.mgmt_ip=ADDR/PREFIX vhotplug.mgmt_gw=ADDR).
mac=""
ip4=10.0.2.15/24
gw4=10.0.2.2
for tok in $(cat /proc/cmdline); do
    case "$tok" in
        vhotplug.mgmt_mac=*) mac=${tok#vhotplug.mgmt_mac=} ;;
        vhotplug.mgmt_ip=*) ip4=${tok#vhotplug.mgmt_ip=} ;;
        vhotplug.mgmt_gw=*) gw4=${tok#vhotplug.mgmt_gw=} ;;
    esac
done
mac=$(echo "$mac" | tr 'A-F' 'a-f')
case "$ip4/$gw4" in
    *[!0-9./]* | */*/*/* | /* | */)
        log "ERROR: bad vhotplug.mgmt_ip=$ip4 or mgmt_gw=$gw4; using 10.0.2.15/24 via 10.0.2.2"
        ip4=10.0.2.15/24 gw4=10.0.2.2
        ;;
esac
if [ -n "$mac" ]; then
    log "looking for the management NIC with MAC $mac"
else
    log "no vhotplug.mgmt_mac= on the command line; using the first ethernet NIC"
fi

nic=""
tries=0
while [ -z "$nic" ] && [ "$tries" -lt 100 ]; do
    for path in /sys/class/net/*; do
        [ -r "$path/address" ] || continue
        name=${path##*/}
        [ "$name" = lo ] && continue
        addr=$(cat "$path/address")
        if [ -z "$mac" ] || [ "$addr" = "$mac" ]; then
            nic=$name
            break
        fi
    done
    [ -n "$nic" ] && break
    tries=$((tries + 1))
    sleep 0.1
done

if [ -n "$nic" ]; then
    ip link set "$nic" up
    ip addr add "$ip4" dev "$nic"
    ip route add default via "$gw4" dev "$nic"
    log "management NIC $nic: $(ip -o -4 addr show dev "$nic" | awk '{print $4}'), default via $gw4"
else
    log "ERROR: management NIC not found after 10 s; interfaces: $(ls /sys/class/net | tr '\n' ' ')"
fi

log "cpus online: $(cat /sys/devices/system/cpu/online)"
log "handing over to busybox init (dropbear on port 22)"
exec /bin/busybox init
