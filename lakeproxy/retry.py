"""Which upstream connect failures are worth another try, and how long to wait.

Retried (the endpoint may be waking from scale-to-zero):

* the network: connection refused, reset or aborted, timeouts, no route or
  address (yet), a temporary DNS failure (``EAI_AGAIN``; a name that does not
  exist is not retried);
* a TLS handshake cut off by EOF (``SSLEOFError``, ``SSLZeroReturnError``);
* a login ErrorResponse meaning "not yet": SQLSTATE 57P03 (cannot connect
  now: starting up, recovering), 57P01/57P02 (the server is shutting down, e.g.
  suspending to zero while we connect), class 08 (connection exception) except
  08P01 protocol violations, and the endpoint front door's errors, which all
  arrive as XX000 and are told apart by their text (see :data:`FRONT_DOOR_NOT_YET`).

Never retried: certificate or host-name verification failures (a retry cannot
fix them and it would hide an attack), any error whose text says ``does not
exist`` (or ``cannot be found`` / ``is disabled`` / ``quota``), other TLS
errors, and everything unknown. Password failures (28P01, a 28000 whose text
says the password or token was refused, and the front door's XX000 "password
authentication failed") are their own kind: the caller retries once with a
fresh credential (:func:`classify_login_error`). Every other 28000 (e.g. "no
pg_hba.conf entry for replication connection") is the endpoint's final answer
about the client's startup, not about the credential: it is forwarded and the
credential is kept (a client must not be able to make the proxy mint one per
connection).

Facts about the front door come from Neon's proxy (neondatabase/neon,
``proxy/src``), which Lakebase autoscaling endpoints are built on: every error it
sends itself carries SQLSTATE XX000; when it cannot reach or wake the compute
the text starts with "Couldn't connect to compute node" (older versions: "Failed
to connect to the compute node"); control plane failures start with "Control
plane request failed" ("Console request failed" before the rename) and carry
the control plane's user-facing text, e.g. "endpoint is idle, retry request" or
"timed out while waiting for endpoint to become active"; its rate limits say
"Too many connections ... Please try again later" and "Too many database
connection attempts are currently ongoing"; final answers say "endpoint cannot
be found", "endpoint is disabled", "... Check your quotas ...".
"""

from __future__ import annotations

import enum
import errno
import random
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from lakeproxy.errors import CredentialError, UpstreamConnectError, UpstreamRejected
from lakeproxy.wire import sqlstate

__all__ = [
    "DEFAULT_POLICY",
    "FRONT_DOOR_NOT_YET",
    "PASSWORD_REFUSED_28000",
    "LoginErrorKind",
    "RetryPolicy",
    "classify_login_error",
    "describe",
    "is_auth_failure",
    "is_retryable",
]

#: Lower-cased fragments of the front door's XX000 texts that mean "not yet".
FRONT_DOOR_NOT_YET: Final = (
    "couldn't connect to compute node",
    "could not connect to compute node",
    "failed to connect to the compute node",
    "control plane request failed",
    "console request failed",
    "endpoint is idle",
    "waiting for endpoint to become active",
    "compute is starting",
    "try again later",
    "too many database connection attempts",
)
#: Lower-cased fragments that make an error final whatever else it says.
NEVER_RETRY: Final = ("does not exist", "cannot be found", "is disabled", "quota")
#: The front door reports a wrong password as XX000 with this text.
_FRONT_DOOR_AUTH: Final = "password authentication failed"
#: Lower-cased fragments of a 28000 text that mean "your password (token) was
#: refused". PostgreSQL sends its own password failures as 28P01
#: ("password authentication failed for user ..."); 28000 is what it sends
#: for everything else about who may log in (no pg_hba.conf entry, role not
#: permitted to log in, ...), so only these texts make a 28000 a password
#: failure. Databricks' docs do not list the endpoint's wording for a refused
#: OAuth token; these cover PostgreSQL's and Neon's texts ("password
#: authentication failed", "invalid password", "... token ... expired").
PASSWORD_REFUSED_28000: Final = (
    "password authentication failed",
    "invalid password",
    "password is invalid",
    "token",
    "credential",
)

_QUOTED: Final = re.compile(r'"(?:[^"]|"")*"')

_RETRY_SQLSTATES: Final = frozenset({
    sqlstate.CANNOT_CONNECT_NOW,  # 57P03
    sqlstate.ADMIN_SHUTDOWN,  # 57P01
    "57P02",  # crash_shutdown
})
_RETRY_ERRNOS: Final = frozenset({
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN,
    errno.EADDRNOTAVAIL, errno.EPIPE,
})


