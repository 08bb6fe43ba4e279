"""What every sign-in method shares: the seam, the HTTP seam, token parsing, CLI runs.

A sign-in method turns its configuration into a workspace token (the Bearer of
the credential API) and its expiry. It neither caches nor retries: the
refresh-ahead cache in :mod:`lakeproxy.auth.cache` does that for every method.

Failures are :class:`~lakeproxy.errors.CredentialError`: ``retryable`` for
network errors, timeouts, 429/5xx and malformed answers; final (SQLSTATE 28000)
when the provider refused, carrying the provider's own error text and the fix
(``hint``). Tokens are never logged, and no CLI output is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Protocol

from lakeproxy.auth.provider import Credential
from lakeproxy.errors import CredentialError
from lakeproxy.wire import sqlstate

log = logging.getLogger("lakeproxy.auth")

JsonObject = dict[str, object]
#: ``(status, error_code, message) -> fix`` for a refused request.
HintFor = Callable[[int, str | None, str | None], str | None]

#: Databricks documents 60 minutes for workspace tokens; used when a response
#: omits the expiry.
DOCUMENTED_LIFETIME: Final = 3600.0
#: How long a CLI (``databricks auth token``, ``az account get-access-token``)
#: may take. Both may refresh over the network first.
CLI_TIMEOUT: Final = 30.0
#: The Azure Databricks resource (its programmatic id in Microsoft Entra ID).
AZURE_DATABRICKS_RESOURCE: Final = "2ff814a6-3304-4ab8-85cb-cd0e6f879c1d"
_MESSAGE_LIMIT: Final = 300
_RFC3339_RE: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:?\d{2})"
)


class Http(Protocol):
    """The HTTP client a method sends its requests with (a DatabricksApi)."""

    @property
    def host(self) -> str:
        """The workspace URL, without a trailing slash."""
        ...

    async def request_json(
        self,
        what: str,
        method: str,
        url: str,
        *,
        step: str,
        deadline: float,
        basic: tuple[str, str] | None = None,
        data: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        hint: HintFor | None = None,
        direct: bool = False,
    ) -> JsonObject:
        """Send one request to ``url`` (a path is relative to the workspace); the
        JSON object of a 2xx reply. ``direct`` never uses an HTTP proxy (metadata
        endpoints). Raises CredentialError (final ones carry ``hint(...)``)."""
        ...


class SignIn(Protocol):
    """One workspace sign-in method (SPEC "Workspace sign-in")."""

    @property
    def method(self) -> str:
        """Its ``DATABRICKS_AUTH_TYPE`` name, e.g. ``databricks-cli``."""
        ...

    @property
    def static(self) -> bool:
        """True for a token that never expires and cannot be refreshed (``pat``)."""
        ...

    async def token(self, http: Http, *, deadline: float) -> Credential:
        """A fresh workspace token. ``deadline`` is a ``loop.time()``.

        Raises CredentialError (see the module docstring).
        """
        ...

    def refused_hint(self, status: int, error_code: str | None, message: str | None) -> str:
        """The fix when the workspace (or the provider) refused this method's token."""
        ...


# --------------------------------------------------------------------------- errors


def clip(text: str) -> str:
    """One line of at most 300 characters."""
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 3] + "..."


def retryable(message: str, *, hint: str | None = None) -> CredentialError:
    """A failure worth retrying; if retries run out the client sees 08006."""
    return CredentialError(
        message, retryable=True, hint=hint, sqlstate=sqlstate.CONNECTION_FAILURE
    )


def refused(message: str, *, hint: str | None) -> CredentialError:
    """A final refusal: 28000 to a waiting client, with the fix."""
    return CredentialError(
        message, retryable=False, hint=hint,
        sqlstate=sqlstate.INVALID_AUTHORIZATION_SPECIFICATION,
    )


def malformed(what: str, detail: str) -> CredentialError:
    return retryable(f"{what}: malformed response: {detail}")


# --------------------------------------------------------------------------- tokens


