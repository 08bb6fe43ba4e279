"""The admin server as ``lakeproxy run`` serves it: probes, metrics, probe storms.

Most tests run ``python -m lakeproxy run`` as a subprocess in front of the
emulator (the same ``serve()`` users run); the one about the moment before the
listeners are bound builds the same parts in-process, in serve()'s order.
"""

from __future__ import annotations

import asyncio
import time

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

from .proxy_process import ProxyProcess, psql, running

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
