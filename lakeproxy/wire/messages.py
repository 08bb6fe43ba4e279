"""construct schemas for every startup-phase message; the only module importing construct.

Each message is a :class:`Layout`: a construct schema for the *whole* frame
(tag byte if any, Int32 length including itself, body, nothing after), plus two
small functions that turn construct's ``Container`` into plain typed values and
back. ``Layout.parse`` raises only :class:`ProtocolError`; ``Layout.build`` raises
only ``ValueError``. Neither message quotes field values, so secrets cannot leak
through them.

Semantic checks (which codes are allowed, key lengths, required parameters, NUL
bytes on encode) live in :mod:`lakeproxy.wire.codec`; this module describes the
byte layout only.

Formats: https://www.postgresql.org/docs/current/protocol-message-formats.html
Schemas are deliberately not ``.compile()``-d: construct documents compiled
parsers as unsafe for untrusted input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final, Generic, TypeVar

from construct import (
    Bytes,
    Check,
    Const,
    Construct,
    ConstructError,
    CString,
    FocusedSeq,
    GreedyBytes,
    If,
    Int8ub,
    Int32sb,
    Int32ub,
    NullTerminated,
    Prefixed,
    PrefixedArray,
    Rebuild,
    RepeatUntil,
    Struct,
    Terminated,
    this,
)

from lakeproxy.wire import limits
from lakeproxy.wire.errors import ProtocolError

T = TypeVar("T")

#: A NUL-terminated UTF-8 string (PostgreSQL's "String" type).
_TEXT = CString("utf8")
#: A NUL-terminated byte string (a password need not be UTF-8).
_CBYTES = NullTerminated(GreedyBytes)


class Layout(Generic[T]):
    """A message's byte layout and its mapping to a plain typed value ``T``."""

    __slots__ = ("_dump", "_load", "_schema", "name")

    def __init__(
        self,
        name: str,
        schema: Construct[Any, Any],
        load: Callable[[Any], T],
        dump: Callable[[T], Any],
    ) -> None:
        self.name = name
        self._schema = schema
        self._load = load
        self._dump = dump

    def parse(self, frame: bytes) -> T:
        """Parse one complete frame.

        Raises:
            ProtocolError: the bytes do not have this layout (08P01). It is
                raised outside the ``except`` block, so no ConstructError (whose
                text may quote the bytes) hangs off it as ``__context__``.
        """
        try:
            parsed = self._schema.parse(frame)
        except ConstructError:
            parsed = _FAILED
        if parsed is _FAILED:
            raise ProtocolError(f"malformed {self.name} message")
        return self._load(parsed)

    def build(self, value: T) -> bytes:
        """Serialise ``value`` as one complete frame.

        Raises:
            ValueError: a field does not fit the wire format (out of range, ...);
                like ``parse``, without a chained ConstructError.
        """
        try:
            data: bytes | None = self._schema.build(self._dump(value))
        except ConstructError:
            data = None
        if data is None:
            raise ValueError(f"cannot encode {self.name}: a field is out of range")
        return data


#: Marks a failed parse (``None`` is a valid parse result).
_FAILED: Final = object()


def _untagged(*fields: Construct[Any, Any]) -> Construct[Any, Any]:
    """Int32 length (including itself), then ``fields``, then end of frame."""
    return FocusedSeq(
        "body",
        "body" / Prefixed(Int32ub, Struct(*fields, Terminated), includelength=True),
        Terminated,
    )


def _tagged(tag: bytes, *fields: Construct[Any, Any]) -> Construct[Any, Any]:
    """Tag byte, Int32 length (including itself), then ``fields``, then end of frame."""
    return FocusedSeq(
        "body",
        Const(tag),
        "body" / Prefixed(Int32ub, Struct(*fields, Terminated), includelength=True),
        Terminated,
    )


def _none(_: Any) -> None:
    return None


def _empty(_: None) -> dict[str, Any]:
    return {}


# --------------------------------------------------------------------------
# Untagged frontend packets

