"""The `renderflow` command: the local stack (`renderflow run`), a worker, admin, trace-report."""
