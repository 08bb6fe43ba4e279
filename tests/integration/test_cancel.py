"""A forwarded CancelRequest lands before the client is told it is done.

libpq's ``PQcancel`` (psql, psycopg ``conn.cancel()``, every libpq driver) and
asyncpg read the close of the cancel connection as "delivered" and send their
next statement at once; PostgreSQL closes that connection only after it has
signalled the backend. These tests put lakeproxy in front of a real TLS
PostgreSQL, so the endpoint has PostgreSQL's own cancel semantics and what they
see is lakeproxy's ordering. (The emulator's front door closes its cancel
connection as soon as it has written the request on to its cluster, as
tokio-postgres' ``cancel_query_raw`` does; on loopback that races the next
statement whatever lakeproxy does, 8 of 20 in one run.) The tests that a
cancel stops a running query through the emulator are in test_proxy_e2e.py.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from psycopg.conninfo import make_conninfo

from lakeproxy.emulator import FakeWorkspace, PgCluster, make_certs
from lakeproxy.wire.codec import CancelRequest, ErrorResponse, ReadyForQuery, encode

from .conftest import ProxyFactory
from .proxy_rig import CLIENT_USER, RawClient, query_bytes

DB_HOST = "db.cancel.lakeproxy.test"
ENDPOINT = "projects/p/branches/b/endpoints/ep-cancel"
ROLE = "canceller"
CLIENT_ID = "sp-cancel"
SECRET = "cancel-test-client-secret"
ROUNDS = 20

#: Run in a child process: PQcancel holds the GIL while it waits for the close of
#: the cancel connection, so it cannot share a process with the proxy. Prints how
#: many next statements were canceled and PQcancel's median time in ms.
_IDLE_CANCEL_SCRIPT = """
import sys, time, psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
canceled, took = 0, []
for _ in range(int(sys.argv[2])):
    started = time.perf_counter()
    conn.cancel()  # PQcancel while the session is idle: PostgreSQL ignores it
    took.append(time.perf_counter() - started)
    try:
        conn.execute("SELECT pg_sleep(0.3)")
    except psycopg.errors.QueryCanceled:
        canceled += 1
took.sort()
print(canceled, round(took[len(took) // 2] * 1000, 2))
"""


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PgCluster, Path]]:
    """PostgreSQL reachable only over TLS (hostssl, trust); yields it and its CA file."""
    work = tmp_path_factory.mktemp("pg_cancel")
    tls = make_certs(work / "tls", [DB_HOST])
    pg = PgCluster(work / "pg", ssl_cert=tls.cert_file, ssl_key=tls.key_file,
                   hba=["local all all trust", "hostssl all all 127.0.0.1/32 trust"])
    pg.start()
    try:
        pg.psql(f"CREATE ROLE {ROLE} LOGIN")
        yield pg, tls.ca_file
    finally:
        pg.close()


@pytest_asyncio.fixture(loop_scope="session")
async def workspace() -> AsyncIterator[FakeWorkspace]:
    ws = FakeWorkspace(client_id=CLIENT_ID, client_secret=SECRET, endpoint_name=ENDPOINT,
                       instance_name="unused", endpoint_host=DB_HOST)
    await ws.start()
    try:
        yield ws
    finally:
        await ws.stop()


def _env(pg: PgCluster, ca_file: Path, ws: FakeWorkspace) -> dict[str, str]:
    return {
        "DATABRICKS_HOST": ws.url, "DATABRICKS_CLIENT_ID": CLIENT_ID,
        "DATABRICKS_CLIENT_SECRET": SECRET, "ENDPOINT_NAME": ENDPOINT,
        "PGHOST": DB_HOST, "PGHOSTADDR": "127.0.0.1", "PGPORT": str(pg.port),
        "PGUSER": ROLE, "PGDATABASE": "postgres",
        "PGSSLMODE": "verify-full", "PGSSLROOTCERT": str(ca_file),
    }


async def _idle_cancels(conninfo: str) -> tuple[int, float]:
    """Run the loop above against ``conninfo``: (next statements canceled, median ms)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _IDLE_CANCEL_SCRIPT, conninfo, str(ROUNDS),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await child.communicate()
    assert child.returncode == 0, err.decode()
    canceled, median_ms = out.decode().split()
    return int(canceled), float(median_ms)


async def test_psycopg_cancel_of_an_idle_session_spares_the_next_statement(
    tls_pg: tuple[PgCluster, Path], workspace: FakeWorkspace, proxy: ProxyFactory,
) -> None:
    """20 times PQcancel on an idle session, then ``pg_sleep(0.3)``: directly to
    PostgreSQL none is canceled, and through lakeproxy none either."""
    pg, ca_file = tls_pg
    async with asyncio.timeout(60):
        direct, _ = await _idle_cancels(make_conninfo(
            "", host=DB_HOST, hostaddr="127.0.0.1", port=str(pg.port), dbname="postgres",
            user=ROLE, sslmode="verify-full", sslrootcert=str(ca_file)))
        p = await proxy(_env(pg, ca_file, workspace))
        proxied, _ = await _idle_cancels(p.conninfo())
    assert direct == 0  # the rig: PostgreSQL closes only once the backend is signalled
    assert proxied == 0, f"{proxied} of {ROUNDS} next statements were canceled"


async def test_forwarded_cancel_counts_as_cancel_and_stops_the_query(
    tls_pg: tuple[PgCluster, Path], workspace: FakeWorkspace, proxy: ProxyFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A forwarded cancel stops the query and is outcome ``cancel`` in the
    ``session end`` line and in /metrics (it was counted ``ok`` there)."""
    pg, ca_file = tls_pg
    async with asyncio.timeout(30):
        p = await proxy(_env(pg, ca_file, workspace))
        reg = p.metrics.registry

        def count(outcome: str) -> float:
            value = reg.get_sample_value("lakeproxy_client_connections_total",
                                         {"outcome": outcome})
            return value or 0.0

        before = {o: count(o) for o in ("ok", "cancel")}
        client = await RawClient.open(p.port)
        try:
            key = await client.login({"user": CLIENT_USER, "database": "postgres"})
            client.send(query_bytes("SELECT pg_sleep(30)"))
            await asyncio.sleep(0.3)
            with caplog.at_level(logging.INFO, logger="lakeproxy.server"):
                cancel = await RawClient.open(p.port)
                cancel.send(encode(CancelRequest(key.process_id, key.secret)))
                assert await cancel.read_until_closed() == []
                await cancel.close()
                errors: list[ErrorResponse] = []
                while not isinstance(msg := await client.read_message(), ReadyForQuery):
                    assert msg is not None, "closed by the proxy"
                    if isinstance(msg, ErrorResponse):
                        errors.append(msg)
                for _ in range(100):  # the session end is recorded once its task is done
                    if count("cancel") > before["cancel"]:
                        break
                    await asyncio.sleep(0.01)
        finally:
            await client.close()
    assert [e.sqlstate for e in errors] == ["57014"]
    assert count("cancel") == before["cancel"] + 1
    assert count("ok") == before["ok"]
    ends = [r for r in caplog.records if r.getMessage() == "session end"]
    assert [r.fields["outcome"] for r in ends] == ["cancel"]  # type: ignore[attr-defined]
