"""Run ``lakeproxy`` with a memory probe: SIGUSR2 appends one JSON line.

    LAKEPROXY_MEMPROBE_OUT=/tmp/probe.jsonl python benchmarks/memprobe.py run

Run as a script with the working directory at the checkout to measure: that
directory's ``lakeproxy`` is imported (so an older checkout can be probed
too). On SIGUSR2 the process appends to ``$LAKEPROXY_MEMPROBE_OUT`` one line
with glibc's ``malloc_info`` totals (``heap_mib``: what the arenas hold from
the system, ``free_mib``: how much of it is free chunks, ``mmap_mib``/
``mmap_count``: allocations mapped on their own) and, when tracemalloc is on
(``PYTHONTRACEMALLOC=1``), the Python-object total and the largest allocation
sites; the TLS transports alive; from the Nth probe on
(``LAKEPROXY_MEMPROBE_GC_FROM=N``), what a full ``gc.collect()`` then frees.
Used by ``benchmarks.soak --proxy-module benchmarks.memprobe``; not part
of lakeproxy itself.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import signal
import sys
import tempfile
import tracemalloc
from types import FrameType


def malloc_totals() -> dict[str, float]:
    """glibc's malloc_info totals in MiB (empty off glibc)."""
    try:
        libc = ctypes.CDLL(None)
        fopen, fclose, info = libc.fopen, libc.fclose, libc.malloc_info
    except (OSError, AttributeError):
        return {}
    fopen.restype = ctypes.c_void_p
    fclose.argtypes = [ctypes.c_void_p]
    info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    with tempfile.NamedTemporaryFile(suffix=".xml") as tmp:
        f = fopen(tmp.name.encode(), b"w")
        info(0, f)
        fclose(f)
        xml = open(tmp.name).read()  # noqa: SIM115 - the file ctypes wrote
    # The totals follow the last </heap>.
    tail = xml[xml.rfind("</heap>") :]
    mib = 1024 * 1024

    fast = re.search(r'<total type="fast" count="(\d+)" size="(\d+)"', tail)
    rest = re.search(r'<total type="rest" count="(\d+)" size="(\d+)"', tail)
    mmap = re.search(r'<total type="mmap" count="(\d+)" size="(\d+)"', tail)
    current = re.search(r'<system type="current" size="(\d+)"', tail)
    heaps = xml.count("<heap nr=")
    return {
        "arenas": heaps,
        "heap_mib": round(int(current.group(1)) / mib, 1) if current else 0.0,
        "free_mib": round(
            (int(fast.group(2)) if fast else 0) / mib + (int(rest.group(2)) if rest else 0) / mib, 1
        ),
        "free_chunks": (int(fast.group(1)) if fast else 0) + (int(rest.group(1)) if rest else 0),
        "mmap_mib": round(int(mmap.group(2)) / mib, 1) if mmap else 0.0,
        "mmap_count": int(mmap.group(1)) if mmap else 0,
    }


def python_totals(top: int = 8) -> dict[str, object]:
    """tracemalloc's total and largest sites (empty when not tracing)."""
    if not tracemalloc.is_tracing():
        return {}
    snap = tracemalloc.take_snapshot()
    stats = snap.statistics("lineno")
    return {
        "python_mib": round(sum(s.size for s in stats) / 1024 / 1024, 1),
        "python_top": [
            f"{s.traceback[0].filename.rsplit('/', 2)[-1]}:{s.traceback[0].lineno} "
            f"{s.size // 1024} KiB x{s.count}"
            for s in stats[:top]
        ],
    }


_probes: list[int] = []


def tls_alive() -> int:
    """TLS transports still in memory (gc-tracked), open or not."""
    from lakeproxy.tls import TLSTransport

    return sum(1 for o in gc.get_objects() if isinstance(o, TLSTransport))


def _probe(signum: int, frame: FrameType | None) -> None:
    out = os.environ.get("LAKEPROXY_MEMPROBE_OUT")
    if not out:
        return
    report: dict[str, object] = {**malloc_totals(), **python_totals()}
    report["gc_counts"] = list(gc.get_count())
    report["tls_alive"] = tls_alive()
    _probes.append(signum)
    if len(_probes) >= int(os.environ.get("LAKEPROXY_MEMPROBE_GC_FROM") or 1_000_000):
        # what a full collection frees (from the Nth probe on): sessions kept
        # only by reference cycles
        report["gc_collected"] = gc.collect()
        report["tls_alive_after_gc"] = tls_alive()
        report["after_gc"] = malloc_totals()
    line = json.dumps(report)
    with open(out, "a") as f:
        f.write(line + "\n")


def main() -> int:
    sys.path.insert(0, os.getcwd())  # the checkout to measure, before any installed copy
    signal.signal(signal.SIGUSR2, _probe)
    from lakeproxy.cli import main as lakeproxy_main

    return lakeproxy_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
