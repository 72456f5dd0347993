"""The metadata service: users, API keys, projects, chains, rules, and their change feed."""
