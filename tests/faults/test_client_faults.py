"""Faults on the client side of the proxy: broken TLS handshakes, silent or
half-sent logins, half-closes. Each checks what the proxy records (a client
fault, never an internal error), that nothing is left open, and that others
are still served."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import psycopg
import pytest
import pytest_asyncio
from faultkit import Proxy, conninfo, fresh_query, one, running_proxy, wait_until

from benchmarks.rawpg import reset
from lakeproxy import session as session_module
from lakeproxy.emulator import Emulator
from lakeproxy.emulator.certs import TlsFiles
from lakeproxy.wire import codec

T = 30
SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"

MakeEmulator = Callable[..., Awaitable[Emulator]]

pytestmark = pytest.mark.timeout(60)


def outcomes(proxy: Proxy) -> dict[str, float]:
    reg = proxy.metrics.registry
    return {
        o: reg.get_sample_value("lakeproxy_client_connections_total", {"outcome": o}) or 0.0
        for o in ("ok", "client_error", "internal")
    }


@pytest_asyncio.fixture(loop_scope="session")
async def tls_proxy(emulator: Emulator, server_tls: TlsFiles) -> AsyncIterator[Proxy]:
    async with running_proxy(
        emulator, LAKEPROXY_TLS_CERT=str(server_tls.cert_file),
        LAKEPROXY_TLS_KEY=str(server_tls.key_file),
    ) as p:
        yield p


@pytest.mark.parametrize("how", ["close", "reset", "garbage", "bad-record", "half-hello"])
async def test_broken_client_tls_handshake_is_a_client_fault(
    tls_proxy: Proxy, server_tls: TlsFiles, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: a client that answered 'S' with a reset, plain text or a
    broken ClientHello was logged with a traceback as an internal error."""
    async with asyncio.timeout(T):
        before = outcomes(tls_proxy)
        reader, writer = await asyncio.open_connection("127.0.0.1", tls_proxy.port)
        writer.write(SSL_REQUEST)
        assert await reader.readexactly(1) == b"S"
        with caplog.at_level(logging.INFO, logger="lakeproxy"):
            if how == "garbage":
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            elif how == "bad-record":
                writer.write(b"\x16\x03\x01\x00\x05hello")
            elif how == "half-hello":
                writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            await writer.drain()
            await asyncio.sleep(0.1)
            if how == "close":
                writer.close()
            else:
                reset(writer)
            await wait_until(lambda: tls_proxy.sessions == 0, 5, "the session to end")
        after = outcomes(tls_proxy)
        assert after["internal"] == before["internal"], "a client fault is not an internal error"
        assert after["client_error"] == before["client_error"] + 1
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert not errors, [r.getMessage() for r in errors]
        # TLS clients are still served.
        conn = await psycopg.AsyncConnection.connect(
            conninfo(tls_proxy.port, sslmode="verify-full", sslrootcert=str(server_tls.ca_file)),
            autocommit=True)
        try:
            assert conn.pgconn.ssl_in_use
            assert await one(conn, "SELECT 1") == 1
        finally:
            await conn.close()


async def test_silent_and_half_sent_logins_time_out(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fifty connections that never finish their startup hold no one else up and
    are closed once the login-message timeout passes."""
    monkeypatch.setattr(session_module, "LOGIN_MESSAGE_TIMEOUT", 1.0)
    async with asyncio.timeout(T), running_proxy(emulator) as proxy:
        startup = codec.encode(codec.StartupMessage(3, 0, {"user": "slow"}))
        idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        for i in range(50):
            r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
            if i % 2:
                w.write(startup[: 1 + i % (len(startup) - 1)])  # part of a packet
            idle.append((r, w))
        await fresh_query(proxy.port)
        try:
            for r, _ in idle:
                assert await asyncio.wait_for(r.read(), 5) == b"", "closed without a word"
            await wait_until(lambda: proxy.sessions == 0, 5, "the sessions to end")
            assert outcomes(proxy)["client_error"] == 50
            assert outcomes(proxy)["internal"] == 0
        finally:
            for _, w in idle:
                w.close()


async def test_half_close_after_a_write_delivers_it(emulator: Emulator) -> None:
    """A client that sends an INSERT and shuts down its sending side at once:
    the row lands (the client's bytes are never dropped) and nothing stays open."""
    async with asyncio.timeout(T), running_proxy(emulator) as proxy:
        setup = await psycopg.AsyncConnection.connect(conninfo(proxy.port), autocommit=True)
        try:
            await setup.execute("CREATE TABLE IF NOT EXISTS half_close (n int)")
            await setup.execute("TRUNCATE half_close")
            for n in range(20):
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                writer.write(codec.encode(codec.StartupMessage(3, 0, {"user": "h"})))
                while (await reader.readexactly(1)) != b"Z":
                    size = struct.unpack("!I", await reader.readexactly(4))[0]
                    await reader.readexactly(size - 4)
                await reader.readexactly(5)
                sql = b"INSERT INTO half_close VALUES (%d)\x00" % n
                writer.write(b"Q" + struct.pack("!I", len(sql) + 4) + sql)
                writer.write_eof()
                await asyncio.wait_for(reader.read(), 5)  # the proxy closes; no hang
                writer.close()
            await wait_until(lambda: proxy.sessions == 1, 5, "half-closed sessions to end")
            rows = None
            for _ in range(50):
                rows = await one(setup, "SELECT count(*) FROM half_close")
                if rows == 20:
                    break
                await asyncio.sleep(0.05)
            assert rows == 20
        finally:
            await setup.execute("DROP TABLE IF EXISTS half_close")
            await setup.close()


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_client_gone_during_a_cold_start_stops_the_dial(
    make_emulator: MakeEmulator, how: str
) -> None:
    """Regression: with reading paused during the dial, a client that hung up
    while the endpoint woke went unnoticed until the login completed (seconds
    later, and one endpoint session opened for no one)."""
    emu = await make_emulator(wake_time=2.0)
    async with asyncio.timeout(T), running_proxy(emu) as proxy:
        await fresh_query(proxy.port)  # a credential is held; the compute is up
        await emu.frontdoor.suspend()
        reg = proxy.metrics.registry
        logins_before = reg.get_sample_value("lakeproxy_upstream_connect_seconds_count")
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(codec.encode(codec.StartupMessage(3, 0, {"user": "impatient"})))
        await writer.drain()
        await asyncio.sleep(0.3)  # the proxy is now waiting for the wake
        assert proxy.sessions == 1
        if how == "close":
            writer.close()
        else:
            reset(writer)
        await wait_until(lambda: proxy.sessions == 0, 1.0, "the proxy to drop the dial")
        await asyncio.sleep(2.5)  # past the wake
        assert reg.get_sample_value("lakeproxy_upstream_connect_seconds_count") == logins_before
        await wait_until(lambda: emu.frontdoor.sessions == 0, 5, "no endpoint session left")
        await fresh_query(proxy.port)
