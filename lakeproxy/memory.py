"""The C allocator, set up from inside the process (glibc; a no-op elsewhere).

What glibc's malloc does by default costs lakeproxy memory it never gets back
(RELIABILITY.md section 5 has the measurements):

- the mmap threshold is dynamic: once a large block that was mapped on its
  own is freed, blocks up to that size come from the heap from then on, and
  the heap is only trimmed when more than twice that is free at its top (up
  to 64 MiB). Fixed values (:data:`MMAP_THRESHOLD`, :data:`TRIM_THRESHOLD`)
  end that: the relay's buffers (at most 256 KiB plus a TLS record) stay in
  the heap, where they are reused without page faults, and anything larger is
  mapped and unmapped on its own;
- every thread that allocates gets an arena of its own, up to 8 per core
  (resolver and executor threads here); :data:`ARENA_MAX` caps them;
- memory freed in the middle of the heap is never returned by ``free``:
  :class:`Trimmer` calls ``malloc_trim`` from the event loop every
  :data:`TRIM_INTERVAL` seconds once at least :data:`TRIM_MIN` more bytes
  are free than after the last trim (after a burst of bulk sessions; idle,
  nothing is done). A trim holds the event loop while it runs: measured
  5 ms after 8 MB were freed, 16 ms after 40 MB, 38-45 ms after 200 MB
  (page by page ``madvise``; no way to split it, and a thread would hold
  the arena's lock as long). Looking costs ~60 µs (``mallinfo2``).

Set here rather than through ``MALLOC_*_`` environment variables so that
every deployment gets them; a variable that is set wins over the value here.
This module imports nothing from lakeproxy.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import platform
from collections.abc import Mapping
from typing import Final

__all__ = [
    "ARENA_MAX",
    "MMAP_THRESHOLD",
    "TRIM_INTERVAL",
    "TRIM_MIN",
    "TRIM_THRESHOLD",
    "Trimmer",
    "configure",
    "free_bytes",
    "trim",
]

#: Blocks of this size and more are mapped on their own and unmapped when
#: freed. Above the relay's largest buffer (a 256 KiB read's plaintext plus a
#: record), so bulk relaying allocates from the heap, as it measured fastest.
MMAP_THRESHOLD: Final = 512 * 1024
#: Free memory at the top of the heap past this goes back to the system on ``free``.
TRIM_THRESHOLD: Final = 2 * 1024 * 1024
#: Malloc arenas at most (the event loop's thread and the helper threads share them).
ARENA_MAX: Final = 2
#: Seconds between two looks at how much of the heap is free.
TRIM_INTERVAL: Final = 5.0
#: Trim once this many more bytes are free than after the previous trim.
TRIM_MIN: Final = 8 * 1024 * 1024

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
_M_ARENA_MAX: Final = -8

#: What :func:`configure` sets: (mallopt parameter, value, the variable that overrides it).
_SETTINGS: Final = (
    ("mmap_threshold", _M_MMAP_THRESHOLD, MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_"),
    ("trim_threshold", _M_TRIM_THRESHOLD, TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_"),
    ("arena_max", _M_ARENA_MAX, ARENA_MAX, "MALLOC_ARENA_MAX"),
)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


class _Glibc:
    """The three glibc functions used here (see :func:`_load`)."""

    def __init__(self, libc: ctypes.CDLL) -> None:
        self.mallopt = libc.mallopt
        self.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        self.mallopt.restype = ctypes.c_int
        self.malloc_trim = libc.malloc_trim
        self.malloc_trim.argtypes = [ctypes.c_size_t]
        self.malloc_trim.restype = ctypes.c_int
        self.mallinfo2 = libc.mallinfo2  # glibc 2.33+
        self.mallinfo2.argtypes = []
        self.mallinfo2.restype = _Mallinfo2


def _load() -> _Glibc | None:
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return _Glibc(ctypes.CDLL(None))
    except (OSError, AttributeError):  # no symbols, or a glibc older than 2.33
        return None


_glibc: Final = _load()


def configure(environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    """Set the allocator's thresholds and arena cap (call once, at start-up,
    before threads start); returns what was set, by name (empty off glibc).
    A setting whose ``MALLOC_*`` variable is in ``environ`` is left to it."""
    if _glibc is None:
        return {}
    applied: dict[str, int] = {}
    for name, param, value, variable in _SETTINGS:
        if variable in environ:
            continue
        if _glibc.mallopt(param, value) == 1:
            applied[name] = value
    return applied


def free_bytes() -> int | None:
    """Bytes free inside malloc's arenas (returned to the system or not), or None off glibc."""
    if _glibc is None:
        return None
    return int(_glibc.mallinfo2().fordblks)


def trim() -> bool:
    """Give free heap pages back to the system (``malloc_trim(0)``); True if any were."""
    return _glibc is not None and _glibc.malloc_trim(0) == 1


class Trimmer:
    """Trims the heap after a burst: every ``interval`` seconds on the event
    loop, :func:`trim` when at least ``min_bytes`` more are free than after the
    previous trim. A no-op off glibc."""

    def __init__(self, interval: float = TRIM_INTERVAL, min_bytes: int = TRIM_MIN) -> None:
        self.interval = interval
        self.min_bytes = min_bytes
        self.trims = 0
        # bytes free after the last trim (they stay counted as free), at first what is free now
        self._baseline = free_bytes() or 0
        self._timer: asyncio.TimerHandle | None = None

    def tick(self) -> bool:
        """Look once; trim if a burst was freed. Returns True if it trimmed."""
        free = free_bytes()
        if free is None:
            return False
        if free < self._baseline:  # freed memory was reused: follow it down
            self._baseline = free
        if free - self._baseline < self.min_bytes:
            return False
        trim()
        self.trims += 1
        self._baseline = free
        return True

    def start(self) -> None:
        """Tick every ``interval`` seconds on the running loop until :meth:`stop`."""
        if _glibc is None or self._timer is not None:
            return
        loop = asyncio.get_running_loop()

        def run() -> None:
            self.tick()
            self._timer = loop.call_later(self.interval, run)

        self._timer = loop.call_later(self.interval, run)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
