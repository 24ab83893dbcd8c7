"""The vocabulary every layer shares: registry errors and their JSON rendering
(:mod:`~proxy.core.errors`), image references and digests, media types, the configuration value
parsers and :class:`~proxy.core.settings.ConfigError`, single flight, and the Prometheus metrics.

May import: :mod:`storage` (its error and content types), nothing else of :mod:`proxy`.
"""
