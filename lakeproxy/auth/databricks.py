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
import ipaddress
import json
import logging
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
from lakeproxy.auth.signin.base import (
    DOCUMENTED_LIFETIME,
    HintFor,
    JsonObject,
    SignIn,
)
from lakeproxy.auth.signin.base import clip as _clip
from lakeproxy.auth.signin.base import credential_at as _credential
from lakeproxy.auth.signin.base import malformed as _malformed
from lakeproxy.auth.signin.base import parse_rfc3339 as parse_rfc3339
from lakeproxy.auth.signin.base import retryable as _retryable
from lakeproxy.auth.signin.base import str_field as _str_field
from lakeproxy.auth.signin.m2m import HINT_CLIENT as HINT_CLIENT
from lakeproxy.auth.signin.m2m import OIDC_TOKEN_PATH as OIDC_TOKEN_PATH
from lakeproxy.auth.signin.m2m import M2MSignIn
from lakeproxy.auth.signin.pat import HINT_PAT as HINT_PAT
from lakeproxy.auth.signin.pat import PatSignIn
from lakeproxy.auth.status import StatusError, TargetStatus, parse_endpoint, parse_instance
from lakeproxy.errors import ConfigError, CredentialError
from lakeproxy.wire import sqlstate

log = logging.getLogger(__name__)

DEFAULT_REQUEST_TIMEOUT: Final = 10.0
SCIM_ME_PATH: Final = "/api/2.0/preview/scim/v2/Me"
POSTGRES_CREDENTIALS_PATH: Final = "/api/2.0/postgres/credentials"
DATABASE_CREDENTIALS_PATH: Final = "/api/2.0/database/credentials"
POSTGRES_API_PREFIX: Final = "/api/2.0/postgres/"
DATABASE_INSTANCES_PATH: Final = "/api/2.0/database/instances/"

ENDPOINT_NAME_RE: Final = re.compile(r"projects/[^/]+/branches/[^/]+/endpoints/[^/]+")

# Fixes from the troubleshooting table of Databricks' "Connect external apps to
# Lakebase using the API" page.
HINT_WORKSPACE_ACCESS: Final = "enable 'Workspace access' for the service principal"
HINT_ENDPOINT: Final = "set ENDPOINT_NAME to projects/<p>/branches/<b>/endpoints/<e>"
HINT_INSTANCE: Final = "set LAKEBASE_INSTANCE to the name of an existing provisioned instance"
# A well-formed name the workspace does not know (404 RESOURCE_DOES_NOT_EXIST).
HINT_ENDPOINT_NOT_FOUND: Final = (
    "endpoint not found: check that ENDPOINT_NAME names an endpoint of this workspace "
    "(the Lakebase app shows projects/<p>/branches/<b>/endpoints/<e>) and that DATABRICKS_HOST "
    "is the workspace it belongs to"
)
HINT_INSTANCE_NOT_FOUND: Final = (
    "instance not found: check that LAKEBASE_INSTANCE names a provisioned instance of this "
    "workspace and that DATABRICKS_HOST is the workspace it belongs to"
)
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
        # A well-formed name the workspace does not know (404 RESOURCE_DOES_NOT_EXIST).
        return HINT_INSTANCE_NOT_FOUND if provisioned else HINT_ENDPOINT_NOT_FOUND
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
        "_closed",
        "_proxy",
        "_session",
        "_signin",
        "_ssl",
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
        signin: SignIn | None = None,
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
        if signin is None and token and has_oauth:
            problems.append(
                "DATABRICKS_TOKEN and DATABRICKS_CLIENT_ID/DATABRICKS_CLIENT_SECRET: "
                "set one authentication method, not both"
            )
        elif signin is None and not token and not (client_id and client_secret):
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
        if signin is None:
            # Either a token, or both client_id and client_secret: checked above.
            signin = PatSignIn(token) if token else M2MSignIn(client_id or "", client_secret or "")
        self._signin: SignIn = signin
        self.endpoint_name = endpoint_name or None
        self.instance_name = instance_name or None
        self.request_timeout = request_timeout
        self._ssl = ssl_context
        self._proxy = _env_proxy(self.host)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def __repr__(self) -> str:
        target = self.endpoint_name or f"instance {self.instance_name}"
        return f"DatabricksApi(host={self.host!r}, auth={self.method}, target={target!r})"

    @property
    def method(self) -> str:
        """The sign-in method's name (``oauth-m2m``, ``pat``, ``databricks-cli``, ...)."""
        return self._signin.method

    @property
    def static_token(self) -> bool:
        """True when a static token (``DATABRICKS_TOKEN``) replaces OAuth."""
        return self._signin.static

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
        """Step 1: a workspace token for the Bearer header of step 2, from the
        sign-in method (a static token is returned without a request).

        ``deadline`` is an absolute ``loop.time()``. Raises CredentialError.
        """
        return await self._signin.token(self, deadline=deadline)

    async def me(self, bearer: str, *, deadline: float) -> str:
        """The signed-in identity's name: ``userName`` of ``GET /api/2.0/preview/scim/v2/Me``
        (a user's e-mail, or a service principal's application id).

        Raises CredentialError.
        """
        what = f"signed-in identity (GET {SCIM_ME_PATH})"
        body = await self._request(what, "GET", SCIM_ME_PATH, step="identity",
                                   deadline=deadline, bearer=bearer)
        return _str_field(body, "userName", what)

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
        """For sign-in methods: see :class:`lakeproxy.auth.signin.base.Http`."""
        return await self._request(
            what, method, url, step=step, deadline=deadline, basic=basic, data=data,
            params=params, headers=headers, hint=hint, direct=direct,
        )

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
        data: Mapping[str, str] | None = None,
        json_body: JsonObject | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        hint: HintFor | None = None,
        direct: bool = False,
    ) -> JsonObject:
        """Send one request; return the JSON object of a 2xx reply.

        ``path`` is relative to the workspace unless it is a full URL (identity
        providers). Raises CredentialError (retryable or final, see the module
        docstring); a final one's fix comes from ``hint`` when given.
        """
        if self._closed:
            raise CredentialError(f"{what}: the credential client is closed", retryable=False)
        loop = asyncio.get_running_loop()
        started = loop.time()
        timeout = min(self.request_timeout, deadline - started)
        if timeout <= 0:
            raise _retryable(f"{what}: no time left before the deadline")
        full = path if path.startswith(("https://", "http://")) else self.host + path
        headers = {"Accept": "application/json", **(headers or {})}
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        elif basic is not None:
            pair = base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode("ascii")
            headers["Authorization"] = f"Basic {pair}"
        try:
            proxy = None if direct else (self._proxy if full is not path else _env_proxy(full))
            async with self._get_session().request(
                method, full, headers=headers, data=data, params=params,
                json=json_body, timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False, proxy=proxy,
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
        fix = hint(status, error_code, message) if hint is not None else hint_for(
            status, error_code, message, step=step, static_token=self.static_token,
            provisioned=self.provisioned,
        )
        if (hint is None and status == 401 and step != "oauth"
                and self.method not in ("oauth-m2m", "pat")):
            fix = self._signin.refused_hint(status, error_code, message)
        raise CredentialError(
            f"{what} refused: {detail}", retryable=False, status=status,
            error_code=error_code, hint=fix,
            sqlstate=sqlstate.INVALID_AUTHORIZATION_SPECIFICATION,
        )
