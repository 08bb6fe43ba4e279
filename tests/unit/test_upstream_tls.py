"""TLS helpers of lakeproxy.upstream (context cache, key exchange, channel binding
data) and EndpointDialer's key-exchange fallback."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import ssl
from collections.abc import Mapping
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from lakeproxy.auth.provider import Credential
from lakeproxy.config import load_config
from lakeproxy.emulator.certs import TlsFiles, make_certs
from lakeproxy.errors import ConfigError, UpstreamConnectError
from lakeproxy.upstream import (
    UpstreamTarget,
    clear_ssl_context_cache,
    handshake_refused,
    make_ssl_context,
    tls_server_end_point,
)
from lakeproxy.upstream import dialer as dialer_mod
from lakeproxy.upstream.dialer import EndpointDialer

HOST = "pg.test"
_Hash = hashes.SHA224 | hashes.SHA256 | hashes.SHA384 | hashes.SHA512
_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_EC = ec.generate_private_key(ec.SECP256R1())


def _cert(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
          algorithm: _Hash | None, *, pss: bool = False) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if pss:
        assert isinstance(key, rsa.RSAPrivateKey)
        assert algorithm is not None
        cert = builder.sign(key, algorithm, rsa_padding=padding.PSS(
            mgf=padding.MGF1(algorithm), salt_length=padding.PSS.DIGEST_LENGTH))
    else:
        cert = builder.sign(key, algorithm)
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("key", "algorithm", "pss", "expected"),
    [
        (_RSA, hashes.SHA256(), False, "sha256"),
        (_RSA, hashes.SHA384(), False, "sha384"),
        (_RSA, hashes.SHA512(), False, "sha512"),
        (_RSA, hashes.SHA224(), False, "sha224"),
        (_EC, hashes.SHA256(), False, "sha256"),
        (_EC, hashes.SHA384(), False, "sha384"),
        (_RSA, hashes.SHA384(), True, "sha384"),
    ],
    ids=["rsa-sha256", "rsa-sha384", "rsa-sha512", "rsa-sha224", "ecdsa-sha256",
         "ecdsa-sha384", "rsa-pss-sha384"],
)
def test_tls_server_end_point_uses_the_signature_hash(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, algorithm: _Hash,
    pss: bool, expected: str,
) -> None:
    der = _cert(key, algorithm, pss=pss)
    got = x509.load_der_x509_certificate(der).signature_hash_algorithm
    assert got is not None
    assert got.name == expected
    assert tls_server_end_point(der) == hashlib.new(expected, der).digest()


def test_tls_server_end_point_sha1_becomes_sha256() -> None:
    # cryptography refuses to sign with SHA-1 now: rewrite the algorithm OIDs of
    # an RSA-SHA256 certificate into sha1WithRSAEncryption (same length; the
    # signature no longer verifies, which does not matter for the binding).
    der = _cert(_RSA, hashes.SHA256())
    sha256_rsa = bytes.fromhex("2a864886f70d01010b")
    sha1_rsa = bytes.fromhex("2a864886f70d010105")
    assert der.count(sha256_rsa) == 2
    der = der.replace(sha256_rsa, sha1_rsa)
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()


def test_tls_server_end_point_undefined_or_garbage() -> None:
    ed = ed25519.Ed25519PrivateKey.generate()
    assert tls_server_end_point(_cert(ed, None)) is None
    assert tls_server_end_point(b"") is None
    assert tls_server_end_point(b"\x30\x82\xff\xff\x00") is None
    assert tls_server_end_point(_cert(_EC, hashes.SHA256())[:50]) is None


def test_ssl_contexts_are_built_once_per_mode_and_ca(tmp_path: Path) -> None:
    clear_ssl_context_cache()
    a = make_ssl_context("verify-full", "system")
    assert make_ssl_context("verify-full", "system") is a
    assert make_ssl_context("verify-ca", "system") is not a
    assert a.check_hostname
    assert a.verify_mode == ssl.CERT_REQUIRED
    ca = make_ssl_context("verify-ca", "system")
    assert not ca.check_hostname
    assert ca.verify_mode == ssl.CERT_REQUIRED
    req = make_ssl_context("require", "system")
    assert not req.check_hostname
    assert req.verify_mode == ssl.CERT_NONE
    assert req.minimum_version >= ssl.TLSVersion.TLSv1_2
    clear_ssl_context_cache()
    assert make_ssl_context("verify-full", "system") is not a


def test_system_cas_are_loaded_into_memory_without_a_lookup_dir() -> None:
    clear_ssl_context_cache()
    ctx = make_ssl_context("verify-full", "system")
    stats = ctx.cert_store_stats()
    assert stats["x509_ca"] > 10  # the bundle was read, not left to a lazy directory lookup


def test_bad_mode_and_missing_ca_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="LAKEBASE_SSLMODE"):
        make_ssl_context("prefer", "system")
    with pytest.raises(ConfigError, match="LAKEBASE_SSLROOTCERT"):
        make_ssl_context("verify-full", str(tmp_path / "missing.pem"))


def test_target_dial_host_and_str() -> None:
    t = UpstreamTarget("ep.example.com", 5432, hostaddr="10.0.0.1", sslmode="verify-ca")
    assert t.dial_host == "10.0.0.1"
    assert str(t) == "ep.example.com:5432 (via 10.0.0.1)"
    assert UpstreamTarget("ep.example.com").dial_host == "ep.example.com"


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> ssl.SSLObject:
    """A TLS handshake in memory, until the client's side completes; returns
    the client's SSLObject, or raises the client's SSLError."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=HOST)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        with contextlib.suppress(ssl.SSLWantReadError):
            c.do_handshake()
            return c
        with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLError):
            s.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    raise AssertionError("the handshake did not finish")


