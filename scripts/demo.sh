#!/usr/bin/env bash
# The main job on the lab: boot the lab guest and show both views of it —
# libvirt's list of hot-pluggable devices and the guest's own view over SSH.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
vh=$here/.venv/bin/vhotplug
name=${1:-vhotplug-lab}

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step "$vh" lab build
step "$vh" lab up --name "$name"
step "$vh" list "$name" --guest
echo
echo "The lab stays up: \`$vh lab ssh --name $name\` logs in, \`make lab-down\` removes it."
