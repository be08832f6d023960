#!/usr/bin/env bash
# Stop the daemons that scripts/setup-host.sh started (by recorded PID only).
set -u
STATE=${VHOTPLUG_STATE_DIR:-/var/lib/vhotplug}
f=${VHOTPLUG_PIDFILE:-$STATE/daemons.pid}
[[ -f $f ]] || exit 0
tac "$f" | while read -r name pid; do
    [[ -n ${pid:-} ]] || continue
    if [[ $(cat /proc/"$pid"/comm 2>/dev/null) == "$name" ]]; then
        echo "stopping $name (pid $pid)"
        kill "$pid"
    fi
done
rm -f "$f"
