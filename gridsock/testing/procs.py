"""Helpers to run gridsock processes and wait for their readiness lines (no sleeps)."""
from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from typing import Callable, List, Optional, Union

__all__ = ["wait_for_line", "gridsock_argv", "stop_process"]


def gridsock_argv(*args: str) -> List[str]:
    """The argv that runs the ``gridsock`` CLI with this interpreter."""
    return [sys.executable, "-m", "gridsock", *args]


def wait_for_line(proc: subprocess.Popen, match: Union[str, Callable[[str], bool]], *, timeout: float = 30.0) -> str:
    """Read ``proc.stdout`` until a line starts with ``match`` (or satisfies it).

    Returns that line without its newline. Raises RuntimeError if the process exits first and
    TimeoutError after ``timeout`` seconds; both name the lines seen so far. Reads the pipe's
    file descriptor directly (bytes not yet split into lines wait on the Popen object), so
    several calls on one process never lose a line to a reader's buffer. ValueError if ``proc``
    was not started with ``stdout=subprocess.PIPE``.
    """
    if proc.stdout is None:
        raise ValueError(f"{proc.args!r} was not started with stdout=subprocess.PIPE")
    check = (lambda line: line.startswith(match)) if isinstance(match, str) else match
    seen: List[str] = []
    pending: bytearray = proc.__dict__.setdefault("_gridsock_pending", bytearray())
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            while b"\n" in pending:
                raw, _, rest = bytes(pending).partition(b"\n")
                pending[:] = rest
                line = raw.decode("utf-8", "replace")
                seen.append(line)
                if check(line):
                    return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line matching {match!r} from {proc.args!r} within {timeout} s; seen: {seen[-10:]}")
            if not selector.select(remaining):
                continue
            data = os.read(fd, 65536)
            if not data:
                proc.wait(timeout=5)
                raise RuntimeError(f"{proc.args!r} exited ({proc.returncode}) before printing {match!r}; seen: {seen[-10:]}")
            pending += data


def stop_process(proc: Optional[subprocess.Popen], *, timeout: float = 10.0) -> None:
    """Terminate ``proc`` and reap it; kill it if it does not stop within ``timeout``."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
