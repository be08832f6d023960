#!/bin/sh
# L1 sysinit: run by busybox init after switch_root, before the daemons start.
log() { echo "vhotplug-l1: $(cut -d' ' -f1 /proc/uptime) $*" >/dev/console; }
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
# Links devtmpfs does not make, which shells and libvirtd's helpers expect.
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
# libvirtd puts each QEMU it starts into a cgroup of this hierarchy (nothing else mounts it here).
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup || log "cgroup2 mount failed"
# udevd (with the one rule /init installed) records the IDs libvirt needs to list USB devices, now
# and for devices that come later; libvirtd, started after this, learns of those from udevd's events.
/lib/systemd/systemd-udevd --daemon --resolve-names=never || log "systemd-udevd failed to start"
udevadm trigger --action=add --subsystem-match=usb
udevadm settle --timeout=10 || log "udevadm settle timed out"
log "sysinit done: $(ls /sys/kernel/iommu_groups | wc -l) IOMMU groups"
