"""A real PostgreSQL server for a machine that has none installed (the local stack and the tests)."""
