"""A fake Databricks workspace API (aiohttp, bound to 127.0.0.1).

Routes, shaped like the real ones:

* ``POST /oidc/v1/token`` — OAuth M2M (client credentials, Basic auth or form
  ``client_id``/``client_secret``); OAuth-style errors (``error``,
  ``error_description``).
* ``POST /api/2.0/postgres/credentials`` — Lakebase autoscaling database credential.
* ``POST /api/2.0/database/credentials`` — provisioned-instance credential.
* ``GET /api/2.0/postgres/{projects/.../endpoints/...}`` — the Endpoint object:
  its four hosts (``status.hosts``), ``status.current_state`` following the
  front door's compute (ACTIVE when running, IDLE when suspended or waking),
  ``spec.disabled``/``status.disabled``.
* ``PATCH /api/2.0/postgres/{name}?update_mask=spec.disabled`` with
  ``{"spec": {"disabled": bool}}`` — switches ``disabled`` (the real API runs
  an update as a long-running operation; this one is done at once and answers
  an operation with ``done: true`` and the endpoint as ``response``).
* ``GET /api/2.0/database/instances/{name}`` — the provisioned DatabaseInstance
  (``read_write_dns``, ``read_only_dns``, ``state``, ``stopped``, ...);
  ``PATCH`` there with ``{"stopped": bool}`` stops it (STOPPED) or starts it
  (STARTING, AVAILABLE after :attr:`FakeWorkspace.instance_start_time`).

Control from Python: :attr:`FakeWorkspace.disabled`,
:attr:`FakeWorkspace.instance_state`, :attr:`FakeWorkspace.readable_secondaries`
(when False the objects report no read-only hosts), :meth:`FakeWorkspace.start_instance`.

* ``GET /api/2.0/preview/scim/v2/Me`` — the identity a Bearer belongs to
  (``userName``: the e-mail of a user, the application id of a service principal).
* with :attr:`FakeWorkspace.identity` set, the token-exchange grant on
  ``/oidc/v1/token`` and the identity providers of :mod:`.identity`.

Every workspace token belongs to a principal; a database credential logs in
as the principal whose token asked for it.

REST errors use Databricks' shape ``{"error_code": ..., "message": ...}``;
unknown paths give 404 ``ENDPOINT_NOT_FOUND`` as the real gateway does.

Tokens look like the real ones (JWTs with random signatures, ~1 KB) but carry
no meaning: validity lives in this object. Expiry uses the wall clock, so
``expire_time`` and validity agree.

Fault injection (:meth:`FakeWorkspace.inject`) queues per-path faults: a status
with the usual error body (or ``body`` verbatim), an optional ``Retry-After``
header and a ``delay`` before answering. ``status=200`` without ``body`` only
delays a normal answer; ``status=0`` drops the connection without a response.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import json
import math
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Protocol

from aiohttp import web

__all__ = ["INSTANCE_STATES", "FakeWorkspace", "Fault", "RecordedRequest", "endpoint_hosts",
           "instance_hosts", "rfc3339"]

OIDC_PATH: Final = "/oidc/v1/token"
POSTGRES_CREDENTIALS_PATH: Final = "/api/2.0/postgres/credentials"
DATABASE_CREDENTIALS_PATH: Final = "/api/2.0/database/credentials"
POSTGRES_PREFIX: Final = "/api/2.0/postgres/"
SCIM_ME_PATH: Final = "/api/2.0/preview/scim/v2/Me"
TOKEN_EXCHANGE_GRANT: Final = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105
INSTANCES_PREFIX: Final = "/api/2.0/database/instances/"

#: DatabaseInstance states (Databricks SDK ``DatabaseInstance_State``, plus
#: UPGRADING, which SPEC names).
INSTANCE_STATES: Final = ("AVAILABLE", "STARTING", "STOPPED", "UPDATING", "UPGRADING",
                          "FAILING_OVER", "DELETING")


def endpoint_hosts(host: str) -> dict[str, str]:
    """The four ``status.hosts`` of an emulated endpoint whose read-write host is
    ``host``: ``-ro``, ``-pooler`` and ``-ro-pooler`` added to its first label.
    The real service's naming is not documented; lakeproxy never derives a
    name, it reads whichever the object reports."""
    label, _, rest = host.partition(".")
    return {"host": host, "read_only_host": f"{label}-ro.{rest}",
            "read_write_pooled_host": f"{label}-pooler.{rest}",
            "read_only_pooled_host": f"{label}-ro-pooler.{rest}"}


def instance_hosts(instance_name: str, domain: str) -> dict[str, str]:
    """``read_write_dns`` and ``read_only_dns`` of an emulated instance."""
    return {"read_write_dns": f"instance-{instance_name}.{domain}",
            "read_only_dns": f"instance-ro-{instance_name}.{domain}"}

_ERROR_CODES: Final[dict[int, str]] = {
    400: "INVALID_PARAMETER_VALUE",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "RESOURCE_DOES_NOT_EXIST",
    409: "RESOURCE_CONFLICT",
    429: "REQUEST_LIMIT_EXCEEDED",
    500: "INTERNAL_ERROR",
    501: "NOT_IMPLEMENTED",
    503: "TEMPORARILY_UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class IdentityProviders(Protocol):
    """What the workspace needs of :class:`lakeproxy.emulator.identity.IdentityProviders`."""

    def token_exchange(self, form: Mapping[str, object]) -> web.Response:
        """Answer the token-exchange grant of ``/oidc/v1/token``."""
        ...

    def add_routes(self, app: web.Application) -> None:
        """Serve the identity providers' routes."""
        ...


