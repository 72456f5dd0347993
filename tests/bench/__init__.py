"""Benchmarks: scripts run by hand (`python -m tests.bench.<name>`), not collected by pytest."""
