"""The image-fetch service: reference images under a hard deadline, cached, coalesced, SSRF-guarded."""
