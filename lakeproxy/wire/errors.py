"""The one exception type the codec raises."""

from __future__ import annotations

from lakeproxy.wire import sqlstate


class ProtocolError(Exception):
    """Bytes that are not a valid Postgres message in this context.

    ``sqlstate`` is what a server would answer with (08P01 by default);
    ``str(exc)`` is a short, client-safe description (it never quotes secrets).
    """

    def __init__(self, message: str, sqlstate: str = sqlstate.PROTOCOL_VIOLATION) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
