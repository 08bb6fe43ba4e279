"""The splice alone, over real loopback sockets: order, flow control, close attribution."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from lakeproxy.emulator.certs import TlsFiles
from lakeproxy.splice import WRITE_HIGH_WATER, Splice
from lakeproxy.tls import start_tls


class _Pending(asyncio.Protocol):
    """Holds an accepted transport, reading nothing, until the splice takes it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        self.transport = transport


@dataclass
class Rig:
    """client_app <-> [client side | Splice | upstream side] <-> server_app."""

    splice: Splice
    app_reader: asyncio.StreamReader  # the client application
    app_writer: asyncio.StreamWriter
    srv_reader: asyncio.StreamReader  # the "endpoint"
    srv_writer: asyncio.StreamWriter


async def _accepted_pair() -> tuple[asyncio.Transport, asyncio.StreamReader, asyncio.StreamWriter]:
    """A transport accepted by a proxy-side server, and the stream that dialed it."""
    loop = asyncio.get_running_loop()
    holder: list[_Pending] = []

    def factory() -> _Pending:
        p = _Pending()
        holder.append(p)
        return p

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(100):
        if holder and holder[0].transport is not None:
            break
        await asyncio.sleep(0.01)
    server.close()
    t = holder[0].transport
    assert t is not None
    return t, reader, writer


async def _tls_upstream(
    tls: TlsFiles,
) -> tuple[asyncio.Transport, asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLSTransport the proxy dialed (reading paused), and the TLS server's stream."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        loop.create_future()
    )

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.set_result((r, w))

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=tls.server_context())
    port = server.sockets[0].getsockname()[1]
    raw, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    t = await start_tls(raw, _Pending(), tls.client_context(), server_hostname="localhost")
    t.pause_reading()
    async with asyncio.timeout(5):
        srv_r, srv_w = await accepted
    server.close()
    return t, srv_r, srv_w


@pytest.fixture(params=["tcp", "tls"])
async def rig(request: pytest.FixtureRequest, server_tls: TlsFiles) -> AsyncIterator[Rig]:
    """The upstream leg is plain TCP, or TLS by hand (lakeproxy.tls) as in the product."""
    client_t, app_r, app_w = await _accepted_pair()
    if request.param == "tls":
        up_t, srv_r, srv_w = await _tls_upstream(server_tls)
    else:
        up_t, srv_r, srv_w = await _accepted_pair()
    s = Splice(client_t, up_t)
    yield Rig(s, app_r, app_w, srv_r, srv_w)
    s.abort()
    for w in (app_w, srv_w):
        w.close()


async def test_bytes_flow_both_ways_in_order_with_leftovers_first(rig: Rig) -> None:
    rig.app_writer.write(b"late-up")
    rig.srv_writer.write(b"late-down")
    await rig.app_writer.drain()
    await rig.srv_writer.drain()
    rig.splice.start(client_leftover=b"early-up:", upstream_leftover=b"early-down:")
    async with asyncio.timeout(5):
        assert await rig.srv_reader.readexactly(16) == b"early-up:late-up"
        assert await rig.app_reader.readexactly(20) == b"early-down:late-down"
    assert rig.splice.bytes_up == 16
    assert rig.splice.bytes_down == 20


async def test_bulk_transfer_checksum_both_directions(rig: Rig) -> None:
    rig.splice.start()
    payload_up = os.urandom(8 * 1024 * 1024)
    payload_down = os.urandom(8 * 1024 * 1024)

    async def send(w: asyncio.StreamWriter, data: bytes) -> None:
        for i in range(0, len(data), 65536):
            w.write(data[i : i + 65536])
            await w.drain()

    async with asyncio.timeout(30):
        results = await asyncio.gather(
            send(rig.app_writer, payload_up),
            send(rig.srv_writer, payload_down),
            rig.srv_reader.readexactly(len(payload_up)),
            rig.app_reader.readexactly(len(payload_down)),
        )
    assert hashlib.sha256(results[2]).digest() == hashlib.sha256(payload_up).digest()
    assert hashlib.sha256(results[3]).digest() == hashlib.sha256(payload_down).digest()


async def test_slow_reader_pauses_the_other_side(rig: Rig) -> None:
    """A client that does not read: the proxy's buffer stays near the high-water mark."""
    rig.splice.start()
    # Shrink the kernel buffers so the proxy's own buffer fills quickly.
    sock = rig.srv_writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    chunk = b"x" * 65536
    sent = 0
    # The endpoint writes 64 MiB while the client application reads nothing.
    async def pump() -> None:
        nonlocal sent
        while sent < 64 * 1024 * 1024:
            rig.srv_writer.write(chunk)
            sent += len(chunk)
            await rig.srv_writer.drain()

    task = asyncio.ensure_future(pump())
    await asyncio.sleep(1.0)
    assert not task.done(), "the endpoint should be blocked by backpressure"
    buffered = rig.splice.client.get_write_buffer_size()
    assert buffered <= WRITE_HIGH_WATER + 256 * 1024
    # Now read everything: nothing was lost.
    total = 0
    async with asyncio.timeout(30):
        while total < 64 * 1024 * 1024:
            data = await rig.app_reader.read(1 << 20)
            assert data
            total += len(data)
        await task
    assert total == sent


async def test_client_close_is_recorded_and_closes_upstream(rig: Rig) -> None:
    rig.splice.start()
    rig.app_writer.write(b"last words")
    rig.app_writer.close()
    async with asyncio.timeout(10):
        result = await rig.splice.wait()
        assert await rig.srv_reader.read() == b"last words"  # flushed, then EOF
    assert result.closed_by == "client"
    assert result.bytes_up == len(b"last words")


async def test_client_half_close_ends_the_session(rig: Rig) -> None:
    """A FIN cannot tell a half-close from a close: the session ends, what the
    client sent is delivered, and the endpoint is closed (as PgBouncer does)."""
    rig.splice.start()
    rig.app_writer.write(b"query+terminate")
    rig.app_writer.write_eof()
    async with asyncio.timeout(5):
        result = await rig.splice.wait()
        assert await rig.srv_reader.read() == b"query+terminate"
        assert await rig.app_reader.read() == b""
    assert result.closed_by == "client"


async def test_upstream_close_flushes_to_client(rig: Rig) -> None:
    rig.splice.start()
    rig.srv_writer.write(b"goodbye")
    rig.srv_writer.close()
    async with asyncio.timeout(5):
        result = await rig.splice.wait()
        assert await rig.app_reader.read() == b"goodbye"
    assert result.closed_by == "upstream"


async def test_abrupt_reset_closes_both(rig: Rig) -> None:
    rig.splice.start()
    sock = rig.app_writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    rig.app_writer.transport.abort()
    async with asyncio.timeout(5):
        result = await rig.splice.wait()
        assert await rig.srv_reader.read() == b""
    assert result.closed_by == "client"


async def test_proxy_abort(rig: Rig) -> None:
    rig.splice.start()
    rig.splice.abort()
    async with asyncio.timeout(5):
        result = await rig.splice.wait()
        assert await rig.app_reader.read() == b""
        # Abort drops unread bytes: over TLS the server's session tickets were
        # still unread (reading was paused), so the kernel may send RST.
        with contextlib.suppress(ConnectionResetError):
            assert await rig.srv_reader.read() == b""
    assert result.closed_by == "proxy"
