"""The readiness rule: ``GET /readyz`` and the ``pg_isready`` answer.

One function decides whether the proxy is ready, for the admin server's
``/readyz`` and for a ``pg_isready`` ping on a client listener, so the two can
never disagree. It only *reads* state the proxy already holds
(:class:`ReadinessSource`): no endpoint connection, no credential request, so a
probe never wakes a scaled-to-zero compute, nor keeps one awake.
"""

from __future__ import annotations

import logging
from typing import Final, Protocol

log = logging.getLogger("lakeproxy.readiness")

#: Why the proxy is not ready (stable: scripts may match them; ``/readyz``'s
#: ``reason`` and the text of ``pg_isready``'s 57P03).
REASON_NOT_LISTENING: Final = "not listening yet"
REASON_DRAINING: Final = "draining"
REASON_NO_CREDENTIAL: Final = "no usable credential"
REASON_AT_LIMIT: Final = "at the client limit"
REASON_NO_FDS: Final = "out of file descriptors"
REASON_INTERNAL: Final = "readiness check failed"


class ReadinessSource(Protocol):
    """What the readiness rule reads from the proxy. Every member must be cheap
    and must not do I/O: no endpoint connection, no credential request."""

    @property
    def listening(self) -> bool:
        """True once every listener is bound."""
        ...

    @property
    def draining(self) -> bool:
        """True from SIGTERM/SIGINT on."""
        ...

    @property
    def active_clients(self) -> int:
        """Clients past their pre-login phase (those ``max_clients`` limits)."""
        ...

    @property
    def max_clients(self) -> int:
        """``LAKEPROXY_MAX_CLIENTS``; 0 or less means no limit."""
        ...

    def credentials_ready(self) -> bool:
        """True if a usable credential is held or the last credential request succeeded."""
        ...

    def can_accept(self) -> bool:
        """False when a new client could not be taken now (out of file descriptors)."""
        ...


def not_ready_reason(state: ReadinessSource) -> str | None:
    """Return why the proxy is not ready, or None when it is.

    Checks, in order: draining, listeners bound, credential, client limit,
    free file descriptors. A ``pg_isready`` ping is still in its pre-login
    phase when it asks, so it is not one of ``state.active_clients``. Only
    reads ``state``; never does I/O and never raises: if ``state`` raises, that
    is logged and the answer is :data:`REASON_INTERNAL`.
    """
    try:
        if state.draining:
            return REASON_DRAINING
        if not state.listening:
            return REASON_NOT_LISTENING
        if not state.credentials_ready():
            return REASON_NO_CREDENTIAL
        if 0 < state.max_clients <= state.active_clients:
            return REASON_AT_LIMIT
        if not state.can_accept():
            return REASON_NO_FDS
    except Exception:
        log.exception("readiness check raised")
        return REASON_INTERNAL
    return None
