#!/usr/bin/env bash
# Prepare a Debian 12 machine (as root) for vhotplug: Debian packages, the
# project venv, and a running libvirtd. Idempotent: each step is skipped when
# already done. Daemons it starts are recorded by PID in $VHOTPLUG_PIDFILE (default
# $STATE/daemons.pid) so
# `scripts/stop-daemons.sh` ends exactly those and nothing else.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
STATE=${VHOTPLUG_STATE_DIR:-/var/lib/vhotplug}
PIDFILE=${VHOTPLUG_PIDFILE:-$STATE/daemons.pid}
VENV=${VENV:-$here/.venv}
PY=${PYTHON:-python3}

PKGS=(libvirt-daemon-system libvirt-clients libvirt-dev pkg-config gcc python3-dev
      qemu-system-x86 qemu-utils ovmf seabios ipxe-qemu
      linux-image-amd64 busybox-static dropbear-bin kmod cpio openssh-client iproute2
      # The non-root operator test runs vhotplug from a venv of Debian's own Python (root's venv Python
      # may sit where other users cannot read it), with Debian's builds of the runtime dependencies.
      python3-venv python3-libvirt python3-lxml python3-paramiko python3-tabulate passwd)

log() { printf 'setup: %s\n' "$*"; }

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || { echo "setup: need root to install: ${missing[*]}" >&2; exit 1; }
    log "installing Debian packages: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    log "Debian packages present"
fi
# The Xen lab fetches (never installs) Xen's packages with apt-get download: it needs package lists.
if ! apt-cache policy xen-hypervisor-4.17-amd64 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    [[ $(id -u) == 0 ]] || { echo "setup: need root to run apt-get update (for the Xen lab's packages)" >&2; exit 1; }
    log "package lists lack Xen 4.17: apt-get update"
    apt-get update -q
fi

stamp=$VENV/.vhotplug-installed
if [[ ! -x $VENV/bin/python || ! -f $stamp || $here/pyproject.toml -nt $stamp ]]; then
    log "creating venv $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e "$here[test]"
    touch "$stamp"
else
    log "venv up to date"
fi
# The editable install runs vhotplug from this tree; compile its bytecode as a wheel install would
# (pip compiles at install time), or every command recompiles every module (~50 ms) when the
# environment sets PYTHONDONTWRITEBYTECODE. Stale .pyc files are ignored by Python (mtime-checked).
"$VENV/bin/python" -m compileall -q "$here/vhotplug"

mkdir -p "$STATE"
if virsh -q -c qemu:///system version >/dev/null 2>&1; then
    log "libvirtd answers on qemu:///system"
else
    log "starting virtlogd and libvirtd (no systemd here)"
    : >>"$PIDFILE"
    # -d daemonizes; the daemons write their own pidfiles, which we copy.
    if ! pgrep -F /run/virtlogd.pid >/dev/null 2>&1; then
        virtlogd -d
        for _ in $(seq 50); do [[ -s /run/virtlogd.pid ]] && break; sleep 0.1; done
        echo "virtlogd $(cat /run/virtlogd.pid)" >>"$PIDFILE"
    fi
    # As Debian's packages would with polkit: members of the libvirt group may use qemu:///system (there
    # is no polkit here, so the socket is opened to the group instead). Root is unaffected.
    conf=$STATE/libvirtd.conf
    printf '%s\n' 'unix_sock_group = "libvirt"' 'unix_sock_rw_perms = "0770"' 'auth_unix_rw = "none"' >"$conf"
    libvirtd -d -f "$conf"
    for _ in $(seq 300); do
        virsh -q -c qemu:///system version >/dev/null 2>&1 && break
        sleep 0.1
    done
    [[ -s /run/libvirtd.pid ]] && echo "libvirtd $(cat /run/libvirtd.pid)" >>"$PIDFILE"
    virsh -q -c qemu:///system version >/dev/null || { echo "setup: libvirtd did not come up" >&2; exit 1; }
    log "libvirtd up ($(virsh -c qemu:///system version | grep -i 'running hypervisor' || true))"
fi

# Directories every vhotplug user shares through the libvirt group (vhotplug/host/shared.py): setgid,
# group-writable; the journal is not world-readable. Made (or fixed, if an older vhotplug made them
# root-only) here because only root can create them under /run and /var/lib.
run=${VHOTPLUG_RUN_DIR:-/run/vhotplug}
for d in "$run" "$run/locks" "$run/pending-detach"; do
    install -d -g libvirt -m 2775 "$d"
    chgrp libvirt "$d" && chmod 2775 "$d"
done
install -d -g libvirt -m 2770 "$STATE/journal"
chgrp libvirt "$STATE/journal" && chmod 2770 "$STATE/journal"
for f in "$run"/locks/*.lock "$run"/pending-detach/*.json; do
    [[ -f $f && ! -L $f ]] && chgrp libvirt "$f" && chmod g+rw "$f"
done
log "shared directories ready for the libvirt group ($run, $STATE/journal)"
