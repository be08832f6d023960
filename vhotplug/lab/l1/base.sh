# Sourced first by the sysinit.sh of every L1 profile (busybox init runs it after switch_root): the
# console log line and what devtmpfs and the kernel leave undone.
log() { echo "vhotplug-l1: $(cut -d' ' -f1 /proc/uptime) $*" >/dev/console; }
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
# Links devtmpfs does not make, which shells and libvirtd's helpers expect (without /dev/fd, Xen's block
# hotplug script waits 40 s for nothing).
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
# libvirtd puts each guest it starts into a cgroup of this hierarchy (nothing else mounts it here).
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup || log "cgroup2 mount failed"
