# Sourced by /init (vhotplug/lab/l1/init) of the Xen lab's dom0 with the new root at $N, before
# switch_root. The Xen packages are the overlay's upper lower layer (9p tag "xenroot").
host=vhotplug-xen-dom0

# Fresh, private Xen state and logs; libvirt's hooks of the host must not run here.
for d in /var/lib/xen /var/log/xen /etc/libvirt/hooks; do
    mkdir -p "$N$d"
    mount -t tmpfs -o mode=0755 tmpfs "$N$d" || log "tmpfs on $d failed"
done
mkdir -p $N/var/lib/xen/dump $N/var/log/libvirt/libxl $N/var/log/libvirt/xen-console

# libvirtd in dom0 drives Xen only: its QEMU driver would probe emulators (and needs a qemu.conf
# that is unreadable through 9p) before it answers.
rm -f $N/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so $N/etc/libvirt/qemu.conf
