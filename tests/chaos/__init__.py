"""Chaos suite: the stack under load through crashes and outages, judged by its invariants."""
