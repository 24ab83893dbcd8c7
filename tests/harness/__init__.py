"""Real-component test harness for regproxy.

Everything here runs real processes or real HTTP servers on 127.0.0.1 (never a mock of the
component under test)::

    tools.py      require_tool(), free_port(), wait_http()
    registry.py   Registry / start_registry(): a real distribution 2.8 (`docker-registry`)
    tokens.py     TokenIssuer: an auth.docker.io look-alike issuing JWTs distribution accepts
    images.py     seed_image() / tag_image(): real multi-platform images pushed with skopeo
    front.py      Front: a recording reverse proxy with per-request fault injection
    proxyproc.py  ProxyProcess: the proxy under test as a subprocess
    _loop.py      LoopThread: runs an aiohttp server on its own thread + event loop so the
                  same object works from sync and async tests
"""
