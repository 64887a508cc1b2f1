"""``gridsock top`` and ``gridsock status --watch``: a live view of one node, refreshed in place.

Theory of operation
-------------------
Every ``interval`` seconds the view asks the node for its ``status`` (the control operation
``gridsock status`` uses) and draws one *frame*: a header (the node, its role and cluster,
whether it is joined, how long its uplink has been up), the path to each peer (as ``gridsock
status`` shows them, each reason cut short), the live data connections with the bytes each way
and the *rate* of each since the previous frame, and the meta links.

The node reports byte counts, not rates: :class:`RateMeter` keeps the counts of the previous
reply per connection number (numbers are never reused by a node) and divides the difference by
the time between the two replies. A connection seen for the first time, or whose counts are not
known (``None``), has no rate yet (``-``).

On a terminal each frame replaces the previous one (ANSI *home* and *erase display*, so no
curses is needed); otherwise frames follow one another separated by a blank line, so a pipe
(``| head``, a test) reads them in order. ``--json`` prints one JSON object per frame and line.
``--count N`` stops after N frames. Ctrl-C ends the view at once with exit status 0; a node that
stops answering ends it with a message on stderr and exit status 1 (:data:`EXIT_NODE_GONE`).
"""
from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from typing import Any, Dict, List, Optional, TextIO, Tuple

from .cli import _add_target, _control_target, _format_age, _format_bytes, _format_paths, _table
from .errors import GridsockError

__all__ = ["add_commands", "watch", "run_view", "format_frame", "RateMeter", "DEFAULT_INTERVAL_S",
           "MIN_INTERVAL_S", "EXIT_NODE_GONE"]

# Between two frames, unless told otherwise (as ``top``'s default is a few seconds).
DEFAULT_INTERVAL_S = 2.0
# Each frame is a control call that walks the node's connection table: no faster than this.
MIN_INTERVAL_S = 0.1
# One frame's status call; a node that does not answer within this long is taken as gone.
STATUS_TIMEOUT_S = 10.0
# A reason under a path is cut to this many characters (``gridsock status`` shows it whole).
REASON_CHARS = 90
# The exit status when the node goes away while watched (a refused first call exits 2, as any
# command whose node cannot be asked).
EXIT_NODE_GONE = 1
# ANSI: cursor home, erase the display (a frame replaces the previous one on a terminal).
CLEAR_SCREEN = "\x1b[H\x1b[2J"


class _Interrupted(Exception):
    """Ctrl-C, raised where the view waits (see :func:`run_view`)."""


class RateMeter:
    """Bytes per second of each data connection, from two successive status replies."""

    def __init__(self) -> None:
        self._last: Dict[int, Tuple[float, Optional[int], Optional[int]]] = {}

    def update(self, connections: List[dict], at: float) -> Dict[int, Tuple[Optional[float], Optional[float]]]:
        """Take the connections of a reply received at ``at`` (monotonic seconds); return
        ``{conn: (sent_per_s, received_per_s)}``, None where not known yet. Forgets the
        connections no longer listed."""
        rates: Dict[int, Tuple[Optional[float], Optional[float]]] = {}
        seen: Dict[int, Tuple[float, Optional[int], Optional[int]]] = {}
        for c in connections:
            conn = int(c["conn"])
            sent, received = c.get("bytes_sent"), c.get("bytes_received")
            seen[conn] = (at, sent, received)
            before = self._last.get(conn)
            if before is None or at <= before[0]:
                rates[conn] = (None, None)
                continue
            elapsed = at - before[0]
            rates[conn] = (_rate(before[1], sent, elapsed), _rate(before[2], received, elapsed))
        self._last = seen
        return rates


def _rate(before: Optional[int], now: Optional[int], elapsed: float) -> Optional[float]:
    if before is None or now is None:
        return None
    return max(0, now - before) / elapsed


def _format_rate(rate: Optional[float]) -> str:
    return "-" if rate is None else _format_bytes(int(rate)) + "/s"


