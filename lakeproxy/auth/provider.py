"""The credential seam: what a session asks for before it logs in upstream.

Times on a :class:`Credential` are on the event loop's monotonic clock
(``loop.time()``), so wall-clock jumps never make a credential look fresh or
stale; ``expires_wall`` keeps the wall-clock expiry for metrics and logs only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final, Protocol

#: A credential with less than this fraction of its lifetime left is never
#: handed out for a new login.
USABLE_FRACTION: Final = 0.1
#: Once this fraction of a credential's lifetime has passed it is refreshed
#: in the background.
REFRESH_FRACTION: Final = 0.5


@dataclass(frozen=True, slots=True)
class Credential:
    """A bearer token or database password and when it expires.

    ``issued_at`` is when the response arrived and ``expires_at`` when the
    token expires, both ``loop.time()`` values; ``expires_wall`` is the
    expiry as a Unix timestamp (``math.inf`` for a static token). The token
    never appears in ``repr()``.
    """

    token: str = field(repr=False)
    issued_at: float
    expires_at: float
    expires_wall: float

    @property
    def lifetime(self) -> float:
        """Seconds between arrival and expiry (``math.inf`` for a static token)."""
        return self.expires_at - self.issued_at

    def remaining(self, now: float) -> float:
        """Seconds left at ``now`` (a ``loop.time()`` value); negative once expired."""
        return self.expires_at - now

    def usable(self, now: float) -> bool:
        """True while at least :data:`USABLE_FRACTION` of the lifetime is left."""
        if math.isinf(self.expires_at):
            return True
        return self.remaining(now) >= USABLE_FRACTION * self.lifetime

    def refresh_at(self) -> float:
        """The ``loop.time()`` at which a background refresh is due."""
        if math.isinf(self.expires_at):
            return math.inf
        return self.issued_at + REFRESH_FRACTION * self.lifetime

    def newer_than(self, other: Credential) -> bool:
        """True if this credential arrived after ``other``."""
        return self.issued_at > other.issued_at


class CredentialProvider(Protocol):
    """Hands out database credentials for upstream logins."""

    async def get(self, *, deadline: float) -> Credential:
        """Return a usable credential (at least a tenth of its lifetime left).

        ``deadline`` is an absolute ``loop.time()`` by which to give up.

        Raises :class:`lakeproxy.errors.CredentialError`: SQLSTATE 28000 when the
        credential API refused the request, 08006 when it could not be reached
        (or kept failing) before the deadline.

        Cancel-safe: cancelling a caller never cancels a request other callers
        share.
        """
        ...

    def invalidate(self, cred: Credential) -> None:
        """The endpoint refused ``cred``: the next :meth:`get` returns a newer one."""
        ...

    def ready(self) -> bool:
        """True if a usable credential is held or the last request succeeded."""
        ...

    async def close(self) -> None:
        """Stop background work and release HTTP resources."""
        ...
