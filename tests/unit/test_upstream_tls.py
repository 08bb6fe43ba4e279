"""TLS helpers of lakeproxy.upstream: context cache and channel binding data."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from lakeproxy.emulator.certs import make_certs
from lakeproxy.errors import ConfigError
from lakeproxy.upstream import (
    UpstreamTarget,
    clear_ssl_context_cache,
    make_ssl_context,
    tls_server_end_point,
)

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
    with pytest.raises(ConfigError, match="PGSSLMODE"):
        make_ssl_context("prefer", "system")
    with pytest.raises(ConfigError, match="PGSSLROOTCERT"):
        make_ssl_context("verify-full", str(tmp_path / "missing.pem"))


def test_target_dial_host_and_str() -> None:
    t = UpstreamTarget("ep.example.com", 5432, hostaddr="10.0.0.1", sslmode="verify-ca")
    assert t.dial_host == "10.0.0.1"
    assert str(t) == "ep.example.com:5432 (via 10.0.0.1)"
    assert UpstreamTarget("ep.example.com").dial_host == "ep.example.com"


def _server_hellos(client: ssl.SSLContext, server: ssl.SSLContext) -> int:
    """Run a TLS 1.3 handshake in memory; count the ServerHellos the client
    read (2 when the server answered the first ClientHello with a
    HelloRetryRequest, which is a ServerHello on the wire)."""
    seen: list[object] = []

    def record(conn: object, direction: object, version: object, content_type: object,
               msg_type: object, data: bytes) -> None:
        if direction == "read" and getattr(msg_type, "name", None) == "SERVER_HELLO":
            seen.append(msg_type)

    client._msg_callback = record  # type: ignore[attr-defined]
    try:
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        c = client.wrap_bio(c_in, c_out, server_hostname="pg.test")
        s = server.wrap_bio(s_in, s_out, server_side=True)
        for _ in range(10):
            for obj in (c, s):
                with contextlib.suppress(ssl.SSLWantReadError):
                    obj.do_handshake()
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        assert c.version() == "TLSv1.3"
    finally:
        client._msg_callback = None  # type: ignore[attr-defined]
    return len(seen)


def test_no_hello_retry_from_a_postgresql_default_server(tmp_path: Path) -> None:
    # PostgreSQL's default ssl_ecdh_curve (prime256v1) accepts P-256 only:
    # OpenSSL's default client offers X25519 first and gets a HelloRetryRequest;
    # lakeproxy's context offers P-256 and does not.
    files = make_certs(tmp_path, ["pg.test"])
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(files.cert_file, files.key_file)
    server.set_ecdh_curve("prime256v1")
    default = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    default.load_verify_locations(files.ca_file)
    assert _server_hellos(default, server) == 2
    clear_ssl_context_cache()
    ours = make_ssl_context("verify-full", str(files.ca_file))
    assert _server_hellos(ours, server) == 1
    # and a server with OpenSSL's default groups (X25519 first) still agrees
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    plain.load_cert_chain(files.cert_file, files.key_file)
    assert _server_hellos(ours, plain) == 1
    clear_ssl_context_cache()