def _header(status: dict, interval: float, now: float) -> List[str]:
    clock = time.strftime("%H:%M:%S", time.localtime(now))
    if status.get("role") == "rendezvous":
        return [f"rendez-vous node of session {status.get('session')} on {status.get('address')}  "
                f"{clock}, every {interval:g}s"]
    where = f"cluster {status['cluster']}" if status.get("cluster") else "no cluster"
    state = "joined" if status.get("joined") else "NOT JOINED"
    up = ""
    uplink = next((link for link in status.get("links", []) if link.get("kind") == "uplink"), None)
    if uplink is not None and uplink.get("since"):
        up = f", uplink up {_format_age(max(0.0, now - float(uplink['since'])))}"
    if status.get("started_at"):  # (a node that says when it started)
        up = f", up {_format_age(max(0.0, now - float(status['started_at'])))}" + up
    return [f"node {status['name']} ({status['role']}, {where}): {state}{up}  {clock}, every {interval:g}s",
            f"  node port {status.get('address')}, bootstrap {status.get('bootstrap')}, "
            f"{len(status.get('directory', []))} node(s) in the directory"]


def _connections(connections: List[dict], rates: Dict[int, Tuple[Optional[float], Optional[float]]],
                 listening: List[int]) -> List[str]:
    ports = ", ".join(map(str, listening))
    lines = [f"data connections: {len(connections) or 'none'}; "
             + (f"listening on grid port(s) {ports}" if ports else "not listening on any grid port")]
    if not connections:
        return lines
    rows = [("CONN", "SIDE", "PEER:PORT", "STACK", "SENT", "RECEIVED", "SENT/S", "RECV/S", "RTT", "AGE", "PROGRAM")]
    for c in sorted(connections, key=lambda c: c["conn"]):
        sent_rate, received_rate = rates.get(int(c["conn"]), (None, None))
        rows.append((f"#{c['conn']}", c["side"], f"{c['peer']}:{c['port']}", c["stack"],
                     _format_bytes(c.get("bytes_sent")), _format_bytes(c.get("bytes_received")),
                     _format_rate(sent_rate), _format_rate(received_rate),
                     f"{c['rtt_ms']:.1f} ms" if c.get("rtt_ms") is not None else "-",
                     _format_age(c.get("age_s", 0.0)),
                     (f"pid {c['pid']}" if c.get("pid") else "a program") if c.get("handed") else "this node"))
    return lines + _table(rows)


def _brief(line: str) -> str:
    """A reason line under a path, cut to REASON_CHARS."""
    text = line.lstrip()
    if text.startswith("not ") and len(text) > REASON_CHARS:
        return line[: len(line) - len(text)] + text[: REASON_CHARS - 3] + "..."
    return line


def format_frame(status: dict, rates: Dict[int, Tuple[Optional[float], Optional[float]]], *,
                 interval: float = DEFAULT_INTERVAL_S, now: Optional[float] = None) -> str:
    """One frame of the view: the text for a status reply and the rates of its connections
    (:meth:`RateMeter.update`). ``now``: the wall clock (Unix time) the frame shows."""
    now = time.time() if now is None else now
    lines = _header(status, interval, now)
    if "paths" in status:
        lines += [_brief(line) for line in _format_paths(status["paths"])]
    if "connections" in status:
        lines += _connections(status["connections"], rates, status.get("listening", []))
    meta = status.get("meta_links") or []
    if meta:
        lines.append("meta links:")
        lines += _table([("PEER", "STACK", "LINK")] + [(m["peer"], m["stack"], m["label"]) for m in meta])
    elif status.get("role") != "rendezvous":
        lines.append("meta links: none")
    if status.get("role") == "rendezvous":
        lines.append("leaders linked:")
        lines += [f"  {link.get('peer') or '?'}  {link['label']}" for link in status.get("links", [])]
    return "\n".join(lines)


def _fit(frame: str) -> str:
    """On a terminal: cut lines to its width and the frame to its height (no wrapping, no scroll)."""
    size = shutil.get_terminal_size()
    lines = [line[: size.columns] for line in frame.splitlines()]
    if len(lines) > size.lines - 1:
        lines = lines[: size.lines - 2] + [f"... ({len(lines) - size.lines + 2} more lines)"]
    return "\n".join(lines)


