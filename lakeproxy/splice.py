"""The hot path: move bytes between a client and the endpoint, untouched.

Two protocol halves, one per transport. Each chunk a transport reads is written
to the other transport as it is: no parsing, no logging, no await. Flow control
is the transports' own: when one side's write buffer passes its high-water
mark, the protocol of that transport is told ``pause_writing`` and stops the
*other* transport from reading until the buffer drains (``resume_writing``).
Memory per session is therefore bounded by the two write buffers' high-water
marks plus one read chunk.

The first side to close (EOF, error or connection loss) is recorded; the other
transport is then closed with ``close()``, which flushes what is already
buffered for it, so bytes that were read are never dropped. ``abort()`` is for
errors and the shutdown deadline.

Measured choices (benchmarks/results/splice_variants-20261128.md, uvloop, TLS
upstream, proxy CPU; `python -m benchmarks.splice_micro --tls --variants ...`):

- The upstream is a :class:`lakeproxy.tls.TLSTransport` (TLS by hand over
  memory BIOs), not ``loop.start_tls``: 17.1 µs of proxy CPU per 100-byte round
  trip against 20.3 µs for the same Protocol halves over uvloop's SSL, and no
  worse in bulk (0.81 vs 0.84 s/GB up, 1.02 vs 1.07 s/GB down). A naive streams
  relay costs 23.9 µs and 1.2 / 2.3 s/GB (2.5x the syscalls in bulk).
- Client to TLS upstream, the half is a ``BufferedProtocol`` reading into one
  buffer shared by the thread (``_IntoTLS``): a bytes object per read made
  glibc grow and trim the heap on every 256 KiB read (~360 page faults per MB),
  1.46 s/GB up instead of 0.81. Per small message the two cost the same.
- Upstream to client, the TLS transport hands plaintext straight to the
  client transport's ``write`` (no Python frame between): within noise of a
  counting ``Protocol`` half (17.2 vs 17.0 µs), kept because it is free.
- ``TCP_NODELAY`` on (off measured no cheaper: 17.7 µs, 1.46 s/GB) so a
  message that ends in a small write never waits for an ACK.
- Write high-water 256 KiB: 1 MiB measured the same CPU and throughput,
  64 KiB up to 4% more CPU client to endpoint; 256 KiB bounds a session to
  ~0.5 MiB of our buffers.
- Memory is given back when a session ends, not when the cyclic garbage
  collector runs: the halves drop their reference to the splice in
  :meth:`Splice._finish` (see :class:`_Ends`).

This module imports nothing from :mod:`lakeproxy.wire`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass
from typing import Final, Literal, cast

from lakeproxy.tls import TLSTransport, shared_buffer

Side = Literal["client", "upstream", "proxy"]

#: How long a closing side may take to flush what is buffered for it before it
#: is aborted (a peer that never reads must not pin the session forever).
CLOSE_FLUSH_TIMEOUT: Final = 30.0

#: Write-buffer high-water mark per direction. Past it, the other side stops
#: reading. 256 KiB keeps a bulk COPY streaming in large writes while bounding
#: a session's worst case to about twice this. 64 KiB measured the same in the
#: splice variants (benchmarks/README.md) but 4% more proxy CPU per GB client
#: to endpoint in 13 interleaved runs for issue #15 (256 KiB: within 2% of
#: before; RELIABILITY.md section 5), for a few MiB less at peak: kept.
WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class SpliceResult:
    """How a spliced session ended.

    ``closed_by`` names the side that closed first (``proxy`` when
    :meth:`Splice.abort` or :meth:`Splice.close` ended it); ``error`` is the
    exception that side's transport reported, if any.
    """

    closed_by: Side
    error: BaseException | None
    bytes_up: int  # client -> upstream
    bytes_down: int  # upstream -> client


class _Ends:
    """What both kinds of half share: close attribution and flow control.

    ``splice`` is dropped once the session has ended (:meth:`Splice._finish`):
    the halves and the splice would otherwise form a reference cycle that
    keeps both transports, the TLS session and its buffers alive until the
    cyclic garbage collector happens to run (measured: hundreds of ended
    sessions and >100 MiB held that way, RELIABILITY.md section 5).
    """

    __slots__ = ("nbytes", "peer", "side", "splice")

    def __init__(self, splice: Splice, side: Side, peer: asyncio.Transport) -> None:
        self.splice: Splice | None = splice
        self.side: Side = side
        self.peer = peer
        self.nbytes = 0

    def eof_received(self) -> bool:
        # EOF from either side ends the session (as PgBouncer and the Cloud SQL
        # proxy do): a FIN cannot tell a half-close from a full close, and a
        # closed client must not keep its endpoint session alive.
        splice = self.splice
        if splice is not None:
            splice._finish(self.side, None)
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        splice = self.splice
        if splice is not None:
            splice._finish(self.side, exc)

    # Our transport's write buffer is full: stop reading from the peer.
    def pause_writing(self) -> None:
        if not self.peer.is_closing():
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if not self.peer.is_closing():
            self.peer.resume_reading()


class _Half(_Ends, asyncio.Protocol):
    """Reads from its transport (a bytes object per read) and writes to ``peer``."""

    __slots__ = ()

    # The hot path: keep it to these two statements.
    def data_received(self, data: bytes) -> None:
        self.nbytes += len(data)
        self.peer.write(data)


class _IntoTLS(_Ends, asyncio.BufferedProtocol):
    """Client to a :class:`~lakeproxy.tls.TLSTransport`: reads into the thread's
    shared buffer and hands the slice over uncopied (``TLSTransport.write``
    encrypts it before returning, so the buffer is free again at once).

    Measured (benchmarks/README.md, splice variants): a bytes object of up to
    256 KiB per read next to the TLS records made glibc grow and trim the heap
    on every read (~360 page faults per MB, 1.5 s of CPU per GB up instead of
    0.9); reading into one long-lived buffer keeps bulk writes at the cost of
    uvloop's own SSL. Per small message it costs the same as ``_Half``.
    """

    __slots__ = ("view",)

    def __init__(self, splice: Splice, side: Side, peer: TLSTransport) -> None:
        super().__init__(splice, side, peer)
        self.view = shared_buffer()[0]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        self.nbytes += nbytes
        self.peer.write(self.view[:nbytes])


def tune_socket(transport: asyncio.BaseTransport) -> None:
    """Set TCP_NODELAY on a TCP transport's socket (no-op for unix sockets)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):  # already closed: the splice will see it
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Splice:
    """One client <-> upstream byte relay. Start with :meth:`start`, await :meth:`wait`."""

    def __init__(self, client: asyncio.Transport, upstream: asyncio.Transport) -> None:
        self.client = client
        self.upstream = upstream
        self._tls = upstream if isinstance(upstream, TLSTransport) else None
        self._tls_base = 0  # the TLS transport's bytes_received when the splice started
        # reads the client, writes upstream
        self._up: _Ends = (
            _IntoTLS(self, "client", self._tls)
            if self._tls is not None
            else _Half(self, "client", upstream)
        )
        self._down = _Half(self, "upstream", client)  # reads upstream, writes the client
        self._done: asyncio.Future[SpliceResult] = asyncio.get_running_loop().create_future()

    def start(self, *, client_leftover: bytes = b"", upstream_leftover: bytes = b"") -> None:
        """Hand both transports to the relay.

        ``client_leftover`` (bytes the client sent after its handshake) goes
        upstream first and ``upstream_leftover`` goes to the client first, each
        before anything read later, so nothing is reordered.
        """
        client, upstream = self.client, self.upstream
        # Protocols first, so flow-control callbacks caused by the leftovers
        # below reach the halves, not the handshake's protocols.
        client.set_protocol(cast(asyncio.BaseProtocol, self._up))
        upstream.set_protocol(self._down)
        tls = self._tls
        if tls is not None:
            # Decrypted bytes go straight to the client's write (no Python
            # frame in between); the TLS transport counts them.
            self._tls_base = tls.bytes_received
            tls.deliver_to(client.write)
        # Either side may have closed already (uvloop raises on a closed
        # transport's set_write_buffer_limits and write): deliver what can be.
        if not client.is_closing():
            tune_socket(client)
            client.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
            if upstream_leftover:
                self._down.nbytes += len(upstream_leftover)
                client.write(upstream_leftover)
        if not upstream.is_closing():
            tune_socket(upstream)
            upstream.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
            if client_leftover:
                self._up.nbytes += len(client_leftover)
                upstream.write(client_leftover)
        if client.is_closing():
            self._finish("client", None)
            return
        if upstream.is_closing():
            self._finish("upstream", None)
            return
        client.resume_reading()
        upstream.resume_reading()

    async def wait(self) -> SpliceResult:
        """Wait until either side closes; cancel-safe (cancelling aborts both)."""
        try:
            return await asyncio.shield(self._done)
        except asyncio.CancelledError:
            self.abort()
            raise

    def close(self) -> None:
        """End the session gracefully from the proxy's side (flushes buffers)."""
        self._finish("proxy", None)

    def abort(self) -> None:
        """End the session at once from the proxy's side (drops buffers)."""
        self._finish("proxy", None, abort=True)

    @property
    def bytes_up(self) -> int:
        return self._up.nbytes

    @property
    def bytes_down(self) -> int:
        tls = self._tls
        if tls is None:
            return self._down.nbytes
        return self._down.nbytes + tls.bytes_received - self._tls_base

    def _finish(self, side: Side, exc: BaseException | None, *, abort: bool = False) -> None:
        if self._done.done():
            return
        self._done.set_result(SpliceResult(side, exc, self.bytes_up, self.bytes_down))
        # No cycle left behind: what the transports still call on the halves
        # (connection_lost, flow control) needs only ``peer``.
        self._up.splice = self._down.splice = None
        if abort:
            self.client.abort()
            self.upstream.abort()
            return
        loop = asyncio.get_running_loop()
        for t in (self.client, self.upstream):
            if t.is_closing():
                continue
            # close() flushes what is already buffered for that side; a peer
            # that never reads is aborted after CLOSE_FLUSH_TIMEOUT (the timer
            # only holds the transport while it still has bytes to flush).
            pending = t.get_write_buffer_size()
            t.close()
            if pending:
                loop.call_later(CLOSE_FLUSH_TIMEOUT, t.abort)


async def splice(
    client: asyncio.Transport,
    upstream: asyncio.Transport,
    *,
    client_leftover: bytes = b"",
    upstream_leftover: bytes = b"",
) -> SpliceResult:
    """Relay bytes both ways until one side closes; return how it ended."""
    s = Splice(client, upstream)
    s.start(client_leftover=client_leftover, upstream_leftover=upstream_leftover)
    return await s.wait()
