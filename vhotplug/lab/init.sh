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
order=/lib/modules/$kver/vhotplug-modules.order
loaded=0
failed=0
if [ -r "$order" ]; then
    while read -r ko; do
        case "$ko" in '' | '#'*) continue ;; esac
        if out=$(insmod "$ko" 2>&1); then
            loaded=$((loaded + 1))
        else
            failed=$((failed + 1))
            log "insmod ${ko##*/} failed: $out"
        fi
    done <"$order"
    log "modules: $loaded loaded, $failed failed"
else
    log "ERROR: no module list $order (image built for another kernel?)"
fi

hostname vhotplug-lab
ip link set lo up && log "lo up"

mac=""
for tok in $(cat /proc/cmdline); do
    case "$tok" in vhotplug.mgmt_mac=*) mac=${tok#vhotplug.mgmt_mac=} ;; esac
done
mac=$(echo "$mac" | tr 'A-F' 'a-f')
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
    ip addr add 10.0.2.15/24 dev "$nic"
    ip route add default via 10.0.2.2 dev "$nic"
    log "management NIC $nic: $(ip -o -4 addr show dev "$nic" | awk '{print $4}'), default via 10.0.2.2"
else
    log "ERROR: management NIC not found after 10 s; interfaces: $(ls /sys/class/net | tr '\n' ' ')"
fi

log "cpus online: $(cat /sys/devices/system/cpu/online)"
log "handing over to busybox init (dropbear on port 22)"
exec /bin/busybox init
