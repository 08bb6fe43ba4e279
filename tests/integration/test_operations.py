"""The admin server as ``lakeproxy run`` serves it: probes, metrics, probe storms,
and ``pg_isready`` answered by the proxy itself.

Most tests run ``python -m lakeproxy run`` as a subprocess in front of the
emulator (the same ``serve()`` users run); the one about the moment before the
listeners are bound builds the same parts in-process, in serve()'s order.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import time
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lakeproxy.admin import AdminServer
from lakeproxy.app import Runtime
from lakeproxy.config import load_config
from lakeproxy.emulator import Emulator
from lakeproxy.emulator.api import POSTGRES_CREDENTIALS_PATH
from lakeproxy.metrics import Metrics

from .proxy_process import ProxyProcess, base_env, psql, running

DB = "databricks_postgres"
T = 60


def _env(emu: Emulator, **extra: str) -> dict[str, str]:
    return {**emu.env(), "LAKEPROXY_LISTEN": "127.0.0.1:0",
            "LAKEPROXY_ADMIN_LISTEN": "127.0.0.1:0", **extra}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page: {(name, sorted labels): value}."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(p: ProxyProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = await p.get("/metrics")
    assert status == 200
    return samples(text)


def conninfo(p: ProxyProcess, **extra: str) -> str:
    params = {"host": "127.0.0.1", "port": str(p.tcp_port()), "dbname": DB, "user": "app",
              "connect_timeout": "20", **extra}
    return " ".join(f"{k}={v}" for k, v in params.items())


# --------------------------------------------------------------------------- /readyz


async def test_readyz_before_listeners_are_bound(emulator: Emulator) -> None:
    """serve() starts the admin server first: until the listeners are bound, 503."""
    async with asyncio.timeout(T):
        metrics = Metrics()
        runtime = Runtime(load_config(env=_env(emulator)), metrics)
        admin = AdminServer(runtime.server, metrics)
        await admin.start("127.0.0.1", 0)
        url = f"http://127.0.0.1:{admin.port}"
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(url + "/readyz") as r:
                    assert r.status == 503
                    assert await r.json() == {"status": "not ready",
                                              "reason": "not listening yet"}
                async with s.get(url + "/healthz") as r:
                    assert r.status == 200
                await runtime.start()
                deadline = time.monotonic() + 10
                while True:
                    async with s.get(url + "/readyz") as r:
                        if r.status == 200:
                            break
                    assert time.monotonic() < deadline, "never ready"
                    await asyncio.sleep(0.02)
        finally:
            await runtime.server.drain(1)
            await runtime.close()
            await admin.stop()


async def test_readyz_without_credential_then_at_the_client_limit(emulator: Emulator) -> None:
    # The start-up credential request is refused: no usable credential.
    emulator.workspace.inject(POSTGRES_CREDENTIALS_PATH, status=403)
    async with asyncio.timeout(T), running(_env(emulator, LAKEPROXY_MAX_CLIENTS="1")) as p:
        await p.wait_for_line("could not mint a credential")
        assert await p.readyz() == (503, "no usable credential")
        assert await p.get("/healthz") == (200, "ok\n")

        # A client's own request succeeds (the fault was for one call): ready.
        conn = await psycopg.AsyncConnection.connect(conninfo(p), autocommit=True)
        try:
            # ... except that this one client is the limit.
            assert await p.readyz() == (503, "at the client limit")
            with pytest.raises(asyncpg.TooManyConnectionsError) as too_many:
                await asyncpg.connect(host="127.0.0.1", port=p.tcp_port(), user="app",
                                      database=DB, ssl=False, timeout=10)
            assert too_many.value.sqlstate == "53300"
            await conn.execute("SELECT 1")
        finally:
            await conn.close()
        deadline = time.monotonic() + 5
        while (ready := await p.readyz()) != (200, "ready"):
            assert time.monotonic() < deadline, ready
            await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- /metrics


async def test_metrics_move_with_real_sessions(emulator: Emulator) -> None:
    async with asyncio.timeout(T), running(_env(emulator)) as p:
        await p.wait_ready()
        before = await scrape(p)
        assert before[("lakeproxy_client_connections_total", (("outcome", "ok"),))] == 0

        for _ in range(3):
            code, out, err = await psql(conninfo(p), "SELECT 1")
            assert (code, out) == (0, "1\n"), err
        # The endpoint's own login error (no such database): outcome "rejected".
        code, _, err = await psql(conninfo(p, dbname="no_such_db"), "SELECT 1")
        assert code == 2
        assert 'database "no_such_db" does not exist' in err

        # An open session's bytes show before it ends (live bytes at scrape time).
        conn = await psycopg.AsyncConnection.connect(conninfo(p), autocommit=True)
        try:
            mid = await scrape(p)
            cur = await conn.execute("SELECT repeat('x', 1000000)")
            assert await cur.fetchone() is not None
            live = await scrape(p)
            down = ("lakeproxy_bytes_total", (("direction", "upstream_to_client"),))
            assert live[("lakeproxy_client_connections_active", ())] == 1
            assert live[down] - mid[down] >= 1_000_000
        finally:
            await conn.close()

        deadline = time.monotonic() + 5
        while (after := await scrape(p))[("lakeproxy_client_connections_active", ())] != 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)

    def total(outcome: str) -> float:
        return after[("lakeproxy_client_connections_total", (("outcome", outcome),))]

    assert total("ok") == 4
    assert total("rejected") == 1
    assert total("internal") == 0
    assert after[("lakeproxy_bytes_total", (("direction", "client_to_upstream"),))] > 0
    assert after[("lakeproxy_bytes_total", (("direction", "upstream_to_client"),))] > 1_000_000
    # A histogram observation per endpoint login (the rejected one never logged in).
    assert after[("lakeproxy_upstream_connect_seconds_count", ())] == 4
    assert 0 < after[("lakeproxy_upstream_connect_seconds_sum", ())] < 20
    assert after[("lakeproxy_upstream_connect_retries_total", ())] == 0
    for kind in ("oauth", "database"):
        assert after[("lakeproxy_credential_requests_total",
                      (("kind", kind), ("result", "ok")))] >= 1
        expiry = after[("lakeproxy_credential_expiry_timestamp_seconds", (("kind", kind),))]
        assert time.time() + 3000 < expiry < time.time() + 3700


# --------------------------------------------------------------------------- probe storm


async def test_probe_storm_leaves_a_suspended_compute_suspended(emulator: Emulator) -> None:
    """300 probes against a proxy whose endpoint is scaled to zero wake nothing."""
    async with asyncio.timeout(T), running(_env(emulator)) as p:
        await p.wait_ready()
        code, _, err = await psql(conninfo(p), "SELECT 1")  # the proxy has been used
        assert code == 0, err
        await emulator.frontdoor.suspend()
        fd, ws = emulator.frontdoor, emulator.workspace
        before = (fd.state, fd.wakes, fd.connections, fd.logins, sum(ws.calls.values()))
        assert before[0] == "SUSPENDED"

        paths = ["/healthz", "/readyz", "/metrics"] * 100
        async with aiohttp.ClientSession() as s:
            sem = asyncio.Semaphore(20)

            async def probe(path: str) -> int:
                async with sem, s.get(p.admin_url + path) as r:
                    await r.read()
                    return r.status

            statuses = await asyncio.gather(*(probe(path) for path in paths))
        assert statuses == [200] * 300  # ready: a credential is held
        await asyncio.sleep(0.5)  # anything a probe set off would have started by now
        after = (fd.state, fd.wakes, fd.connections, fd.logins, sum(ws.calls.values()))
        assert after == before

        # The check is sensitive: a real client does wake the compute.
        code, _, err = await psql(conninfo(p), "SELECT 1")
        assert code == 0, err
        assert fd.wakes == 1


# --------------------------------------------------------------------------- pg_isready

PG_ISREADY = shutil.which("pg_isready") or "/usr/lib/postgresql/15/bin/pg_isready"


async def pg_isready(port: int) -> tuple[int, str]:
    """Run the real ``pg_isready -h 127.0.0.1 -p port``: (exit status, what it printed)."""
    child = await asyncio.create_subprocess_exec(
        PG_ISREADY, "-h", "127.0.0.1", "-p", str(port), "-t", "10",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=base_env(),
    )
    out, err = await child.communicate()
    assert child.returncode is not None
    return child.returncode, (out + err).decode().strip()


def _said(port: int, what: str) -> str:
    return f"127.0.0.1:{port} - {what}"


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def _probes_counted(p: ProxyProcess, n: int) -> Samples:
    """/metrics once ``probe`` reached ``n`` (a session is counted as its task ends)."""
    deadline = time.monotonic() + 5
    while (m := await scrape(p))[("lakeproxy_client_connections_total",
                                  (("outcome", "probe"),))] < n:
        assert time.monotonic() < deadline, m
        await asyncio.sleep(0.02)
    return m


async def test_pg_isready_is_answered_without_waking_a_suspended_compute(
    emulator: Emulator,
) -> None:
    """Ready proxy, compute scaled to zero: pg_isready says "accepting connections"
    (exit 0), and no credential request, no connection to the endpoint is made."""
    async with asyncio.timeout(T), running(_env(emulator)) as p:
        await p.wait_ready()
        port = p.tcp_port()
        code, _, err = await psql(conninfo(p), "SELECT 1")  # the proxy has been used
        assert code == 0, err
        await emulator.frontdoor.suspend()
        fd, ws = emulator.frontdoor, emulator.workspace
        before = (fd.state, fd.wakes, fd.connections, fd.logins, sum(ws.calls.values()))
        assert before[0] == "SUSPENDED"
        ends = len(p.lines_matching("session end"))

        for _ in range(5):
            assert await pg_isready(port) == (0, _said(port, "accepting connections"))
        after = (fd.state, fd.wakes, fd.connections, fd.logins, sum(ws.calls.values()))
        assert after == before
        m = await _probes_counted(p, 5)
        assert m[("lakeproxy_client_connections_total", (("outcome", "probe"),))] == 5
        assert m[("lakeproxy_client_connections_total", (("outcome", "rejected"),))] == 0
        assert len(p.lines_matching("session end")) == ends  # probes log at debug only


@contextlib.asynccontextmanager
async def _handing_over(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
) -> AsyncIterator[int]:
    """A loopback port whose first client is spliced onto an open connection
    (``reader``/``writer``): lets a real client use a connection the proxy
    accepted earlier. Yields the port."""

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.write_eof()

    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        await asyncio.gather(pump(c_reader, writer), pump(reader, c_writer))
        c_writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        writer.close()


async def test_pg_isready_while_draining_is_rejected(emulator: Emulator) -> None:
    """SIGTERM with an open session holding the drain: the listeners are closed,
    so a new pg_isready gets no answer (exit 2), and one on a connection the
    proxy accepted before the drain gets 57P03 "draining" (exit 1)."""
    env = _env(emulator, LAKEPROXY_SHUTDOWN_GRACE="30")
    async with asyncio.timeout(T), running(env) as p:
        await p.wait_ready()
        port = p.tcp_port()
        conn = await psycopg.AsyncConnection.connect(conninfo(p), autocommit=True)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            async with _handing_over(reader, writer) as early:
                p.signal(signal.SIGTERM)
                await p.wait_for_line("shutting down")
                assert await p.readyz() == (503, "draining")
                assert await pg_isready(port) == (2, _said(port, "no response"))
                assert await pg_isready(early) == (1, _said(early, "rejecting connections"))
                m = await _probes_counted(p, 1)
            cur = await conn.execute("SELECT 1")  # the session holding the drain still works
            assert await cur.fetchone() == (1,)
        finally:
            await conn.close()
        assert await p.wait() == 0
    assert m[("lakeproxy_client_connections_total", (("outcome", "shutdown"),))] == 0


async def test_pg_isready_without_a_credential_then_at_the_client_limit(
    emulator: Emulator,
) -> None:
    """No usable credential: exit 1, and the probe asked the API for none. At the
    client limit: exit 1; below it, exit 0 (the probe's own connection does not
    count). Logged at debug, outcome ``probe``."""
    ws, fd = emulator.workspace, emulator.frontdoor
    ws.inject(POSTGRES_CREDENTIALS_PATH, status=403)  # the start-up credential request
    env = _env(emulator, LAKEPROXY_MAX_CLIENTS="1", LAKEPROXY_LOG_LEVEL="debug")
    async with asyncio.timeout(T), running(env) as p:
        port = p.tcp_port()
        await p.wait_for_line("could not mint a credential")
        assert await p.readyz() == (503, "no usable credential")
        before = (sum(ws.calls.values()), fd.connections)
        assert await pg_isready(port) == (1, _said(port, "rejecting connections"))
        await _probes_counted(p, 1)
        assert (sum(ws.calls.values()), fd.connections) == before

        conn = await psycopg.AsyncConnection.connect(conninfo(p), autocommit=True)
        try:  # this client got a credential, and is the limit
            assert await p.readyz() == (503, "at the client limit")
            assert await pg_isready(port) == (1, _said(port, "rejecting connections"))
        finally:
            await conn.close()
        deadline = time.monotonic() + 5
        while (ready := await p.readyz()) != (200, "ready"):
            assert time.monotonic() < deadline, ready
            await asyncio.sleep(0.02)
        assert await pg_isready(port) == (0, _said(port, "accepting connections"))
        m = await _probes_counted(p, 3)
    for outcome, n in (("probe", 3), ("rejected", 0), ("credential_error", 0), ("ok", 1)):
        assert m[("lakeproxy_client_connections_total", (("outcome", outcome),))] == n
    probes = p.lines_matching("session end.*outcome=probe")
    assert len(probes) == 3
    assert all(" DEBUG " in line for line in probes), probes
    assert sum("sqlstate=57P03" in line for line in probes) == 2
    assert any("no usable credential" in line for line in probes), probes
    assert any("at the client limit" in line for line in probes), probes
