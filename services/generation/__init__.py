"""The generation service: renders, their durable queue in PostgreSQL, workers, events and artifacts."""
