# Shared by the demo scripts (sourced): where vhotplug is, and how a step is shown.
here=$(cd "$(dirname "${BASH_SOURCE[1]}")/.." && pwd)
vh=$here/.venv/bin/vhotplug
# Print the command (without the venv path), then run it.
step() { printf '\n\033[1m$ %s\033[0m\n' "${*#"$here/.venv/bin/"}"; "$@"; }
# Evaluate a Python expression on the JSON document read from stdin (as d).
json() { "$here/.venv/bin/python" -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
