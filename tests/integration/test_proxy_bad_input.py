"""Clients that break the rules, by hand over raw sockets: each gets its
ErrorResponse (08P01) or a close within the login timeout, and the proxy goes
on serving. Clients that vanish abruptly leave no upstream session behind."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from lakeproxy.emulator import Emulator
from lakeproxy.session import LOGIN_MESSAGE_TIMEOUT
from lakeproxy.wire.codec import (
    AuthenticationOk,
    BackendMessage,
    ErrorResponse,
    GSSENCRequest,
    NegotiateProtocolVersion,
    OtherMessage,
    ReadyForQuery,
    encode,
)

from .conftest import ProxyFactory
from .proxy_rig import (
    CLIENT_USER,
    DATABASE,
    SSL_REQUEST,
    Proxy,
    RawClient,
    eventually,
    query_bytes,
    role_backends,
    startup_bytes,
)

MakeEmulator = Callable[..., Awaitable[Emulator]]
PARAMS = {"user": CLIENT_USER, "database": DATABASE}


def _packet(code: int, body: bytes) -> bytes:
    return (8 + len(body)).to_bytes(4, "big") + code.to_bytes(4, "big") + body


BAD_STARTS = {
    "short garbage": b"\x00\x00\x00\x10" + b"\xde\xad\xbe\xef" * 3,
    "protocol 2.0": _packet(2 << 16, b"user\x00someone\x00database\x00db\x00\x00"),
    "early bytes after SSLRequest": SSL_REQUEST + startup_bytes(PARAMS),
}


#: A startup length field below 8 or above 10,000: PostgreSQL closes the
#: connection without a reply (the peer may not speak the protocol at all).
SILENT_STARTS = {
    "http request": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "tls client hello": bytes.fromhex("16030100f4010000f00303") + b"\x00" * 32,
    "oversized startup": (20_000).to_bytes(4, "big") + (3 << 16).to_bytes(4, "big")
    + b"user\x00" + b"x" * 9_000,
    "length below 8": (4).to_bytes(4, "big") + (3 << 16).to_bytes(4, "big"),
    # node-postgres ending a client before it connected: Terminate, then its startup.
    "terminate before startup": b"X\x00\x00\x00\x04" + startup_bytes(PARAMS),
}


async def _served(p: Proxy) -> None:
    assert await p.psql("SELECT current_user") == f"{p.role}\n"


@pytest.mark.parametrize("name", list(BAD_STARTS))
async def test_bad_start_gets_08p01_and_the_proxy_keeps_serving(
    emulator: Emulator, proxy: ProxyFactory, name: str,
) -> None:
    async with asyncio.timeout(20):
        p = await proxy(emulator)
        client = await RawClient.open(p.port)
        try:
            client.send(BAD_STARTS[name])
            started = time.monotonic()
            messages = await client.read_until_closed()
        finally:
            await client.close()
        assert time.monotonic() - started < 2
        assert len(messages) == 1, messages
        err = messages[0]
        assert isinstance(err, ErrorResponse)
        assert (err.severity, err.sqlstate) == ("FATAL", "08P01")
        assert err.message.startswith("lakeproxy:"), err.message
        await _served(p)
    assert emulator.frontdoor.connections == 1  # only the psql at the end went upstream


@pytest.mark.parametrize("name", list(SILENT_STARTS))
async def test_out_of_range_startup_length_is_closed_without_a_reply(
    emulator: Emulator, proxy: ProxyFactory, name: str,
) -> None:
    """As PostgreSQL: no ErrorResponse (node-postgres would raise it as an
    unhandled error), the connection is closed, counted as a client error, and
    the proxy keeps serving."""
    async with asyncio.timeout(20):
        p = await proxy(emulator)
        client = await RawClient.open(p.port)
        try:
            client.send(SILENT_STARTS[name])
            messages = await client.read_until_closed()
        finally:
            await client.close()
        assert messages == []
        await eventually(lambda: _has(p, 'outcome="client_error"} 1.0'), timeout=5)
        await _served(p)
    assert emulator.frontdoor.connections == 1  # only the psql at the end went upstream


async def _has(p: Proxy, text: str) -> bool:
    return text in p.metrics.render().decode()


async def test_ssl_and_gssenc_requests_get_n_then_login(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    async with asyncio.timeout(20):
        p = await proxy(emulator)
        client = await RawClient.open(p.port)
        try:
            client.send(encode(GSSENCRequest()))
            assert await client.read_byte() == b"N"
            client.send(SSL_REQUEST)
            assert await client.read_byte() == b"N"
            key = await client.login(PARAMS)
            assert key.process_id > 0
        finally:
            await client.close()


async def test_newer_minor_version_and_pq_options_are_negotiated_down(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    async with asyncio.timeout(20):
        p = await proxy(emulator)
        client = await RawClient.open(p.port)
        try:
            client.send(startup_bytes({**PARAMS, "_pq_.something": "on"}, minor=2))
            messages: list[BackendMessage] = []
            while not isinstance(msg := await client.expect_message(), ReadyForQuery):
                messages.append(msg)
        finally:
            await client.close()
    assert messages[0] == NegotiateProtocolVersion(0, ("_pq_.something",))
    assert messages[1] == AuthenticationOk()


async def test_silent_clients_are_closed_at_the_login_timeout(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    """One client sends nothing, another stops halfway through its startup
    packet, a third goes quiet after SSLRequest: all are closed after
    LOGIN_MESSAGE_TIMEOUT, and others are served meanwhile."""
    async with asyncio.timeout(LOGIN_MESSAGE_TIMEOUT + 15):
        p = await proxy(emulator)
        silent = await RawClient.open(p.port)
        partial = await RawClient.open(p.port)
        partial.send(startup_bytes(PARAMS)[:10])
        after_ssl = await RawClient.open(p.port)
        after_ssl.send(SSL_REQUEST)
        assert await after_ssl.read_byte() == b"N"
        started = time.monotonic()
        await _served(p)
        clients = (silent, partial, after_ssl)
        try:
            results = await asyncio.gather(*(c.read_until_closed() for c in clients))
            took = time.monotonic() - started
        finally:
            for c in clients:
                await c.close()
        await _served(p)
    assert results == [[], [], []]
    assert LOGIN_MESSAGE_TIMEOUT - 0.5 <= took <= LOGIN_MESSAGE_TIMEOUT + 2
    assert p.server.sessions == set()


async def test_past_max_clients_gets_53300(emulator: Emulator, proxy: ProxyFactory) -> None:
    async with asyncio.timeout(20):
        p = await proxy(emulator, LAKEPROXY_MAX_CLIENTS="2")
        first, second = await p.asyncpg(), await p.asyncpg()
        try:
            third = await RawClient.open(p.port)
            third.send(startup_bytes(PARAMS))
            messages = await third.read_until_closed()
            await third.close()
            assert len(messages) == 1
            assert isinstance(messages[0], ErrorResponse)
            assert messages[0].sqlstate == "53300"
            assert messages[0].message.startswith("lakeproxy:")
        finally:
            await first.close()
        await asyncio.sleep(0.1)
        try:
            await _served(p)  # a place is free again
        finally:
            await second.close()


# --------------------------------------------------------------------------- abrupt closes


async def _simple_query(client: RawClient, sql: str) -> list[BackendMessage]:
    client.send(query_bytes(sql))
    out: list[BackendMessage] = []
    while not isinstance(msg := await client.expect_message(), ReadyForQuery):
        out.append(msg)
    return out


async def _nothing_left(p: Proxy, emu: Emulator) -> None:
    """Wait until neither lakeproxy nor the front door holds a session, then
    until PostgreSQL has no backend of the emulator's role."""

    async def closed() -> bool:
        return not p.server.sessions and emu.frontdoor.sessions == 0

    async def no_backends() -> bool:
        return await role_backends(emu.pg, emu.role) == 0

    await eventually(closed, timeout=3, interval=0.05)
    await eventually(no_backends, timeout=5, interval=0.2)


