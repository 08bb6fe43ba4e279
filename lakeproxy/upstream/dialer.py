"""One configured endpoint as a Dialer: its credential, TLS context and login.

:class:`EndpointDialer` is what a session calls to get a logged-in upstream
connection (and to forward a cancel): it looks the host up once, takes a
credential from the cache, and dials with retries.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Mapping

from lakeproxy.auth.cache import CachedCredentials
from lakeproxy.auth.databricks import DatabricksApi
from lakeproxy.auth.provider import Credential
from lakeproxy.config import Config, DatabricksConfig, EndpointConfig
from lakeproxy.errors import UpstreamConnectError
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

log = logging.getLogger("lakeproxy.upstream")


def make_api(databricks: DatabricksConfig, endpoint: EndpointConfig) -> DatabricksApi:
    """The credential API client for one endpoint (raises ConfigError)."""
    oauth = databricks.auth_method == "oauth-m2m"
    return DatabricksApi(
        host=databricks.host,
        client_id=databricks.client_id if oauth else None,
        client_secret=databricks.client_secret if oauth else None,
        token=None if oauth else databricks.token,
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
    ) -> None:
        self.config = config
        self.credentials = credentials
        self.metrics = metrics
        self._groups: TlsGroups = "p256"
        self.ssl_context: ssl.SSLContext = make_ssl_context(config.sslmode, config.sslrootcert)
        self._host: str | None = config.host

    def reload_tls(self) -> None:
        """Build this endpoint's TLS context from the CA file again (SIGHUP).

        Raises:
            ConfigError: the CA file cannot be loaded.
        """
        c = self.config
        self.ssl_context = make_ssl_context(c.sslmode, c.sslrootcert, groups=self._groups)

    def describe(self) -> str:
        where = self._host or "(host looked up)"
        return f"{self.config.label} at {where}:{self.config.port} as {self.config.user}"

    async def target(self, *, deadline: float) -> UpstreamTarget:
        """The endpoint's address, looking the host up once when PGHOST is unset."""
        if self._host is None:
            self._host = await self.credentials.endpoint_host(
                self.config.name, deadline=deadline
            )
            log.info("endpoint %s: host is %s", self.config.label, self._host)
        c = self.config
        return UpstreamTarget(host=self._host, port=c.port, hostaddr=c.hostaddr,
                              sslmode=c.sslmode)

    async def connect(self, params: Mapping[str, str], *, deadline: float) -> UpstreamConnection:
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

        def attempt() -> Awaitable[UpstreamConnection]:
            return connect_with_retry(
                target, used[-1].token, params, deadline=deadline, ssl_context=self.ssl_context,
                refresh_credential=refresh,
                on_retry=(lambda _exc: m.upstream_retry()) if m is not None else None,
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
    return EndpointDialer(endpoint, creds, metrics=metrics)
