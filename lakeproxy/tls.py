"""Client-side TLS done by hand: an ``ssl.SSLObject`` over memory BIOs on a plain transport.

:func:`start_tls` upgrades a connected TCP transport (asyncio's or uvloop's) to
TLS and returns a :class:`TLSTransport`, an ``asyncio.Transport`` that encrypts
what is written to it and hands decrypted bytes to its protocol. lakeproxy uses
it instead of ``loop.start_tls`` on the upstream leg because it costs less per
message: 17.1 µs of proxy CPU per relayed round trip against 20.3 µs over
uvloop's ``SSLProtocol``, and the same in bulk (benchmarks/README.md, "splice
variants"). Where the difference comes from:

- the object is both the raw transport's protocol and the application's
  transport, and the splice hands plaintext straight to the client's
  ``write``: one Python frame per socket read each way, no write queue, no
  per-read flow-control bookkeeping (``SSLProtocol`` re-computes buffer sizes
  and app/SSL reading states on every read and write);
- the socket is read into one buffer per thread (``BufferedProtocol``) and
  records are decrypted into another, so a read allocates one bytes object,
  of the plaintext's size; ``SSL_read``/``SSL_write`` are called on the C
  object directly;
- a read decrypts while the incoming BIO holds bytes and stops there:
  OpenSSL (without read-ahead, CPython's default) takes exactly one record per
  ``SSL_read``, so an empty BIO means nothing is left and no read is spent on
  raising ``SSLWantReadError``;
- the handshake can send the first application bytes with the client's
  Finished in one TCP write (``on_handshake``): one syscall and one wakeup of
  the server less per new connection (TLS 1.3).

Half-close is not supported (as with any TLS transport): ``eof_received`` of
the protocol is called on the peer's close_notify or TCP EOF and its return
value is ignored; the transport then closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Callable
from typing import Any, Final, cast

__all__ = ["BIO_SLICE", "MAX_RECORD", "READ_BUFFER", "TLSTransport", "shared_buffer", "start_tls"]

#: The largest plaintext a TLS record carries (2**14, RFC 8446 5.1): one
#: ``SSL_read`` returns at most one record, so reading this much never leaves
#: plaintext behind.
MAX_RECORD: Final = 16384

#: Bytes read from the socket at most per read (uvloop's own read size).
READ_BUFFER: Final = 256 * 1024

#: The most bytes put into a session's memory BIO at once. An OpenSSL memory
#: BIO never shrinks: it keeps 4/3 of the most it ever held for the rest of
#: the session (measured: 300 BIOs that held 256 KiB once keep 76 MiB, 64 KiB
#: once 20 MiB). Feeding reads and writes through in slices of this size
#: bounds the two BIOs of a session to ~0.2 MiB whatever it relayed, for a
#: few more C calls per 256 KiB (RELIABILITY.md section 5; bulk CPU per MB
#: measured unchanged, benchmarks/results).
BIO_SLICE: Final = 64 * 1024

_WantRead: Final = ssl.SSLWantReadError
#: Past this much plaintext, deliver before decrypting more (the buffer holds
#: READ_BUFFER + 2 records; one socket read never gets here).
_OUT_LIMIT: Final = READ_BUFFER + MAX_RECORD
_local = threading.local()


def shared_buffer() -> tuple[memoryview, memoryview]:
    """This thread's (read buffer, plaintext buffer), made once per thread.

    Every TLS transport (and splice half) of an event loop reads into the
    same buffer: what is read is consumed (copied into the TLS BIO, or
    encrypted) before the callback returns, so no session needs one of its
    own (idle sessions stay small) and no bytes object is allocated per read.
    """
    bufs: tuple[memoryview, memoryview] | None = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = (memoryview(bytearray(READ_BUFFER)),
                memoryview(bytearray(READ_BUFFER + 2 * MAX_RECORD)))
        _local.bufs = bufs
    return bufs


def _noop_data(data: bytes) -> None:
    pass


#: The protocol of a transport whose connection is lost: it lets go of the
#: real one, which often holds the transport (a login in progress does), so
#: the pair is freed by reference counting, not by the cyclic collector.
_GONE: Final = asyncio.Protocol()


class TLSTransport(asyncio.Transport, asyncio.BufferedProtocol):
    """TLS over ``raw``: the raw transport's (buffered) protocol, and a transport
    for ``protocol``.

    Made by :func:`start_tls`. ``bytes_sent`` and ``bytes_received`` count
    plaintext bytes written to and delivered by this transport.
    """

    __slots__ = (
        "_app",
        "_app_data",
        "_closing",
        "_handshake",
        "_incoming",
        "_lost",
        "_on_handshake",
        "_out",
        "_outgoing",
        "_raw",
        "_read",
        "_read_bytes",
        "_sslobj",
        "_view",
        "_write",
        "bytes_received",
        "bytes_sent",
    )

    def __init__(
        self,
        raw: asyncio.Transport,
        context: ssl.SSLContext,
        server_hostname: str | None,
        protocol: asyncio.BaseProtocol,
    ) -> None:
        super().__init__()
        self._raw = raw
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._sslobj = context.wrap_bio(
            self._incoming, self._outgoing, server_side=False, server_hostname=server_hostname
        )
        # The C object behind ssl.SSLObject: its read() and write() skip one
        # Python frame per call (the wrapper only forwards).
        inner = getattr(self._sslobj, "_sslobj", self._sslobj)
        self._read = cast("Callable[[int, memoryview], int]", inner.read)
        self._read_bytes = cast("Callable[[int], bytes]", inner.read)
        self._write = cast("Callable[[bytes | bytearray | memoryview], int]", inner.write)
        self._view, self._out = shared_buffer()
        self._app: asyncio.BaseProtocol = protocol
        self._app_data: Callable[[bytes], object] = _noop_data
        self._closing = False
        self._lost = False
        self._handshake: asyncio.Future[None] | None = None
        self._on_handshake: Callable[[TLSTransport], None] | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.set_protocol(protocol)

    @property
    def ssl_object(self) -> ssl.SSLObject:
        """The TLS session (peer certificate, cipher, ALPN)."""
        return self._sslobj

    # -- the application's side: asyncio.Transport --------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` and write the records to the raw transport.

        ``data`` is consumed before this returns (the caller may reuse it).
        """
        if self._closing or not data:
            return
        n = len(data)
        try:
            if n <= BIO_SLICE:
                self._write(data)
                self._raw.write(self._outgoing.read())
            else:
                # Bulk: encrypt in slices (the outgoing BIO stays small, see
                # BIO_SLICE) and hand them to the socket as one writev.
                view = memoryview(data)
                pieces = []
                for i in range(0, n, BIO_SLICE):
                    self._write(view[i : i + BIO_SLICE])
                    pieces.append(self._outgoing.read())
                self._raw.writelines(pieces)
        except ssl.SSLError as exc:  # the TLS session is broken (after a fatal alert)
            self._fatal(exc)
            return
        self.bytes_sent += n

    def writelines(self, list_of_data: object) -> None:
        for data in cast("list[bytes]", list_of_data):
            self.write(data)

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS does not support half-close")

    def close(self) -> None:
        """Send close_notify, then close the raw transport once its buffer is flushed."""
        if self._closing:
            return
        self._closing = True
        if self._handshake is None:
            # unwrap() queues close_notify (the peer's is not awaited: it then
            # raises SSLWantReadError).
            with contextlib.suppress(ssl.SSLError, ValueError):
                self._sslobj.unwrap()
            self._flush()
        self._raw.close()

    def abort(self) -> None:
        """Close at once; buffered bytes are dropped."""
        self._closing = True
        self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._raw.is_closing()

    def pause_reading(self) -> None:
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._raw.resume_reading()

    def is_reading(self) -> bool:
        return self._raw.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol
        self._app_data = cast(asyncio.Protocol, protocol).data_received

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app

    def deliver_to(self, write: Callable[[bytes], object]) -> None:
        """Hand decrypted bytes to ``write`` (e.g. another transport's
        ``write``) instead of the protocol's ``data_received``; the protocol
        still gets everything else. Undone by :meth:`set_protocol`.
        ``bytes_received`` counts what is handed over either way."""
        self._app_data = write

    def get_extra_info(self, name: str, default: Any = None) -> Any:  # as asyncio's
        obj = self._sslobj
        if name == "ssl_object":
            return obj
        if name == "peercert":
            return obj.getpeercert()
        if name == "cipher":
            return obj.cipher()
        if name == "compression":
            return obj.compression()
        if name == "sslcontext":
            return obj.context
        return self._raw.get_extra_info(name, default)

    # -- the raw transport's side: asyncio.BufferedProtocol ------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        """Decrypt every complete record; hand the plaintext to the protocol as
        one bytes object.

        The hot path for upstream -> client: one Python frame per socket read
        besides ``get_buffer`` (``_decrypt``/``_deliver`` helpers cost 0.2 µs
        per message more: inlined). The first record is decrypted into a bytes
        object of its own: when it is the only one (a query's answer, the
        common case) that object is handed over as it is, 0.27 µs less per
        message than decrypting into the shared buffer and copying out.
        Further records (bulk) go into the plaintext buffer, one copy each.
        """
        if nbytes > BIO_SLICE and self._handshake is None:
            self._receive_bulk(nbytes)
            return
        incoming = self._incoming
        if nbytes:
            incoming.write(self._view[:nbytes])
        if self._handshake is not None:
            self._continue_handshake()
            return
        # An SSL_read takes exactly one record from the BIO (no read-ahead):
        # once the BIO is empty nothing is left, and no read is wasted on
        # raising SSLWantReadError. A partial record raises it, once.
        eof = False
        try:
            data = self._read_bytes(MAX_RECORD)
            eof = not data  # b"": close_notify
        except _WantRead:
            data = b""
        except ssl.SSLError as exc:
            self._fatal(exc)
            return
        if data and incoming.pending:
            # More records came with it (bulk): into the plaintext buffer after it.
            read = self._read
            out = self._out
            pos = len(data)
            out[:pos] = data
            try:
                while incoming.pending:
                    if pos > _OUT_LIMIT:  # only when more than one socket read arrived
                        self.bytes_received += pos
                        self._app_data(bytes(out[:pos]))
                        pos = 0
                    n = read(MAX_RECORD, out[pos:])
                    if not n:  # close_notify
                        eof = True
                        break
                    pos += n
            except _WantRead:
                pass
            except ssl.SSLError as exc:
                if pos:  # what was decrypted before the bad record still goes through
                    self.bytes_received += pos
                    self._app_data(bytes(out[:pos]))
                self._fatal(exc)
                return
            data = bytes(out[:pos])
        if self._outgoing.pending:  # e.g. a KeyUpdate answer
            self._raw.write(self._outgoing.read())
        if data:
            self.bytes_received += len(data)
            self._app_data(data)
        if eof:
            self.eof_received()

    def _receive_bulk(self, nbytes: int) -> None:
        """:meth:`buffer_updated` for a read of more than :data:`BIO_SLICE`:
        the ciphertext goes into the incoming BIO a slice at a time, each
        decrypted into the plaintext buffer before the next (the BIO stays
        small); the plaintext is handed over as one bytes object."""
        incoming = self._incoming
        read = self._read
        out = self._out
        view = self._view
        pos = 0
        eof = False
        try:
            for start in range(0, nbytes, BIO_SLICE):
                incoming.write(view[start : min(start + BIO_SLICE, nbytes)])
                try:
                    while incoming.pending:
                        if pos > _OUT_LIMIT:  # only with bytes left from an earlier read
                            self.bytes_received += pos
                            self._app_data(bytes(out[:pos]))
                            pos = 0
                        n = read(MAX_RECORD, out[pos:])
                        if not n:  # close_notify
                            eof = True
                            break
                        pos += n
                except _WantRead:  # a partial record: the next slice completes it
                    continue
                if eof:
                    break
        except ssl.SSLError as exc:
            if pos:  # what was decrypted before the bad record still goes through
                self.bytes_received += pos
                self._app_data(bytes(out[:pos]))
            self._fatal(exc)
            return
        if self._outgoing.pending:  # e.g. a KeyUpdate answer
            self._raw.write(self._outgoing.read())
        if pos:
            self.bytes_received += pos
            self._app_data(bytes(out[:pos]))
        if eof:
            self.eof_received()

    def data_received(self, data: bytes) -> None:
        """For transports that do not support buffered reads."""
        self._incoming.write(data)
        self.buffer_updated(0)

    def eof_received(self) -> bool:
        """The peer closed (TCP EOF or close_notify): tell the protocol, then close."""
        if self._handshake is not None:
            self._fail_handshake(ConnectionResetError("the peer closed the connection during TLS"))
            return False
        if not self._closing:
            cast(asyncio.Protocol, self._app).eof_received()
            self.close()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self._closing = True
        if self._handshake is not None:
            err = ConnectionResetError("the connection was lost during the TLS handshake")
            err.__cause__ = exc
            self._fail_handshake(err)
            return
        if not self._lost:
            self._lose(exc)

    def pause_writing(self) -> None:
        self._app.pause_writing()

    def resume_writing(self) -> None:
        self._app.resume_writing()

    # -- internals -----------------------------------------------------------------

    def _flush(self) -> None:
        if self._outgoing.pending:
            self._raw.write(self._outgoing.read())

    def _fatal(self, exc: BaseException) -> None:
        """A TLS error after the handshake: send the alert, drop the connection."""
        if self._closing:
            return
        self._flush()
        self._closing = True
        self._raw.abort()
        if not self._lost:
            self._lose(exc)

    def _lose(self, exc: BaseException | None) -> None:
        """Tell the protocol the connection is lost, then let go of it."""
        self._lost = True
        app = self._app
        self._app, self._app_data = _GONE, _noop_data
        app.connection_lost(cast("Exception | None", exc))

    def _begin_handshake(self, on_handshake: Callable[[TLSTransport], None] | None) -> None:
        self._handshake = asyncio.get_running_loop().create_future()
        self._on_handshake = on_handshake
        self._raw.set_protocol(self)
        self._continue_handshake()
        self._raw.resume_reading()

    def _continue_handshake(self) -> None:
        try:
            self._sslobj.do_handshake()
        except _WantRead:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:
            self._flush()  # the alert, if OpenSSL made one
            self._fail_handshake(exc)
            return
        done = self._handshake
        self._handshake = None
        on_handshake, self._on_handshake = self._on_handshake, None
        if on_handshake is not None:
            # Its first writes leave with our Finished, in one TCP write.
            on_handshake(self)
        self._flush()
        if done is not None and not done.done():
            done.set_result(None)
        if self._incoming.pending:  # records that came with the server's Finished
            self.buffer_updated(0)

    def _fail_handshake(self, exc: BaseException) -> None:
        done = self._handshake
        self._handshake = None
        self._closing = True
        if done is not None and not done.done():
            done.set_exception(exc)


async def start_tls(
    raw: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    context: ssl.SSLContext,
    *,
    server_hostname: str | None,
    on_handshake: Callable[[TLSTransport], None] | None = None,
) -> TLSTransport:
    """Run the client side of a TLS handshake over ``raw`` (taking over its
    protocol) and return the TLS transport, delivering to ``protocol``.

    ``server_hostname`` is sent as SNI and checked against the certificate as
    ``context`` says. ``on_handshake(tls)`` runs as soon as the handshake
    completes, before the client's last handshake bytes are flushed: what it
    writes leaves in the same TCP write. Not cancel-safe on its own: on
    cancellation or failure the caller aborts ``raw``.

    Returns:
        The TLS transport (reading as ``raw`` was resumed).
    Raises:
        ssl.SSLCertVerificationError: the certificate was refused.
        ssl.SSLError: another TLS failure (the peer's alert, a protocol error).
        ConnectionResetError: the connection closed during the handshake.
    """
    tls = TLSTransport(raw, context, server_hostname, protocol)
    tls._begin_handshake(on_handshake)
    done = tls._handshake
    if done is not None:
        await done
    return tls
