"""lakeproxy's exception tree.

Every class carries the SQLSTATE a client is sent and a ``client_message``
written for clients (it always starts with ``lakeproxy:``). ``str(exc)`` is for
logs and may say more, but never contains a secret.
"""

from __future__ import annotations

from typing import Literal

from lakeproxy.wire import sqlstate as S

ErrorKind = Literal["internal", "client", "credential", "upstream", "config", "capacity"]


class LakeproxyError(Exception):
    """Base class. Unknown failures become XX000 "internal error"."""

    sqlstate: str = S.INTERNAL_ERROR
    kind: ErrorKind = "internal"

    def __init__(
        self,
        message: str,
        *,
        client_message: str | None = None,
        hint: str | None = None,
        sqlstate: str | None = None,
    ) -> None:
        super().__init__(message)
        if sqlstate is not None:
            self.sqlstate = sqlstate
        self.client_message = client_message or f"lakeproxy: {message}"
        self.hint = hint


class ConfigError(LakeproxyError):
    """Bad or missing configuration. Never retried; the CLI exits 2."""

    kind: ErrorKind = "config"

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class ClientProtocolError(LakeproxyError):
    """The client broke the protocol (malformed/oversized startup, v2, early bytes)."""

    sqlstate = S.PROTOCOL_VIOLATION
    kind: ErrorKind = "client"


class ClientAuthFailed(LakeproxyError):
    """The client's password (LAKEPROXY_CLIENT_PASSWORD) was wrong."""

    sqlstate = S.INVALID_PASSWORD
    kind: ErrorKind = "client"


class ClientNotAllowed(LakeproxyError):
    sqlstate = S.INVALID_AUTHORIZATION_SPECIFICATION
    kind: ErrorKind = "client"


class CredentialError(LakeproxyError):
    """Minting a credential failed.

    ``retryable`` is True for 429/5xx/network/malformed bodies; a refused request
    (other 4xx) is final and reaches the client as 28000.
    """

    sqlstate = S.INVALID_AUTHORIZATION_SPECIFICATION
    kind: ErrorKind = "credential"

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        error_code: str | None = None,
        hint: str | None = None,
        retry_after: float | None = None,
        sqlstate: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint, sqlstate=sqlstate)
        self.retryable = retryable
        self.status = status
        self.error_code = error_code
        self.retry_after = retry_after


class UpstreamConnectError(LakeproxyError):
    """The endpoint could not be reached or refused us in a way we may retry."""

    sqlstate = S.CONNECTION_FAILURE
    kind: ErrorKind = "upstream"

    def __init__(
        self, message: str, *, retryable: bool, hint: str | None = None,
        sqlstate: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint, sqlstate=sqlstate)
        self.retryable = retryable


class UpstreamRejected(LakeproxyError):
    """The endpoint sent its own ErrorResponse during login.

    ``raw`` is the frame exactly as received; it goes to the client unchanged.
    """

    kind: ErrorKind = "upstream"

    def __init__(self, raw: bytes, sqlstate: str, message: str) -> None:
        super().__init__(message, sqlstate=sqlstate, client_message=message)
        self.raw = raw


class TooManyConnections(LakeproxyError):
    sqlstate = S.TOO_MANY_CONNECTIONS
    kind: ErrorKind = "capacity"


class ShuttingDown(LakeproxyError):
    sqlstate = S.ADMIN_SHUTDOWN
    kind: ErrorKind = "capacity"