async def _abort_mid_streaming_query(client: RawClient) -> None:
    client.send(query_bytes("SELECT repeat('x', 1000) FROM generate_series(1, 10000000)"))
    msg = await client.read_message()
    assert isinstance(msg, OtherMessage)
    assert msg.tag == b"T"  # RowDescription: the rows are on their way


async def _abort_mid_sleep(client: RawClient) -> None:
    client.send(query_bytes("SELECT pg_sleep(30)"))
    await asyncio.sleep(0.5)


async def _abort_mid_copy_in(client: RawClient) -> None:
    await _simple_query(client, "CREATE TEMP TABLE sink (line text)")
    client.send(query_bytes("COPY sink FROM STDIN"))
    msg = await client.read_message()
    assert isinstance(msg, OtherMessage)
    assert msg.tag == b"G"  # CopyInResponse
    row = b"some text of a row\n" * 100
    client.send((b"d" + (len(row) + 4).to_bytes(4, "big") + row) * 50)
    await asyncio.sleep(0.3)


@pytest.mark.parametrize("during", ["streaming query", "pg_sleep", "COPY IN"])
async def test_no_upstream_session_outlives_an_aborted_client(
    make_emulator: MakeEmulator, proxy: ProxyFactory, during: str,
) -> None:
    emu = await make_emulator()
    # A backend blocked in pg_sleep notices a closed socket only by polling it
    # (as it would for a direct client); every other case notices at once.
    await asyncio.to_thread(
        emu.pg.psql, f"ALTER ROLE \"{emu.role}\" SET client_connection_check_interval = '200ms'")
    async with asyncio.timeout(30):
        p = await proxy(emu)
        client = await RawClient.open(p.port)
        key = await client.login(PARAMS)
        await {"streaming query": _abort_mid_streaming_query, "pg_sleep": _abort_mid_sleep,
               "COPY IN": _abort_mid_copy_in}[during](client)
        assert await role_backends(emu.pg, emu.role) == 1
        client.abort()
        await _nothing_left(p, emu)
        assert p.server.cancels.lookup(key.process_id, key.secret) is None
        await _served(p)
        await _nothing_left(p, emu)


async def test_no_upstream_session_outlives_a_client_gone_during_login(
    make_emulator: MakeEmulator, proxy: ProxyFactory,
) -> None:
    """The client hangs up while lakeproxy waits for the compute to wake: the
    login is abandoned, and nothing is left once the compute is up."""
    emu = await make_emulator(wake_time=2.0)
    await emu.frontdoor.suspend()
    async with asyncio.timeout(30):
        p = await proxy(emu)
        client = await RawClient.open(p.port)
        client.send(startup_bytes(PARAMS))
        await asyncio.sleep(0.5)
        assert len(p.server.sessions) == 1
        client.abort()
        # Well before the wake completes (2 s): the hang-up is seen within one
        # poll (HANG_UP_POLL) even on a loaded machine.
        for _ in range(50):
            if not p.server.sessions:
                break
            await asyncio.sleep(0.02)
        assert not p.server.sessions
        await asyncio.sleep(2.0)  # the wake completes
        await _nothing_left(p, emu)
        await _served(p)

