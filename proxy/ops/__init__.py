"""Operators' features: the console (:mod:`~proxy.ops.console`), scheduled sync
(:mod:`~proxy.ops.sync`, status in :mod:`~proxy.ops.sync_status`), their settings
(:mod:`~proxy.ops.settings`), and the client side of admin commands (:mod:`~proxy.ops.commands`).

May import: :mod:`proxy.registry` and every layer below it; never :mod:`proxy.config` or
:mod:`proxy.app`.
"""