def str_field(obj: Mapping[str, object], name: str, what: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value:
        raise malformed(what, f"no {name!r} string")
    return value


def credential_at(token: str, expires_wall: float, what: str) -> Credential:
    """A credential whose response arrived now and that expires at ``expires_wall``."""
    now = asyncio.get_running_loop().time()
    lifetime = expires_wall - time.time()
    if not lifetime > 0 or not math.isfinite(lifetime):
        raise malformed(what, "the credential is already expired (is the clock right?)")
    return Credential(
        token=token, issued_at=now, expires_at=now + lifetime, expires_wall=expires_wall
    )


def number_field(obj: Mapping[str, object], name: str, what: str) -> float | None:
    """A number that may come as a JSON number or a string (``"3599"``), or None."""
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise malformed(what, f"{name!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise malformed(what, f"{name!r} is not a number")
    return float(value)


def oauth_credential(body: Mapping[str, object], what: str) -> Credential:
    """An OAuth token response: ``access_token`` with ``expires_in`` (seconds) or
    ``expires_on`` (Unix time, as Azure's managed identity endpoints send it)."""
    token = str_field(body, "access_token", what)
    expires_in = number_field(body, "expires_in", what)
    if expires_in is not None:
        return credential_at(token, time.time() + expires_in, what)
    expires_on = number_field(body, "expires_on", what)
    if expires_on is not None:
        return credential_at(token, expires_on, what)
    log.debug("%s: no expires_in; assuming %.0fs", what, DOCUMENTED_LIFETIME)
    return credential_at(token, time.time() + DOCUMENTED_LIFETIME, what)


def parse_rfc3339(value: str) -> float:
    """Parse an RFC 3339 timestamp into a Unix time.

    Handles ``Z`` and numeric offsets and fractional seconds of any precision
    (``2026-11-28T10:00:00.123456789Z``). Raises ``ValueError`` otherwise.
    """
    match = _RFC3339_RE.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"not an RFC 3339 timestamp: {value!r}")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction = float(match.group(7)) if match.group(7) else 0.0
    zone = match.group(8)
    if zone in ("Z", "z"):
        tz = datetime.UTC
    else:
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        offset = datetime.timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
        tz = datetime.timezone(sign * offset)
    # A leap second (:60) is folded into the next second.
    leap = 1 if second == 60 else 0
    stamp = datetime.datetime(year, month, day, hour, minute, second - leap, tzinfo=tz)
    return stamp.timestamp() + leap + fraction


# --------------------------------------------------------------------------- CLIs


async def run_cli_json(
    argv: Sequence[str], *, what: str, fix: str, missing_fix: str, deadline: float,
) -> JsonObject:
    """Run a CLI that prints a JSON object (a token) on stdout; return that object.

    Raises CredentialError: final (28000) when the command is missing
    (``missing_fix``), exits non-zero (its last stderr line, then ``fix``) or
    prints no JSON object; retryable when it does not finish before
    ``deadline`` or :data:`CLI_TIMEOUT`. Neither stdout (it holds a token) nor
    stderr is logged. Cancel-safe: a cancelled run kills the process.
    """
    loop = asyncio.get_running_loop()
    timeout = min(CLI_TIMEOUT, deadline - loop.time())
    if timeout <= 0:
        raise retryable(f"{what}: no time left before the deadline")
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except (FileNotFoundError, NotADirectoryError):
        raise refused(f"{what}: {argv[0]} not found", hint=missing_fix) from None
    except PermissionError:
        raise refused(f"{what}: {argv[0]} is not executable", hint=missing_fix) from None
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        raise retryable(f"{what}: {argv[0]} did not answer within {timeout:.0f}s") from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())
    log.debug("%s: %s exited %s", what, argv[0], proc.returncode)
    if proc.returncode != 0:
        raise refused(f"{what}: {_last_line(err) or f'exit status {proc.returncode}'}", hint=fix)
    try:
        obj = json.loads(out)
    except ValueError:
        raise refused(f"{what}: {argv[0]} printed no JSON", hint=fix) from None
    if not isinstance(obj, dict):
        raise refused(f"{what}: {argv[0]} printed no JSON object", hint=fix)
    return obj


def _last_line(stderr: bytes) -> str:
    """The CLI's error: its first ``Error:``/``ERROR:`` line (both CLIs print one;
    az follows it with advice lines), else its last non-empty stderr line."""
    lines = [ln.strip() for ln in stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    for line in lines:
        if line.lower().startswith("error:"):
            return clip(line)
    return clip(lines[-1]) if lines else ""
