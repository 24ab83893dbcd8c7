"""regproxy: a pull-through caching registry proxy (HTTP server, upstream client, config, CLI)."""

__version__ = "0.1.0"
