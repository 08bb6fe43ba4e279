"""Session mode's splice: the same byte relay, plus message boundaries (headers only).

Under session reuse (``pool_mode = "session"``) the proxy must know, when a
client sends ``Terminate``, whether the endpoint session is *clean*: every
``Query``, ``Sync`` and ``FunctionCall`` answered by its ``ReadyForQuery``, the
last message one of those, no COPY in progress (SPEC "Session reuse"). To know
that, :class:`TrackedSplice` reads the 5-byte header (type byte and length) of
every message each way and skips the body; it never parses a body, with one
exception: ``ReadyForQuery``'s body is a single status byte (``I``/``T``/``E``),
which it keeps so the reset knows whether to roll back. Bytes still pass
untouched, in the same writes as :class:`lakeproxy.splice.Splice`; only the
client's final ``Terminate`` is held back (the endpoint session stays open and
goes to :mod:`lakeproxy.pool`).

What it counts (``_Track``): ``pending`` = Query + Sync + FunctionCall sent
minus ReadyForQuery received; ``last`` = type of the client's last message
(COPY data, CopyDone and CopyFail belong to the Query that started the COPY);
``in_copy`` from CopyInResponse/CopyOutResponse to the next ReadyForQuery;
``dirty`` (sticky: never parked) on CopyBothResponse, on an ErrorResponse or a
ParameterStatus that answers nothing (``pending`` 0: a FATAL such as 57P01, or
a setting the endpoint changed on its own, which the proxy could not
reproduce for the next client), and on anything unusual at Terminate (a
Terminate split across reads, bytes after it). Every uncertainty counts as
not clean: the cost of a wrong "not clean" is one login, the cost of a wrong
"clean" would be a session handed to a stranger mid-conversation.

Measured cost (CPU time, uvloop, Python 3.11; shared 2-core VM):

- the walk alone (``python -m benchmarks.boundaries_micro``,
  results/boundaries_micro-20261204.json): 0.82 µs per simple-protocol
  transaction (Query up; RowDescription, DataRow, CommandComplete,
  ReadyForQuery down), 1.02 µs with a prepared statement (Bind, Execute, Sync
  up), 1.2 µs per MB in bulk (a large message is skipped by arithmetic, its
  body never touched). Written for that: one ``Struct.unpack_from`` and one
  frozenset lookup per message, locals in the loop, counters written back
  once per read; the first shape (attribute updates per message, two
  lookups, a helper call per read) measured 0.89-0.91 µs;
- in the whole proxy (``python -m benchmarks.pool``,
  results/pool-20261204-1856.md, 5 rounds): ``pgbench -S -c 8`` costs 0.98x
  the proxy CPU per transaction of ``off`` mode (rounds 0.86-1.20x: the
  machine's noise is larger than the walk, which is ~2% of the ~40 µs a
  transaction costs the proxy).

This module imports nothing from :mod:`lakeproxy.wire` (the headers are read
with :mod:`struct`, as the splice's own framing would be).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Final, cast

from lakeproxy.splice import CLOSE_FLUSH_TIMEOUT, Side, Splice, SpliceResult, _Ends, _Half
from lakeproxy.tls import TLSTransport, shared_buffer

_HEADER: Final = struct.Struct("!BI")
_unpack: Final = _HEADER.unpack_from

# Frontend message types (PostgreSQL protocol, "Message Formats").
_QUERY: Final = ord("Q")
_SYNC: Final = ord("S")
_FUNCTION_CALL: Final = ord("F")
_TERMINATE: Final = ord("X")
_COPY_DATA: Final = ord("d")
_COPY_DONE: Final = ord("c")
_COPY_FAIL: Final = ord("f")
#: Messages that get exactly one ReadyForQuery.
_ANSWERED: Final = frozenset((_QUERY, _SYNC, _FUNCTION_CALL))
#: Client messages that belong to the COPY of the Query before them.
_COPY_FROM_CLIENT: Final = frozenset((_COPY_DATA, _COPY_DONE, _COPY_FAIL))

# Backend message types.
_READY: Final = ord("Z")
_COPY_IN: Final = ord("G")
_COPY_OUT: Final = ord("H")
_COPY_BOTH: Final = ord("W")
_ERROR: Final = ord("E")
_PARAMETER_STATUS: Final = ord("S")

#: The Terminate message (type and length 4).
TERMINATE_MESSAGE: Final = b"X\x00\x00\x00\x04"
_NO_MESSAGE: Final = -1


class _Track:
    """Message boundaries both ways, and what they say about cleanliness."""

    __slots__ = (
        "dirty",
        "down_carry",
        "down_skip",
        "in_copy",
        "last",
        "pending",
        "status",
        "up_carry",
        "up_skip",
    )

    def __init__(self) -> None:
        self.pending = 0
        self.last = _NO_MESSAGE
        self.status = ord("I")
        self.in_copy = False
        self.dirty = False
        self.up_skip = 0  # body bytes of the current client message still to come
        self.up_carry = b""  # a header split across reads
        self.down_skip = 0
        self.down_carry = b""

    def clean(self) -> bool:
        """True when a Terminate now would leave the endpoint session reusable."""
        return (
            not self.dirty and self.pending == 0 and not self.in_copy
            and (self.last == _NO_MESSAGE or self.last in _ANSWERED)
        )

    # -- client -> endpoint ---------------------------------------------------------

    def up(self, data: bytes | memoryview) -> int:
        """Walk the client's bytes; return the offset of a Terminate in ``data``, or -1."""
        n = len(data)
        pos = self.up_skip
        if pos >= n:
            self.up_skip = pos - n
            return -1
        if self.up_carry:
            carry = self.up_carry
            head = carry + bytes(data[: 5 - len(carry)])
            if len(head) < 5:
                self.up_carry = head
                self.up_skip = 0
                return -1
            self.up_carry = b""
            t, length = _unpack(head)
            if t == _TERMINATE:
                self.dirty = True  # split Terminate: part of it already went upstream
            elif t in _ANSWERED:
                self.pending += 1
                self.last = t
            elif t not in _COPY_FROM_CLIENT:
                self.last = t
            pos = 1 + length - len(carry)
        # The loop runs once per message: locals only, one set lookup for the
        # common message (Parse, Bind, Execute, Describe...).
        unpack = _unpack
        special = _UP_SPECIAL
        last = _NO_MESSAGE
        answered = 0
        while pos + 5 <= n:
            t, length = unpack(data, pos)
            if t in special:
                if t == _TERMINATE:
                    if pos + 5 != n:
                        self.dirty = True  # bytes after Terminate
                    self.up_skip = 0
                    if last != _NO_MESSAGE:
                        self.last = last
                    self.pending += answered
                    return pos
                if t not in _COPY_FROM_CLIENT:  # Query, Sync, FunctionCall
                    answered += 1
                    last = t
            else:
                last = t
            pos += 1 + length
        if pos < n:
            self.up_carry = bytes(data[pos:])
            self.up_skip = 0
        else:
            self.up_skip = pos - n
        if last != _NO_MESSAGE:
            self.last = last
        self.pending += answered
        return -1

    # -- endpoint -> client ---------------------------------------------------------

    def down(self, data: bytes | memoryview) -> None:
        """Walk the endpoint's bytes (ReadyForQuery's status byte is the one body read)."""
        n = len(data)
        pos = self.down_skip
        if pos >= n:
            self.down_skip = pos - n
            return
        if self.down_carry:
            carry = self.down_carry
            head = carry + bytes(data[: 6 - len(carry)])
            if len(head) < 5 or (head[0] == _READY and len(head) < 6):
                self.down_carry = head
                self.down_skip = 0
                return
            self.down_carry = b""
            t, length = _unpack(head)
            self._backend_message(t, head[5] if t == _READY else 0)
            pos = 1 + length - len(carry)
        unpack = _unpack
        special = _DOWN_SPECIAL
        while pos + 5 <= n:
            t, length = unpack(data, pos)
            if t in special:
                if t == _READY:
                    if pos + 5 == n:  # its status byte comes with the next read
                        break
                    self.pending -= 1
                    self.status = data[pos + 5]
                    self.in_copy = False
                else:
                    self._backend_message(t, 0)
            pos += 1 + length
        if pos < n:
            self.down_carry = bytes(data[pos:])
            self.down_skip = 0
        else:
            self.down_skip = pos - n

    def _backend_message(self, t: int, status: int) -> None:
        if t == _READY:
            self.pending -= 1
            self.status = status
            self.in_copy = False
        elif t in (_COPY_IN, _COPY_OUT):
            self.in_copy = True
        elif t == _COPY_BOTH or (t in (_ERROR, _PARAMETER_STATUS) and self.pending <= 0):
            self.dirty = True


