"""Client authentication: SCRAM-SHA-256 with LAKEPROXY_CLIENT_PASSWORD.

The proxy plays the server's part of SASL with ``scramp`` (a well-kept SCRAM
implementation, so we do not hand-roll the crypto). Any user name is accepted:
the password is the secret, and the role upstream is lakeproxy's own. The
salted keys are derived once at start-up, never per connection.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from scramp import ScramException, ScramMechanism
from scramp.utils import saslprep

from lakeproxy.errors import ClientAuthFailed, ClientProtocolError
from lakeproxy.wire.client_handshake import PasswordReceived
from lakeproxy.wire.codec import (
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    PasswordKind,
    SASLInitialResponse,
    SASLResponse,
    encode,
)

MECHANISM = "SCRAM-SHA-256"
ITERATIONS = 4096
#: Bytes of salt, as PostgreSQL's SCRAM_DEFAULT_SALT_LEN.
SALT_LENGTH = 16


@dataclass(frozen=True, slots=True)
class ScramVerifier:
    """The salted password, as PostgreSQL stores it in pg_authid."""

    salt: bytes = field(repr=False)
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)
    iterations: int

    @classmethod
    def from_password(cls, password: str, *, salt: bytes | None = None) -> ScramVerifier:
        """Derive the verifier as PostgreSQL does (``scram_build_secret``).

        Any password is accepted: one that SASLprep refuses is used as its raw
        bytes (see :func:`password_bytes`). ``salt`` defaults to 16 random bytes.
        """
        if salt is None:
            salt = secrets.token_bytes(SALT_LENGTH)
        salted = hashlib.pbkdf2_hmac("sha256", password_bytes(password), salt, ITERATIONS)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored = hashlib.sha256(client_key).digest()
        server = hmac.digest(salted, b"Server Key", "sha256")
        return cls(salt, stored, server, ITERATIONS)


def password_bytes(password: str) -> bytes:
    """The bytes SCRAM salts for ``password``, as PostgreSQL and libpq choose them.

    Both SASLprep the password (RFC 4013) and, when it is not valid UTF-8 or
    SASLprep refuses it (a control character, a bidi mix, an unassigned code
    point, ...), use the password as it is (PostgreSQL auth-scram.c,
    ``pg_be_scram_build_secret``; libpq fe-auth-scram.c). A value read from the
    environment that is not valid UTF-8 holds its bytes as surrogate escapes:
    those bytes are used.
    """
    try:
        prepared: str = saslprep(password)
        return prepared.encode("utf-8")
    except (ScramException, UnicodeEncodeError):
        return password.encode("utf-8", "surrogateescape")


class ScramAuthenticator:
    """One client's SCRAM-SHA-256 exchange (implements session.ClientAuthenticator)."""

    def __init__(self, verifier: ScramVerifier) -> None:
        v = verifier
        self._server = ScramMechanism(MECHANISM).make_server(
            lambda _user: (v.salt, v.stored_key, v.server_key, v.iterations)
        )
        self._step = 0

    def start(self) -> tuple[bytes, PasswordKind]:
        return encode(AuthenticationSASL((MECHANISM,))), PasswordKind.SASL_INITIAL

    def step(self, message: PasswordReceived) -> tuple[bytes, PasswordKind | None]:
        msg = message.message
        try:
            if self._step == 0:
                if not isinstance(msg, SASLInitialResponse) or msg.data is None:
                    raise ClientProtocolError("expected SASLInitialResponse")
                if msg.mechanism != MECHANISM:
                    raise ClientProtocolError(
                        f"client selected an invalid SASL authentication mechanism: "
                        f"{msg.mechanism}"
                    )
                first = msg.data.decode("utf-8")
                stand_in = _with_user_name(first)
                self._server.set_client_first(stand_in)
                if stand_in != first:
                    # The proof covers the message as the client sent it.
                    self._server.client_first_bare = _bare(first)
                self._step = 1
                first = self._server.get_server_first().encode()
                return encode(AuthenticationSASLContinue(first)), PasswordKind.SASL_RESPONSE
            if not isinstance(msg, SASLResponse):
                raise ClientProtocolError("expected SASLResponse")
            self._server.set_client_final(msg.data.decode("utf-8"))
            final = self._server.get_server_final().encode()
            self._step = 2
            return encode(AuthenticationSASLFinal(final)), None
        except ScramException as exc:
            raise _auth_failed() from exc
        except UnicodeDecodeError as exc:
            raise ClientProtocolError("malformed SCRAM message") from exc


def _bare(client_first: str) -> str:
    """client-first-message-bare: what follows the GS2 header ``n,,`` (RFC 5802)."""
    parts = client_first.split(",", 2)
    if len(parts) < 3:
        raise ClientProtocolError("malformed SCRAM client-first-message")
    return parts[2]


def _with_user_name(client_first: str) -> str:
    """``client_first`` with a stand-in for an empty user name.

    libpq sends ``n=,`` (PostgreSQL ignores the SCRAM user name and uses the
    startup packet's), which scramp refuses as an empty attribute. scramp only
    passes the name to the (name-blind) verifier lookup, so a stand-in is
    harmless; the caller restores the original bare message for the proof.
    """
    bare = _bare(client_first)
    if not bare.startswith("n=,"):
        return client_first
    header = client_first[: len(client_first) - len(bare)]
    return header + "n=*" + bare[len("n="):]


def _auth_failed() -> ClientAuthFailed:
    return ClientAuthFailed(
        "client password authentication failed",
        client_message="lakeproxy: password authentication failed",
        hint="use the password set in LAKEPROXY_CLIENT_PASSWORD",
    )
