"""Uploads: images a user sends to serve as references, kept until they expire (docs/uploads.md)."""
