"""lakeproxy in-process for the end-to-end tests, and the clients that talk to it.

:func:`start_proxy` builds a real :class:`~lakeproxy.app.Runtime` (the
same one ``lakeproxy run`` serves) from an environment, bound to an ephemeral
port on 127.0.0.1. :class:`Proxy` connects real clients to it: psql (as a
subprocess, with a clean environment and no password), psycopg and asyncpg.
:class:`RawClient` speaks the protocol by hand for the bad-input tests.

Everything here runs on the test's event loop, so a client that blocks (psql,
libpq's ``cancel()``) must run in a subprocess or a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import asyncpg
import psycopg
from psycopg.conninfo import make_conninfo

from lakeproxy.app import Runtime
from lakeproxy.config import load_config
from lakeproxy.emulator import PgCluster
from lakeproxy.metrics import Metrics
from lakeproxy.server import ProxyServer
from lakeproxy.wire.codec import (
    BackendKeyData,
    BackendMessage,
    ErrorResponse,
    ReadyForQuery,
    StartupMessage,
    decode_backend,
    encode,
)
from lakeproxy.wire.framing import FrameReader

from .proxy_process import psql as run_psql

PSQL = "/usr/bin/psql"
DATABASE = "databricks_postgres"
#: What a client sends as its user name: lakeproxy replaces it with the role.
CLIENT_USER = "someone-else"
SSL_REQUEST = (8).to_bytes(4, "big") + ((1234 << 16) | 5679).to_bytes(4, "big")


class PsqlFailed(Exception):
    """psql exited non-zero; the message is its stderr."""

    def __init__(self, returncode: int, stderr: str) -> None:
        super().__init__(f"psql exited {returncode}: {stderr.strip()}")
        self.returncode = returncode
        self.stderr = stderr


@dataclass(slots=True)
class Proxy:
    """A running lakeproxy and how to reach it. ``env`` holds secrets: never print it."""

    runtime: Runtime
    metrics: Metrics
    env: Mapping[str, str]

    @property
    def server(self) -> ProxyServer:
        return self.runtime.server

    @property
    def port(self) -> int:
        return self.server.bound_port()

    @property
    def role(self) -> str:
        """The Postgres role lakeproxy logs in as."""
        return self.env.get("LAKEBASE_USER") or self.env["PGUSER"]

    @property
    def database(self) -> str:
        return self.env.get("LAKEBASE_DATABASE") or self.env.get("PGDATABASE", DATABASE)

    def conninfo(self, *, dbname: str | None = None, **extra: str) -> str:
        """A libpq connection string for this proxy (no password, any user name)."""
        params = {"host": "127.0.0.1", "port": str(self.port),
                  "dbname": dbname or self.database, "user": CLIENT_USER, **extra}
        return make_conninfo("", **params)

    async def run_psql(self, sql: str, *, dbname: str | None = None,
                       timeout: float = 30.0) -> tuple[int, str, str]:
        """Run ``psql -c sql`` through the proxy; returns (exit code, stdout, stderr)."""
        return await run_psql(self.conninfo(dbname=dbname), sql, timeout=timeout)

    async def psql(self, sql: str, *, dbname: str | None = None) -> str:
        """psql's unaligned, tuples-only output. Raises PsqlFailed."""
        code, out, err = await self.run_psql(sql, dbname=dbname)
        if code != 0:
            raise PsqlFailed(code, err)
        return out

    async def asyncpg(self, **kwargs: object) -> asyncpg.Connection:
        """An asyncpg connection through the proxy (``ssl=False`` unless given)."""
        options: dict[str, object] = {"host": "127.0.0.1", "port": self.port,
                                      "user": CLIENT_USER, "database": self.database,
                                      "ssl": False, "timeout": 30}
        options.update(kwargs)
        return await asyncpg.connect(**options)

    async def psycopg(self, **kwargs: str) -> psycopg.AsyncConnection[tuple[object, ...]]:
        """A psycopg (libpq) connection through the proxy, autocommit."""
        return await psycopg.AsyncConnection.connect(self.conninfo(**kwargs), autocommit=True)


async def start_proxy(env: Mapping[str, str], *, warm: bool = True) -> Proxy:
    """Load the configuration from ``env`` (listening on 127.0.0.1:0) and start it.

    With ``warm`` the runtime starts minting a credential at once, as
    ``lakeproxy run`` does. Raises ConfigError or OSError.
    """
    full = {"LAKEPROXY_LISTEN": "127.0.0.1:0", **env}
    metrics = Metrics()
    runtime = Runtime(load_config(env=full), metrics)
    await runtime.start(warm=warm)
    return Proxy(runtime, metrics, full)


async def stop_proxy(proxy: Proxy) -> None:
    """Drain (1 s grace) and close."""
    await proxy.server.drain(1)
    await proxy.runtime.close()


async def role_backends(pg: PgCluster, role: str) -> int:
    """Backends of ``role`` in ``pg_stat_activity`` (psql over the socket)."""
    lit = "'" + role.replace("'", "''") + "'"
    out = await asyncio.to_thread(
        pg.psql, f"SELECT count(*) FROM pg_stat_activity WHERE usename = {lit}")  # noqa: S608
    return int(out.strip())


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout: float,
                     interval: float = 0.1) -> float:
    """Poll ``check`` until it is true; returns the seconds it took. Raises TimeoutError."""
    started = time.monotonic()
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(interval)
    return time.monotonic() - started


# --------------------------------------------------------------------------- the wire by hand


def startup_bytes(params: Mapping[str, str], *, minor: int = 0) -> bytes:
    return encode(StartupMessage(3, minor, dict(params)))


def query_bytes(sql: str) -> bytes:
    body = sql.encode() + b"\x00"
    return b"Q" + (len(body) + 4).to_bytes(4, "big") + body


class RawClient:
    """One TCP connection to the proxy, driven byte by byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.frames = FrameReader(tagged=True, max_length=1 << 24)

    @classmethod
    async def open(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def read_byte(self) -> bytes:
        """One untagged byte (the answer to SSLRequest)."""
        return await self.reader.readexactly(1)

    async def read_message(self) -> BackendMessage | None:
        """The next backend message, or None at EOF (or a reset)."""
        while (frame := self.frames.next_frame()) is None:
            try:
                data = await self.reader.read(65536)
            except ConnectionError:
                data = b""
            if not data:
                return None
            self.frames.feed(data)
        return decode_backend(frame)

    async def expect_message(self) -> BackendMessage:
        """The next backend message; AssertionError on EOF or an ErrorResponse."""
        msg = await self.read_message()
        assert msg is not None, "closed by the proxy"
        assert not isinstance(msg, ErrorResponse), msg
        return msg

    async def read_until_closed(self) -> list[BackendMessage]:
        """Every message up to EOF."""
        out: list[BackendMessage] = []
        while (msg := await self.read_message()) is not None:
            out.append(msg)
        return out

    async def login(self, params: Mapping[str, str]) -> BackendKeyData:
        """Send a StartupMessage and read up to ReadyForQuery; returns the cancel key.

        Raises AssertionError with the ErrorResponse when the login fails.
        """
        self.send(startup_bytes(params))
        key: BackendKeyData | None = None
        while True:
            msg = await self.expect_message()
            if isinstance(msg, BackendKeyData):
                key = msg
            if isinstance(msg, ReadyForQuery):
                assert key is not None
                return key

    def abort(self) -> None:
        """Close abruptly (RST)."""
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
