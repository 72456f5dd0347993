"""The HTTP gateway: Renderflow's only HTTP surface, in front of the metadata and generation services."""
