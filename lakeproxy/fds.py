"""File descriptors: the open-files limit and how many are free.

A client costs one descriptor while it logs in and two once it is spliced (its
socket and the endpoint's); the limit is what bounds ``max_clients`` in the
end. :func:`raise_open_files_limit` lifts the soft ``RLIMIT_NOFILE`` to the
hard one at start-up, as PgBouncer and most servers do, and
:func:`clients_allowed` says how many clients that leaves room for.
:func:`free_fds` is read by ``/readyz`` (once per probe, never per chunk).

No I/O beyond ``getrlimit``/``setrlimit`` and listing ``/proc/self/fd``.
"""

from __future__ import annotations

import errno
import os
import resource
from typing import Final

#: Descriptors per client at most: its pre-login slot (1), then its socket and
#: the endpoint's (2). Pre-login connections have a budget of ``max_clients``
#: of their own (see session.py), so ``max_clients`` clients need 3 each.
FDS_PER_CLIENT: Final = 3

#: Descriptors kept for everything else: the interpreter and event loop,
#: listeners, the admin server's connections (64 at most), credential API
#: calls, logs.
FDS_RESERVED: Final = 128

#: Below this many free descriptors the process cannot take a client
#: (its socket and the endpoint's) and ``/readyz`` says so.
FDS_HEADROOM: Final = 4

#: Errors of accept(2) that mean "out of descriptors" (process, system, kernel memory).
FD_EXHAUSTION_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

_FD_DIR: Final = "/proc/self/fd"


def raise_open_files_limit() -> tuple[int, int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit.

    Returns:
        ``(before, soft, hard)``: the soft limit found, the soft limit now, and
        the hard limit (``resource.RLIM_INFINITY`` counts as unlimited). When
        raising fails (e.g. a platform cap below the hard limit) the soft limit
        is left as it was.
    """
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = before
    if hard != resource.RLIM_INFINITY and before != resource.RLIM_INFINITY and before < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return before, soft, hard


def clients_allowed(soft_limit: int) -> int:
    """How many clients (``max_clients``) ``soft_limit`` descriptors leave room for."""
    if soft_limit == resource.RLIM_INFINITY:
        return 1 << 31
    return max(0, (soft_limit - FDS_RESERVED) // FDS_PER_CLIENT)


def free_fds() -> int | None:
    """Descriptors this process may still open, or None where that is unknown
    (no ``/proc``). 0 when listing the directory itself runs out of them."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        used = len(os.listdir(_FD_DIR)) - 1  # less the listing's own descriptor
    except OSError as exc:
        return 0 if exc.errno in FD_EXHAUSTION_ERRNOS else None
    return max(0, soft - used)
