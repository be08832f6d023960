#!/bin/sh
# L1 sysinit: run by busybox init after switch_root, before the daemons start.
. /etc/vhotplug-l1/base.sh
# udevd (with the one rule /init installed) records the IDs libvirt needs to list USB devices, now
# and for devices that come later; libvirtd, started after this, learns of those from udevd's events.
/lib/systemd/systemd-udevd --daemon --resolve-names=never || log "systemd-udevd failed to start"
udevadm trigger --action=add --subsystem-match=usb
udevadm settle --timeout=10 || log "udevadm settle timed out"
log "sysinit done: $(ls /sys/kernel/iommu_groups | wc -l) IOMMU groups"
