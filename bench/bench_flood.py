"""A member floods a victim through the rendez-vous node: memory and ping round trips.

Runs :func:`gridsock.testing.flood.run_flood` (the rendez-vous node and three clusters, each in
a process of its own, on loopback; the flooder ``a2`` writes 1 MiB routed messages at ``b2`` as
fast as its socket takes them, bypassing its own node's queues) for each flood topic (``relay``:
bulk; ``flood``: not bulk), and prints one Markdown table row per run: the rendez-vous node's
RSS growth, its routed queue's peak, the round trips of the victim's and bystanders' pings
(all pairs together; a run without a flood first gives the machine's baseline), pings unanswered within ``PING_TIMEOUT_S``, links dropped that were not
the flooder's, and what the flooder got through.

``--before DIR`` also runs the same scenario against another tree of gridsock (a ``git
archive`` of an older commit, say: ``git archive COMMIT | tar -x -C DIR``), through
``PYTHONPATH``; the scenario's module is copied into it if it lacks one. A run stops early if
the rendez-vous node's RSS passes ``--abort-rss-mb``.

    python bench/bench_flood.py [--seconds 10] [--before /tmp/gridsock-before]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import gridsock.testing.flood as flood_module
from gridsock.testing.flood import FLOOD_TOPICS, FLOODER, run_flood

MIB = 1024 * 1024


def _row(label: str, topic: str, result: dict) -> str:
    rtts = sorted(r for p in result["pings"].values() for r in ([p["max_s"]] if p["max_s"] is not None else []))
    p50s = sorted(p["p50_s"] for p in result["pings"].values() if p["p50_s"] is not None)
    p99s = sorted(p["p99_s"] for p in result["pings"].values() if p["p99_s"] is not None)
    count = sum(p["count"] for p in result["pings"].values())
    failed = sum(len(p["failures"]) for p in result["pings"].values())
    others = [c for c in result["closures"]
              if not ((c[0] == "A" and c[1].startswith(f"member {FLOODER} ")) or c[0] == "F")]
    growth = (result["rv_rss"]["max"] - result["rv_rss"]["start"]) / MIB
    queue = result["routed_queue_peak"]
    flood = result["flood"] or {}
    sent = flood.get("sent_bytes", 0) / MIB
    seconds = flood.get("seconds") or 1
    return (f"| {label} | {topic} | {growth:.0f}{' (aborted)' if result['aborted'] else ''} | "
            f"{'-' if queue is None else f'{queue / MIB:.1f}'} | "
            f"{(p50s[len(p50s) // 2] if p50s else 0) * 1000:.0f} / {(p99s[-1] if p99s else 0) * 1000:.0f} / "
            f"{(rtts[-1] if rtts else 0) * 1000:.0f} | {failed}/{count} | {len(others)} | "
            f"{sent:.0f} MiB ({sent / seconds:.0f} MiB/s) |")


def _run(label: str, topic: str, seconds: float, abort_rss_mb: int, env=None) -> str:
    workdir = Path(tempfile.mkdtemp(prefix="bench-flood-"))
    try:
        result = run_flood(workdir, duration_s=seconds, topic=topic, abort_rss_bytes=abort_rss_mb * MIB, env=env)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    others = [c for c in result["closures"]
              if not ((c[0] == "A" and c[1].startswith(f"member {FLOODER} ")) or c[0] == "F")]
    for process, link, reason in others:
        print(f"    ({label}, {topic}: process {process} dropped {link}: {reason})", file=sys.stderr)
    for pair, pings in result["pings"].items():
        for failure in pings["failures"]:
            print(f"    ({label}, {topic}: ping {pair} failed: {failure})", file=sys.stderr)
    guards = {name: g for name, g in [*result["guards"].items(), ("rendezvous", result["rv_guard"])]
              if g and (g["held"] or g["dropped"] or g["cut"])}
    print(f"    ({label}, {topic}: guards {guards})", file=sys.stderr)
    return _row(label, topic, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each flood lasts")
    parser.add_argument("--before", help="another gridsock tree to run the same scenario against")
    parser.add_argument("--abort-rss-mb", type=int, default=1536, help="stop a run when the rendez-vous RSS passes this")
    args = parser.parse_args()
    print(f"flood of {args.seconds:.0f} s per run; pings: {', '.join(f'{s}->{d}' for s, d in flood_module.PINGS)}")
    print()
    print("| code | flood topic | rendez-vous RSS growth (MiB) | routed queue peak (MiB) | ping p50 / p99 / max (ms) "
          "| pings unanswered | other links dropped | flooder got through |")
    print("|---|---|---|---|---|---|---|---|")
    runs = []
    if args.before:
        before = Path(args.before)
        target = before / "gridsock" / "testing" / "flood.py"
        if not target.exists():
            shutil.copy(flood_module.__file__, target)
        env = dict(os.environ, PYTHONPATH=str(before))
        runs += [("before", topic, env) for topic in FLOOD_TOPICS]
    runs += [("after", topic, None) for topic in ("none",) + FLOOD_TOPICS]
    for label, topic, env in runs:
        print(_run(label, topic, args.seconds, args.abort_rss_mb, env), flush=True)


if __name__ == "__main__":
    main()
