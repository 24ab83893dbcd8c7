"""The HTTP face: the registry API's handlers (:mod:`~proxy.registry.routes`), the typed app
keys the composition root fills (:mod:`~proxy.registry.keys`), and the access log, metrics and
API header middleware (:mod:`~proxy.registry.middleware`). Handlers parse and check a request
and ask the services below for the answer; they hold no cache logic themselves.

May import: every layer below it (platforms, cache, access, fetch, core, storage); never
:mod:`proxy.ops`, :mod:`proxy.config` or :mod:`proxy.app`.
"""
