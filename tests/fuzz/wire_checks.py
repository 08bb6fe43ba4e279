"""The fuzz targets' oracles: feed untrusted bytes to the wire layer, check invariants.

Shared by the atheris harness (:mod:`fuzz_wire`) and the pytest regression and
seed tests, so a finding reproduces without atheris. Each ``check_*`` function
takes one fuzzer input and returns normally when the code under test behaved;
any other outcome is a finding:

* an exception other than :class:`ProtocolError` escaping the wire layer
  (which the session would turn into XX000 "internal error", or worse);
* a frame longer than the limit in force, or whose length field disagrees
  with its size;
* bytes lost, duplicated or reordered between what was fed and what came out
  (frames handed back plus ``trailing_data()``);
* a complete frame left buffered while the caller is told NEED_DATA (a hang);
* a decoded message that does not re-encode to the bytes it came from, or a
  handshake reply that is not what the protocol allows.

Input layouts (all inputs are plain bytes, so any byte string is valid):

* :func:`check_handshake`: ``flags``, ``chunking``, then the client's bytes.
* :func:`check_framing`: ``mode``, ``chunking``, then the stream.
* :func:`check_codec`: ``decoder``, then one frame.
* :func:`check_any`: first byte picks one of the three (mod 3), rest is its input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from lakeproxy.wire import limits
from lakeproxy.wire.client_handshake import (
    MAX_PASSWORD_MESSAGE,
    NEED_DATA,
    CancelRequested,
    ClientHandshake,
    GSSENCRequested,
    PasswordReceived,
    SSLRequested,
    StartupReceived,
    negotiate_bytes,
)
from lakeproxy.wire.codec import (
    AuthenticationSASL,
    BackendKeyData,
    GSSENCRequest,
    Message,
    NegotiateProtocolVersion,
    PasswordKind,
    PasswordMessage,
    SASLInitialResponse,
    SASLResponse,
    SSLRequest,
    StartupMessage,
    decode_backend,
    decode_password,
    decode_startup,
    encode,
    error_response,
)
from lakeproxy.wire.errors import ProtocolError
from lakeproxy.wire.framing import FrameReader

__all__ = [
    "TARGETS",
    "FuzzFinding",
    "check_any",
    "check_codec",
    "check_framing",
    "check_handshake",
    "chunks",
    "handshake_input",
    "seed_inputs",
    "write_seeds",
]

_KINDS: Final = (
    PasswordKind.PASSWORD,
    PasswordKind.SASL_INITIAL,
    PasswordKind.SASL_RESPONSE,
    PasswordKind.PASSWORD,
)
_SSL_FRAME: Final = encode(SSLRequest())
_GSS_FRAME: Final = encode(GSSENCRequest())
#: max_length choices for the framing target (small ones reach the limit checks).
_MAX_LENGTHS: Final = (8, 9, 16, 64, 300, limits.MAX_STARTUP_PACKET, MAX_PASSWORD_MESSAGE,
                       limits.MAX_STARTUP_PHASE_MESSAGE)


class FuzzFinding(AssertionError):
    """An invariant broke (not a ProtocolError: those are the expected refusals)."""


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise FuzzFinding(what)


def chunks(stream: bytes, seed: int) -> Iterator[bytes]:
    """Cut ``stream`` into chunks as TCP might: seed 0 = one chunk, else sizes
    1..seed from a small LCG (deterministic, so findings reproduce)."""
    if seed == 0 or not stream:
        yield stream
        return
    state = seed
    pos = 0
    while pos < len(stream):
        state = (state * 1103515245 + 12345) & 0x7FFF_FFFF
        size = 1 + (state >> 8) % seed
        yield stream[pos : pos + size]
        pos += size


def handshake_input(
    stream: bytes, *, accept_ssl: bool = False, passwords: tuple[PasswordKind, ...] = (),
    chunk_seed: int = 0,
) -> bytes:
    """Build a :func:`check_handshake` input (used for seeds and regression tests)."""
    flags = int(accept_ssl)
    if passwords:
        flags |= 0b10 | (_KINDS.index(passwords[0]) << 2)
        if len(passwords) > 1:
            flags |= 0b1_0000
    return bytes([flags, chunk_seed]) + stream


# ----------------------------------------------------------------------------- handshake


def _expected_frame(rest: bytes, *, tagged: bool, max_length: int) -> bytes | None:
    """The next frame by an independent reading of the header, None if incomplete
    or invalid (the reader must then raise or wait)."""
    if tagged:
        if len(rest) < 5:
            return None
        length = int.from_bytes(rest[1:5], "big")
        if not 4 <= length <= max_length:
            return None
        size = length + 1
    else:
        if len(rest) < 4:
            return None
        length = int.from_bytes(rest[:4], "big")
        if not 8 <= length <= max_length:
            return None
        size = length
    return rest[:size] if len(rest) >= size else None


def _check_startup(frame: bytes, ev: StartupReceived) -> None:
    original = decode_startup(frame)
    _require(isinstance(original, StartupMessage), "StartupReceived for a non-startup frame")
    assert isinstance(original, StartupMessage)
    msg = ev.message
    _require((msg.major, msg.minor) == (3, 0), f"session continues at {msg.major}.{msg.minor}")
    _require(not any(k.startswith("_pq_.") for k in msg.params), "_pq_. option passed on")
    # A startup without "user" is accepted (SPEC: node-postgres with $USER unset
    # sends none; the proxy replaces the user name anyway).
    kept = {k: v for k, v in original.params.items() if not k.startswith("_pq_.")}
    _require(msg.params == kept, "startup parameters changed")
    asked_more = original.minor > 0 or len(kept) != len(original.params)
    _require((ev.negotiate is not None) == asked_more, "NegotiateProtocolVersion owed/not")
    reply = negotiate_bytes(ev.negotiate)
    if ev.negotiate is not None:
        back = decode_backend(reply)
        _require(back == ev.negotiate, "NegotiateProtocolVersion does not round-trip")
        assert isinstance(back, NegotiateProtocolVersion)
        _require(back.newest_minor == 0, "negotiated a minor version other than 0")
        _require(set(back.unrecognized) == set(original.params) - set(kept),
                 "wrong unrecognized options")
        # What goes upstream must itself be a valid startup packet.
    _require(decode_startup(encode(msg)) == msg, "forwarded startup does not round-trip")


def check_handshake(data: bytes) -> None:
    """Drive :class:`ClientHandshake` with a client's bytes; see the module doc.

    Input: ``flags`` (bit 0: answer SSLRequest with 'S'; bit 1: ask for a
    password after the startup; bits 2-3: its kind; bit 4: then ask for a
    SASLResponse too), ``chunking`` (see :func:`chunks`), then the stream.
    """
    if len(data) < 2:
        return
    flags, seed, stream = data[0], data[1], data[2:]
    accept_ssl = bool(flags & 1)
    kinds: list[PasswordKind] = []
    if flags & 0b10:
        kinds.append(_KINDS[(flags >> 2) & 3])
        if flags & 0b1_0000:
            kinds.append(PasswordKind.SASL_RESPONSE)
    hs = ClientHandshake()
    fed = 0
    pos = 0  # bytes of the stream consumed as frames
    tagged = False
    finished = False  # nothing more will be read by the handshake
    pieces = chunks(stream, seed)
    try:
        while True:
            ev = hs.next_event()
            if ev is NEED_DATA:
                if not finished:
                    limit = MAX_PASSWORD_MESSAGE if tagged else limits.MAX_STARTUP_PACKET
                    stuck = _expected_frame(stream[pos:fed], tagged=tagged, max_length=limit)
                    _require(stuck is None, "NEED_DATA with a complete frame buffered")
                piece = next(pieces, None)
                if piece is None:
                    break
                hs.receive_data(piece)
                fed += len(piece)
                continue
            limit = MAX_PASSWORD_MESSAGE if tagged else limits.MAX_STARTUP_PACKET
            frame = _expected_frame(stream[pos:fed], tagged=tagged, max_length=limit)
            _require(frame is not None, f"{type(ev).__name__} without a complete valid frame")
            assert frame is not None
            _require(len(frame) <= limit + int(tagged), "frame over the limit")
            pos += len(frame)
            if isinstance(ev, SSLRequested | GSSENCRequested):
                want = _SSL_FRAME if isinstance(ev, SSLRequested) else _GSS_FRAME
                _require(frame == want, "upgrade request event for another frame")
                _require(hs.encrypted_upgrade_pending, "upgrade not pending")
                _require(pos == fed, "upgrade answered with unencrypted data buffered")
                if isinstance(ev, SSLRequested):
                    reply = hs.answer_ssl(accept_ssl)
                    _require(reply == (b"S" if accept_ssl else b"N"), "SSL answer not one byte")
                else:
                    _require(hs.answer_gssenc() == b"N", "GSSENC answer not 'N'")
            elif isinstance(ev, CancelRequested):
                _require(encode(ev.request) == frame, "CancelRequest does not round-trip")
                finished = True
            elif isinstance(ev, StartupReceived):
                _check_startup(frame, ev)
                tagged = True
                if kinds:
                    hs.expect_password(kinds.pop(0))
                else:
                    finished = True
            elif isinstance(ev, PasswordReceived):
                _require(frame[:1] == b"p", "password event for a non-'p' frame")
                _require(encode(ev.message) == frame, "password message does not round-trip")
                if kinds:
                    hs.expect_password(kinds.pop(0))
                else:
                    finished = True
            else:  # pragma: no cover - Event is a closed union
                raise FuzzFinding(f"unknown event {ev!r}")
    except ProtocolError as exc:
        _require(bool(exc.sqlstate) and len(exc.sqlstate) == 5, "ProtocolError without SQLSTATE")
        return
    if finished:
        trailing = hs.trailing_data()
        _require(trailing == stream[pos:fed], "trailing data lost or reordered")
        _require(hs.trailing_data() == b"", "trailing data returned twice")


# ----------------------------------------------------------------------------- framing


def check_framing(data: bytes) -> None:
    """Drive :class:`FrameReader` directly; see the module doc.

    Input: ``mode`` (bit 0: start tagged; bit 1: switch modes after the first
    frame; bits 2-4: max_length choice), ``chunking``, then the stream.
    """
    if len(data) < 2:
        return
    mode, seed, stream = data[0], data[1], data[2:]
    tagged = bool(mode & 1)
    switch = bool(mode & 2)
    max_length = _MAX_LENGTHS[(mode >> 2) & 7]
    reader = FrameReader(tagged=tagged, max_length=max_length)
    out: list[bytes] = []
    fed = 0
    try:
        for piece in chunks(stream, seed):
            reader.feed(piece)
            fed += len(piece)
            while (frame := reader.next_frame()) is not None:
                _require(type(frame) is bytes, "frame is not bytes")
                if tagged:
                    length = int.from_bytes(frame[1:5], "big")
                    _require(len(frame) >= 5 and length == len(frame) - 1, "tagged size")
                    _require(4 <= length <= max_length, "tagged frame over the limit")
                else:
                    length = int.from_bytes(frame[:4], "big")
                    _require(length == len(frame), "untagged size")
                    _require(8 <= length <= max_length, "untagged frame over the limit")
                out.append(frame)
                if switch and len(out) == 1:
                    tagged = not tagged
                    reader.set_mode(tagged=tagged, max_length=max_length)
            _require(reader.tagged == tagged, "mode changed by itself")
            _require(sum(map(len, out)) + reader.buffered == fed, "bytes lost in the buffer")
    except ProtocolError:
        # Sticky: the bad header stays buffered, so asking again raises again.
        held = reader.buffered
        try:
            reader.next_frame()
        except ProtocolError:
            pass
        else:
            raise FuzzFinding("a refused length was not sticky") from None
        _require(reader.buffered == held, "refusal consumed bytes")
        _require(sum(map(len, out)) + held == fed, "bytes lost before the refusal")
        return
    rest = reader.trailing()
    _require(b"".join(out) + rest == stream, "frames + trailing != stream")
    _require(reader.buffered == 0, "trailing() did not clear")


# ----------------------------------------------------------------------------- codec


def _decoders() -> tuple[Callable[[bytes], Message], ...]:
    return (
        decode_startup,
        decode_backend,
        lambda f: decode_password(f, PasswordKind.PASSWORD),
        lambda f: decode_password(f, PasswordKind.SASL_INITIAL),
        lambda f: decode_password(f, PasswordKind.SASL_RESPONSE),
    )


_DECODERS: Final = _decoders()


def check_codec(data: bytes) -> None:
    """One decoder (first byte, mod 5: startup, backend, password x3) on one frame.

    A frame that decodes must re-encode to exactly the same bytes.
    """
    if not data:
        return
    decode = _DECODERS[data[0] % len(_DECODERS)]
    frame = data[1:]
    try:
        msg = decode(frame)
    except ProtocolError as exc:
        _require(len(exc.sqlstate) == 5, "ProtocolError without SQLSTATE")
        return
    try:
        again = encode(msg)
    except ValueError as exc:
        raise FuzzFinding(f"decoded {type(msg).__name__} cannot be re-encoded: {exc}") from exc
    _require(again == frame, f"{type(msg).__name__} does not re-encode byte for byte")


# ----------------------------------------------------------------------------- seeds

STARTUP_CAPTURES: Final = Path(__file__).resolve().parents[1] / "data" / "startup"


def seed_inputs() -> dict[str, bytes]:
    """Seed inputs for every target, built from the real client captures."""
    captures = {p.name: p.read_bytes() for p in sorted(STARTUP_CAPTURES.glob("*.bin"))}
    startups = {k: v for k, v in captures.items() if ".sslrequest" not in k}
    ssl_request = captures.get("psql_prefer.sslrequest.bin", b"")
    password = encode(PasswordMessage(b"hunter2"))
    sasl_initial = encode(SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=abcdefghijklmnopqrstuvwx"))
    sasl_response = encode(SASLResponse(b"c=biws,r=abcdefghijklmnopqrstuvwxyz,p=proof"))
    gss = (8).to_bytes(4, "big") + ((1234 << 16) | 5680).to_bytes(4, "big")
    cancel = (16).to_bytes(4, "big") + ((1234 << 16) | 5678).to_bytes(4, "big") + bytes(8)
    seeds: dict[str, bytes] = {}
    hs = handshake_input
    for name, startup in startups.items():
        base = name.removesuffix(".bin")
        seeds[f"hs-{base}"] = b"\x00" + hs(startup)
        seeds[f"hs-{base}-ssl-n"] = b"\x00" + hs(ssl_request + startup, chunk_seed=7)
        seeds[f"hs-{base}-ssl-s"] = b"\x00" + hs(ssl_request + startup, accept_ssl=True)
        seeds[f"hs-{base}-gss"] = b"\x00" + hs(gss + ssl_request + startup, chunk_seed=3)
        seeds[f"hs-{base}-password"] = b"\x00" + hs(
            startup + password + b"Q\x00\x00\x00\x0dSELECT 1\x00",
            passwords=(PasswordKind.PASSWORD,))
        seeds[f"hs-{base}-scram"] = b"\x00" + hs(
            startup + sasl_initial + sasl_response,
            passwords=(PasswordKind.SASL_INITIAL, PasswordKind.SASL_RESPONSE), chunk_seed=13)
        seeds[f"frame-{base}"] = b"\x01" + bytes([0b10100, 5]) + startup
        seeds[f"frame-{base}-then-tagged"] = b"\x01" + bytes([0b10110, 0]) + startup + password
        seeds[f"codec-startup-{base}"] = b"\x02\x00" + startup
    seeds["hs-cancel"] = b"\x00" + hs(cancel)
    seeds["codec-cancel"] = b"\x02\x00" + cancel
    seeds["codec-password"] = b"\x02\x02" + password
    seeds["codec-sasl-initial"] = b"\x02\x03" + sasl_initial
    seeds["codec-sasl-response"] = b"\x02\x04" + sasl_response
    seeds["codec-error"] = b"\x02\x01" + encode(error_response("28P01", "no", hint="hint"))
    seeds["codec-auth-sasl"] = b"\x02\x01" + encode(AuthenticationSASL(("SCRAM-SHA-256",)))
    seeds["codec-negotiate"] = b"\x02\x01" + encode(NegotiateProtocolVersion(0, ("_pq_.x",)))
    seeds["codec-key"] = b"\x02\x01" + encode(BackendKeyData(42, bytes(range(32))))
    return seeds


def write_seeds(directory: Path) -> int:
    """(Re)write the seed corpus into ``directory``; returns how many seeds."""
    directory.mkdir(parents=True, exist_ok=True)
    seeds = seed_inputs()
    for name, data in seeds.items():
        (directory / name).write_bytes(data)
    return len(seeds)


TARGETS: Final = (check_handshake, check_framing, check_codec)


def check_any(data: bytes) -> None:
    """Dispatch on the first byte (mod 3) to one of :data:`TARGETS`."""
    if data:
        TARGETS[data[0] % len(TARGETS)](data[1:])
