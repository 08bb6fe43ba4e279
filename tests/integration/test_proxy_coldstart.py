"""Scale to zero: a client's first query waits while the endpoint wakes, and an
endpoint that never answers fails with 08006 at the connect deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from lakeproxy.emulator import Emulator
from lakeproxy.emulator.api import POSTGRES_CREDENTIALS_PATH
from lakeproxy.emulator.pgcluster import free_port

from .conftest import ProxyFactory

MakeEmulator = Callable[..., Awaitable[Emulator]]


async def test_suspended_endpoint_wakes_for_the_query(
    make_emulator: MakeEmulator, proxy: ProxyFactory,
) -> None:
    emu = await make_emulator(wake_time=5.0)
    await emu.frontdoor.suspend()
    assert emu.frontdoor.state == "SUSPENDED"
    async with asyncio.timeout(30):
        p = await proxy(emu)
        started = time.monotonic()
        out = await p.psql("SELECT current_user, current_database()")
        took = time.monotonic() - started
    assert out == f"{emu.role}|databricks_postgres\n"
    assert took >= 4.8
    assert emu.frontdoor.wakes == 1


async def test_compute_not_ready_errors_are_retried_while_waking(
    make_emulator: MakeEmulator, proxy: ProxyFactory,
) -> None:
    """The front door answers XX000 "Couldn't connect to compute node" for the first
    2 s of the wake: lakeproxy retries those until the login goes through."""
    emu = await make_emulator(wake_time=3.0, wake_error_time=2.0)
    await emu.frontdoor.suspend()
    async with asyncio.timeout(30):
        p = await proxy(emu)
        started = time.monotonic()
        assert await p.psql("SELECT 1") == "1\n"
        took = time.monotonic() - started
    assert took >= 2.8
    assert emu.frontdoor.wakes == 1
    assert emu.frontdoor.connections >= 3  # the first login, its retries, and the one that won


async def test_endpoint_down_gives_08006_at_the_deadline(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    async with asyncio.timeout(30):
        p = await proxy(emulator, LAKEBASE_PORT=str(free_port()), LAKEPROXY_CONNECT_DEADLINE="3")
        started = time.monotonic()
        with pytest.raises(asyncpg.PostgresError) as info:
            await p.asyncpg()
        took = time.monotonic() - started
    exc = info.value
    assert exc.sqlstate == "08006"
    assert exc.message.startswith("lakeproxy:"), exc.message
    assert exc.hint
    assert 2.5 <= took <= 4.0


async def test_a_herd_of_clients_during_a_wake_all_get_in(
    make_emulator: MakeEmulator, proxy: ProxyFactory,
) -> None:
    """30 clients arrive at once at a suspended endpoint (say, a pool filling up):
    one credential call, one wake, every client served."""
    emu = await make_emulator(wake_time=3.0, wake_error_time=1.0)
    await emu.frontdoor.suspend()
    async with asyncio.timeout(30):
        p = await proxy(emu, warm=False)

        async def one() -> int:
            conn = await p.asyncpg()
            try:
                pid: int = await conn.fetchval("SELECT pg_backend_pid()")
                return pid
            finally:
                await conn.close()

        pids = await asyncio.gather(*(one() for _ in range(30)))
    assert len(set(pids)) == 30
    assert emu.frontdoor.wakes == 1
    assert emu.workspace.calls[POSTGRES_CREDENTIALS_PATH] == 1
