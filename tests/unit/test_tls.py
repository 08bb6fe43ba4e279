"""lakeproxy.tls against a real TLS server (the loop's own SSL), on asyncio and uvloop."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress

import pytest
import uvloop

from lakeproxy.emulator.certs import TlsFiles
from lakeproxy.tls import BIO_SLICE, READ_BUFFER, TLSTransport, start_tls

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def run(loop_name: str, coro: Awaitable[None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(60):
            await coro

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(bounded())


class Collect(asyncio.Protocol):
    """The application protocol on top of the TLS transport."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.changed = asyncio.Event()
        self.eof = False
        self.lost = False
        self.lost_exc: BaseException | None = None
        self.paused = 0

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.changed.set()

    def eof_received(self) -> bool:
        self.eof = True
        self.changed.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_exc = exc
        self.changed.set()

    def pause_writing(self) -> None:
        self.paused += 1

    async def until(self, pred: Callable[[], bool]) -> None:
        while not pred():
            self.changed.clear()
            await self.changed.wait()


@asynccontextmanager
async def tls_server(tls: TlsFiles, handler: Handler) -> AsyncIterator[int]:
    tasks: set[asyncio.Task[None]] = set()

    async def wrapped(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(r, w)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(wrapped, "127.0.0.1", 0, ssl=tls.server_context())
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def dial(
    tls: TlsFiles, port: int, proto: asyncio.BaseProtocol, *, host: str = "localhost",
    on_handshake: Callable[[TLSTransport], None] | None = None,
) -> TLSTransport:
    loop = asyncio.get_running_loop()
    raw, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    try:
        return await start_tls(raw, proto, tls.client_context(), server_hostname=host,
                               on_handshake=on_handshake)
    except BaseException:
        raw.abort()
        raise


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(1 << 16):
        w.write(data)
        await w.drain()


@pytest.fixture(params=sorted(LOOPS))
def loop_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_echo_counts_and_extra_info(loop_name: str, server_tls: TlsFiles) -> None:
    async def scenario() -> None:
        async with tls_server(server_tls, echo) as port:
            app = Collect()
            t = await dial(server_tls, port, app)
            assert isinstance(t.get_extra_info("ssl_object"), ssl.SSLObject)
            assert t.get_extra_info("peercert")["subjectAltName"]
            assert t.get_extra_info("socket") is not None
            assert t.get_extra_info("peername")[0] == "127.0.0.1"
            assert t.get_protocol() is app
            assert not t.can_write_eof()
            t.write(b"hello ")
            t.writelines([b"tls", b"!"])
            await app.until(lambda: len(app.data) >= 10)
            assert bytes(app.data) == b"hello tls!"
            assert (t.bytes_sent, t.bytes_received) == (10, 10)
            t.close()
            await app.until(lambda: app.lost)
            assert t.is_closing()

    run(loop_name, scenario())


def test_on_handshake_bytes_arrive_first(loop_name: str, server_tls: TlsFiles) -> None:
    got: list[bytes] = []

    async def first(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got.append(await r.readexactly(5))
        w.write(b"ok")
        await w.drain()
        await r.read()

    async def scenario() -> None:
        async with tls_server(server_tls, first) as port:
            app = Collect()
            t = await dial(server_tls, port, app, on_handshake=lambda tt: tt.write(b"first"))
            await app.until(lambda: len(app.data) >= 2)
            assert got == [b"first"]
            t.close()
            await app.until(lambda: app.lost)

    run(loop_name, scenario())


def test_wrong_host_name_fails_verification(loop_name: str, server_tls: TlsFiles) -> None:
    async def scenario() -> None:
        async with tls_server(server_tls, echo) as port:
            with pytest.raises(ssl.SSLCertVerificationError):
                await dial(server_tls, port, Collect(), host="not-the-name.test")

    run(loop_name, scenario())


def test_peer_closing_during_handshake(loop_name: str) -> None:
    async def scenario() -> None:
        async def hang_up(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.read(1)
            w.close()

        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        raw, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        ctx = ssl.create_default_context()
        with pytest.raises((ConnectionResetError, ssl.SSLError)):
            await start_tls(raw, Collect(), ctx, server_hostname="localhost")
        raw.abort()
        server.close()

    run(loop_name, scenario())


def test_peer_close_notify_gives_eof_then_lost(loop_name: str, server_tls: TlsFiles) -> None:
    async def bye(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"bye")
        await w.drain()
        w.close()
        await w.wait_closed()

    async def scenario() -> None:
        async with tls_server(server_tls, bye) as port:
            app = Collect()
            await dial(server_tls, port, app)
            await app.until(lambda: app.lost)
            assert bytes(app.data) == b"bye"
            assert app.eof

    run(loop_name, scenario())


def test_close_sends_close_notify(loop_name: str, server_tls: TlsFiles) -> None:
    seen: list[bytes] = []

    async def read_all(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seen.append(await r.read())  # b"" only on a clean close_notify

    async def scenario() -> None:
        async with tls_server(server_tls, read_all) as port:
            app = Collect()
            t = await dial(server_tls, port, app)
            t.write(b"last")
            t.close()
            t.write(b"ignored after close")
            await app.until(lambda: app.lost)
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.01)
            assert seen == [b"last"]

    run(loop_name, scenario())


def test_abort_drops_the_connection(loop_name: str, server_tls: TlsFiles) -> None:
    async def scenario() -> None:
        async with tls_server(server_tls, echo) as port:
            app = Collect()
            t = await dial(server_tls, port, app)
            t.abort()
            await app.until(lambda: app.lost)
            assert t.is_closing()

    run(loop_name, scenario())


def test_bulk_both_ways_in_order(loop_name: str, server_tls: TlsFiles) -> None:
    """More than one socket read's worth, in writes that split records."""
    payload = os.urandom(3 * READ_BUFFER + 12345)

    async def scenario() -> None:
        async with tls_server(server_tls, echo) as port:
            app = Collect()
            t = await dial(server_tls, port, app)
            t.set_write_buffer_limits(high=1 << 20)
            for i in range(0, len(payload), 7000):
                t.write(memoryview(payload)[i : i + 7000])
            await app.until(lambda: len(app.data) >= len(payload))
            assert hashlib.sha256(app.data).digest() == hashlib.sha256(payload).digest()
            assert t.bytes_received == len(payload)
            t.close()
            await app.until(lambda: app.lost)

    run(loop_name, scenario())


def test_writes_larger_than_a_bio_slice_in_order(loop_name: str, server_tls: TlsFiles) -> None:
    """Writes of several BIO slices each (encrypted slice by slice, sent as
    one writev) and reads of up to a whole read buffer (decrypted slice by
    slice) keep every byte, in order."""
    payload = os.urandom(5 * READ_BUFFER + 777)
    step = 3 * BIO_SLICE + 1000

    async def scenario() -> None:
        async with tls_server(server_tls, echo) as port:
            app = Collect()
            t = await dial(server_tls, port, app)
            t.set_write_buffer_limits(high=8 << 20)
            for i in range(0, len(payload), step):
                t.write(memoryview(payload)[i : i + step])
            assert t.bytes_sent == len(payload)
            await app.until(lambda: len(app.data) >= len(payload))
            assert hashlib.sha256(app.data).digest() == hashlib.sha256(payload).digest()
            assert t.bytes_received == len(payload)
            t.close()
            await app.until(lambda: app.lost)

    run(loop_name, scenario())


#: A client process: 16 TLS sessions each send 1 MiB in 256 KiB writes and
#: get it echoed back, then sit idle; prints the heap bytes (in use plus
#: mapped on their own) per session that this left behind.
_BULK_THEN_IDLE = """
import asyncio, gc, ssl, sys
import uvloop
from lakeproxy import memory
from lakeproxy.tls import start_tls

SESSIONS, CHUNK, WRITES = 16, 256 * 1024, 4

class Count(asyncio.Protocol):
    def __init__(self):
        self.n = 0
        self.changed = asyncio.Event()
    def data_received(self, data):
        self.n += len(data)
        self.changed.set()

def heap():
    info = memory._glibc.mallinfo2()
    return info.uordblks + info.hblkhd

async def main(port, ca):
    loop = asyncio.get_running_loop()
    ctx = ssl.create_default_context(cafile=ca)
    payload = b"x" * CHUNK
    sessions = []
    for _ in range(SESSIONS):
        raw, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        app = Count()
        sessions.append((await start_tls(raw, app, ctx, server_hostname="localhost"), app))
    for t, app in sessions:  # one small round trip each: every session fully set up
        t.write(b"x")
        while app.n < 1:
            app.changed.clear()
            await app.changed.wait()
    gc.collect()
    base = heap()
    for t, app in sessions:
        t.set_write_buffer_limits(high=8 << 20)
        for _ in range(WRITES):
            t.write(payload)
        while app.n < 1 + WRITES * CHUNK:
            app.changed.clear()
            await app.changed.wait()
    gc.collect()
    print((heap() - base) // SESSIONS)

uvloop.run(main(int(sys.argv[1]), sys.argv[2]))
"""


def test_a_session_that_relayed_bulk_keeps_little(server_tls: TlsFiles) -> None:
    """An OpenSSL memory BIO keeps the most it ever held for the whole session:
    before BIO_SLICE a session that relayed 256 KiB chunks kept 596 KiB while
    idle (measured here); fed in slices, 140 KiB."""

    async def scenario() -> None:
        async with tls_server(server_tls, echo) as port:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _BULK_THEN_IDLE, str(port), str(server_tls.ca_file),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        per_session = int(out)
        assert per_session < 256 * 1024, f"{per_session // 1024} KiB per idle session"

    run("uvloop", scenario())


def test_a_lost_connection_lets_go_of_its_protocol(loop_name: str, server_tls: TlsFiles) -> None:
    """A protocol that holds its transport (as the upstream login does) and
    the transport are freed when the connection is lost, without the cyclic
    garbage collector: the transport drops its protocol once it has told it."""

    class Holding(Collect):
        transport: TLSTransport | None = None

    def alive() -> int:
        return sum(1 for o in gc.get_objects() if isinstance(o, TLSTransport))

    async def one(port: int, close: str) -> None:
        app = Holding()
        t = app.transport = await dial(server_tls, port, app)
        if close == "abort":
            t.abort()
        else:  # closed after a round trip: close_notify, then the peer's EOF
            t.write(b"x")
            await app.until(lambda: bool(app.data))
            t.close()
        await app.until(lambda: app.lost)
        await asyncio.sleep(0.05)  # the raw transport's last callbacks

    async def scenario() -> None:
        async with tls_server(server_tls, echo) as port:
            gc.collect()
            gc.disable()
            try:
                before = alive()
                await one(port, "abort")
                await one(port, "close")
                assert alive() == before
            finally:
                gc.enable()

    run(loop_name, scenario())


def test_pause_reading_stops_delivery(loop_name: str, server_tls: TlsFiles) -> None:
    async def talk(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readexactly(1)
        w.write(b"x" * 1000)
        await w.drain()
        await r.read()

    async def scenario() -> None:
        async with tls_server(server_tls, talk) as port:
            app = Collect()
            t = await dial(server_tls, port, app)
            t.pause_reading()
            assert not t.is_reading()
            t.write(b"go")
            await asyncio.sleep(0.2)
            assert not app.data
            t.resume_reading()
            await app.until(lambda: len(app.data) >= 1000)
            t.close()
            await app.until(lambda: app.lost)

    run(loop_name, scenario())


def test_write_eof_is_refused(server_tls: TlsFiles) -> None:
    async def scenario() -> None:
        async with tls_server(server_tls, echo) as port:
            app = Collect()
            t = await dial(server_tls, port, app)
            with pytest.raises(NotImplementedError):
                t.write_eof()
            t.abort()
            await app.until(lambda: app.lost)

    run("asyncio", scenario())


# -- record delivery, byte for byte (no sockets: the raw side is a fake transport)


class _RawStub(asyncio.Transport):
    """A raw transport that keeps what is written; reads are fed by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False
        self.proto: asyncio.BaseProtocol | None = None

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.proto = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.proto is not None
        return self.proto

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def resume_reading(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class Chunks(Collect):
    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        assert type(data) is bytes
        self.chunks.append(data)
        super().data_received(data)


def _feed(tls: TLSTransport, data: bytes) -> None:
    """What the loop does on a socket read: fill the buffer, report the count."""
    view = tls.get_buffer(-1)
    view[: len(data)] = data
    tls.buffer_updated(len(data))


class _Peer:
    """The server side, as an SSLObject over memory BIOs."""

    def __init__(self, tls_files: TlsFiles) -> None:
        ctx = tls_files.server_context()
        ctx.num_tickets = 0  # only what the tests send arrives
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)

    def record(self, data: bytes) -> bytes:
        self.obj.write(data)
        return self.outgoing.read()

    def close_notify(self) -> bytes:
        with suppress(ssl.SSLWantReadError):
            self.obj.unwrap()
        return self.outgoing.read()


async def _connected(tls_files: TlsFiles) -> tuple[TLSTransport, Chunks, _Peer, _RawStub]:
    raw, app, peer = _RawStub(), Chunks(), _Peer(tls_files)
    task = asyncio.ensure_future(
        start_tls(raw, app, tls_files.client_context(), server_hostname="localhost")
    )
    await asyncio.sleep(0)
    for _ in range(5):
        peer.incoming.write(bytes(raw.out))
        raw.out.clear()
        with suppress(ssl.SSLWantReadError):
            peer.obj.do_handshake()
        if peer.outgoing.pending:
            tls = raw.get_protocol()
            assert isinstance(tls, TLSTransport)
            _feed(tls, peer.outgoing.read())
        await asyncio.sleep(0)
        if task.done():
            break
    tls = await task
    peer.incoming.write(bytes(raw.out))  # the client's Finished
    raw.out.clear()
    peer.obj.do_handshake()
    return tls, app, peer, raw


def test_records_are_delivered_whole_split_and_joined(server_tls: TlsFiles) -> None:
    async def main() -> None:
        tls, app, peer, _ = await _connected(server_tls)
        # one record per read (the common case): handed over as decrypted
        _feed(tls, peer.record(b"one"))
        assert app.chunks == [b"one"]
        # two records in one read: one delivery
        _feed(tls, peer.record(b"two") + peer.record(b"three"))
        assert app.chunks[1:] == [b"twothree"]
        # a record and a half, then the rest
        four, five = peer.record(b"four"), peer.record(b"five" * 5000)
        _feed(tls, four + five[:100])
        assert app.chunks[2:] == [b"four"]
        _feed(tls, five[100:])
        assert app.chunks[3:] == [b"five" * 5000]
        # half a record alone: nothing yet
        six = peer.record(b"six")
        _feed(tls, six[:3])
        _feed(tls, six[3:])
        assert app.chunks[4:] == [b"six"]
        assert tls.bytes_received == len(b"onetwothreefour" + b"five" * 5000 + b"six")
        assert not app.eof
        assert not app.lost

    run("asyncio", main())


@pytest.mark.parametrize("with_data", [False, True])
def test_close_notify_after_data_in_one_read(server_tls: TlsFiles, with_data: bool) -> None:
    async def main() -> None:
        tls, app, peer, raw = await _connected(server_tls)
        data = peer.record(b"last words") if with_data else b""
        _feed(tls, data + peer.close_notify())
        assert app.chunks == ([b"last words"] if with_data else [])
        assert app.eof
        assert tls.is_closing()
        assert raw.closed

    run("asyncio", main())


def test_a_corrupt_record_ends_the_connection_after_the_good_ones(server_tls: TlsFiles) -> None:
    async def main() -> None:
        tls, app, peer, raw = await _connected(server_tls)
        good = peer.record(b"good")
        bad = bytearray(peer.record(b"tampered"))
        bad[-1] ^= 1  # the AEAD tag no longer matches
        _feed(tls, good + bytes(bad))
        assert app.chunks == [b"good"]
        assert app.lost
        assert isinstance(app.lost_exc, ssl.SSLError)
        assert raw.closed
        # alone, as the first record of a read
        tls2, app2, peer2, _ = await _connected(server_tls)
        bad2 = bytearray(peer2.record(b"tampered"))
        bad2[-1] ^= 1
        _feed(tls2, bytes(bad2))
        assert app2.chunks == []
        assert isinstance(app2.lost_exc, ssl.SSLError)

    run("asyncio", main())
