"""One tag for every architecture: platform rules and their ``platforms:`` settings
(:mod:`~proxy.platforms.rules`) and the service that synthesizes an index from upstream's and
the rules' sources and picks a client's platform (:mod:`~proxy.platforms.service`).

May import: :mod:`proxy.cache`, :mod:`proxy.access`, :mod:`proxy.fetch`, :mod:`proxy.core`,
:mod:`storage`.
"""
