"""Timing helpers: wall-clock phases and call durations of library functions, without changing them."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from typing import Iterator


@contextlib.contextmanager
def record_calls(module, name: str, durations: list[float]) -> Iterator[list[float]]:
    """Append the duration of every call of ``module.name`` to ``durations`` while the context is open.

    The wrapper calls the original function with the same arguments and returns its result, so
    the library runs unchanged. Only the wall time around each call is recorded.
    """
    original = getattr(module, name, None)
    if original is None:
        raise AttributeError(
            f"{module.__name__}.{name} does not exist, so the benchmark cannot time it; update "
            "benchmarks/perf to the library's current function names"
        )

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            durations.append(time.perf_counter() - started)

    setattr(module, name, timed)
    try:
        yield durations
    finally:
        setattr(module, name, original)


def peak_rss_bytes() -> tuple[int, str]:
    """Return this process's peak resident set size in bytes and where it was read.

    On Linux, ru_maxrss of a child process starts from its parent's peak: the value survives
    fork and exec, so a child of a large parent reports the parent's peak. VmHWM in
    /proc/self/status belongs to the process's own address space and is read first.
    """
    high_water = _proc_status_bytes("VmHWM")
    if high_water is not None:
        return high_water, "VmHWM"
    return ru_maxrss_bytes(), "ru_maxrss"


def ru_maxrss_bytes() -> int:
    """Return getrusage's ru_maxrss in bytes (the field is KiB on Linux and bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int | None:
    """Return this process's current resident set size in bytes, or None where /proc is missing."""
    return _proc_status_bytes("VmRSS")


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
