"""Splice variants measured side by side by :mod:`benchmarks.splice_micro` (``--variants``).

A variant is ``<relay>/<tls>[/<option>...]``:

- relay: how bytes cross the proxy between the two transports
  - ``splice``: :class:`lakeproxy.splice.Splice`, the product;
  - ``protocol``: two ``asyncio.Protocol`` halves, ``data_received`` counts and
    calls the peer's ``write`` (the product's first version, kept here as the
    baseline);
  - ``buffered``: two ``asyncio.BufferedProtocol`` halves reading into a
    preallocated buffer; the slice must be copied before ``write`` (the
    transport may keep a reference to what it could not send at once);
  - ``bare``: the peer's ``write`` *is* ``data_received`` (no Python frame per
    chunk, no byte count): the floor of what Python costs per chunk;
  - ``shared``: client to upstream reads into the thread's shared buffer and
    writes the slice uncopied (needs a TLS-by-hand upstream, whose ``write``
    encrypts at once); upstream to client as ``protocol``;
- tls: how the upstream leg does TLS (ignored without ``--tls``)
  - ``sslproto``: ``loop.start_tls`` (uvloop's Cython ``SSLProtocol``, or asyncio's);
  - ``bio``: :func:`lakeproxy.tls.start_tls` (``ssl.SSLObject`` over memory
    BIOs by hand on the plain TCP transport; the socket is read into a shared
    buffer, records are decrypted into another);
  - ``biosimple``: the same, as first written: a bytes object per socket read,
    one per record, joined (on uvloop; asyncio reads it buffered anyway);
- options: ``nodelay0`` (no TCP_NODELAY on either socket), ``hw<KiB>``
  (write-buffer high-water mark per direction; low = high / 4).

``streams`` (the naive relay) and ``direct`` are not variants: splice_micro
runs them as before.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from typing import Final, Literal, cast

from lakeproxy import splice as product
from lakeproxy.tls import MAX_RECORD, TLSTransport, shared_buffer, start_tls

RelayKind = Literal["splice", "protocol", "buffered", "bare", "shared"]
TlsKind = Literal["sslproto", "bio", "biosimple"]
RELAYS: Final = ("splice", "protocol", "buffered", "bare", "shared")
TLS_KINDS: Final = ("sslproto", "bio", "biosimple")
BUFFER: Final = 256 * 1024  # the buffered halves' read buffer (uvloop reads up to 256 KiB)


@dataclass(frozen=True, slots=True)
class Variant:
    """A parsed variant name (see the module docstring)."""

    name: str
    relay: RelayKind
    tls: TlsKind
    nodelay: bool = True
    high_water: int | None = None  # None: the product's

    @classmethod
    def parse(cls, name: str) -> Variant:
        """Raises ValueError for an unknown relay, TLS kind or option."""
        relay, _, rest = name.partition("/")
        tls, _, opts = rest.partition("/")
        if relay not in RELAYS:
            raise ValueError(f"unknown relay {relay!r} in {name!r} (one of {RELAYS})")
        tls = tls or "bio"
        if tls not in TLS_KINDS:
            raise ValueError(f"unknown TLS kind {tls!r} in {name!r} (one of {TLS_KINDS})")
        nodelay, high = True, None
        for opt in filter(None, opts.split("/")):
            if opt == "nodelay0":
                nodelay = False
            elif opt.startswith("hw") and opt[2:].isdigit():
                high = int(opt[2:]) * 1024
            else:
                raise ValueError(f"unknown option {opt!r} in {name!r}")
        return cls(name, cast(RelayKind, relay), cast(TlsKind, tls), nodelay, high)


class _Hold(asyncio.Protocol):
    """Keeps bytes that arrive before the relay takes over."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data


async def dial(
    variant: Variant, host: str, port: int, ctx: ssl.SSLContext | None, server_hostname: str
) -> tuple[asyncio.Transport, bytes]:
    """Connect upstream (TLS when ``ctx``) the variant's way; return the
    transport, reading paused, and any bytes it already received."""
    loop = asyncio.get_running_loop()
    raw, _ = await loop.create_connection(asyncio.Protocol, host, port)
    hold = _Hold()
    if ctx is None:
        raw.set_protocol(hold)
        raw.pause_reading()
        return raw, b""
    transport: asyncio.Transport
    if variant.tls == "sslproto":
        tls = await loop.start_tls(raw, hold, ctx, server_hostname=server_hostname)
        assert tls is not None
        transport = tls
    elif variant.tls == "biosimple":
        simple = _SimpleTLS(raw, ctx, server_hostname, hold)
        simple._begin_handshake(None)
        if simple._handshake is not None:
            await simple._handshake
        transport = simple
    else:
        transport = await start_tls(raw, hold, ctx, server_hostname=server_hostname)
    transport.pause_reading()
    return transport, bytes(hold.buffer)