def rfc3339(ts: float) -> str:
    """``ts`` (Unix seconds) as RFC 3339 UTC with a 'Z', milliseconds only when
    non-zero (as protobuf's JSON Timestamp prints them)."""
    dt = datetime.fromtimestamp(ts, UTC)
    if dt.microsecond // 1000 == 0:
        return dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _fake_jwt(subject: str, lifetime: float, **claims: object) -> str:
    now = time.time()
    header = {"kid": secrets.token_hex(16), "typ": "at+jwt", "alg": "RS256"}
    payload = {"client_id": subject, "scope": "all-apis", "sub": subject,
               "iss": "https://emulator.lakebase.local/oidc", "iat": int(now),
               "exp": int(now + lifetime), "jti": str(uuid.uuid4()), **claims}
    return ".".join((_b64url(json.dumps(header, separators=(",", ":")).encode()),
                     _b64url(json.dumps(payload, separators=(",", ":")).encode()),
                     _b64url(secrets.token_bytes(256))))


def _prune(expiries: dict[str, tuple[float, str]]) -> None:
    """Forget expired tokens once the table grows (a long demo or soak run)."""
    if len(expiries) >= 256:
        now = time.time()
        for token in [t for t, (exp, _) in expiries.items() if exp <= now]:
            del expiries[token]


def _json_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


@dataclass(slots=True)
class Fault:
    """One queued fault; see :meth:`FakeWorkspace.inject`."""

    count: int
    status: int
    retry_after: float | None
    delay: float
    body: bytes | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """A request as received (headers without Authorization; body kept) and when."""

    method: str
    path: str
    content_type: str
    body: bytes = field(repr=False)
    authorization_scheme: str
    #: ``time.monotonic()`` when the request arrived.
    at: float = field(default_factory=time.monotonic, compare=False)


