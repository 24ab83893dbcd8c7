"""The pull-through services, one per content kind: each answers local-first from
:mod:`storage` and fetches from upstream when it must. Blobs (:mod:`~proxy.cache.blobs`, sent
with :mod:`~proxy.cache.sendfile` or relayed uncached by :mod:`~proxy.cache.relay`), manifests
and tags (:mod:`~proxy.cache.manifests`), what a repository is known to hold
(:mod:`~proxy.cache.links`), and OCI 1.1 referrers (:mod:`~proxy.cache.referrers`).

May import: :mod:`proxy.fetch`, :mod:`proxy.core`, :mod:`storage`.
"""
