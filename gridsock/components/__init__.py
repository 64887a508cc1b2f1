"""Components: one module per method (tcp, relay ...) or filter (tls, lz4, zlib, bz2, adoc ...).

Nothing is imported here: :mod:`gridsock.registry` imports a component's module the first time
a stack uses it, so parsing ``"tls/lz4/tcp"`` costs neither ``gevent.ssl`` nor ``lz4``.
"""
