"""Helpers for the fault tests: an in-process proxy, a raw client, psycopg sessions.

libpq does not expose the SQLSTATE of a failed connection, so :func:`raw_login`
speaks the protocol itself and returns exactly what a client is sent before its
session starts; sessions that did start are driven with psycopg.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import psycopg

from lakeproxy.app import Runtime
from lakeproxy.config import load_config
from lakeproxy.emulator import Emulator
from lakeproxy.metrics import Metrics
from lakeproxy.wire import codec
from lakeproxy.wire.framing import FrameReader


@dataclass(slots=True)
class Proxy:
    port: int
    runtime: Runtime
    metrics: Metrics

    @property
    def sessions(self) -> int:
        """Sessions the proxy holds now (handshaking, connecting or spliced)."""
        return len(self.runtime.server.sessions)


@asynccontextmanager
async def running_proxy(emu: Emulator, **env: str) -> AsyncIterator[Proxy]:
    """lakeproxy in this process in front of ``emu``; ``env`` overrides its environment."""
    full = dict(emu.env())
    full["LAKEPROXY_LISTEN"] = "127.0.0.1:0"
    full.update(env)
    metrics = Metrics(process_metrics=False)
    runtime = Runtime(load_config(env=full), metrics)
    await runtime.start()
    try:
        yield Proxy(runtime.server.bound_port(), runtime, metrics)
    finally:
        await runtime.server.drain(1)
        await runtime.close()


@dataclass(frozen=True, slots=True)
class Login:
    """What a client saw: the ErrorResponse (None when it got ReadyForQuery),
    the seconds it took, and whether the proxy closed the socket after an error."""

    error: codec.ErrorResponse | None
    seconds: float
    closed: bool

    @property
    def sqlstate(self) -> str | None:
        return None if self.error is None else self.error.sqlstate


async def raw_login(port: int, *, database: str = "databricks_postgres",
                    timeout: float = 30.0) -> Login:
    """Send a StartupMessage (no TLS) and read until ReadyForQuery, ErrorResponse or EOF.

    Raises:
        TimeoutError: nothing decisive within ``timeout`` (a hang).
        ConnectionError: the proxy closed the socket without an ErrorResponse.
    """
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(timeout):
            writer.write(codec.encode(codec.StartupMessage(
                3, 0, {"user": "faulty", "database": database})))
            frames = FrameReader(tagged=True, max_length=1 << 20)
            while True:
                frame = frames.next_frame()
                if frame is None:
                    data = await reader.read(65536)
                    if not data:
                        raise ConnectionError("closed without an ErrorResponse")
                    frames.feed(data)
                    continue
                if frame[:1] == b"Z":
                    return Login(None, time.monotonic() - started, False)
                if frame[:1] == b"E":
                    msg = codec.decode_backend(frame)
                    assert isinstance(msg, codec.ErrorResponse)
                    closed = await reader.read(1) == b""
                    return Login(msg, time.monotonic() - started, closed)
    finally:
        writer.close()


def conninfo(port: int, **extra: str) -> str:
    params = {"host": "127.0.0.1", "port": str(port), "dbname": "databricks_postgres",
              "user": "faulty", "sslmode": "disable", "connect_timeout": "20", **extra}
    return psycopg.conninfo.make_conninfo(**params)


async def connect(port: int) -> psycopg.AsyncConnection[tuple[object, ...]]:
    return await psycopg.AsyncConnection.connect(conninfo(port), autocommit=True)


async def one(conn: psycopg.AsyncConnection[tuple[object, ...]], sql: str) -> object:
    """The first column of the first row of ``sql``."""
    cur = await conn.execute(sql.encode())
    row = await cur.fetchone()
    assert row is not None
    return row[0]


async def fresh_query(port: int) -> None:
    """The proxy still serves: a new client connects and runs a query."""
    conn = await connect(port)
    try:
        assert await one(conn, "SELECT 41 + 1") == 42
    finally:
        await conn.close()


async def wait_until(pred: object, timeout: float, what: str) -> None:
    """Poll ``pred()`` (a zero-argument callable) until true; AssertionError at the timeout."""
    assert callable(pred)
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
