"""Install the socket personality into an unmodified program, after gevent's ``monkey``.

Theory of operation
-------------------
``patch_all()`` (today: ``patch_socket()``) replaces, in the ``socket`` module, the class
``socket``, ``create_connection`` (gevent's does not go through the module's names) and the
name functions (``getaddrinfo``, ``gethostbyname``, ``gethostbyname_ex``, ``gethostbyaddr``,
``getnameinfo``, ``getfqdn``) by the personality's (:mod:`gridsock.personalities.socket`).
Every module that calls ``socket.socket(...)`` or ``socket.getaddrinfo(...)`` through the module
then reaches grid nodes by name. The originals are kept here, in one place (:func:`get_original`); the personality's
own Unix connections to its agent use them, and ``unpatch_all()`` puts them back.

``ssl``: ``SSLContext.sslsocket_class`` becomes the personality's ``GridSSLSocket``, so that
``wrap_socket`` on a grid socket keeps its grid port, listener and addresses; installed at once
if ``ssl`` is imported, else by an import hook when the program imports it (``ssl`` is heavy:
a program that never uses it never loads it). ``unpatch_all()`` puts the class back.

A program that runs patched and then lets gevent patch (``monkey.patch_all()``) gets the
personality back on top of gevent's sockets: gevent calls :func:`gevent_did_patch_all` (an entry
point). Patching gevent first and the personality second works as well.

A module that bound the names itself before the patch (``from socket import socket``: ``ssl``
does) keeps the originals; :func:`patch_socket` warns, naming such modules. Patch first:
``python -m gridsock.monkey script.py``, ``gridsock run -- python script.py`` or the
``sitecustomize`` they install for child processes do.

The personality needs an agent: a node process on the host (``$GRIDSOCK_AGENT`` or
``patch_all(agent=PATH)``). Without one, patching changes nothing anybody can see.

Command line::

    python -m gridsock.monkey [--node NAME | --agent PATH] script.py [args...]
    python -m gridsock.monkey [--node NAME | --agent PATH] -m module [args...]

runs the script patched, with ``$GRIDSOCK_AGENT`` set and this package's ``sitecustomize``
first on ``PYTHONPATH``, so that Python child processes (``subprocess``, and multiprocessing's
``spawn`` and ``forkserver`` children, which start a fresh interpreter) are patched too.
"""
from __future__ import annotations

import os
import socket
import sys
import warnings
from typing import Any, Dict, List, Optional, Tuple

from gridsock.names import run_dir

__all__ = ["patch_all", "patch_socket", "unpatch_all", "is_patched", "get_original", "SOCKET_ITEMS",
           "site_dir", "child_environment", "gevent_did_patch_all", "main"]

#: What the personality replaces in the ``socket`` module.
SOCKET_ITEMS = ("socket", "create_connection", "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr",
                "getnameinfo", "getfqdn")
#: The environment variable naming the agent socket (inherited by child processes).
AGENT_ENV = "GRIDSOCK_AGENT"

# The originals, captured when this module is first imported (before any patch of ours).
_ORIGINALS: Dict[Tuple[str, str], Any] = {("socket", name): getattr(socket, name) for name in SOCKET_ITEMS}
_patched: Dict[Tuple[str, str], Any] = {}


def get_original(module_name: str, item_name):
    """The original ``module_name.item_name`` (or a list of them, for a list of names)."""
    if isinstance(item_name, (list, tuple)):
        return [get_original(module_name, name) for name in item_name]
    key = (module_name, item_name)
    if key in _ORIGINALS:
        return _ORIGINALS[key]
    return getattr(sys.modules[module_name] if module_name in sys.modules else __import__(module_name), item_name)


def is_patched(module_name: str = "socket", item_name: Optional[str] = None) -> bool:
    """True if the personality is installed in ``module_name`` (or for that one item)."""
    if item_name is None:
        return any(mod == module_name for mod, _ in _patched)
    return (module_name, item_name) in _patched


def patch_socket(*, agent: Optional[str] = None, warn: bool = True) -> None:
    """Install the socket personality in the ``socket`` module (idempotent).

    ``agent``: the agent socket's path (default ``$GRIDSOCK_AGENT``); it is also exported to
    child processes through the environment.
    """
    from . import socket as personality

    if agent:
        os.environ[AGENT_ENV] = agent
    personality.configure(os.environ.get(AGENT_ENV))
    if is_patched("socket"):
        return
    if warn:
        _warn_early_bindings()
    for name in SOCKET_ITEMS:
        _patched[("socket", name)] = getattr(personality, "GridSocket" if name == "socket" else name)
        setattr(socket, name, _patched[("socket", name)])
    _patch_ssl(personality)


def _patch_ssl(personality) -> None:
    """Make ``SSLContext.wrap_socket`` build grid-aware SSL sockets (``SSLContext.sslsocket_class``:
    :func:`gridsock.personalities.socket.ssl_socket_class`), now if ``ssl`` is imported, else
    when the program imports it (an import hook: nothing heavy is imported before the program).
    Only the stdlib's ``ssl``: gevent's builds its sockets otherwise."""
    ssl = sys.modules.get("ssl")
    if ssl is None:
        if not any(isinstance(finder, _SSLImportHook) for finder in sys.meta_path):
            sys.meta_path.insert(0, _SSLImportHook())
        return
    if getattr(ssl.SSLContext, "__module__", None) != "ssl" or not hasattr(ssl.SSLSocket, "_create"):
        return
    grid_class = personality.ssl_socket_class()
    if grid_class is None:
        return
    _ORIGINALS.setdefault(("ssl.SSLContext", "sslsocket_class"), ssl.SSLContext.sslsocket_class)
    _patched[("ssl.SSLContext", "sslsocket_class")] = grid_class
    ssl.SSLContext.sslsocket_class = grid_class