class FakeWorkspace:
    """The workspace API for one service principal, one Lakebase endpoint and
    one provisioned instance. ``role`` is the Postgres role the credentials
    log in as (default: ``client_id``, as for real service principals)."""

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str,
        endpoint_name: str,
        instance_name: str,
        endpoint_host: str,
        pat: str | None = None,
        oauth_lifetime: float = 3600.0,
        credential_lifetime: float = 3600.0,
        role: str | None = None,
    ) -> None:
        self.client_id = client_id
        self._client_secret = client_secret
        self.endpoint_name = endpoint_name
        self.instance_name = instance_name
        self.endpoint_host = endpoint_host
        self._pat = pat
        self.role = role if role is not None else client_id
        self.oauth_lifetime = oauth_lifetime
        self.credential_lifetime = credential_lifetime
        #: returns "ACTIVE", "SUSPENDED" or "WAKING" (the front door's state).
        self.compute_state: Callable[[], str] = lambda: "ACTIVE"
        domain = endpoint_host.partition(".")[2] or "emulator.lakebase.local"
        self.hosts = endpoint_hosts(endpoint_host)
        self.instance_hosts = instance_hosts(instance_name, domain)
        #: ``spec.disabled`` of the endpoint; ``on_disabled`` runs when it turns true
        #: (the real service then suspends the compute).
        self.disabled = False
        self.on_disabled: Callable[[], None] | None = None
        #: the provisioned instance's ``state`` (see INSTANCE_STATES)
        self.instance_state = "AVAILABLE"
        #: seconds from STARTING to AVAILABLE after a PATCH with stopped=false
        self.instance_start_time = 1.0
        #: False: neither object reports read-only hosts (no readable secondary)
        self.readable_secondaries = True
        self._instance_task: asyncio.Task[None] | None = None
        self.calls: collections.Counter[str] = collections.Counter()
        #: the last 1000 requests, oldest first
        self.requests: collections.deque[RecordedRequest] = collections.deque(maxlen=1000)
        self._faults: dict[str, collections.deque[Fault]] = collections.defaultdict(
            collections.deque)
        #: token -> (expiry, principal): workspace Bearer tokens (OAuth, token
        #: exchange, and Entra ID tokens the emulated Entra/managed identity/az issue)
        self._oauth_tokens: dict[str, tuple[float, str]] = {}
        #: database credential -> (expiry, the role it logs in as)
        self._credentials: dict[str, tuple[float, str]] = {}
        #: the identity providers (token exchange, Entra, managed identity, CLIs);
        #: set by the Emulator, which knows the principals
        self.identity: IdentityProviders | None = None
        self._runner: web.AppRunner | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self._created = time.time()

    # ------------------------------------------------------------------ control

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (valid after :meth:`start`)."""
        return f"http://{self.host}:{self.port}"

    def inject(
        self,
        path: str,
        *,
        count: int = 1,
        status: int = 500,
        retry_after: float | None = None,
        delay: float = 0.0,
        body: bytes | None = None,
    ) -> None:
        """Make the next ``count`` calls to ``path`` (exact request path) fail.

        Each gets ``status`` after sleeping ``delay`` seconds, with a
        ``Retry-After`` header when ``retry_after`` is given and ``body``
        verbatim (else the usual JSON error for that status). ``status=200``
        without ``body`` just delays the normal answer; ``status=0`` closes the
        connection without answering. Faults queue up in call order.
        """
        if count < 1:
            raise ValueError("count must be >= 1")
        self._faults[path].append(Fault(count, status, retry_after, delay, body))

    def set_disabled(self, disabled: bool) -> None:
        """Switch ``spec.disabled`` (as the UI or an update call would)."""
        was, self.disabled = self.disabled, disabled
        if disabled and not was and self.on_disabled is not None:
            self.on_disabled()

    def start_instance(self, after: float | None = None) -> None:
        """STARTING now, AVAILABLE ``after`` seconds later (default
        :attr:`instance_start_time`). Needs a running event loop."""
        self._cancel_instance_task()
        self.instance_state = "STARTING"
        delay = self.instance_start_time if after is None else after

        async def become_available() -> None:
            await asyncio.sleep(delay)
            self.instance_state = "AVAILABLE"

        self._instance_task = asyncio.get_running_loop().create_task(become_available())

    def set_instance_state(self, state: str) -> None:
        """Put the instance in ``state`` at once (one of INSTANCE_STATES)."""
        if state not in INSTANCE_STATES:
            raise ValueError(f"unknown instance state {state!r}")
        self._cancel_instance_task()
        self.instance_state = state

    def _cancel_instance_task(self) -> None:
        if self._instance_task is not None:
            self._instance_task.cancel()
            self._instance_task = None

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        self._faults.clear()

    def issue_credential(
        self, lifetime: float | None = None, *, principal: str | None = None
    ) -> tuple[str, float]:
        """Mint a database credential directly (no HTTP); returns (token, expiry).
        ``principal`` is the role it logs in as (default: the service principal's)."""
        life = self.credential_lifetime if lifetime is None else lifetime
        who = self.role if principal is None else principal
        token = _fake_jwt(who, life, aud="lakebase")
        expiry = time.time() + life
        _prune(self._credentials)
        self._credentials[token] = (expiry, who)
        return token, expiry

    def issue_oauth_token(self, principal: str, lifetime: float | None = None) -> tuple[str, float]:
        """Mint a workspace Bearer token for ``principal``; returns (token, expiry)."""
        life = self.oauth_lifetime if lifetime is None else lifetime
        token = _fake_jwt(principal, life)
        expiry = time.time() + life
        _prune(self._oauth_tokens)
        self._oauth_tokens[token] = (expiry, principal)
        return token, expiry

    def is_valid_credential(self, role: str, token: str) -> bool:
        """True when ``token`` is an issued, unexpired, unrevoked database
        credential for ``role`` (the identity that asked for it)."""
        entry = self._credentials.get(token)
        return entry is not None and role == entry[1] and time.time() < entry[0]

    def revoke_credentials(self) -> None:
        """Invalidate every database credential issued so far."""
        self._credentials.clear()

    def revoke_oauth_tokens(self) -> None:
        """Invalidate every workspace OAuth token issued so far."""
        self._oauth_tokens.clear()

    # ------------------------------------------------------------------ server

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Bind and serve. ``port=0`` picks a free port (see :attr:`url`)."""
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post(OIDC_PATH, self._oidc_token)
        app.router.add_post(POSTGRES_CREDENTIALS_PATH, self._postgres_credentials)
        app.router.add_post(DATABASE_CREDENTIALS_PATH, self._database_credentials)
        app.router.add_get(POSTGRES_PREFIX + "{name:.+}", self._get_postgres_resource)
        app.router.add_get(SCIM_ME_PATH, self._scim_me)
        if self.identity is not None:
            self.identity.add_routes(app)
        app.router.add_patch(POSTGRES_PREFIX + "{name:.+}", self._patch_postgres_resource)
        app.router.add_get(INSTANCES_PREFIX + "{name}", self._get_instance)
        app.router.add_patch(INSTANCES_PREFIX + "{name}", self._patch_instance)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                    shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.host, self.port = self._runner.addresses[0][:2]

    async def stop(self) -> None:
        """Stop serving (idempotent)."""
        self._cancel_instance_task()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # ------------------------------------------------------------------ plumbing

    @staticmethod
    def _error(status: int, code: str, message: str) -> web.Response:
        return web.json_response({"error_code": code, "message": message}, status=status)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        self.calls[path] += 1
        body = await request.read()
        auth = request.headers.get("Authorization", "")
        self.requests.append(RecordedRequest(request.method, path,
                                             request.headers.get("Content-Type", ""), body,
                                             auth.split(" ", 1)[0]))
        queue = self._faults.get(path)
        if queue:
            fault = queue[0]
            fault.count -= 1
            if fault.count <= 0:
                queue.popleft()
            if fault.delay > 0:
                await asyncio.sleep(fault.delay)
            if fault.status == 0:
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError  # aiohttp treats this as a dropped peer
            if not (fault.status == 200 and fault.body is None):
                return self._fault_response(path, fault)
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return self._error(404, "ENDPOINT_NOT_FOUND",
                               f"No API found for '{request.method} {path}'")
        except web.HTTPMethodNotAllowed:
            return self._error(405, "ENDPOINT_NOT_FOUND",
                               f"No API found for '{request.method} {path}'")

    def _fault_response(self, path: str, fault: Fault) -> web.Response:
        headers = {}
        if fault.retry_after is not None:
            ra = fault.retry_after
            headers["Retry-After"] = str(int(ra)) if float(ra).is_integer() else str(ra)
        if fault.body is not None:
            return web.Response(status=fault.status, body=fault.body, headers=headers,
                                content_type="application/json")
        if path == OIDC_PATH:
            payload: dict[str, str] = {
                "error": "temporarily_unavailable" if fault.status >= 500 else "invalid_request",
                "error_description": f"injected fault (HTTP {fault.status})"}
        else:
            code = _ERROR_CODES.get(fault.status,
                                    "INTERNAL_ERROR" if fault.status >= 500 else "BAD_REQUEST")
            payload = {"error_code": code, "message": f"injected fault (HTTP {fault.status})"}
        return web.json_response(payload, status=fault.status, headers=headers)

    def _bearer(self, request: web.Request) -> str | web.Response:
        """The principal a valid Bearer (OAuth token or PAT) belongs to, else the 401."""
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return self._error(401, "UNAUTHENTICATED",
                               "Credential was not sent or was of an unsupported type for "
                               "this API.")
        token = token.strip()
        if self._pat is not None and secrets.compare_digest(token, self._pat):
            return self.role
        entry = self._oauth_tokens.get(token)
        if entry is None:
            return self._error(401, "UNAUTHENTICATED", "Invalid access token.")
        if time.time() >= entry[0]:
            return self._error(401, "UNAUTHENTICATED", "Token expired.")
        return entry[1]

    async def _json_body(self, request: web.Request) -> dict[str, object] | web.Response:
        raw = await request.read()
        try:
            data = json.loads(raw) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError) as exc:
            return self._error(400, "MALFORMED_REQUEST",
                               f"Invalid JSON given in the body of the request - {exc}")
        if not isinstance(data, dict):
            return self._error(400, "MALFORMED_REQUEST",
                               "Invalid JSON given in the body of the request - expected a map")
        return data

    # ------------------------------------------------------------------ routes

    def _oauth_error(self, status: int, error: str, description: str) -> web.Response:
        return web.json_response({"error": error, "error_description": description},
                                 status=status)

    async def _oidc_token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") == TOKEN_EXCHANGE_GRANT:
            if self.identity is None:
                return self._oauth_error(400, "unsupported_grant_type",
                                         "Token exchange is not configured")
            return self.identity.token_exchange(form)
        client_id = client_secret = None
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "basic" and encoded:
            try:
                decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return self._oauth_error(401, "invalid_client", "Client authentication failed")
            client_id, _, client_secret = decoded.partition(":")
        elif "client_id" in form:
            client_id, client_secret = str(form.get("client_id")), str(
                form.get("client_secret", ""))
        if client_id is None or client_secret is None:
            return self._oauth_error(401, "invalid_client", "Missing client authentication")
        if not (secrets.compare_digest(client_id, self.client_id)
                and secrets.compare_digest(client_secret, self._client_secret)):
            return self._oauth_error(401, "invalid_client", "Client authentication failed")
        if form.get("grant_type") != "client_credentials":
            return self._oauth_error(400, "unsupported_grant_type",
                                     "Only grant_type=client_credentials is supported")
        scopes = str(form.get("scope", "")).split()
        if "all-apis" not in scopes:
            return self._oauth_error(400, "invalid_scope",
                                     "Requested scope is invalid (use scope=all-apis)")
        life = self.oauth_lifetime
        token, _ = self.issue_oauth_token(self.client_id, life)
        return web.json_response({"access_token": token, "scope": "all-apis",
                                  "token_type": "Bearer", "expires_in": _json_number(life)})

    async def _scim_me(self, request: web.Request) -> web.Response:
        principal = self._bearer(request)
        if isinstance(principal, web.Response):
            return principal
        ident = str(uuid.uuid5(uuid.NAMESPACE_URL, principal).int % 10**16)
        return web.json_response({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            "id": ident, "userName": principal, "displayName": principal, "active": True,
        })

    async def _postgres_credentials(self, request: web.Request) -> web.Response:
        principal = self._bearer(request)
        if isinstance(principal, web.Response):
            return principal
        data = await self._json_body(request)
        if isinstance(data, web.Response):
            return data
        endpoint = data.get("endpoint")
        if not endpoint:
            return self._error(400, "INVALID_PARAMETER_VALUE", "Field 'endpoint' is required")
        if not isinstance(endpoint, str):
            return self._error(400, "INVALID_PARAMETER_VALUE", "Field 'endpoint' must be a string")
        if endpoint != self.endpoint_name:
            return self._error(404, "RESOURCE_DOES_NOT_EXIST",
                               f"Endpoint '{endpoint}' does not exist.")
        token, expiry = self.issue_credential(principal=principal)
        return web.json_response({"token": token, "expire_time": rfc3339(expiry)})

    async def _database_credentials(self, request: web.Request) -> web.Response:
        principal = self._bearer(request)
        if isinstance(principal, web.Response):
            return principal
        data = await self._json_body(request)
        if isinstance(data, web.Response):
            return data
        names = data.get("instance_names")
        if not names and not data.get("claims"):
            return self._error(400, "INVALID_PARAMETER_VALUE",
                               "At least one of instance_names or claims must be specified")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return self._error(400, "INVALID_PARAMETER_VALUE",
                               "Field 'instance_names' must be a list of strings")
        request_id = data.get("request_id")
        if request_id is not None:
            try:
                uuid.UUID(str(request_id))
            except ValueError:
                return self._error(400, "INVALID_PARAMETER_VALUE",
                                   "Field 'request_id' must be a UUID")
        for name in names:
            if name != self.instance_name:
                return self._error(404, "RESOURCE_DOES_NOT_EXIST",
                                   f"Database instance '{name}' does not exist.")
        token, expiry = self.issue_credential(principal=principal)
        return web.json_response({"token": token, "expiration_time": rfc3339(expiry)})

    async def _get_postgres_resource(self, request: web.Request) -> web.Response:
        if isinstance(err := self._bearer(request), web.Response):
            return err
        name = request.match_info["name"]
        if name != self.endpoint_name:
            return self._error(404, "RESOURCE_DOES_NOT_EXIST", f"'{name}' does not exist.")
        return web.json_response(self.endpoint_object())

    def endpoint_object(self) -> dict[str, object]:
        """The Endpoint resource as ``GET /api/2.0/postgres/{name}`` returns it."""
        state = self.compute_state()
        current = {"ACTIVE": "ACTIVE", "SUSPENDED": "IDLE", "WAKING": "IDLE"}.get(state, state)
        endpoint_id = self.endpoint_name.rsplit("/", 1)[-1]
        status: dict[str, object] = {
            "endpoint_type": "ENDPOINT_TYPE_READ_WRITE",
            "current_state": current,
            "hosts": self._reported(self.hosts, ("read_only_host", "read_only_pooled_host")),
            "autoscaling_limit_min_cu": 0.5,
            "autoscaling_limit_max_cu": 2,
            "suspend_timeout_duration": "300s",
            "disabled": self.disabled,
            "endpoint_id": endpoint_id,
        }
        if state == "WAKING":
            status["pending_state"] = "ACTIVE"
        return {
            "name": self.endpoint_name,
            "uid": f"ep-{uuid.uuid5(uuid.NAMESPACE_URL, self.endpoint_name).hex[:16]}",
            "parent": self.endpoint_name.rsplit("/endpoints/", 1)[0],
            "create_time": rfc3339(math.floor(self._created)),
            "update_time": rfc3339(math.floor(self._created)),
            "endpoint_id": endpoint_id,
            "spec": {
                "endpoint_type": "ENDPOINT_TYPE_READ_WRITE",
                "autoscaling_limit_min_cu": 0.5,
                "autoscaling_limit_max_cu": 2,
                "disabled": self.disabled,
                "suspend_timeout_duration": "300s",
            },
            "status": status,
        }

    def _reported(self, hosts: dict[str, str], read_only: tuple[str, ...]) -> dict[str, str]:
        if self.readable_secondaries:
            return dict(hosts)
        return {k: v for k, v in hosts.items() if k not in read_only}

    async def _patch_postgres_resource(self, request: web.Request) -> web.Response:
        if isinstance(err := self._bearer(request), web.Response):
            return err
        name = request.match_info["name"]
        if name != self.endpoint_name:
            return self._error(404, "RESOURCE_DOES_NOT_EXIST", f"'{name}' does not exist.")
        data = await self._json_body(request)
        if isinstance(data, web.Response):
            return data
        mask = request.query.get("update_mask", "")
        spec = data.get("spec")
        if mask != "spec.disabled" or not isinstance(spec, dict) or not isinstance(
                spec.get("disabled"), bool):
            return self._error(400, "INVALID_PARAMETER_VALUE",
                               "the emulator updates only spec.disabled "
                               "(update_mask=spec.disabled, body {\"spec\": {\"disabled\": ...}})")
        self.set_disabled(spec["disabled"])
        return web.json_response({"name": f"{name}/operations/{uuid.uuid4()}", "done": True,
                                  "response": self.endpoint_object()})

    def instance_object(self) -> dict[str, object]:
        """The DatabaseInstance as ``GET /api/2.0/database/instances/{name}`` returns it."""
        stopped = self.instance_state == "STOPPED"
        return {
            "name": self.instance_name,
            "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, self.instance_name)),
            "creator": self.client_id,
            "creation_time": rfc3339(math.floor(self._created)),
            "state": self.instance_state,
            "pg_version": "PG_VERSION_15",
            "capacity": "CU_1",
            "effective_capacity": "CU_1",
            "stopped": stopped,
            "effective_stopped": stopped,
            "node_count": 2,
            "effective_node_count": 2,
            "enable_readable_secondaries": self.readable_secondaries,
            "effective_enable_readable_secondaries": self.readable_secondaries,
            "enable_pg_native_login": False,
            "effective_enable_pg_native_login": False,
            **self._reported(self.instance_hosts, ("read_only_dns",)),
        }

    async def _get_instance(self, request: web.Request) -> web.Response:
        if isinstance(err := self._bearer(request), web.Response):
            return err
        name = request.match_info["name"]
        if name != self.instance_name:
            return self._error(404, "RESOURCE_DOES_NOT_EXIST",
                               f"Database instance '{name}' does not exist.")
        return web.json_response(self.instance_object())

    async def _patch_instance(self, request: web.Request) -> web.Response:
        if isinstance(err := self._bearer(request), web.Response):
            return err
        name = request.match_info["name"]
        if name != self.instance_name:
            return self._error(404, "RESOURCE_DOES_NOT_EXIST",
                               f"Database instance '{name}' does not exist.")
        data = await self._json_body(request)
        if isinstance(data, web.Response):
            return data
        stopped = data.get("stopped")
        if not isinstance(stopped, bool):
            return self._error(400, "INVALID_PARAMETER_VALUE",
                               "the emulator updates only 'stopped' (a boolean)")
        if stopped:
            self.set_instance_state("STOPPED")
        elif self.instance_state == "STOPPED":
            self.start_instance()
        return web.json_response(self.instance_object())
