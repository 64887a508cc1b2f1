"""Patches every Python process started with this directory on PYTHONPATH and $GRIDSOCK_AGENT set.

``gridsock run`` and ``python -m gridsock.monkey`` put it there, so that child interpreters
(subprocess, multiprocessing's spawn and forkserver) run with the socket personality too. The
``sitecustomize`` this one shadows, if any, runs afterwards.
"""
import os
import sys


def _chain() -> None:
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.machinery.PathFinder.find_spec(
        "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != here])
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if os.environ.get("GRIDSOCK_AGENT"):
    from gridsock.personalities.monkey import patch_all

    patch_all(warn=False)
_chain()