class _SSLImportHook:
    """A ``sys.meta_path`` finder: finds ``ssl`` as the other finders do, and patches it once it
    has run (:func:`_patch_ssl`). (No importlib.abc base: importing it costs more than ssl.)"""

    def find_spec(self, fullname, path, target=None):
        if fullname != "ssl":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    # (a Loader by duck typing: importlib.abc costs more to import than ssl)
                    spec.loader = _PatchingLoader(spec.loader)  # type: ignore[assignment]
                return spec
        return None


class _PatchingLoader:
    """The loader of ``ssl``, and then :func:`_patch_ssl`; the module keeps the loader it had."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def __getattr__(self, name: str):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _unhook_ssl()
        if is_patched("socket"):
            from . import socket as personality

            _patch_ssl(personality)


def _unhook_ssl() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _SSLImportHook)]


def patch_all(*, agent: Optional[str] = None, warn: bool = True) -> None:
    """Install every personality (today: the socket personality)."""
    patch_socket(agent=agent, warn=warn)


def unpatch_all() -> None:
    """Put every original back."""
    _unhook_ssl()
    for (module_name, name) in list(_patched):
        if module_name == "ssl.SSLContext":
            setattr(sys.modules["ssl"].SSLContext, name, _ORIGINALS[(module_name, name)])
        else:
            setattr(sys.modules[module_name], name, _ORIGINALS[(module_name, name)])
        del _patched[(module_name, name)]


def _warn_early_bindings() -> None:
    originals = {id(_ORIGINALS[("socket", name)]): name for name in SOCKET_ITEMS}
    culprits: List[str] = []
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name == "socket" or module_name.startswith(("gridsock", "gevent")) \
                or (module_name.startswith("_") and module_name != "__main__"):
            continue
        try:
            values = vars(module)
        except TypeError:
            continue
        bound = sorted({originals[id(v)] for v in list(values.values()) if id(v) in originals
                        and any(v is _ORIGINALS[("socket", n)] for n in SOCKET_ITEMS)})
        if bound:
            culprits.append(f"{module_name} ({', '.join(bound)})")
    if culprits:
        warnings.warn("gridsock personality installed after these modules bound socket names of their own, "
                      "which keep the originals: " + "; ".join(sorted(culprits))
                      + ". Patch earlier (python -m gridsock.monkey, gridsock run).", RuntimeWarning, stacklevel=3)


def gevent_did_patch_all(event=None) -> None:
    """gevent's plugin hook (entry point ``gevent.plugins.monkey.did_patch_all``).

    A program run patched (``gridsock run``, ``python -m gridsock.monkey``) that then calls
    gevent's ``monkey.patch_all()`` has just had its socket names replaced by gevent's, ours
    included. Install the personality again, on top of gevent's socket class this time, so grid
    connections are cooperative too.
    """
    if not _patched or getattr(socket, "socket") is _patched.get(("socket", "socket")):
        return
    import importlib

    from . import socket as personality

    for name in SOCKET_ITEMS:
        _ORIGINALS[("socket", name)] = getattr(socket, name)  # gevent's now
    _patched.clear()
    importlib.reload(personality)  # a GridSocket built on gevent's class
    patch_socket(warn=False)


def site_dir() -> str:
    """The directory whose ``sitecustomize`` patches every Python process started with it on PYTHONPATH."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "_site")


def child_environment(agent: str, env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """``env`` (default: ours) for a child process that must run patched."""
    env = dict(os.environ if env is None else env)
    env[AGENT_ENV] = agent
    paths = [site_dir()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != site_dir()]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


USAGE = """usage: python -m gridsock.monkey [--node NAME | --agent PATH] (script.py | -m module) [args...]

Run a Python program with the gridsock socket personality: its sockets reach grid nodes by name,
through the node NAME running on this host (or the agent socket PATH, default $GRIDSOCK_AGENT).
Everything after the script (or -m module) is the program's own."""


def main(argv: Optional[List[str]] = None) -> int:
    import runpy

    args = list(sys.argv[1:] if argv is None else argv)
    agent: Optional[str] = None
    node: Optional[str] = None
    module: Optional[str] = None
    program: Optional[str] = None
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print(USAGE)
            return 0
        if arg in ("--node", "--agent", "-m") and not args:
            print(f"{USAGE}\n\nerror: {arg} needs a value", file=sys.stderr)
            return 2
        if arg == "--node":
            node = args.pop(0)
        elif arg == "--agent":
            agent = args.pop(0)
        elif arg == "-m":
            module = args.pop(0)
            break
        elif arg.startswith("-"):
            print(f"{USAGE}\n\nerror: unknown option {arg}", file=sys.stderr)
            return 2
        else:
            program = arg
            break
    if node and agent:
        print(f"{USAGE}\n\nerror: give --node or --agent, not both", file=sys.stderr)
        return 2
    if not node and not (agent or os.environ.get(AGENT_ENV)):
        print(f"{USAGE}\n\nerror: no agent: give --node NAME or --agent PATH, or set ${AGENT_ENV}", file=sys.stderr)
        return 2
    if not module and not program:
        print(f"{USAGE}\n\nerror: nothing to run: give script.py or -m module", file=sys.stderr)
        return 2
    if node:
        agent = os.path.join(run_dir(), f"{node}.agent")
    agent = agent or os.environ[AGENT_ENV]
    os.environ.update(child_environment(agent))
    patch_all(agent=agent)
    if module:
        sys.argv = [module] + args
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    elif program:
        sys.argv = [program] + args
        sys.path.insert(0, os.path.dirname(os.path.abspath(program)))
        runpy.run_path(program, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