SSL_REQUEST: Final = Layout[None](
    "SSLRequest", _untagged(Const(limits.SSL_REQUEST_CODE, Int32ub)), _none, _empty
)

GSSENC_REQUEST: Final = Layout[None](
    "GSSENCRequest", _untagged(Const(limits.GSSENC_REQUEST_CODE, Int32ub)), _none, _empty
)

#: (process id, key). Protocol 3.2 keys are variable-length: whatever follows the pid.
CANCEL_REQUEST: Final = Layout[tuple[int, bytes]](
    "CancelRequest",
    _untagged(
        Const(limits.CANCEL_REQUEST_CODE, Int32ub), "process_id" / Int32ub, "key" / GreedyBytes
    ),
    lambda c: (int(c.process_id), bytes(c.key)),
    lambda v: {"process_id": v[0], "key": v[1]},
)

#: Name/value pairs ending with an empty name.
_PARAMS = RepeatUntil(
    lambda obj, lst, ctx: obj["name"] == "",
    Struct("name" / _TEXT, "value" / If(this.name != "", _TEXT)),
)


def _load_params(items: Any) -> list[tuple[str, str]]:
    return [(str(i.name), str(i.value)) for i in items[:-1]]


def _dump_params(params: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    return [{"name": n, "value": v} for n, v in params] + [{"name": "", "value": None}]


#: (protocol version code, parameters in wire order).
STARTUP_MESSAGE: Final = Layout[tuple[int, list[tuple[str, str]]]](
    "StartupMessage",
    _untagged("version" / Int32ub, "params" / _PARAMS),
    lambda c: (int(c.version), _load_params(c.params)),
    lambda v: {"version": v[0], "params": _dump_params(v[1])},
)

# --------------------------------------------------------------------------
# Tagged frontend 'p' messages

#: The password bytes (without the trailing NUL).
PASSWORD_MESSAGE: Final = Layout[bytes](
    "PasswordMessage",
    _tagged(b"p", "password" / _CBYTES),
    lambda c: bytes(c.password),
    lambda v: {"password": v},
)

#: (mechanism, data or None when the length is -1).
SASL_INITIAL_RESPONSE: Final = Layout[tuple[str, bytes | None]](
    "SASLInitialResponse",
    _tagged(
        b"p",
        "mechanism" / _TEXT,
        "length" / Rebuild(Int32sb, lambda ctx: -1 if ctx.data is None else len(ctx.data)),
        Check(this.length >= -1),
        "data" / If(this.length >= 0, Bytes(this.length)),
    ),
    lambda c: (str(c.mechanism), None if c.data is None else bytes(c.data)),
    lambda v: {"mechanism": v[0], "data": v[1]},
)

SASL_RESPONSE: Final = Layout[bytes](
    "SASLResponse",
    _tagged(b"p", "data" / GreedyBytes),
    lambda c: bytes(c.data),
    lambda v: {"data": v},
)

# --------------------------------------------------------------------------
# Backend 'R' Authentication*


def _auth(code: int, *fields: Construct[Any, Any]) -> Construct[Any, Any]:
    return _tagged(b"R", Const(code, Int32ub), *fields)


AUTH_OK: Final = Layout[None]("AuthenticationOk", _auth(limits.AUTH_OK), _none, _empty)

AUTH_CLEARTEXT_PASSWORD: Final = Layout[None](
    "AuthenticationCleartextPassword", _auth(limits.AUTH_CLEARTEXT_PASSWORD), _none, _empty
)

#: The 4-byte salt.
AUTH_MD5_PASSWORD: Final = Layout[bytes](
    "AuthenticationMD5Password",
    _auth(limits.AUTH_MD5_PASSWORD, "salt" / Bytes(4)),
    lambda c: bytes(c.salt),
    lambda v: {"salt": v},
)

#: Mechanism names (the terminating empty name is not included).
AUTH_SASL: Final = Layout[list[str]](
    "AuthenticationSASL",
    _auth(limits.AUTH_SASL, "mechanisms" / RepeatUntil(lambda obj, lst, ctx: obj == "", _TEXT)),
    lambda c: [str(m) for m in c.mechanisms[:-1]],
    lambda v: {"mechanisms": [*v, ""]},
)

AUTH_SASL_CONTINUE: Final = Layout[bytes](
    "AuthenticationSASLContinue",
    _auth(limits.AUTH_SASL_CONTINUE, "data" / GreedyBytes),
    lambda c: bytes(c.data),
    lambda v: {"data": v},
)

AUTH_SASL_FINAL: Final = Layout[bytes](
    "AuthenticationSASLFinal",
    _auth(limits.AUTH_SASL_FINAL, "data" / GreedyBytes),
    lambda c: bytes(c.data),
    lambda v: {"data": v},
)

# --------------------------------------------------------------------------
# Other backend messages of the startup phase

#: (name, value).
PARAMETER_STATUS: Final = Layout[tuple[str, str]](
    "ParameterStatus",
    _tagged(b"S", "name" / _TEXT, "value" / _TEXT),
    lambda c: (str(c.name), str(c.value)),
    lambda v: {"name": v[0], "value": v[1]},
)

#: (process id, secret key). 4 bytes in 3.0; 3.2 allows up to 256.
BACKEND_KEY_DATA: Final = Layout[tuple[int, bytes]](
    "BackendKeyData",
    _tagged(b"K", "process_id" / Int32ub, "secret" / GreedyBytes),
    lambda c: (int(c.process_id), bytes(c.secret)),
    lambda v: {"process_id": v[0], "secret": v[1]},
)

#: The transaction status byte.
READY_FOR_QUERY: Final = Layout[bytes](
    "ReadyForQuery",
    _tagged(b"Z", "status" / Bytes(1)),
    lambda c: bytes(c.status),
    lambda v: {"status": v},
)

#: (newest protocol version supported, unrecognised protocol options). The version is
#: the whole number, major << 16 | minor, as PostgreSQL sends it (PG_PROTOCOL_LATEST).
NEGOTIATE_PROTOCOL_VERSION: Final = Layout[tuple[int, list[str]]](
    "NegotiateProtocolVersion",
    _tagged(b"v", "newest_version" / Int32ub, "options" / PrefixedArray(Int32ub, _TEXT)),
    lambda c: (int(c.newest_version), [str(o) for o in c.options]),
    lambda v: {"newest_version": v[0], "options": v[1]},
)

#: (field code byte, value) pairs, ended on the wire by a zero code byte.
_FIELDS = RepeatUntil(
    lambda obj, lst, ctx: obj["code"] == 0,
    Struct("code" / Int8ub, "value" / If(this.code != 0, _TEXT)),
)


def _load_fields(c: Any) -> list[tuple[int, str]]:
    return [(int(f.code), str(f.value)) for f in c.fields[:-1]]


def _dump_fields(v: Sequence[tuple[int, str]]) -> dict[str, Any]:
    items = [{"code": k, "value": s} for k, s in v]
    return {"fields": [*items, {"code": 0, "value": None}]}


ERROR_RESPONSE: Final = Layout[list[tuple[int, str]]](
    "ErrorResponse", _tagged(b"E", "fields" / _FIELDS), _load_fields, _dump_fields
)

NOTICE_RESPONSE: Final = Layout[list[tuple[int, str]]](
    "NoticeResponse", _tagged(b"N", "fields" / _FIELDS), _load_fields, _dump_fields
)

#: Any tagged frame: (tag byte, body). Used for messages the codec does not interpret.
ANY_TAGGED: Final = Layout[tuple[bytes, bytes]](
    "tagged",
    Struct(
        "tag" / Bytes(1),
        "body" / Prefixed(Int32ub, GreedyBytes, includelength=True),
        Terminated,
    ),
    lambda c: (bytes(c.tag), bytes(c.body)),
    lambda v: {"tag": v[0], "body": v[1]},
)
