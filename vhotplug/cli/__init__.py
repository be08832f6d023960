"""The command line. Importing this package means vhotplug owns the process."""

import sys

# paramiko imports `invoke` only to run ssh_config "Match exec" lines, which vhotplug
# never reads, and copes with its absence; skipping it saves ~35 ms on every command.
sys.modules.setdefault("invoke", None)  # type: ignore[arg-type]