def run_view(target: str, *, interval: float = DEFAULT_INTERVAL_S, count: Optional[int] = None,
             as_json: bool = False, out: Optional[TextIO] = None, err: Optional[TextIO] = None,
             tty: Optional[bool] = None, label: Optional[str] = None) -> int:
    """Draw frames of the node serving the control socket ``target`` until ``count`` frames,
    Ctrl-C (exit status 0) or the node going away (a message on ``err``, :data:`EXIT_NODE_GONE`).

    ``tty`` (default: whether ``out`` is a terminal) redraws in place. Raises GridsockError
    (ConnectError...) when the first call fails: nothing serves ``target``.
    """
    import gevent

    from .bootstrap.control import call

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    tty = out.isatty() if tty is None else tty
    interval = max(MIN_INTERVAL_S, float(interval))
    label = label or target
    meter = RateMeter()
    main_greenlet = gevent.getcurrent()
    # The signal arrives in the hub; raise it where the view waits (a call, or the sleep).
    handler = gevent.signal_handler(signal.SIGINT, lambda: main_greenlet.throw(_Interrupted()))
    frames = 0
    try:
        while count is None or frames < count:
            started = time.monotonic()
            try:
                status = call(target, "status", timeout=STATUS_TIMEOUT_S)
            except (GridsockError, OSError, TimeoutError) as exc:
                if frames == 0:  # never answered: as any command whose node cannot be asked
                    if isinstance(exc, GridsockError):
                        raise
                    raise GridsockError(f"{label} does not answer: {exc}") from exc
                print(f"gridsock top: {label} went away: {exc}", file=err, flush=True)
                return EXIT_NODE_GONE
            at = time.monotonic()
            rates = meter.update(status.get("connections", []), at)
            frames += 1
            if as_json:
                out.write(json.dumps({"at": time.time(), "status": status,
                                      "rates": {str(conn): {"sent_per_s": s, "received_per_s": r}
                                                for conn, (s, r) in rates.items()}}, sort_keys=True) + "\n")
            else:
                frame = format_frame(status, rates, interval=interval)
                if tty:
                    out.write(CLEAR_SCREEN + _fit(frame) + "\n")
                else:
                    out.write(("\n" if frames > 1 else "") + frame + "\n")
            out.flush()
            if count is not None and frames >= count:
                break
            gevent.sleep(max(0.0, interval - (time.monotonic() - started)))
    except _Interrupted:
        return 0
    finally:
        handler.cancel()
    return 0


def watch(args) -> int:
    """``gridsock top`` and ``gridsock status --watch [S]``: the live view of one node."""
    interval = getattr(args, "interval", None)
    if interval is None:
        interval = getattr(args, "watch", None) or DEFAULT_INTERVAL_S
    target = _control_target(args)
    return run_view(target, interval=interval, count=getattr(args, "count", None),
                    as_json=bool(getattr(args, "json", False)), label=args.node or target)


def _positive(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _count(text: str) -> int:
    import argparse

    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a count of frames (1 or more): {text!r}")
    return int(text)


def add_commands(sub: Any) -> None:
    """Add ``gridsock top`` to the ``gridsock`` parser."""
    top = sub.add_parser("top", help="a live view of a running node: paths, connections and their rates, "
                                     "meta links (until Ctrl-C)",
                         description="A live view of a running node, refreshed every --interval seconds: "
                                     "the path to each peer, the data connections with bytes and rates each "
                                     "way, the meta links. In place on a terminal; frames separated by a "
                                     "blank line otherwise.")
    _add_target(top)
    top.add_argument("--interval", type=_positive, default=DEFAULT_INTERVAL_S, metavar="SECONDS",
                     help=f"between two frames (default {DEFAULT_INTERVAL_S:g}; at least {MIN_INTERVAL_S:g})")
    top.add_argument("--count", type=_count, metavar="N", help="stop after N frames")
    top.add_argument("--json", action="store_true", help="one JSON object per frame and line: status and rates")
    top.set_defaults(handler=watch)