class LoginErrorKind(enum.Enum):
    """How to treat an ErrorResponse the endpoint sent during login."""

    RETRY = "retry"  # "not yet": try again after a backoff
    AUTH = "auth"  # the password (credential) was refused: retry once with a fresh one
    FINAL = "final"  # forward it to the client unchanged


def classify_login_error(code: str, message: str) -> LoginErrorKind:
    """Classify a login ErrorResponse by its SQLSTATE ``code`` and ``message``.

    ``does not exist`` (and the other :data:`NEVER_RETRY` texts) win over
    everything else, so "role ... does not exist" (28000) is FINAL. AUTH is a
    password failure only: 28P01, or a 28000 whose text says the password or
    token was refused (:data:`PASSWORD_REFUSED_28000`); any other 28000 is FINAL.
    """
    text = message.lower()
    if any(fragment in text for fragment in NEVER_RETRY):
        return LoginErrorKind.FINAL
    if code == sqlstate.INVALID_PASSWORD:
        return LoginErrorKind.AUTH
    if code == sqlstate.INVALID_AUTHORIZATION_SPECIFICATION:
        # Names are quoted in these texts (user "x", database "y"): a role
        # called "token" must not turn a pg_hba refusal into a password failure.
        unquoted = _QUOTED.sub('""', text)
        if any(fragment in unquoted for fragment in PASSWORD_REFUSED_28000):
            return LoginErrorKind.AUTH
        return LoginErrorKind.FINAL
    if code == sqlstate.INTERNAL_ERROR:
        if text.startswith(_FRONT_DOOR_AUTH):
            return LoginErrorKind.AUTH
        if any(fragment in text for fragment in FRONT_DOOR_NOT_YET):
            return LoginErrorKind.RETRY
        return LoginErrorKind.FINAL
    if code in _RETRY_SQLSTATES:
        return LoginErrorKind.RETRY
    if code.startswith("08"):
        # 08P01 means we (or a pooler) broke the protocol: a retry sends the
        # same bytes. PgBouncer's "no more connections allowed" is the exception.
        if code == sqlstate.PROTOCOL_VIOLATION:
            return (LoginErrorKind.RETRY if "no more connections allowed" in text
                    else LoginErrorKind.FINAL)
        return LoginErrorKind.RETRY
    return LoginErrorKind.FINAL


def is_auth_failure(exc: BaseException) -> bool:
    """True when ``exc`` is the endpoint refusing the credential as a password."""
    return (isinstance(exc, UpstreamRejected)
            and classify_login_error(exc.sqlstate, exc.client_message) is LoginErrorKind.AUTH)


def is_retryable(exc: BaseException) -> bool:
    """True when a fresh attempt (after a backoff) may succeed where ``exc`` failed.

    Auth failures return False: they are retried once, with a fresh credential,
    by the caller (see :func:`is_auth_failure`).
    """
    if isinstance(exc, UpstreamRejected):
        return classify_login_error(exc.sqlstate, exc.client_message) is LoginErrorKind.RETRY
    if isinstance(exc, UpstreamConnectError | CredentialError):
        return exc.retryable
    if isinstance(exc, ssl.SSLCertVerificationError):
        return False
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return True
    if isinstance(exc, ssl.SSLError):  # a cut-off handshake, reported by OpenSSL 3
        reason = getattr(exc, "reason", None) or ""
        return "UNEXPECTED_EOF" in reason or "EOF occurred" in str(exc)
    if isinstance(exc, socket.gaierror):
        return exc.errno == socket.EAI_AGAIN
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, OSError):
        if exc.errno in _RETRY_ERRNOS:
            return True
        # asyncio's create_connection when several addresses all failed differently.
        return exc.errno is None and str(exc).startswith("Multiple exceptions:")
    return False


def describe(exc: BaseException) -> str:
    """A one-line description of ``exc`` for logs and client messages."""
    if isinstance(exc, UpstreamRejected):
        return f"{exc.client_message} (SQLSTATE {exc.sqlstate})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message or exc.reason}"
    text = str(exc)
    if isinstance(exc, TimeoutError) and not text:
        return "timed out"
    return text or type(exc).__name__


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter (AWS architecture blog, "Exponential
    Backoff And Jitter"): the n-th wait is uniform in ``[0, min(cap, base * 2**(n-1))]``,
    but at least ``floor`` so a wake-up is not hammered."""

    base: float = 0.1
    cap: float = 4.0
    floor: float = 0.02

    def delay(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        ceiling = min(self.cap, self.base * (2.0 ** max(0, retry - 1)))
        return max(self.floor, ceiling * rand())


DEFAULT_POLICY: Final = RetryPolicy()
