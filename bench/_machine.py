"""What the benchmarks record about the machine they ran on (shared by the bench scripts)."""
from __future__ import annotations

__all__ = ["cpu_model"]


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo, or "unknown"."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"
