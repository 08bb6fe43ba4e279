"""ScramAuthenticator against a SCRAM-SHA-256 client written from RFC 5802/7677.

The client sends what libpq sends: an empty user name (``n=,``), since
PostgreSQL takes the user from the startup packet. The integration tests run
the real clients (psql, psycopg, asyncpg) against the proxy.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

import pytest
from scramp import ScramException, ScramMechanism
from scramp.utils import saslprep

from lakeproxy.client_auth import ScramAuthenticator, ScramVerifier, password_bytes
from lakeproxy.errors import ClientAuthFailed, ClientProtocolError
from lakeproxy.wire.client_handshake import PasswordReceived
from lakeproxy.wire.codec import (
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    PasswordKind,
    SASLInitialResponse,
    SASLResponse,
    decode_backend,
)

PASSWORD = "correct horse battery staple"


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _exchange(auth: ScramAuthenticator, password: str, *, user: str = "",
              gs2: str = "n,,") -> bytes:
    """Run one exchange as a client would; returns the server's final message."""
    out, first_kind = auth.start()
    assert first_kind is PasswordKind.SASL_INITIAL
    sasl = decode_backend(out)
    assert isinstance(sasl, AuthenticationSASL)
    assert sasl.mechanisms == ("SCRAM-SHA-256",)

    nonce = base64.b64encode(secrets.token_bytes(18)).decode()
    bare = f"n={user},r={nonce}"
    out, next_kind = auth.step(PasswordReceived(
        SASLInitialResponse("SCRAM-SHA-256", (gs2 + bare).encode())))
    assert next_kind is PasswordKind.SASL_RESPONSE
    cont = decode_backend(out)
    assert isinstance(cont, AuthenticationSASLContinue)
    server_first = cont.data.decode()
    attrs = dict(item.split("=", 1) for item in server_first.split(","))
    assert attrs["r"].startswith(nonce)

    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]),
                                 int(attrs["i"]))
    client_key = _hmac(salted, b"Client Key")
    without_proof = f"c={base64.b64encode(gs2.encode()).decode()},r={attrs['r']}"
    auth_message = f"{bare},{server_first},{without_proof}".encode()
    signature = _hmac(hashlib.sha256(client_key).digest(), auth_message)
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    final = f"{without_proof},p={base64.b64encode(proof).decode()}"
    out, last_kind = auth.step(PasswordReceived(SASLResponse(final.encode())))
    assert last_kind is None
    done = decode_backend(out)
    assert isinstance(done, AuthenticationSASLFinal)
    server_key = _hmac(salted, b"Server Key")
    expected = base64.b64encode(_hmac(server_key, auth_message)).decode()
    assert done.data.decode() == f"v={expected}"
    return done.data


@pytest.fixture(scope="module")
def verifier() -> ScramVerifier:
    return ScramVerifier.from_password(PASSWORD)


@pytest.mark.parametrize("user", ["", "alice", "someone=2Celse"])
def test_right_password_any_user_name(verifier: ScramVerifier, user: str) -> None:
    """libpq's empty user name included: the proof is checked over the bytes sent."""
    _exchange(ScramAuthenticator(verifier), PASSWORD, user=user)


def test_gs2_y_flag_is_accepted(verifier: ScramVerifier) -> None:
    """libpq over TLS sends 'y,,' (it could bind, the server offered no -PLUS)."""
    _exchange(ScramAuthenticator(verifier), PASSWORD, gs2="y,,")


@pytest.mark.parametrize("user", ["", "alice"])
def test_wrong_password_is_28p01(verifier: ScramVerifier, user: str) -> None:
    with pytest.raises(ClientAuthFailed) as failed:
        _exchange(ScramAuthenticator(verifier), "wrong", user=user)
    assert failed.value.sqlstate == "28P01"
    assert failed.value.client_message == "lakeproxy: password authentication failed"


def test_malformed_first_message(verifier: ScramVerifier) -> None:
    auth = ScramAuthenticator(verifier)
    auth.start()
    with pytest.raises(ClientProtocolError):
        auth.step(PasswordReceived(SASLInitialResponse("SCRAM-SHA-256", b"garbage")))


def test_verifier_repr_has_no_keys(verifier: ScramVerifier) -> None:
    text = repr(verifier)
    assert verifier.stored_key.hex() not in text
    assert "salt" not in text
    assert "stored_key" not in text
    assert "server_key" not in text


@pytest.mark.parametrize("password", [PASSWORD, "I\u00adX", "\u2168"])  # SASLprep maps both
def test_verifier_is_the_one_scramp_derives(password: str) -> None:
    salt = secrets.token_bytes(16)
    ours = ScramVerifier.from_password(password, salt=salt)
    theirs = ScramMechanism("SCRAM-SHA-256").make_auth_info(password, 4096, salt)
    assert (ours.salt, ours.stored_key, ours.server_key, ours.iterations) == theirs


@pytest.mark.parametrize("password", ["bell\x07ringer", "\u05d0mixed-bidi", "pw\u0221"])
def test_password_saslprep_refuses_is_used_as_its_bytes(password: str) -> None:
    """As PostgreSQL and libpq: a password SASLprep refuses (control character,
    bidi mix, unassigned code point) is salted as it is, not refused."""
    with pytest.raises(ScramException):
        saslprep(password)
    assert password_bytes(password) == password.encode()
    _exchange(ScramAuthenticator(ScramVerifier.from_password(password)), password)


def test_password_that_is_not_utf8_is_used_as_its_bytes() -> None:
    raw = b"caf\xe9-latin1"
    password = raw.decode("utf-8", "surrogateescape")  # as os.environ holds it
    assert password_bytes(password) == raw
