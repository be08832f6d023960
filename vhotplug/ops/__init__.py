"""Multi-step operations: attach/verify/rollback and detach/wait/verify."""
