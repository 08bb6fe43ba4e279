"""The wiring: configuration in, a serving process out.

:class:`Runtime` builds one :class:`~lakeproxy.upstream.dialer.EndpointDialer`
(credentials + TLS login + retries) per ``[[endpoints]]`` entry and the
:class:`~lakeproxy.server.ProxyServer` around them, and re-reads the
configuration on SIGHUP. :func:`serve` is ``lakeproxy run``: admin server,
listeners, signals, drain.

This is the top of the import graph: it imports the server, the dialers and
the credentials; nothing below imports it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import ssl
from collections.abc import Callable, Coroutine

from lakeproxy.admin import AdminServer
from lakeproxy.client_auth import ScramAuthenticator, ScramVerifier
from lakeproxy.config import Config, EndpointConfig, reload_config
from lakeproxy.errors import ConfigError, CredentialError, LakeproxyError
from lakeproxy.metrics import Metrics
from lakeproxy.server import Endpoint, ProxyServer, bind_error
from lakeproxy.session import ClientAuthenticator
from lakeproxy.upstream import clear_ssl_context_cache, make_ssl_context
from lakeproxy.upstream.dialer import EndpointDialer, build_dialer

log = logging.getLogger("lakeproxy.app")


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


def _install_signals(
    loop: asyncio.AbstractEventLoop, stop: asyncio.Event, reload: Callable[[], None]
) -> Callable[[], None]:
    count = 0

    def on_stop(signum: int) -> None:
        nonlocal count
        count += 1
        if count > 1 and signum == signal.SIGINT:
            log.warning("second SIGINT: exiting now")
            os._exit(130)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, reload)

    def remove() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    return remove


async def serve(config: Config, *, ready: Callable[[ProxyServer], None] | None = None) -> int:
    """``lakeproxy run``: serve until SIGTERM/SIGINT, then drain.

    Returns the exit code: 0 after a drain, 1 when a listener or the admin
    server cannot be bound (logged as one line).
    """
    loop = asyncio.get_running_loop()
    metrics = Metrics()
    runtime = Runtime(config, metrics)
    server = runtime.server
    admin: AdminServer | None = None
    stop = asyncio.Event()
    remove_signals = _install_signals(loop, stop, runtime.reload)
    try:
        try:
            if config.admin_listen is not None:
                admin = AdminServer(server, metrics)
                host, port = config.admin_listen
                try:
                    await admin.start(host, port)
                except OSError as exc:
                    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                    raise bind_error(f"cannot serve the admin endpoints on {where}",
                                      exc) from exc
            await runtime.start()
        except OSError as exc:
            log.error("%s", exc)  # one line, no traceback: the address is the problem
            return 1
        log.info(
            "lakeproxy listening on %s for %s%s",
            ", ".join(server.bound),
            ", ".join(runtime.describe_endpoints()),
            f"; admin on {config.admin_listen[0]}:{admin.port}" if admin is not None
            and config.admin_listen is not None else "",
        )
        if ready is not None:
            ready(server)
        await stop.wait()
        log.info(
            "shutting down: %d open session(s), grace %.0fs",
            len(server.sessions), config.shutdown_grace,
        )
        await server.drain(config.shutdown_grace)
    finally:
        remove_signals()
        await runtime.close()
        if admin is not None:
            await admin.stop()
    log.info("lakeproxy stopped")
    return 0
