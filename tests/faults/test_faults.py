"""Faults between lakeproxy and the endpoint, in the credential API, and on the
endpoint itself. Real processes and sockets: PostgreSQL, the emulator (TLS
front door + workspace API), lakeproxy in this process, a fault-injecting TCP
relay in front of the front door, and psycopg / a raw protocol client.

Each test asserts what the client sees (its SQLSTATE, and that it never waits
past LAKEPROXY_CONNECT_DEADLINE plus a margin) and that the proxy keeps
serving: afterwards a fresh client runs a query.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import psycopg
import psycopg.errors
import pytest
import pytest_asyncio
from fault_relay import FaultRelay
from faultkit import Proxy, connect, fresh_query, one, raw_login, running_proxy, wait_until

from lakeproxy.emulator import Emulator
from lakeproxy.emulator.api import OIDC_PATH, POSTGRES_CREDENTIALS_PATH

#: LAKEPROXY_CONNECT_DEADLINE for these tests, and how late past it a client may hear.
DEADLINE = 2.0
MARGIN = 1.5
T = 40  # per-test asyncio timeout

pytestmark = pytest.mark.timeout(60)


@pytest_asyncio.fixture(loop_scope="session")
async def relay(emulator: Emulator) -> AsyncIterator[FaultRelay]:
    async with FaultRelay("127.0.0.1", emulator.port) as r:
        yield r


@pytest_asyncio.fixture(loop_scope="session")
async def proxy(emulator: Emulator, relay: FaultRelay) -> AsyncIterator[Proxy]:
    """The proxy dialing the endpoint through the relay (TLS name still PGHOST)."""
    async with running_proxy(
        emulator, LAKEBASE_HOSTADDR="127.0.0.1", LAKEBASE_PORT=str(relay.port),
        LAKEPROXY_CONNECT_DEADLINE=str(DEADLINE),
    ) as p:
        yield p


async def no_leftover_sessions(proxy: Proxy, emulator: Emulator, expected: int = 0) -> None:
    """The proxy and the front door both end up holding ``expected`` sessions."""
    await wait_until(lambda: proxy.sessions == expected, 5, "proxy sessions to end")
    await wait_until(lambda: emulator.frontdoor.sessions == expected, 5,
                     "front-door sessions to end")


# --------------------------------------------------------------------- the network path


@pytest.mark.parametrize("mode", ["blackhole", "reset"])
async def test_dead_path_gives_08006_by_the_deadline(
    proxy: Proxy, relay: FaultRelay, emulator: Emulator, mode: str
) -> None:
    async with asyncio.timeout(T):
        relay.set_fault("blackhole" if mode == "blackhole" else "reset")
        login = await raw_login(proxy.port)
        assert login.sqlstate == "08006", login.error
        assert login.error is not None
        assert login.error.message.startswith("lakeproxy:")
        assert login.error.get("H"), "a hint is owed"
        assert login.closed
        assert DEADLINE - 0.2 <= login.seconds <= DEADLINE + MARGIN
        if mode == "reset":
            assert relay.accepted >= 2, "resets are retried"
        relay.set_fault("pass")
        await fresh_query(proxy.port)
        await no_leftover_sessions(proxy, emulator)


async def test_resets_then_recovery_within_the_deadline(
    proxy: Proxy, relay: FaultRelay
) -> None:
    async with asyncio.timeout(T):
        relay.set_fault("reset", count=3)
        login = await raw_login(proxy.port)
        assert login.error is None, login.error
        assert relay.accepted == 4
        assert login.seconds < DEADLINE


@pytest.mark.parametrize("cut_after", [1, 7, 600])
async def test_tls_handshake_cut_is_retried(
    proxy: Proxy, relay: FaultRelay, cut_after: int
) -> None:
    """Cut after the 'S' (1), inside the ServerHello's record header (7), or
    inside the certificate (600): retried, and the third try gets through."""
    async with asyncio.timeout(T):
        relay.set_fault("cut", cut_after=cut_after, count=2)
        login = await raw_login(proxy.port)
        assert login.error is None, login.error
        assert relay.accepted == 3


async def test_tls_handshake_always_cut_gives_08006(
    proxy: Proxy, relay: FaultRelay, emulator: Emulator
) -> None:
    async with asyncio.timeout(T):
        relay.set_fault("cut", cut_after=50)
        login = await raw_login(proxy.port)
        assert login.sqlstate == "08006", login.error
        assert login.seconds <= DEADLINE + MARGIN
        relay.set_fault("pass")
        await fresh_query(proxy.port)
        await no_leftover_sessions(proxy, emulator)


async def test_slow_path_still_works(proxy: Proxy, relay: FaultRelay) -> None:
    async with asyncio.timeout(T):
        relay.set_fault("delay", delay=0.05)
        conn = await connect(proxy.port)
        try:
            assert await one(conn, "SELECT count(*) FROM generate_series(1, 1000)") == 1000
        finally:
            await conn.close()


async def test_path_slower_than_the_deadline_gives_08006(
    proxy: Proxy, relay: FaultRelay
) -> None:
    async with asyncio.timeout(T):
        relay.set_fault("delay", delay=DEADLINE + 1)
        login = await raw_login(proxy.port)
        assert login.sqlstate == "08006", login.error
        assert login.seconds <= DEADLINE + MARGIN
        relay.set_fault("pass")
        await fresh_query(proxy.port)


async def test_cut_mid_session(proxy: Proxy, relay: FaultRelay, emulator: Emulator) -> None:
    """The path dies under two sessions (one idle, one mid-query): both clients
    hear about it at once, nothing is left open, others are served."""
    async with asyncio.timeout(T):
        idle = await connect(proxy.port)
        busy = await connect(proxy.port)
        try:
            assert await one(idle, "SELECT 1") == 1
            # PostgreSQL notices a vanished client mid-query only with this set.
            await busy.execute("SET client_connection_check_interval = '100ms'")
            query = asyncio.ensure_future(one(busy, "SELECT pg_sleep(20)"))
            await asyncio.sleep(0.3)
            assert relay.cut_all() == 2
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError):
                await query
            with pytest.raises(psycopg.OperationalError):
                await one(idle, "SELECT 1")
            assert time.monotonic() - started < 2, "the client must not hang"
            await no_leftover_sessions(proxy, emulator)
            # Nothing left on the database either: both backends ended.
            bystander = await connect(proxy.port)
            try:
                sql = ("SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                       "'client backend' AND usename = current_user AND pid <> pg_backend_pid()")
                for _ in range(100):
                    if await one(bystander, sql) == 0:
                        break
                    await asyncio.sleep(0.05)
                assert await one(bystander, sql) == 0
            finally:
                await bystander.close()
        finally:
            await idle.close()
            await busy.close()


# --------------------------------------------------------------------- the credential API


@pytest_asyncio.fixture(loop_scope="session")
async def direct_proxy(emulator: Emulator) -> AsyncIterator[Proxy]:
    """A proxy dialing the front door directly."""
    async with running_proxy(emulator, LAKEPROXY_CONNECT_DEADLINE=str(DEADLINE)) as p:
        yield p


async def test_slow_api_within_the_deadline(emulator: Emulator) -> None:
    async with asyncio.timeout(T):
        emulator.workspace.inject(POSTGRES_CREDENTIALS_PATH, status=200, delay=1.0)
        async with running_proxy(emulator, LAKEPROXY_CONNECT_DEADLINE="5") as p:
            login = await raw_login(p.port)
            assert login.error is None, login.error
            assert login.seconds >= 0.9


async def test_api_slower_than_the_deadline(emulator: Emulator) -> None:
    async with asyncio.timeout(T):
        emulator.workspace.inject(POSTGRES_CREDENTIALS_PATH, status=200, delay=DEADLINE + 1)
        async with running_proxy(emulator, LAKEPROXY_CONNECT_DEADLINE=str(DEADLINE)) as p:
            login = await raw_login(p.port)
            assert login.sqlstate == "08006", login.error
            assert login.seconds <= DEADLINE + MARGIN
            # The slow answer lands a moment later; then everyone is served.
            await asyncio.sleep(1.2)
            await fresh_query(p.port)


async def test_5xx_burst_is_retried(emulator: Emulator) -> None:
    async with asyncio.timeout(T):
        ws = emulator.workspace
        ws.inject(OIDC_PATH, count=2, status=502)
        ws.inject(POSTGRES_CREDENTIALS_PATH, count=3, status=503)
        async with running_proxy(emulator, LAKEPROXY_CONNECT_DEADLINE="8") as p:
            login = await raw_login(p.port)
            assert login.error is None, login.error
            assert ws.calls[OIDC_PATH] == 3
            assert ws.calls[POSTGRES_CREDENTIALS_PATH] == 4


async def test_429_storm_gives_08006_and_honours_retry_after(emulator: Emulator) -> None:
    async with asyncio.timeout(T):
        ws = emulator.workspace
        ws.inject(POSTGRES_CREDENTIALS_PATH, count=10_000, status=429, retry_after=0.5)
        async with running_proxy(emulator, LAKEPROXY_CONNECT_DEADLINE=str(DEADLINE)) as p:
            logins = await asyncio.gather(*(raw_login(p.port) for _ in range(5)))
            for login in logins:
                assert login.sqlstate == "08006", login.error
                assert login.seconds <= DEADLINE + MARGIN
                assert login.error is not None
                assert "429" in login.error.message or "REQUEST_LIMIT" in login.error.message
            # Five clients shared the requests (single flight), spaced by Retry-After.
            assert ws.calls[POSTGRES_CREDENTIALS_PATH] <= DEADLINE / 0.5 + 2
            ws.clear_faults()
            await fresh_query(p.port)


@pytest.mark.parametrize("path", [OIDC_PATH, POSTGRES_CREDENTIALS_PATH])
async def test_broken_json_is_retried(emulator: Emulator, path: str) -> None:
    async with asyncio.timeout(T):
        ws = emulator.workspace
        ws.inject(path, status=200, body=b'{"token": "abc", "expire_')
        ws.inject(path, status=200, body=b"<html>gateway</html>")
        async with running_proxy(emulator, LAKEPROXY_CONNECT_DEADLINE="8") as p:
            login = await raw_login(p.port)
            assert login.error is None, login.error
            assert ws.calls[path] == 3


async def test_401_during_background_refresh_leaves_sessions_alone(
    emulator: Emulator,
) -> None:
    """Credentials live 3 s, so the background refresh runs at ~1.5 s; its first
    step-2 call gets 401 (the workspace token is refreshed once, then it
    works) and later the OAuth step is refused outright for a while. The open
    session never notices and new clients keep getting in."""
    async with asyncio.timeout(T):
        ws = emulator.workspace
        ws.credential_lifetime = 3.0
        ws.oauth_lifetime = 3.0
        async with running_proxy(emulator, LAKEPROXY_CONNECT_DEADLINE="5") as p:
            conn = await connect(p.port)
            try:
                oidc_before = ws.calls[OIDC_PATH]
                ws.inject(POSTGRES_CREDENTIALS_PATH, status=401)
                await wait_until(lambda: ws.calls[POSTGRES_CREDENTIALS_PATH] >= 3, 5,
                                 "the refresh to be retried after the 401")
                assert ws.calls[OIDC_PATH] > oidc_before, "401 refreshes the OAuth token"
                assert await one(conn, "SELECT 1") == 1
                await fresh_query(p.port)
                # Now the OAuth step refuses (a revoked secret) during later refreshes.
                ws.inject(OIDC_PATH, count=100, status=401)
                await asyncio.sleep(1.0)
                assert await one(conn, "SELECT 2") == 2
                await fresh_query(p.port)  # the current credential still serves
            finally:
                await conn.close()


# --------------------------------------------------------------------- the endpoint


async def test_suspend_under_open_sessions(direct_proxy: Proxy, emulator: Emulator) -> None:
    async with asyncio.timeout(T):
        conns = [await connect(direct_proxy.port) for _ in range(3)]
        try:
            for c in conns:
                assert await one(c, "SELECT 1") == 1
            await emulator.frontdoor.suspend()
            for c in conns:
                with pytest.raises(psycopg.errors.AdminShutdown) as info:
                    await one(c, "SELECT 1")
                assert info.value.sqlstate == "57P01"
            await no_leftover_sessions(direct_proxy, emulator)
            assert emulator.frontdoor.state == "SUSPENDED"
            await fresh_query(direct_proxy.port)  # wakes the compute
            assert emulator.frontdoor.wakes == 1
        finally:
            for c in conns:
                await c.close()


async def test_pg_terminate_backend_of_a_proxied_session(
    direct_proxy: Proxy, emulator: Emulator
) -> None:
    async with asyncio.timeout(T):
        victim = await connect(direct_proxy.port)
        killer = await connect(direct_proxy.port)
        try:
            pid = await one(victim, "SELECT pg_backend_pid()")
            assert victim.info.backend_pid == pid, "the pid passes through the proxy"
            assert await one(killer, f"SELECT pg_terminate_backend({pid}, 5000)") is True
            with pytest.raises(psycopg.errors.AdminShutdown) as info:
                await one(victim, "SELECT 1")
            assert info.value.sqlstate == "57P01"
            await no_leftover_sessions(direct_proxy, emulator, expected=1)
            assert await one(killer, "SELECT 1") == 1
            await fresh_query(direct_proxy.port)
        finally:
            await victim.close()
            await killer.close()
