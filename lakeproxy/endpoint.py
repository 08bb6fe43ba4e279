"""Wiring: a configured endpoint becomes a Dialer (credential + TLS login + retries).

:class:`EndpointDialer` is what a session calls to get a logged-in upstream
connection. :class:`Runtime` builds one dialer per ``[[endpoints]]`` entry,
the :class:`~lakeproxy.server.ProxyServer` around them, and re-reads the
configuration on SIGHUP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Mapping

from lakeproxy.auth.cache import CachedCredentials
from lakeproxy.auth.databricks import DatabricksApi
from lakeproxy.auth.provider import Credential
from lakeproxy.client_auth import ScramAuthenticator, ScramVerifier
from lakeproxy.config import Config, DatabricksConfig, EndpointConfig, reload_config
from lakeproxy.errors import ConfigError, CredentialError, LakeproxyError, UpstreamConnectError
from lakeproxy.metrics import Metrics
from lakeproxy.server import Endpoint, ProxyServer
from lakeproxy.session import ClientAuthenticator
from lakeproxy.upstream import (
    TlsGroups,
    UpstreamConnection,
    UpstreamTarget,
    clear_ssl_context_cache,
    connect_with_retry,
    handshake_refused,
    make_ssl_context,
    send_cancel,
)

log = logging.getLogger("lakeproxy.endpoint")


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

    creds = CachedCredentials(
        make_api(config.databricks, endpoint), on_request=on_request, on_credential=on_credential
    )
    return EndpointDialer(endpoint, creds, metrics=metrics)


def client_tls_context(config: Config) -> ssl.SSLContext | None:
    """Server-side TLS for clients (LAKEPROXY_TLS_CERT/KEY), or None."""
    if config.tls_cert is None or config.tls_key is None or config.client_tls == "off":
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.tls_cert, config.tls_key)
    ctx.set_alpn_protocols(["postgresql"])
    return ctx


def client_authenticator(config: Config) -> Callable[[], ClientAuthenticator] | None:
    """SCRAM-SHA-256 for clients (LAKEPROXY_CLIENT_PASSWORD), or None (trust).

    The salted verifier is derived here, once, not per connection.
    """
    if config.client_password is None:
        return None
    verifier = ScramVerifier.from_password(config.client_password)
    return lambda: ScramAuthenticator(verifier)


class Runtime:
    """One process's proxy: dialers, server, reload."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()
        self.dialers = [build_dialer(config, ep, metrics) for ep in config.endpoints]
        self.server = ProxyServer(
            config,
            [Endpoint(d.config, d, d.credentials.ready) for d in self.dialers],
            metrics=metrics,
            authenticator=client_authenticator(config),
            tls_context=client_tls_context(config),
        )

    def describe_endpoints(self) -> list[str]:
        return [d.describe() for d in self.dialers]

    async def start(self, *, warm: bool = True) -> None:
        """Bind the listeners; with ``warm``, start minting a credential in the background."""
        await self.server.start()
        if warm:
            for d in self.dialers:
                self._spawn(self._warm(d))

    async def _warm(self, dialer: EndpointDialer) -> None:
        loop = asyncio.get_running_loop()
        try:
            await dialer.credentials.get(deadline=loop.time() + self.config.connect_deadline)
        except CredentialError as exc:
            log.warning("could not mint a credential for %s yet: %s", dialer.config.label, exc)
        except Exception:
            log.exception("credential warm-up failed")

    def reload(self) -> None:
        """SIGHUP: re-read the configuration; new connections use the new settings."""
        try:
            new = reload_config(self.config, env=os.environ)
        except ConfigError as exc:
            log.error("reload failed, keeping the old configuration: %s", exc)
            return
        if len(new.endpoints) != len(self.config.endpoints):
            log.error("reload failed, keeping the old configuration: the number of endpoints "
                      "changed (%d -> %d); restart to apply that",
                      len(self.config.endpoints), len(new.endpoints))
            return
        if [ep.listen for ep in new.endpoints] != [ep.listen for ep in self.config.endpoints]:
            log.warning("reload: listener changes need a restart; other changes apply")
        try:
            authenticator = client_authenticator(new)
            tls_context = client_tls_context(new)
        except (OSError, ssl.SSLError) as exc:
            log.error("reload failed, keeping the old configuration: client TLS: %s", exc)
            return
        # CA files are read again even where no setting changed (a CA rotated
        # in place); kept dialers get the new contexts too.
        clear_ssl_context_cache()
        try:
            for ep in new.endpoints:
                make_ssl_context(ep.sslmode, ep.sslrootcert)
        except ConfigError as exc:
            log.error("reload failed, keeping the old configuration: %s", exc)
            return
        old = self.dialers
        kept: list[EndpointDialer] = []
        try:
            dialers: list[EndpointDialer] = []
            for i, ep in enumerate(new.endpoints):
                prev = old[i] if i < len(old) else None
                if prev is not None and _same_upstream(self.config, prev.config, new, ep):
                    # Same identity and endpoint: keep the dialer and its credentials.
                    kept.append(prev)
                    dialers.append(prev)
                else:
                    dialers.append(build_dialer(new, ep, self.metrics))
        except (LakeproxyError, OSError, ssl.SSLError) as exc:
            log.error("reload failed, keeping the old configuration: %s", exc)
            return
        self.config = new
        self.dialers = dialers
        for d in kept:
            try:
                d.reload_tls()  # from the files just loaded (a fallback dialer builds its own)
            except ConfigError as exc:  # the file changed again since: keep the old context
                log.error("reload: %s keeps its TLS context: %s", d.config.label, exc)
        self.server.reconfigure(
            new,
            [Endpoint(ep, d, d.credentials.ready)
             for ep, d in zip(new.endpoints, dialers, strict=True)],
            authenticator=authenticator,
            tls_context=tls_context,
        )
        log.info("configuration reloaded from %s", new.config_file or "environment")
        for d in dialers:
            if not any(d is k for k in kept):
                self._spawn(self._warm(d))  # readiness needs a credential for each
        for d in old:
            if not any(d is k for k in kept):
                self._spawn(d.close())

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for d in self.dialers:
            await d.close()


def _same_upstream(
    old_config: Config, old: EndpointConfig, new_config: Config, new: EndpointConfig
) -> bool:
    """True when a reload leaves how ``old`` is reached unchanged (so its dialer and
    cached credentials can be kept); ``database``, ``listen`` and ``pool_mode`` do not
    matter here."""
    return old_config.databricks == new_config.databricks and (
        dataclasses.replace(old, database="", listen=(), pool_mode="off")
        == dataclasses.replace(new, database="", listen=(), pool_mode="off")
    )

