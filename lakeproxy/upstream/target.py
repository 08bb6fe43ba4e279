"""Where the endpoint is, and the TLS contexts that check it.

:class:`UpstreamTarget` is one resolved endpoint address; :func:`make_ssl_context`
builds (once per CA file and mode) the client context every dial uses.
"""

from __future__ import annotations

import os
import ssl
import threading
from dataclasses import dataclass
from typing import Final, Literal

from lakeproxy.errors import ConfigError

SslMode = Literal["require", "verify-ca", "verify-full"]
SSL_MODES: Final = ("require", "verify-ca", "verify-full")


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where the endpoint is and how to check it.

    ``host``: the name sent as SNI (Lakebase routes on it; Python's ssl sends
    no SNI for an IP literal) and checked against the certificate;
    ``hostaddr``: an IP address to dial instead of resolving ``host`` (libpq's
    LAKEBASE_HOSTADDR); ``sslmode``: ``require`` (encrypt; with a CA file also
    the chain, as libpq does), ``verify-ca`` (chain) or ``verify-full`` (chain
    and host name).
    """

    host: str
    port: int = 5432
    hostaddr: str | None = None
    sslmode: SslMode = "verify-full"

    @property
    def dial_host(self) -> str:
        """The address TCP connects to."""
        return self.hostaddr or self.host

    def __str__(self) -> str:
        via = f" (via {self.hostaddr})" if self.hostaddr else ""
        return f"{self.host}:{self.port}{via}"


# ---------------------------------------------------------------------------- TLS contexts

_contexts: dict[tuple[str, str, str], ssl.SSLContext] = {}
_contexts_lock = threading.Lock()


#: The one key-exchange group offered to the endpoint (see _build_ssl_context).
UPSTREAM_TLS_GROUP: Final = "prime256v1"

#: Key-exchange groups a context offers: ``p256`` (:data:`UPSTREAM_TLS_GROUP`
#: only, the default) or ``default`` (OpenSSL's list, X25519 first), the
#: fallback for an endpoint that refuses P-256 (see :func:`handshake_refused`).
TlsGroups = Literal["p256", "default"]


def make_ssl_context(
    sslmode: str, sslrootcert: str = "system", *, groups: TlsGroups = "p256"
) -> ssl.SSLContext:
    """Return the client TLS context for ``(sslmode, sslrootcert)``, built once
    and shared by every later call with the same pair.

    ``sslrootcert`` is a CA bundle file, or ``system`` for the system CAs. The
    CAs are loaded into memory once: no CA directory is searched during
    handshakes (``ssl.create_default_context()`` installs a lazily searched
    directory that OpenSSL 3 re-reads on every handshake). ``require`` with a
    CA file checks the chain but not the host name (libpq's rule: a root
    certificate file makes ``require`` behave as ``verify-ca``); ``require``
    with ``system`` checks nothing but still encrypts.

    Raises:
        ConfigError: unknown ``sslmode``, or no CA could be loaded.
    """
    key = (sslmode, sslrootcert, groups)
    with _contexts_lock:
        ctx = _contexts.get(key)
        if ctx is None:
            ctx = _build_ssl_context(sslmode, sslrootcert, groups)
            _contexts[key] = ctx
        return ctx


def clear_ssl_context_cache() -> None:
    """Forget the contexts built so far (after the CA files changed, e.g. on SIGHUP)."""
    with _contexts_lock:
        _contexts.clear()


def handshake_refused(exc: BaseException | None) -> bool:
    """True when ``exc``, or an exception it was raised from, is the endpoint's
    handshake_failure alert: what a server sends when it shares no key-exchange
    group (or cipher) with the ClientHello."""
    while exc is not None:
        if (isinstance(exc, ssl.SSLError)
                and getattr(exc, "reason", None) == "SSLV3_ALERT_HANDSHAKE_FAILURE"):
            return True
        exc = exc.__cause__
    return False


def _build_ssl_context(sslmode: str, sslrootcert: str, groups: TlsGroups) -> ssl.SSLContext:
    if sslmode not in SSL_MODES:
        raise ConfigError([
            f"LAKEBASE_SSLMODE={sslmode!r} is not supported: use require, verify-ca or verify-full"
        ])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Offer (and send a key share for) P-256 only: the group every TLS 1.3
    # server must support (RFC 8446, 9.1), and the only one a PostgreSQL
    # server accepts with its default ssl_ecdh_curve. OpenSSL's default
    # offers X25519 first, which such a server answers with a
    # HelloRetryRequest: one more round trip and key pair per connection
    # (benchmarks/README.md, "new connections"). An endpoint that refuses it
    # gets OpenSSL's default list instead (EndpointDialer.connect).
    if groups == "p256":
        ctx.set_ecdh_curve(UPSTREAM_TLS_GROUP)
    if sslmode == "require" and sslrootcert == "system":
        # libpq: require without a root certificate file encrypts only.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    # libpq (fe-secure-openssl.c): "If the root cert file exists, the behavior
    # of sslmode=require will be the same as that of verify-ca": the chain is
    # checked, the host name is not. Sending the credential to an endpoint the
    # given CA did not sign would give it away.
    ctx.check_hostname = sslmode == "verify-full"
    ctx.verify_mode = ssl.CERT_REQUIRED
    if sslrootcert == "system":
        _load_system_cas(ctx)
    else:
        try:
            ctx.load_verify_locations(cafile=sslrootcert)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError([
                f"LAKEBASE_SSLROOTCERT={sslrootcert}: cannot load CA certificates: {exc}"
            ]) from None
    return ctx


def _load_system_cas(ctx: ssl.SSLContext) -> None:
    paths = ssl.get_default_verify_paths()
    if paths.cafile and os.path.isfile(paths.cafile):
        ctx.load_verify_locations(cafile=paths.cafile)
        return
    pems: list[str] = []
    if paths.capath and os.path.isdir(paths.capath):
        for entry in sorted(os.scandir(paths.capath), key=lambda e: e.name):
            if not entry.is_file():
                continue
            try:
                with open(entry.path, encoding="ascii", errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            if "-----BEGIN CERTIFICATE-----" in text and text not in pems:
                pems.append(text)
    if pems:
        ctx.load_verify_locations(cadata="\n".join(pems))
        return
    raise ConfigError([
        f"LAKEBASE_SSLROOTCERT=system: no system CA certificates found (looked for {paths.cafile} "
        f"and {paths.capath}); set LAKEBASE_SSLROOTCERT to a CA bundle file"
    ])
