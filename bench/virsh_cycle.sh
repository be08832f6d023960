#!/usr/bin/env bash
# The hand-written equivalent of one `vhotplug attach nic --verify` + `vhotplug detach --verify`:
# virsh attach-device, ssh-poll every 0.1 s until the guest shows the MAC, virsh detach-device,
# ssh-poll until it is gone.
# Arguments: URI DOMAIN XMLFILE MAC HOST PORT KEY KNOWN_HOSTS [CONTROL_PATH [PROXY_COMMAND]]
# With CONTROL_PATH, ssh shares one connection (OpenSSH ControlMaster/ControlPersist), as a careful
# operator's loop would. PROXY_COMMAND reaches a guest behind a jump host (the Xen lab's dom0).
set -euo pipefail
uri=$1 dom=$2 xml=$3 mac=$4 host=$5 port=$6 key=$7 known=$8 control=${9:-} proxy=${10:-}
opts=()
[[ -n $control ]] && opts+=(-o ControlMaster=auto -o "ControlPath=$control" -o ControlPersist=60)
[[ -n $proxy ]] && opts+=(-o "ProxyCommand=$proxy")
ssh_guest() {
    ssh -q -i "$key" -p "$port" -o UserKnownHostsFile="$known" -o StrictHostKeyChecking=yes \
        -o IdentitiesOnly=yes -o BatchMode=yes "${opts[@]}" "root@$host" "$@"
}
has_mac() { ssh_guest "cat /sys/class/net/*/address" | grep -qx "$mac"; }

virsh -q -c "$uri" attach-device "$dom" "$xml" --live >/dev/null
until has_mac; do sleep 0.1; done
virsh -q -c "$uri" detach-device "$dom" "$xml" --live >/dev/null
while has_mac; do sleep 0.1; done
