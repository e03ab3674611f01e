"""microVM support: artifacts, drivers."""
