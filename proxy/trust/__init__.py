"""The trust policy on the pull path (issue #23): the ``policy:`` settings and their keys
(:mod:`~proxy.trust.settings`), cosign key-based signature verification
(:mod:`~proxy.trust.cosign`) and the service that admits or refuses a manifest and records its
verdicts (:mod:`~proxy.trust.service`).

May import: :mod:`proxy.platforms`, :mod:`proxy.cache`, :mod:`proxy.access`, :mod:`proxy.fetch`,
:mod:`proxy.core`, :mod:`storage`; never :mod:`proxy.registry`, :mod:`proxy.ops`,
:mod:`proxy.config` or :mod:`proxy.app`.
"""
