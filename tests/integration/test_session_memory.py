"""An ended session gives its memory back at once, not at the next full
garbage collection (issue #15; RELIABILITY.md section 5).

Each session's objects (protocol, session, splice, its two halves, the
endpoint's TLS transport with its OpenSSL session and memory BIOs) used to
form reference cycles, so only the cyclic collector freed them: a soak's
proxy held 664 ended sessions and 140 MiB that way after its load. Here the
collector is switched off while real sessions run and end; the TLS
transports must be gone all the same.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

from lakeproxy.emulator import Emulator
from lakeproxy.tls import TLSTransport
from lakeproxy.wire.codec import ReadyForQuery

from .conftest import ProxyFactory
from .proxy_rig import DATABASE, Proxy, RawClient, eventually, query_bytes

T = 60


def _tls_transports() -> int:
    """TLS transports in memory, reachable or not (gc-tracked objects)."""
    return sum(1 for o in gc.get_objects() if isinstance(o, TLSTransport))


@contextmanager
def _no_cycle_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _until_no_sessions(p: Proxy) -> None:
    async def none_left() -> bool:
        return not p.server.sessions

    await eventually(none_left, timeout=T)


async def _copy_out(p: Proxy) -> None:
    """A login, a 2 MB COPY out read to the end, Terminate."""
    c = await RawClient.open(p.port)
    await c.login({"user": "x", "database": DATABASE})
    c.send(query_bytes(
        "COPY (SELECT repeat('x', 1000) FROM generate_series(1, 2000)) TO STDOUT"))
    while not isinstance(await c.expect_message(), ReadyForQuery):
        pass
    c.send(b"X\x00\x00\x00\x04")
    await c.read_until_closed()
    await c.close()


async def _reset_mid_result(p: Proxy) -> None:
    """A login, a large result, and a reset after its first messages."""
    c = await RawClient.open(p.port)
    await c.login({"user": "x", "database": DATABASE})
    c.send(query_bytes("SELECT g, repeat('x', 100) FROM generate_series(1, 200000) g"))
    for _ in range(10):
        assert not isinstance(await c.expect_message(), ReadyForQuery)
    c.abort()


async def _closed_by_the_proxy(p: Proxy) -> None:
    """A login, then the proxy ends the session (as on shutdown)."""
    c = await RawClient.open(p.port)
    await c.login({"user": "x", "database": DATABASE})
    for session in list(p.server.sessions):
        session.close()
    await c.read_until_closed()
    await c.close()


async def test_ended_sessions_leave_no_tls_transport_behind(
    emulator: Emulator, proxy: ProxyFactory
) -> None:
    async with asyncio.timeout(T):
        p = await proxy(emulator)
        await _copy_out(p)  # warm: credential, imports, caches
        await _until_no_sessions(p)
        scenarios: list[Callable[[Proxy], Awaitable[None]]] = [
            _copy_out, _reset_mid_result, _closed_by_the_proxy,
        ]
        with _no_cycle_collector():
            before = _tls_transports()
            for scenario in scenarios:
                for _ in range(3):
                    await scenario(p)
            await _until_no_sessions(p)
            await asyncio.sleep(0.2)  # the transports' last callbacks
            assert _tls_transports() == before


async def test_pooled_sessions_leave_no_splice_behind(
    emulator: Emulator, proxy: ProxyFactory
) -> None:
    """Session reuse: the client's Terminate parks the endpoint session (its TLS
    transport rightly stays, in the pool); the tracked splice that carried the
    client must go with the client."""
    from lakeproxy.boundaries import TrackedSplice

    def splices() -> int:
        return sum(1 for o in gc.get_objects() if isinstance(o, TrackedSplice))

    async with asyncio.timeout(T):
        p = await proxy(emulator, LAKEPROXY_POOL_MODE="session")
        await _copy_out(p)  # warm, and one endpoint session parked
        await _until_no_sessions(p)
        with _no_cycle_collector():
            for _ in range(3):
                await _copy_out(p)  # Terminate: parked again
                await _until_no_sessions(p)

            async def none_left() -> bool:  # once each park (an endpoint reset) is done
                return splices() == 0

            await eventually(none_left, timeout=10)
