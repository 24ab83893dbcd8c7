"""regproxy's side-by-side benchmark: ``python -m bench`` (see bench/README.md).

It stands up, on 127.0.0.1, a seeded upstream (distribution), distribution's own pull-through
cache, regproxy and nginx (sendfile), measures them in turn on the same data, prints a Markdown
table and writes JSON.
"""
