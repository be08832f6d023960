# Sourced by /init of the nested lab's L1 with the new root at $N, before switch_root.

# udev runs in L1 with one rule of ours only (see udev.rules). On merged-/usr hosts /lib is a link
# to usr/lib: each real directory is hidden once.
for d in /etc/udev/rules.d /lib/udev/rules.d /usr/lib/udev/rules.d; do
    real=$(readlink -f "$N$d") && [ -d "$real" ] || continue
    grep -q " $real " /proc/mounts || mount -t tmpfs -o mode=0755 tmpfs "$real"
done
mkdir -p $N/etc/udev/rules.d
cp /vhotplug/udev.rules $N/etc/udev/rules.d/50-vhotplug-l1.rules

# The host's qemu.conf is 0600 root: unreadable through 9p, and libvirtd refuses to start without it.
rm -f $N/etc/libvirt/qemu.conf
cp /vhotplug/qemu.conf $N/etc/libvirt/qemu.conf
# libvirtd probes every emulator it finds before it answers; L1 only runs x86_64 guests, and
# hiding the i386 one saves ~2.5 s of that probe (measured).
rm -f $N/usr/bin/qemu-system-i386
