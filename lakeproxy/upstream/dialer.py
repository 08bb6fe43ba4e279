"""One configured endpoint as a Dialer: its credential, TLS context and login.

:class:`EndpointDialer` is what a session calls to get a logged-in upstream
connection (and to forward a cancel): it looks the host up once, takes a
credential from the cache, and dials with retries.

Hosts and state (SPEC "Endpoint hosts"): with no host configured, the
endpoint's or instance's status (:mod:`lakeproxy.auth.status`) is read and the
host of the configured kind is used; it is remembered. The state decides
before any dial: a disabled endpoint or a STOPPED/DELETING instance fails the
client at once (08006 with a hint), a kind the object does not report too.
While dials keep failing, the state is read again at most every
:data:`STATE_REREAD` seconds (also with an explicit host, whenever the
endpoint or instance name is known), so an endpoint disabled or an instance
stopped meanwhile ends the retries at once instead of at the deadline.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
from collections.abc import Awaitable, Iterator, Mapping
from contextlib import contextmanager
from typing import Final

from lakeproxy.auth.cache import CachedCredentials
from lakeproxy.auth.databricks import DatabricksApi
from lakeproxy.auth.provider import Credential
from lakeproxy.auth.signin import make_signin
from lakeproxy.auth.status import TargetStatus
from lakeproxy.config import Config, DatabricksConfig, EndpointConfig, name_sources
from lakeproxy.errors import CredentialError, LakeproxyError, UpstreamConnectError
from lakeproxy.metrics import Metrics
from lakeproxy.upstream.cancel import send_cancel
from lakeproxy.upstream.dial import connect_with_retry
from lakeproxy.upstream.login import UpstreamConnection
from lakeproxy.upstream.target import (
    TlsGroups,
    UpstreamTarget,
    handshake_refused,
    make_ssl_context,
)
from lakeproxy.wire import sqlstate

log = logging.getLogger("lakeproxy.upstream")

#: While dials keep failing, the state is read again at most this often (seconds).
STATE_REREAD: Final = 5.0
#: A re-read during retries waits at most this long for the API, so it never
#: holds up the next dial for long; a re-read that fails changes nothing.
_REREAD_TIMEOUT: Final = 3.0


def make_api(databricks: DatabricksConfig, endpoint: EndpointConfig) -> DatabricksApi:
    """The credential API client for one endpoint, signing in with the configured
    method (raises ConfigError)."""
    return DatabricksApi(
        host=databricks.host,
        signin=make_signin(databricks),
        endpoint_name=endpoint.name,
        instance_name=endpoint.instance,
    )


class EndpointDialer:
    """Opens logged-in connections to one endpoint. Implements session.Dialer."""

    def __init__(
        self,
        config: EndpointConfig,
        credentials: CachedCredentials,
        *,
        metrics: Metrics | None = None,
        sources: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.config = config
        #: Where the workspace settings came from (``Config.sources``), for hints.
        self.sources = sources
        self.credentials = credentials
        self.metrics = metrics
        self._groups: TlsGroups = "p256"
        self.ssl_context: ssl.SSLContext = make_ssl_context(config.sslmode, config.sslrootcert)
        self._host: str | None = config.host
        self._status: TargetStatus | None = None
        self._status_at = -math.inf
        self._status_lock = asyncio.Lock()
        if config.host is not None and config.host_kind is not None:
            log.warning("endpoint %s: host_kind=%s is ignored because the host is set "
                        "explicitly (%s); unset the host to use the looked-up %s host",
                        config.label, config.host_kind, config.host, config.host_kind)

    def reload_tls(self) -> None:
        """Build this endpoint's TLS context from the CA file again (SIGHUP).

        Raises:
            ConfigError: the CA file cannot be loaded.
        """
        c = self.config
        self.ssl_context = make_ssl_context(c.sslmode, c.sslrootcert, groups=self._groups)

    def describe(self) -> str:
        kind = self.config.kind
        where = self._host or ("(host looked up)" if kind == "read_write"
                               else f"({kind} host looked up)")
        role = self.config.user or "the signed-in identity"
        return f"{self.config.label} at {where}:{self.config.port} as {role}"

    async def role(self, *, deadline: float) -> str:
        """The Postgres role: the configured one, else the signed-in identity's name
        (SCIM ``Me``, asked once). Raises CredentialError."""
        if self.config.user is not None:
            return self.config.user
        return await self.credentials.identity(deadline=deadline)

    @contextmanager
    def hints_named(self) -> Iterator[None]:
        """Errors raised inside get hints naming where each value came from (the
        file and key, the profile or the variable), not always the variable."""
        try:
            yield
        except LakeproxyError as exc:
            exc.hint = name_sources(exc.hint, self.config.sources, self.sources)
            raise

    @property
    def status(self) -> TargetStatus | None:
        """The endpoint's or instance's status as last read (None: never read)."""
        return self._status

    async def read_status(self, *, deadline: float, max_age: float = 0.0) -> TargetStatus:
        """The status, read from the API unless the last read is younger than
        ``max_age`` seconds. Callers arriving while a read runs share it.

        Raises CredentialError (08006 when the API kept failing until ``deadline``).
        """
        loop = asyncio.get_running_loop()
        asked = loop.time()
        async with self._status_lock:
            now = loop.time()
            if self._status is not None and (
                    self._status_at >= asked or now - self._status_at < max_age):
                return self._status
            status = await self.credentials.target_status(deadline=deadline)
            previous, self._status, self._status_at = self._status, status, loop.time()
        if previous is None or previous.describe() != status.describe():
            log.info("%s %s: state %s", status.what, self.config.label, status.describe())
        return status

    def _check_state(self, status: TargetStatus) -> None:
        """Raise 08006 (never retried) when the state says no dial can succeed."""
        if status.verdict() == "refuse":
            message, hint = status.refusal()
            raise UpstreamConnectError(
                f"{status.what} {self.config.label}: {message}", retryable=False,
                hint=hint, sqlstate=sqlstate.CONNECTION_FAILURE,
            )

    async def target(self, *, deadline: float) -> UpstreamTarget:
        """The endpoint's address: the configured host, or the looked-up host of
        the configured kind.

        Raises:
            UpstreamConnectError: 08006 for a refused state (disabled, stopped)
                or a kind the endpoint does not report.
            CredentialError: the lookup failed (28000 refused, 08006 unavailable).
        """
        c = self.config
        status = self._status
        if c.host is not None:
            host = c.host
            if status is not None and status.verdict() == "refuse":
                # Refused before: look again (at most every STATE_REREAD s) before failing.
                self._check_state(await self.read_status(deadline=deadline,
                                                         max_age=STATE_REREAD))
        else:
            host = await self._lookup(deadline)
        return UpstreamTarget(host=host, port=c.port, hostaddr=c.hostaddr, sslmode=c.sslmode)

    async def _lookup(self, deadline: float) -> str:
        loop = asyncio.get_running_loop()
        kind = self.config.kind
        status = self._status
        if status is None or self._host is None or status.verdict() == "refuse":
            status = await self.read_status(
                deadline=deadline, max_age=0.0 if status is None else STATE_REREAD)
        while True:
            self._check_state(status)
            host = status.host(kind)
            if host is not None:
                break
            message, hint = status.missing(kind)
            pause = min(STATE_REREAD, deadline - loop.time())
            if status.verdict() != "wait" or pause <= 0:
                raise UpstreamConnectError(
                    f"{status.what} {self.config.label} (state {status.describe()}): {message}",
                    retryable=False, hint=hint, sqlstate=sqlstate.CONNECTION_FAILURE,
                )
            # An instance on its way to AVAILABLE may not report its hosts yet.
            await asyncio.sleep(pause)
            status = await self.read_status(deadline=deadline, max_age=STATE_REREAD)
        if host != self._host:
            log.info("%s %s: %s host is %s", status.what, self.config.label, kind, host)
            self._host = host
        return host

    async def _recheck(self, deadline: float) -> None:
        """Between failed dials: read the state again if the last read is older
        than STATE_REREAD, and stop the retries if it now refuses."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._status_at < STATE_REREAD:
            return
        try:
            status = await self.read_status(
                deadline=min(deadline, loop.time() + _REREAD_TIMEOUT), max_age=STATE_REREAD)
        except CredentialError as exc:
            log.debug("endpoint %s: state re-read failed: %s", self.config.label, exc)
            return
        self._check_state(status)
        host = status.host(self.config.kind)
        if self.config.host is None and host is not None and host != self._host:
            log.info("%s %s: %s host is now %s", status.what, self.config.label,
                     self.config.kind, host)
            self._host = host

    async def connect(self, params: Mapping[str, str], *, deadline: float) -> UpstreamConnection:
        with self.hints_named():
            return await self._connect(params, deadline=deadline)

    async def _connect(self, params: Mapping[str, str], *, deadline: float) -> UpstreamConnection:
        if "user" not in params:  # no role configured: the signed-in identity's
            params = {**params, "user": await self.role(deadline=deadline)}
        target = await self.target(deadline=deadline)
        cred = await self.credentials.get(deadline=deadline)
        used: list[Credential] = [cred]

        async def refresh() -> str:
            # The endpoint refused the credential: drop it, mint a newer one.
            self.credentials.invalidate(used[-1])
            fresh = await self.credentials.get(deadline=deadline)
            used.append(fresh)
            return fresh.token

        m = self.metrics

        async def recheck(_exc: BaseException) -> None:
            await self._recheck(deadline)

        def attempt() -> Awaitable[UpstreamConnection]:
            return connect_with_retry(
                target, used[-1].token, params, deadline=deadline, ssl_context=self.ssl_context,
                refresh_credential=refresh,
                on_retry=(lambda _exc: m.upstream_retry()) if m is not None else None,
                before_retry=recheck,
            )

        groups = self._groups
        try:
            return await attempt()
        except UpstreamConnectError as exc:
            if groups != "p256" or not handshake_refused(exc):
                raise
            # P-256 is mandatory for TLS 1.3 servers, but one that refuses it
            # must still be reachable: offer OpenSSL's default groups from now on.
            if self._groups == "p256":
                log.warning("endpoint %s refused a TLS handshake offering only P-256; "
                            "offering OpenSSL's default key-exchange groups from now on",
                            self.config.label)
                self._groups = "default"
                self.reload_tls()
        return await attempt()

    async def cancel(self, process_id: int, secret: bytes) -> None:
        loop = asyncio.get_running_loop()
        target = await self.target(deadline=loop.time() + 10)
        await send_cancel(target, self.ssl_context, process_id, secret)

    async def close(self) -> None:
        await self.credentials.close()


def build_dialer(
    config: Config, endpoint: EndpointConfig, metrics: Metrics | None
) -> EndpointDialer:
    def on_request(kind: str, result: str) -> None:
        if metrics is not None and kind in ("oauth", "database"):
            metrics.credential_request(kind, "ok" if result == "ok" else "error")  # type: ignore[arg-type]

    def on_credential(kind: str, expires_wall: float) -> None:
        if metrics is not None and kind in ("oauth", "database"):
            metrics.credential_expiry(kind, expires_wall)  # type: ignore[arg-type]

    def on_remint_limited(kind: str, seconds: float) -> None:
        if metrics is not None:
            metrics.credential_remint_limited()

    creds = CachedCredentials(
        make_api(config.databricks, endpoint), on_request=on_request,
        on_credential=on_credential, on_remint_limited=on_remint_limited,
    )
    return EndpointDialer(endpoint, creds, metrics=metrics, sources=config.sources)
