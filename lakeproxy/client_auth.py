"""Client authentication: SCRAM-SHA-256 with LAKEPROXY_CLIENT_PASSWORD.

The proxy plays the server's part of SASL with ``scramp`` (a well-kept SCRAM
implementation, so we do not hand-roll the crypto). Any user name is accepted:
the password is the secret, and the role upstream is lakeproxy's own. The
salted keys are derived once at start-up, never per connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scramp import ScramException, ScramMechanism

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


@dataclass(frozen=True, slots=True)
class ScramVerifier:
    """The salted password, as PostgreSQL stores it in pg_authid."""

    salt: bytes = field(repr=False)
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)
    iterations: int

    @classmethod
    def from_password(cls, password: str) -> ScramVerifier:
        salt, stored, server, iterations = ScramMechanism(MECHANISM).make_auth_info(
            password, iteration_count=ITERATIONS
        )
        return cls(salt, stored, server, iterations)


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
