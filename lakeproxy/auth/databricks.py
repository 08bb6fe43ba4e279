"""The Databricks REST calls that mint credentials (no caching, no retries).

Step 1 exchanges the service principal's secret for a workspace OAuth token
(``POST /oidc/v1/token``); step 2 exchanges that token for a database
credential (autoscaling ``POST /api/2.0/postgres/credentials`` or provisioned
``POST /api/2.0/database/credentials``). :meth:`DatabricksApi.target_status`
reads the endpoint's or instance's hosts and state (:mod:`.status`). A personal access token
(``DATABRICKS_TOKEN``) replaces step 1.

Every failure is a :class:`lakeproxy.errors.CredentialError`: ``retryable`` for
429, 5xx, network errors, timeouts and malformed 2xx bodies (with
``retry_after`` from the ``Retry-After`` header); final for any other status,
carrying the API's error code and message and the matching fix from
Databricks' troubleshooting table as ``hint``. Logs name paths, statuses and
error codes, never a token or a secret.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import logging
import math
import re
import ssl
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping
from typing import Final

import aiohttp

from lakeproxy import __version__
from lakeproxy.auth.backoff import parse_retry_after
from lakeproxy.auth.provider import Credential
from lakeproxy.auth.status import StatusError, TargetStatus, parse_endpoint, parse_instance
from lakeproxy.errors import ConfigError, CredentialError
from lakeproxy.wire import sqlstate

log = logging.getLogger(__name__)

DEFAULT_REQUEST_TIMEOUT: Final = 10.0
#: Databricks documents 60 minutes for both tokens; used when a response
#: omits the expiry.
DOCUMENTED_LIFETIME: Final = 3600.0

OIDC_TOKEN_PATH: Final = "/oidc/v1/token"  # noqa: S105 - a path, not a secret
POSTGRES_CREDENTIALS_PATH: Final = "/api/2.0/postgres/credentials"
DATABASE_CREDENTIALS_PATH: Final = "/api/2.0/database/credentials"
POSTGRES_API_PREFIX: Final = "/api/2.0/postgres/"
DATABASE_INSTANCES_PATH: Final = "/api/2.0/database/instances/"

ENDPOINT_NAME_RE: Final = re.compile(r"projects/[^/]+/branches/[^/]+/endpoints/[^/]+")

# Fixes from the troubleshooting table of Databricks' "Connect external apps to
# Lakebase using the API" page.
HINT_CLIENT: Final = "check DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET"
HINT_PAT: Final = "check DATABRICKS_TOKEN (it may be expired or revoked)"
HINT_WORKSPACE_ACCESS: Final = "enable 'Workspace access' for the service principal"
HINT_ENDPOINT: Final = "set ENDPOINT_NAME to projects/<p>/branches/<b>/endpoints/<e>"
HINT_INSTANCE: Final = "set LAKEBASE_INSTANCE to the name of an existing provisioned instance"
HINT_ROLE: Final = (
    "create the OAuth role for the service principal in the Lakebase SQL editor "
    "(databricks_create_role)"
)
HINT_PERMISSION: Final = (
    "grant the service principal permission on the Lakebase project or instance"
)
HINT_UNREACHABLE: Final = "check that DATABRICKS_HOST is right and reachable"
HINT_WRONG_WORKSPACE: Final = (
    "the workspace refused a fresh OAuth token: check that DATABRICKS_HOST is the "
    "workspace of this service principal"
)
HINT_HOST_API: Final = "check DATABRICKS_HOST: it should be the workspace URL"

_MESSAGE_LIMIT: Final = 300
_RFC3339_RE: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:?\d{2})"
)

JsonObject = dict[str, object]


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (``127.0.0.0/8``, ``::1``)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(host: str) -> str:
    """Validate ``DATABRICKS_HOST`` and return it without a trailing slash.

    ``https://`` is required, except ``http://`` to a loopback host. Raises
    :class:`ConfigError` naming the problem.
    """
    parsed = urllib.parse.urlsplit(host.strip())
    scheme = parsed.scheme.lower()
    hostname = parsed.hostname
    if scheme not in ("https", "http") or not hostname:
        raise ConfigError([f"DATABRICKS_HOST: expected an https:// URL, got {host!r}"])
    if parsed.username is not None or parsed.password is not None:
        raise ConfigError(["DATABRICKS_HOST: must not contain a user name or password"])
    if parsed.query or parsed.fragment:
        raise ConfigError(["DATABRICKS_HOST: must not contain a query or fragment"])
    if scheme == "http" and not is_loopback_host(hostname):
        raise ConfigError(
            [f"DATABRICKS_HOST: https:// is required (http:// only to loopback), got {host!r}"]
        )
    return urllib.parse.urlunsplit((scheme, parsed.netloc, parsed.path.rstrip("/"), "", ""))


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


def hint_for(
    status: int,
    error_code: str | None,
    message: str | None,
    *,
    step: str,
    static_token: bool,
    provisioned: bool,
) -> str | None:
    """The fix for a refused request, from Databricks' troubleshooting table.

    ``step`` is ``"oauth"``, ``"database"`` or ``"endpoint"``. Returns None when
    nothing matches.
    """
    text = f"{error_code or ''} {message or ''}".lower().replace("_", " ")
    target_hint = HINT_INSTANCE if provisioned else HINT_ENDPOINT
    if "invalid client" in text or "client authentication" in text:
        return HINT_CLIENT
    if "workspace access" in text:
        return HINT_WORKSPACE_ACCESS
    if "role" in text and ("does not exist" in text or "not found" in text):
        return HINT_ROLE
    if error_code == "ENDPOINT_NOT_FOUND":  # the gateway knows no such API path
        return HINT_HOST_API
    if "invalid parameter value" in text or "'endpoint'" in text or "'instance" in text:
        return target_hint
    if status == 404 or "does not exist" in text or "not found" in text:
        return target_hint
    if step == "oauth" and status in (400, 401, 403):
        return HINT_CLIENT
    if status == 401:
        return HINT_PAT if static_token else HINT_WRONG_WORKSPACE
    if status == 403:
        return HINT_PAT if static_token else HINT_PERMISSION
    return None


def _error_fields(body: bytes) -> tuple[str | None, str | None]:
    """(error code, message) from a Databricks or OAuth error body, if any."""
    try:
        obj = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        return None, _clip(" ".join(text.split())) or None
    if not isinstance(obj, dict):
        return None, None
    code = obj.get("error_code", obj.get("error"))
    message = obj.get("message", obj.get("error_description"))
    return (
        _clip(code) if isinstance(code, str) else None,
        _clip(message) if isinstance(message, str) else None,
    )


def _clip(text: str) -> str:
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 3] + "..."


def _malformed(what: str, detail: str) -> CredentialError:
    return _retryable(f"{what}: malformed response: {detail}")


def _retryable(message: str, *, hint: str | None = None) -> CredentialError:
    """A failure worth retrying; if retries run out the client sees 08006."""
    return CredentialError(
        message, retryable=True, hint=hint, sqlstate=sqlstate.CONNECTION_FAILURE
    )


def _str_field(obj: Mapping[str, object], name: str, what: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value:
        raise _malformed(what, f"no {name!r} string")
    return value


def _credential(token: str, expires_wall: float, what: str) -> Credential:
    """A credential whose response arrived now and that expires at ``expires_wall``."""
    now = asyncio.get_running_loop().time()
    lifetime = expires_wall - time.time()
    if not lifetime > 0 or not math.isfinite(lifetime):
        raise _malformed(what, "the credential is already expired (is the clock right?)")
    return Credential(
        token=token, issued_at=now, expires_at=now + lifetime, expires_wall=expires_wall
    )


def _env_proxy(url: str) -> str | None:
    """The proxy ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` choose for ``url``."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if is_loopback_host(host) or urllib.request.proxy_bypass(host):
        return None
    return urllib.request.getproxies().get(parts.scheme)


class DatabricksApi:
    """The credential endpoints of one Databricks workspace.

    Authenticates with a service principal (``client_id``/``client_secret``,
    OAuth M2M) or a static ``token``; mints credentials for an autoscaling
    ``endpoint_name`` or a provisioned ``instance_name``. Raises
    :class:`ConfigError` for an invalid combination or host.

    All requests share one ``aiohttp.ClientSession``, created on first use and
    closed by :meth:`close`.
    """

    __slots__ = (
        "_client_id",
        "_client_secret",
        "_closed",
        "_proxy",
        "_session",
        "_ssl",
        "_static_token",
        "endpoint_name",
        "host",
        "instance_name",
        "request_timeout",
    )

    def __init__(
        self,
        *,
        host: str,
        client_id: str | None = None,
        client_secret: str | None = None,
        token: str | None = None,
        endpoint_name: str | None = None,
        instance_name: str | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        problems: list[str] = []
        try:
            self.host = check_host(host)
        except ConfigError as exc:
            problems.extend(exc.problems)
            self.host = ""
        has_oauth = bool(client_id or client_secret)
        if token and has_oauth:
            problems.append(
                "DATABRICKS_TOKEN and DATABRICKS_CLIENT_ID/DATABRICKS_CLIENT_SECRET: "
                "set one authentication method, not both"
            )
        elif not token and not (client_id and client_secret):
            problems.append(
                "DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET (or DATABRICKS_TOKEN): "
                "required"
            )
        if bool(endpoint_name) == bool(instance_name):
            problems.append("ENDPOINT_NAME or LAKEBASE_INSTANCE: set exactly one")
        elif endpoint_name and not ENDPOINT_NAME_RE.fullmatch(endpoint_name):
            problems.append(
                f"ENDPOINT_NAME: expected projects/<p>/branches/<b>/endpoints/<e>, "
                f"got {endpoint_name!r}"
            )
        if not request_timeout > 0:
            problems.append("request timeout: must be positive")
        if problems:
            raise ConfigError(problems)
        self._client_id = client_id or None
        self._client_secret = client_secret or None
        self._static_token = token or None
        self.endpoint_name = endpoint_name or None
        self.instance_name = instance_name or None
        self.request_timeout = request_timeout
        self._ssl = ssl_context
        self._proxy = _env_proxy(self.host)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def __repr__(self) -> str:
        auth = "token" if self._static_token else "oauth-m2m"
        target = self.endpoint_name or f"instance {self.instance_name}"
        return f"DatabricksApi(host={self.host!r}, auth={auth}, target={target!r})"

    @property
    def static_token(self) -> bool:
        """True when a static token (``DATABRICKS_TOKEN``) replaces OAuth."""
        return self._static_token is not None

    @property
    def provisioned(self) -> bool:
        """True for a provisioned instance (``LAKEBASE_INSTANCE``)."""
        return self.instance_name is not None

    async def close(self) -> None:
        """Close the shared HTTP session. Later calls raise a final CredentialError."""
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # ------------------------------------------------------------------ calls

    async def oauth_token(self, *, deadline: float) -> Credential:
        """Step 1: a workspace token for the Bearer header of step 2.

        With a static token, returns it (never expiring) without a request.
        ``deadline`` is an absolute ``loop.time()``. Raises CredentialError.
        """
        if self._static_token is not None:
            now = asyncio.get_running_loop().time()
            return Credential(
                token=self._static_token, issued_at=now, expires_at=math.inf,
                expires_wall=math.inf,
            )
        client_id, client_secret = self._client_id, self._client_secret
        if client_id is None or client_secret is None:  # __init__ makes this unreachable
            raise ConfigError(["DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET: required"])
        what = f"workspace OAuth token (POST {OIDC_TOKEN_PATH})"
        body = await self._request(
            what, "POST", OIDC_TOKEN_PATH, step="oauth", deadline=deadline,
            data={"grant_type": "client_credentials", "scope": "all-apis"},
            basic=(client_id, client_secret),
        )
        token = _str_field(body, "access_token", what)
        expires_in = body.get("expires_in")
        if isinstance(expires_in, str):
            try:
                expires_in = float(expires_in)
            except ValueError:
                raise _malformed(what, "'expires_in' is not a number") from None
        if expires_in is None:
            log.debug("%s: no expires_in; assuming %.0fs", what, DOCUMENTED_LIFETIME)
            expires_in = DOCUMENTED_LIFETIME
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
            raise _malformed(what, "'expires_in' is not a number")
        return _credential(token, time.time() + float(expires_in), what)

    async def database_credential(self, bearer: str, *, deadline: float) -> Credential:
        """Step 2: a database credential (the Postgres password) for ``bearer``.

        ``bearer`` is the step-1 token. Raises CredentialError; a 401 has
        ``status == 401`` so the caller can refresh the bearer and retry.
        """
        if self.instance_name is not None:
            what = f"database credential (POST {DATABASE_CREDENTIALS_PATH})"
            body = await self._request(
                what, "POST", DATABASE_CREDENTIALS_PATH, step="database", deadline=deadline,
                bearer=bearer,
                json_body={"instance_names": [self.instance_name], "request_id": str(uuid.uuid4())},
            )
            expiry_field = "expiration_time"
        else:
            what = f"database credential (POST {POSTGRES_CREDENTIALS_PATH})"
            body = await self._request(
                what, "POST", POSTGRES_CREDENTIALS_PATH, step="database", deadline=deadline,
                bearer=bearer, json_body={"endpoint": self.endpoint_name},
            )
            expiry_field = "expire_time"
        token = _str_field(body, "token", what)
        raw_expiry = body.get(expiry_field)
        if raw_expiry is None:
            log.warning("%s: no %r; assuming %.0fs", what, expiry_field, DOCUMENTED_LIFETIME)
            return _credential(token, time.time() + DOCUMENTED_LIFETIME, what)
        if not isinstance(raw_expiry, str):
            raise _malformed(what, f"{expiry_field!r} is not a string")
        try:
            expires_wall = parse_rfc3339(raw_expiry)
        except ValueError:
            raise _malformed(what, f"{expiry_field!r} is not an RFC 3339 time") from None
        return _credential(token, expires_wall, what)

    async def endpoint_host(
        self, bearer: str, endpoint_name: str | None = None, *, deadline: float
    ) -> str:
        """The Postgres host name of an autoscaling endpoint (``status.hosts.host``).

        ``endpoint_name`` defaults to the configured one. Raises CredentialError
        (ConfigError for a name that is not ``projects/<p>/branches/<b>/endpoints/<e>``).
        """
        status = await self.target_status(bearer, endpoint_name, deadline=deadline)
        host = status.host("read_write")
        if host is None:
            raise _malformed(f"endpoint host (GET {self._status_path(endpoint_name)})",
                             "no 'status.hosts.host' string")
        return host

    async def target_status(
        self, bearer: str, endpoint_name: str | None = None, *, deadline: float
    ) -> TargetStatus:
        """The hosts and state of the endpoint (autoscaling, ``GET
        /api/2.0/postgres/{ENDPOINT_NAME}``) or of the instance (provisioned,
        ``GET /api/2.0/database/instances/{name}``).

        ``endpoint_name`` overrides the configured autoscaling endpoint. Raises
        CredentialError (a malformed object is retryable, like a malformed
        credential), ConfigError for a malformed endpoint name.
        """
        path = self._status_path(endpoint_name)
        provisioned = endpoint_name is None and self.instance_name is not None
        what = f"{'instance' if provisioned else 'endpoint'} status (GET {path})"
        body = await self._request(
            what, "GET", path, step="endpoint", deadline=deadline, bearer=bearer
        )
        try:
            return parse_instance(body) if provisioned else parse_endpoint(body)
        except StatusError as exc:
            raise _malformed(what, str(exc)) from None

    def _status_path(self, endpoint_name: str | None) -> str:
        if endpoint_name is None and self.instance_name is not None:
            return DATABASE_INSTANCES_PATH + urllib.parse.quote(self.instance_name, safe="")
        name = endpoint_name or self.endpoint_name
        if name is None or not ENDPOINT_NAME_RE.fullmatch(name):
            raise ConfigError(
                [f"ENDPOINT_NAME: expected projects/<p>/branches/<b>/endpoints/<e>, got {name!r}"]
            )
        return POSTGRES_API_PREFIX + "/".join(
            urllib.parse.quote(part, safe="") for part in name.split("/")
        )

    # -------------------------------------------------------------- internals

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": f"lakeproxy/{__version__}"},
                connector=aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True),
                # Proxies come from _env_proxy; trust_env would also read .netrc,
                # whose credentials clash with our Authorization header.
                trust_env=False,
            )
        return self._session

    async def _request(
        self,
        what: str,
        method: str,
        path: str,
        *,
        step: str,
        deadline: float,
        bearer: str | None = None,
        basic: tuple[str, str] | None = None,
        data: dict[str, str] | None = None,
        json_body: JsonObject | None = None,
    ) -> JsonObject:
        """Send one request; return the JSON object of a 2xx reply.

        Raises CredentialError (retryable or final, see the module docstring).
        """
        if self._closed:
            raise CredentialError(f"{what}: the credential client is closed", retryable=False)
        loop = asyncio.get_running_loop()
        started = loop.time()
        timeout = min(self.request_timeout, deadline - started)
        if timeout <= 0:
            raise _retryable(f"{what}: no time left before the deadline")
        headers = {"Accept": "application/json"}
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        elif basic is not None:
            pair = base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode("ascii")
            headers["Authorization"] = f"Basic {pair}"
        try:
            async with self._get_session().request(
                method, self.host + path, headers=headers, data=data,
                json=json_body, timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False, proxy=self._proxy,
            ) as resp:
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                body = await resp.read()
        except TimeoutError:
            log.info("%s %s: timed out after %.1fs", method, path, timeout)
            raise _retryable(
                f"{what}: timed out after {timeout:.1f}s", hint=HINT_UNREACHABLE
            ) from None
        except aiohttp.ClientError as exc:
            log.info("%s %s: %s", method, path, type(exc).__name__)
            raise _retryable(
                f"{what}: {type(exc).__name__}: {exc}", hint=HINT_UNREACHABLE
            ) from None
        log.debug("%s %s -> %d (%.3fs)", method, path, status, loop.time() - started)

        if 200 <= status < 300:
            try:
                obj = json.loads(body)
            except ValueError:
                raise _malformed(what, f"HTTP {status} body is not JSON") from None
            if not isinstance(obj, dict):
                raise _malformed(what, f"HTTP {status} body is not a JSON object")
            return obj

        error_code, message = _error_fields(body)
        detail = f"HTTP {status}" + "".join(f" {part}" for part in (error_code, message) if part)
        if status == 429 or status >= 500:
            log.info("%s %s -> %d %s", method, path, status, error_code or "")
            raise CredentialError(
                f"{what} failed: {detail}", retryable=True, status=status,
                error_code=error_code, retry_after=retry_after,
                hint=HINT_UNREACHABLE if status >= 500 else None,
                sqlstate=sqlstate.CONNECTION_FAILURE,
            )
        log.info("%s %s -> %d %s", method, path, status, error_code or "")
        hint = hint_for(
            status, error_code, message, step=step, static_token=self.static_token,
            provisioned=self.provisioned,
        )
        raise CredentialError(
            f"{what} refused: {detail}", retryable=False, status=status,
            error_code=error_code, hint=hint,
            sqlstate=sqlstate.INVALID_AUTHORIZATION_SPECIFICATION,
        )
