"""Fetching from upstream registries: the aiohttp client with its token flow, retries and rate
limit (:mod:`~proxy.fetch.upstream`, configured by :mod:`~proxy.fetch.settings`), cold blob GETs
on worker threads (:mod:`~proxy.fetch.threadget`, :mod:`~proxy.fetch.rawbody`), and the single
flight of blob downloads (:mod:`~proxy.fetch.download`, :mod:`~proxy.fetch.downloads`,
:mod:`~proxy.fetch.spool`), coordinated across replicas by :mod:`~proxy.fetch.fleet`.

May import: :mod:`proxy.core` and :mod:`storage`.
"""
