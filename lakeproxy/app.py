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
import resource
import signal
import ssl
from collections.abc import Callable, Coroutine, Sequence

from lakeproxy import memory
from lakeproxy.admin import AdminServer
from lakeproxy.client_auth import ScramAuthenticator, ScramVerifier
from lakeproxy.config import Config, EndpointConfig, Listener, reload_config
from lakeproxy.errors import ConfigError, CredentialError, LakeproxyError
from lakeproxy.fds import FDS_PER_CLIENT, FDS_RESERVED, clients_allowed, raise_open_files_limit
from lakeproxy.log import add_secret
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


def unguarded_listeners(open_listeners: Sequence[Listener], config: Config) -> list[Listener]:
    """The non-loopback listeners among ``open_listeners`` that ``config`` would
    leave without client authentication (the start-up rule, applied to the
    listeners actually open: a reload keeps them whatever its ``listen`` says)."""
    if config.client_password is not None or config.allow_remote_trust:
        return []
    return [lst for lst in open_listeners if not lst.is_loopback]


class Runtime:
    """One process's proxy: dialers, server, reload."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()
        self._retired: list[EndpointDialer] = []  # replaced by a reload, closed later
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
            deadline = loop.time() + self.config.connect_deadline
            await dialer.credentials.get(deadline=deadline)
            role = await dialer.role(deadline=deadline)  # the signed-in identity, if unset
            log.info("endpoint %s: signed in with %s, logging in as %s", dialer.config.label,
                     dialer.credentials.method, role)
        except CredentialError as exc:
            log.warning("could not mint a credential for %s yet: %s", dialer.config.label, exc)
        except Exception:
            log.exception("credential warm-up failed")

    def reload(self) -> None:
        """SIGHUP: re-read the configuration; new connections use the new settings."""
        old_deadline = self.config.connect_deadline
        try:
            new = reload_config(self.config, env=os.environ)
        except ConfigError as exc:
            log.error("reload failed, keeping the old configuration: %s", exc)
            return
        for secret in new.secrets():  # a rotated secret is redacted too
            add_secret(secret)
        if len(new.endpoints) != len(self.config.endpoints):
            log.error("reload failed, keeping the old configuration: the number of endpoints "
                      "changed (%d -> %d); restart to apply that",
                      len(self.config.endpoints), len(new.endpoints))
            return
        unguarded = unguarded_listeners(self.server.open_listeners, new)
        if unguarded:
            log.error(
                "reload failed, keeping the old configuration: %s stays open (listeners change "
                "only on restart) and is not a loopback address, so the new configuration "
                "would let anyone who can reach it connect without a password; keep "
                "LAKEPROXY_CLIENT_PASSWORD set, or restart to apply the new listen",
                ", ".join(lst.describe() for lst in unguarded),
            )
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
        for warning in new.warnings:
            log.warning("%s", warning)
        for d in dialers:
            if not any(d is k for k in kept):
                self._spawn(self._warm(d))  # readiness needs a credential for each
        grace = max(old_deadline, new.connect_deadline)
        for d in old:
            if not any(d is k for k in kept):
                # Sessions that began before the reload may still be dialing through
                # it (credential, status, a retry's refresh): close it only once
                # their connect deadline has passed.
                self._retired.append(d)
                self._spawn(self._retire(d, grace))

    async def _retire(self, dialer: EndpointDialer, after: float) -> None:
        await asyncio.sleep(after)
        if dialer in self._retired:
            self._retired.remove(dialer)
            await dialer.close()

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        retired, self._retired = self._retired, []
        for d in [*self.dialers, *retired]:
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


def check_open_files(max_clients: int) -> None:
    """Raise the soft open-files limit to the hard one; log what it allows.

    One INFO line with the limit and the ``max_clients`` it leaves room for; a
    WARNING when ``max_clients`` needs more (clients past the limit would be
    refused with 53300 "out of file descriptors").
    """
    before, soft, hard = raise_open_files_limit()
    allowed = clients_allowed(soft)
    unlimited = soft == resource.RLIM_INFINITY
    limit = "unlimited" if unlimited else str(soft)
    raised = f", raised from {before}" if soft != before else ""
    hard_text = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    log.info("open files limit %s (hard %s%s): room for max_clients %s (configured %d)",
             limit, hard_text, raised, "any" if unlimited else allowed, max_clients)
    if not unlimited and max_clients > allowed:
        log.warning(
            "open files limit %d leaves room for %d clients, but LAKEPROXY_MAX_CLIENTS is %d "
            "(each client needs up to %d descriptors, plus %d for the proxy): raise the hard "
            "limit (ulimit -Hn, systemd LimitNOFILE=, docker --ulimit nofile=) or lower "
            "LAKEPROXY_MAX_CLIENTS", soft, allowed, max_clients, FDS_PER_CLIENT, FDS_RESERVED,
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
    # The allocator first, before any helper thread takes an arena of its own.
    log.debug("allocator settings: %s", memory.configure() or "none (not glibc)")
    trimmer = memory.Trimmer()
    check_open_files(config.max_clients)
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
        trimmer.start()
        await stop.wait()
        log.info(
            "shutting down: %d open session(s), grace %.0fs",
            len(server.sessions), config.shutdown_grace,
        )
        await server.drain(config.shutdown_grace)
    finally:
        trimmer.stop()
        remove_signals()
        await runtime.close()
        if admin is not None:
            await admin.stop()
    log.info("lakeproxy stopped")
    return 0
