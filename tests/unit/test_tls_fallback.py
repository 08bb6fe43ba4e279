"""EndpointDialer's key-exchange fallback, with real OpenSSL handshakes.

lakeproxy offers only P-256 upstream. A server that accepts only X25519 answers
with a handshake_failure alert; the dialer then offers OpenSSL's default groups
for that endpoint from then on. The connection attempts here are in-memory TLS
handshakes between the dialer's own context and such a server (the rest of the
login is not the point and is left out).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Mapping
from pathlib import Path

import pytest

from lakeproxy import endpoint as endpoint_mod
from lakeproxy.auth.provider import Credential
from lakeproxy.config import load_config
from lakeproxy.emulator.certs import TlsFiles, make_certs
from lakeproxy.endpoint import EndpointDialer
from lakeproxy.errors import UpstreamConnectError
from lakeproxy.upstream import clear_ssl_context_cache, handshake_refused

HOST = "ep.test"


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> None:
    """A TLS handshake in memory; raises the client's SSLError if it fails."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=HOST)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        with contextlib.suppress(ssl.SSLWantReadError):
            c.do_handshake()
            return
        with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLError):
            s.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    raise AssertionError("the handshake did not finish")


class _Creds:
    def __init__(self) -> None:
        self.gets = 0

    async def get(self, *, deadline: float) -> Credential:
        self.gets += 1
        return Credential(token="tok", issued_at=0.0, expires_at=1e12, expires_wall=1e12)

    def invalidate(self, cred: Credential) -> None:
        pass


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return make_certs(tmp_path, [HOST])


def _dialer(tls: TlsFiles) -> EndpointDialer:
    env: Mapping[str, str] = {
        "DATABRICKS_HOST": "https://env.cloud.databricks.com",
        "DATABRICKS_CLIENT_ID": "env-client",
        "DATABRICKS_CLIENT_SECRET": "s3cr3t",
        "ENDPOINT_NAME": "projects/p/branches/b/endpoints/env",
        "PGHOST": HOST,
        "PGSSLROOTCERT": str(tls.ca_file),
        "HOME": "/nonexistent",
    }
    config = load_config(env=env, argv={}, config_file=None)
    clear_ssl_context_cache()
    return EndpointDialer(config.endpoints[0], _Creds())  # type: ignore[arg-type]


def _server(tls: TlsFiles, group: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    ctx.set_ecdh_curve(group)
    return ctx


def _fake_connect(server: ssl.SSLContext, contexts: list[ssl.SSLContext]) -> object:
    async def connect_with_retry(target: object, token: str, params: object, *,
                                 deadline: float, ssl_context: ssl.SSLContext,
                                 **_: object) -> str:
        contexts.append(ssl_context)
        await asyncio.sleep(0)  # let concurrent attempts interleave
        try:
            _handshake(ssl_context, server)
        except ssl.SSLError as exc:
            raise UpstreamConnectError(f"cannot connect: {exc}", retryable=False) from exc
        return "connected"

    return connect_with_retry


def _rig(tls: TlsFiles, monkeypatch: pytest.MonkeyPatch,
         server: ssl.SSLContext) -> tuple[EndpointDialer, list[ssl.SSLContext]]:
    """A dialer whose connection attempts are handshakes with ``server``, and
    the list of the contexts those attempts used."""
    contexts: list[ssl.SSLContext] = []
    monkeypatch.setattr(endpoint_mod, "connect_with_retry", _fake_connect(server, contexts))
    return _dialer(tls), contexts


def _connect(dialer: EndpointDialer, n: int = 1) -> list[object]:
    """``n`` connections through ``dialer`` at once; their results."""
    async def main() -> list[object]:
        deadline = asyncio.get_running_loop().time() + 10
        return list(await asyncio.gather(
            *(dialer.connect({"user": "u"}, deadline=deadline) for _ in range(n))))

    return asyncio.run(main())


def test_the_alert_of_a_server_without_p256_is_recognised(tls: TlsFiles) -> None:
    dialer = _dialer(tls)
    with pytest.raises(ssl.SSLError) as info:
        _handshake(dialer.ssl_context, _server(tls, "X25519"))
    assert handshake_refused(info.value)
    wrapped = UpstreamConnectError("cannot connect", retryable=False)
    wrapped.__cause__ = info.value
    assert handshake_refused(wrapped)
    # other failures are not mistaken for it
    assert not handshake_refused(ssl.SSLError(1, "bad record mac"))
    assert not handshake_refused(ConnectionResetError())
    assert not handshake_refused(None)


def test_the_dialer_falls_back_once_and_stays_there(
    tls: TlsFiles, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dialer, contexts = _rig(tls, monkeypatch, _server(tls, "X25519"))
    first = dialer.ssl_context

    # several first connections at once: all succeed, one switch
    with caplog.at_level(logging.WARNING, logger="lakeproxy.endpoint"):
        assert _connect(dialer, 4) == ["connected"] * 4
    assert dialer.ssl_context is not first
    switches = [r for r in caplog.records if "offering only P-256" in r.getMessage()]
    assert len(switches) == 1
    assert contexts[:4] == [first] * 4  # each first attempt offered P-256 only
    assert all(c is dialer.ssl_context for c in contexts[4:])
    # later connections go straight to the fallback; a reload keeps it
    contexts.clear()
    dialer.reload_tls()
    assert _connect(dialer, 4) == ["connected"] * 4
    assert len(contexts) == 4
    assert all(c is dialer.ssl_context for c in contexts)


def test_a_server_with_p256_needs_no_fallback(
    tls: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    dialer, contexts = _rig(tls, monkeypatch, _server(tls, "prime256v1"))
    first = dialer.ssl_context

    assert _connect(dialer) == ["connected"]
    assert contexts == [first]
    assert dialer.ssl_context is first


def test_other_failures_are_not_retried_with_other_groups(
    tls: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = make_certs(tls.ca_file.parent / "other", [HOST])  # a CA we do not trust
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(other.cert_file, other.key_file)
    dialer, contexts = _rig(tls, monkeypatch, server)
    first = dialer.ssl_context

    with pytest.raises(UpstreamConnectError):
        _connect(dialer)
    assert contexts == [first]
    assert dialer.ssl_context is first
