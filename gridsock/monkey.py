"""``python -m gridsock.monkey script.py``: run a program under the socket personality.

A façade for :mod:`gridsock.personalities.monkey` (where everything lives), so the command and
``import gridsock.monkey; gridsock.monkey.patch_all()`` read as in gevent. Nothing in the
framework imports this module.
"""
from __future__ import annotations

import sys

from gridsock.personalities.monkey import (  # noqa: F401
    get_original,
    is_patched,
    main,
    patch_all,
    patch_socket,
    unpatch_all,
)

__all__ = ["patch_all", "patch_socket", "unpatch_all", "is_patched", "get_original", "main"]

if __name__ == "__main__":
    sys.exit(main())
