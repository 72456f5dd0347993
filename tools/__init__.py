"""What is not a service: the `renderflow` command and the local stack's supervisor (`cli`), the
trace analysis (`tracereport`), and a PostgreSQL server for a machine without one (`embedded_pg`).
None of it is in the production image."""
