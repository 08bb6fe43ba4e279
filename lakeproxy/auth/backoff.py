"""Exponential backoff with full jitter.

See "Exponential Backoff And Jitter" (AWS Architecture Blog, 2015): each delay is
drawn uniformly from ``[0, min(maximum, initial * factor**n)]``, which spreads
retries of many clients the most.
"""

from __future__ import annotations

import datetime
import email.utils
import math
import random
import time
from collections.abc import Iterator


def backoff_delays(
    initial: float = 0.1, maximum: float = 5.0, factor: float = 2.0
) -> Iterator[float]:
    """Yield an endless series of jittered delays in seconds.

    The n-th delay (from 0) is uniform in ``[0, min(maximum, initial * factor**n)]``.
    """
    cap = initial
    while True:
        yield random.uniform(0.0, cap)  # noqa: S311 - jitter, not cryptography
        cap = min(maximum, cap * factor)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Parse an HTTP ``Retry-After`` header into seconds to wait.

    Accepts delay-seconds (``"3"``, also ``"1.5"``) or an HTTP-date. Returns None
    for a missing or unparseable value; never a negative number. ``now`` is the
    current Unix time (defaults to ``time.time()``).
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" dates come back naive; they mean UTC
        when = when.replace(tzinfo=datetime.UTC)
    wall = time.time() if now is None else now
    return max(0.0, when.timestamp() - wall)
