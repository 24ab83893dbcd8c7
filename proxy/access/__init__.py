"""Who may pull what, and from where: client authentication and per-repository rules
(:mod:`~proxy.access.auth`, which owns the ``auth:`` section), the Bearer token service
(:mod:`~proxy.access.tokens`), and routing of a requested name to an upstream and repository
(:mod:`~proxy.access.routing`).

May import: :mod:`proxy.fetch` (upstream settings), :mod:`proxy.core`.
"""
