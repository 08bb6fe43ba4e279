"""The admin server is bounded against anyone on the machine (issue #10, findings 2 and 10).

Idle and half-sent connections are closed after a few seconds, the number of
admin connections is capped (the oldest idle one goes first), and a malformed
request is a 400 with at most one INFO line, never an aiohttp traceback.
Raw sockets throughout: that is what an attacker uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lakeproxy.admin import AdminServer
from lakeproxy.metrics import Metrics

from .proxy_process import running
from .test_admin import FakeProxy

T = 60


def _env(config_dir: Path) -> dict[str, str]:
    # Nothing answers at DATABRICKS_HOST: only the admin server is exercised.
    return {
        "DATABRICKS_HOST": "http://127.0.0.1:9",
        "DATABRICKS_TOKEN": "not-used-here",
        "ENDPOINT_NAME": "projects/p/branches/b/endpoints/e",
        "PGHOST": "ep.invalid",
        "PGUSER": "app",
        "LAKEPROXY_LISTEN": "127.0.0.1:0",
        "LAKEPROXY_ADMIN_LISTEN": "127.0.0.1:0",
        "HOME": str(config_dir),
    }


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _closed_by_server(reader: asyncio.StreamReader, *, within: float) -> bytes:
    """Read until the server closes the connection; what it sent before. Raises
    TimeoutError when it is still open after ``within`` seconds."""
    data = b""
    async with asyncio.timeout(within):
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(65536):
                data += chunk
    return data


async def test_idle_and_half_sent_admin_connections_are_closed(tmp_path: Path) -> None:
    """A real ``lakeproxy run`` with its defaults: no admin socket outlives a few seconds
    of silence (aiohttp alone keeps them for an hour)."""
    async with asyncio.timeout(T), running(_env(tmp_path)) as p:
        assert p.admin is not None
        port = int(p.admin.rsplit(":", 1)[1])
        idle = await _open(port)
        half = await _open(port)
        half[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        kept = await _open(port)
        kept[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await kept[0].readuntil(b"ok\n")
        assert answer.startswith(b"HTTP/1.1 200")
        for reader, _ in (idle, half, kept):
            assert await _closed_by_server(reader, within=30) == b""
        for _, writer in (idle, half, kept):
            writer.close()
        status, _ = await p.get("/healthz")
        assert status == 200


@pytest.fixture
async def small_admin() -> AsyncIterator[AdminServer]:
    server = AdminServer(FakeProxy(), Metrics(process_metrics=False),
                         idle_timeout=300, max_connections=4)
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def default_admin() -> AsyncIterator[AdminServer]:
    server = AdminServer(FakeProxy(), Metrics(process_metrics=False))
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.stop()


async def test_admin_connections_are_capped_oldest_idle_first(small_admin: AdminServer) -> None:
    async with asyncio.timeout(T):
        answered = await _open(small_admin.port)
        answered[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await answered[0].readuntil(b"ok\n")).startswith(b"HTTP/1.1 200")
        idle = [await _open(small_admin.port) for _ in range(5)]
        # 6 opened, 4 allowed: the two oldest that never sent a request are closed
        # (the keep-alive connection of a client that did is kept).
        for reader, _ in idle[:2]:
            assert await _closed_by_server(reader, within=10) == b""
        for reader, writer in [answered, *idle[2:]]:
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await reader.readuntil(b"\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
        for _, writer in [answered, *idle]:
            writer.close()


MALFORMED = [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nnot a header line\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: many\r\n\r\n",
    b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
]


async def test_malformed_admin_requests_are_400_and_one_info_line(
    default_admin: AdminServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # lakeproxy's default level
    async with asyncio.timeout(T):
        for request in MALFORMED:
            reader, writer = await _open(default_admin.port)
            writer.write(request)
            answer = await _closed_by_server(reader, within=10)
            writer.close()
            assert re.match(rb"HTTP/1\.[01] 400 ", answer), (request[:40], answer[:80])
    loud = [r for r in caplog.records if r.levelno > logging.INFO]
    assert loud == [], [r.getMessage() for r in loud]
    assert [r for r in caplog.records if r.exc_info] == []
    bad = [r for r in caplog.records if "bad request" in r.getMessage()]
    assert 1 <= len(bad) <= len(MALFORMED)
    assert all(len(r.getMessage().splitlines()) == 1 for r in bad)