class _SimpleTLS(TLSTransport, asyncio.Protocol):
    """lakeproxy.tls's first version: the raw transport delivers a bytes object
    per read (``data_received``), each record is read into a bytes object of
    its own and they are joined."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        incoming = self._incoming
        incoming.write(data)
        if self._handshake is not None:
            self._continue_handshake()
            return
        read = self._sslobj.read
        chunks: list[bytes] = []
        eof = False
        try:
            while incoming.pending:
                chunk = read(MAX_RECORD)
                if not chunk:
                    eof = True
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            self._fatal(exc)
            return
        self._flush()
        if chunks:
            plain = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self.bytes_received += len(plain)
            self._app_data(plain)
        if eof:
            self.eof_received()


def _tune(t: asyncio.Transport, variant: Variant) -> None:
    sock = t.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(variant.nodelay))
    high = variant.high_water or product.WRITE_HIGH_WATER
    t.set_write_buffer_limits(high=high, low=high // 4)


class _Closer:
    """Close both transports once; resolve ``done``."""

    def __init__(self, a: asyncio.Transport, b: asyncio.Transport) -> None:
        self.a, self.b = a, b
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
            self.a.close()
            self.b.close()


class _ProtocolHalf(asyncio.Protocol):
    __slots__ = ("closer", "nbytes", "peer")

    def __init__(self, peer: asyncio.Transport, closer: _Closer) -> None:
        self.peer = peer
        self.closer = closer
        self.nbytes = 0

    def data_received(self, data: bytes) -> None:
        self.nbytes += len(data)
        self.peer.write(data)

    def eof_received(self) -> bool:
        self.closer.finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closer.finish()

    def pause_writing(self) -> None:
        self.peer.pause_reading()

    def resume_writing(self) -> None:
        if not self.peer.is_closing():
            self.peer.resume_reading()


class _BareHalf(_ProtocolHalf):
    """``data_received`` is the peer transport's own ``write``."""

    __slots__ = ("data_received",)

    def __init__(self, peer: asyncio.Transport, closer: _Closer) -> None:
        super().__init__(peer, closer)
        self.data_received = peer.write  # type: ignore[method-assign]


class _BufferedHalf(asyncio.BufferedProtocol):
    __slots__ = ("buf", "closer", "nbytes", "peer", "view")

    def __init__(self, peer: asyncio.Transport, closer: _Closer) -> None:
        self.peer = peer
        self.closer = closer
        self.nbytes = 0
        self.buf = bytearray(BUFFER)
        self.view = memoryview(self.buf)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        self.nbytes += nbytes
        self.peer.write(self.buf[:nbytes])  # a copy: the buffer is reused

    def eof_received(self) -> bool:
        self.closer.finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closer.finish()

    def pause_writing(self) -> None:
        self.peer.pause_reading()

    def resume_writing(self) -> None:
        if not self.peer.is_closing():
            self.peer.resume_reading()


class _SharedHalf(asyncio.BufferedProtocol):
    """Reads into the thread's shared buffer and writes the slice as it is: only
    for a peer whose ``write`` consumes it at once (a TLSTransport encrypts it)."""

    __slots__ = ("closer", "nbytes", "peer", "view")

    def __init__(self, peer: asyncio.Transport, closer: _Closer) -> None:
        assert isinstance(peer, TLSTransport)
        self.peer = peer
        self.closer = closer
        self.nbytes = 0
        self.view = shared_buffer()[0]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        self.nbytes += nbytes
        self.peer.write(self.view[:nbytes])

    def eof_received(self) -> bool:
        self.closer.finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closer.finish()

    def pause_writing(self) -> None:
        self.peer.pause_reading()

    def resume_writing(self) -> None:
        if not self.peer.is_closing():
            self.peer.resume_reading()


async def relay(
    variant: Variant,
    client: asyncio.Transport,
    upstream: asyncio.Transport,
    client_leftover: bytes,
    upstream_leftover: bytes,
) -> None:
    """Relay until either side closes."""
    if variant.relay == "splice":
        s = product.Splice(client, upstream)
        s.start(client_leftover=client_leftover, upstream_leftover=upstream_leftover)
        await s.wait()
        return
    half = {"protocol": _ProtocolHalf, "buffered": _BufferedHalf, "bare": _BareHalf}.get(
        variant.relay, _ProtocolHalf
    )
    up_half = _SharedHalf if variant.relay == "shared" else half
    closer = _Closer(client, upstream)
    for t in (client, upstream):
        _tune(t, variant)
    if client_leftover:
        upstream.write(client_leftover)
    if upstream_leftover:
        client.write(upstream_leftover)
    client.set_protocol(up_half(upstream, closer))
    upstream.set_protocol(half(client, closer))
    client.resume_reading()
    upstream.resume_reading()
    await closer.done