def _server(tls: TlsFiles, group: str | None = None) -> ssl.SSLContext:
    """A TLS server context for ``tls``, accepting only ``group`` if given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if group is not None:
        ctx.set_ecdh_curve(group)
    return ctx


def _server_hellos(client: ssl.SSLContext, server: ssl.SSLContext) -> int:
    """Count the ServerHellos the client reads in a TLS 1.3 handshake (2 when
    the server answered the first ClientHello with a HelloRetryRequest, which
    is a ServerHello on the wire)."""
    seen: list[object] = []

    def record(conn: object, direction: object, version: object, content_type: object,
               msg_type: object, data: bytes) -> None:
        if direction == "read" and getattr(msg_type, "name", None) == "SERVER_HELLO":
            seen.append(msg_type)

    client._msg_callback = record  # type: ignore[attr-defined]
    try:
        assert _handshake(client, server).version() == "TLSv1.3"
    finally:
        client._msg_callback = None  # type: ignore[attr-defined]
    return len(seen)


def test_no_hello_retry_from_a_postgresql_default_server(tmp_path: Path) -> None:
    # PostgreSQL's default ssl_ecdh_curve (prime256v1) accepts P-256 only:
    # OpenSSL's default client offers X25519 first and gets a HelloRetryRequest;
    # lakeproxy's context offers P-256 and does not.
    files = make_certs(tmp_path, [HOST])
    server = _server(files, "prime256v1")
    default = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    default.load_verify_locations(files.ca_file)
    assert _server_hellos(default, server) == 2
    clear_ssl_context_cache()
    ours = make_ssl_context("verify-full", str(files.ca_file))
    assert _server_hellos(ours, server) == 1
    # and a server with OpenSSL's default groups (X25519 first) still agrees
    assert _server_hellos(ours, _server(files)) == 1
    clear_ssl_context_cache()


# --------------------------------------------------------------------------- key-exchange fallback
# lakeproxy offers only P-256 upstream. A server that accepts only X25519
# answers with a handshake_failure alert; EndpointDialer then offers OpenSSL's
# default groups for that endpoint from then on. The connection attempts here
# are in-memory handshakes between the dialer's own context and such a server
# (the rest of the login is not the point and is left out).


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
    monkeypatch.setattr(dialer_mod, "connect_with_retry", _fake_connect(server, contexts))
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
    with caplog.at_level(logging.WARNING, logger="lakeproxy.upstream"):
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
