"""regproxy's server: a pull-through cache speaking the registry API (OCI distribution, pull side).

The packages are layers; each imports only the layers below it (``tests/test_layers.py`` checks
it), and :mod:`storage` sits under them all::

    proxy.cli, proxy.workers,     entry points: commands, worker processes, listening sockets,
    proxy.server                  signals
    proxy.app                     the composition root: builds the services, wires the routes
    proxy.config                  the loader (defaults < YAML < REGPROXY_* < flags)
    proxy.ops                     operators' features: console, scheduled sync, admin commands
    proxy.registry                the HTTP face: handlers of the registry API, keys, middleware
    proxy.platforms               one tag for every architecture: rules and index synthesis
    proxy.cache                   pull-through services per content kind (blobs, manifests, ...)
    proxy.access                  who may pull what (client auth, tokens), and where it routes
    proxy.fetch                   talking to upstreams: the client, downloads, the fleet
    proxy.core                    errors, references, media types, settings parsers, metrics
    storage                       drivers, the content store, metadata (imports nothing above)

Each feature owns its settings: a frozen dataclass and a parser for its section, next to the
code that uses them; :mod:`proxy.config` only assembles them.
"""

__version__ = "0.1.0"