#: Client message types the walk acts on (any other only becomes ``last``).
_UP_SPECIAL: Final = frozenset((_QUERY, _SYNC, _FUNCTION_CALL, _TERMINATE, *_COPY_FROM_CLIENT))
#: Backend message types the walk acts on (rows, descriptions, completions skip).
_DOWN_SPECIAL: Final = frozenset(
    (_READY, _COPY_IN, _COPY_OUT, _COPY_BOTH, _ERROR, _PARAMETER_STATUS)
)


class _TrackUp(_Ends, asyncio.BufferedProtocol):
    """Client -> endpoint, reading into the thread's shared buffer (as ``_IntoTLS``)
    and walking headers before the write; stops at the client's Terminate."""

    __slots__ = ("copy", "track", "view")

    def __init__(self, splice: TrackedSplice, side: Side, peer: asyncio.Transport,
                 track: _Track) -> None:
        super().__init__(splice, side, peer)
        self.view = shared_buffer()[0]
        self.track = track
        # A TLS transport consumes the buffer before write() returns; another
        # transport may keep it, so gets a copy.
        self.copy = not isinstance(peer, TLSTransport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        self.nbytes += nbytes
        data = self.view[:nbytes]
        at = self.track.up(data)
        if at < 0:
            self.peer.write(bytes(data) if self.copy else data)
            return
        if at:
            self.peer.write(bytes(data[:at]) if self.copy else data[:at])
        cast("TrackedSplice", self.splice)._terminated()


class _TrackDown(_Half):
    """Endpoint -> client over a plain transport (tests): walk, then write."""

    __slots__ = ("track",)

    def __init__(self, splice: Splice, side: Side, peer: asyncio.Transport,
                 track: _Track) -> None:
        super().__init__(splice, side, peer)
        self.track = track

    def data_received(self, data: bytes) -> None:
        self.nbytes += len(data)
        self.track.down(data)
        self.peer.write(data)


class _Held(asyncio.Protocol):
    """The endpoint transport's protocol between the client's Terminate and the reset."""

    def __init__(self) -> None:
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.lost = True  # unexpected: the reset will see it as not clean

    def eof_received(self) -> bool:
        self.lost = True
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True


class TrackedSplice(Splice):
    """A :class:`Splice` that knows message boundaries; see the module docstring.

    After :meth:`wait`, :attr:`parkable` says whether the client ended cleanly
    with Terminate; then the endpoint transport is left open, reading paused,
    for the pool, and :attr:`status` is the last ReadyForQuery status byte.
    """

    def __init__(self, client: asyncio.Transport, upstream: asyncio.Transport) -> None:
        super().__init__(client, upstream)
        self.track = _Track()
        self.parkable = False
        self._up = _TrackUp(self, "client", upstream, self.track)
        if self._tls is None:
            self._down = _TrackDown(self, "upstream", client, self.track)

    @property
    def status(self) -> int:
        return self.track.status

    def start(self, *, client_leftover: bytes = b"", upstream_leftover: bytes = b"") -> None:
        track = self.track
        if upstream_leftover:
            track.down(upstream_leftover)
        if client_leftover and track.up(client_leftover) >= 0:
            track.dirty = True  # a Terminate before the session began: forward it as is
        super().start(client_leftover=client_leftover, upstream_leftover=upstream_leftover)
        tls = self._tls
        if tls is not None and not self._done.done():
            write = self.client.write
            down = track.down

            def deliver(data: bytes) -> None:
                down(data)
                write(data)

            tls.deliver_to(deliver)

    def _terminated(self) -> None:
        """The client sent Terminate (not forwarded): park if clean, else end as usual."""
        if self._done.done():
            return
        if not self.track.clean() or self.upstream.is_closing():
            self.upstream.write(TERMINATE_MESSAGE)
            self._finish("client", None)
            return
        self.parkable = True
        upstream, client = self.upstream, self.client
        upstream.pause_reading()
        upstream.set_protocol(_Held())
        self._done.set_result(SpliceResult("client", None, self.bytes_up, self.bytes_down))
        if not client.is_closing():
            pending = client.get_write_buffer_size()
            client.close()
            if pending:
                asyncio.get_running_loop().call_later(CLOSE_FLUSH_TIMEOUT, client.abort)

    def upstream_lost(self) -> bool:
        """True when the held endpoint transport saw data, EOF or a loss after Terminate."""
        proto = self.upstream.get_protocol()
        return not isinstance(proto, _Held) or proto.lost or self.upstream.is_closing()
