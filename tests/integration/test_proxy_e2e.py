"""Real clients through lakeproxy in front of the Lakebase emulator.

psql, psycopg (pipeline mode, 50 MB COPY each way), asyncpg (prepared
statements, a million rows), LISTEN/NOTIFY, cancel and pg_terminate_backend:
everything after the login is the splice, so these show that bytes pass
untouched, in order, with flow control, and that the process ID and the cancel
key are handled as the SPEC says.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shlex
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psycopg
import pytest

from lakeproxy.emulator import Emulator
from lakeproxy.emulator.pgcluster import free_port
from lakeproxy.wire.codec import (
    CancelRequest,
    ErrorResponse,
    OtherMessage,
    ReadyForQuery,
    encode,
)

from .conftest import ProxyFactory
from .proxy_rig import CLIENT_USER, DATABASE, PSQL, RawClient, query_bytes, startup_bytes

COPY_BYTES = 50 * 1024 * 1024


async def test_psql_current_user_and_database(emulator: Emulator, proxy: ProxyFactory) -> None:
    async with asyncio.timeout(30):
        p = await proxy(emulator)
        out = await p.psql("SELECT current_user, current_database()")
    assert out == f"{emulator.role}|{DATABASE}\n"


async def test_psql_names_another_database(emulator: Emulator, proxy: ProxyFactory) -> None:
    """The database a client names is passed through (and its error comes back unchanged)."""
    async with asyncio.timeout(30):
        p = await proxy(emulator)
        assert await p.psql("SELECT current_database()", dbname="postgres") == "postgres\n"
        code, _, err = await p.run_psql("SELECT 1", dbname="no_such_db")
    assert code == 2
    assert 'database "no_such_db" does not exist' in err


async def test_startup_options_and_a_unix_socket_listener(
    emulator: Emulator, proxy: ProxyFactory, tmp_path: Path,
) -> None:
    """Startup parameters other than user/database (options, application_name)
    reach the endpoint unchanged; a unix: listener serves as libpq expects."""
    sockets = tmp_path / "sock"
    sockets.mkdir()
    async with asyncio.timeout(30):
        p = await proxy(emulator, LAKEPROXY_LISTEN=f"127.0.0.1:0,unix:{sockets}:6544")
        assert (sockets / ".s.PGSQL.6544").is_socket()
        async with await p.psycopg(
            options="-c statement_timeout=1234 -c search_path=elsewhere",
            application_name="options-test",
        ) as conn:
            cur = await conn.execute(
                "SELECT current_setting('statement_timeout'), current_setting('search_path'),"
                " current_setting('application_name')")
            assert await cur.fetchone() == ("1234ms", "elsewhere", "options-test")
        async with await psycopg.AsyncConnection.connect(
            host=str(sockets), port=6544, dbname=DATABASE, user=CLIENT_USER,
        ) as conn:
            cur = await conn.execute("SELECT current_user")
            assert await cur.fetchone() == (emulator.role,)


async def test_a_startup_without_database_gets_pgdatabase(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    async with asyncio.timeout(30):
        p = await proxy(emulator)
        client = await RawClient.open(p.port)
        try:
            await client.login({"user": "whoever"})
            client.send(query_bytes("SELECT current_database()"))
            rows: list[bytes] = []
            while not isinstance(msg := await client.expect_message(), ReadyForQuery):
                if isinstance(msg, OtherMessage) and msg.tag == b"D":
                    rows.append(msg.body[6:])
        finally:
            await client.close()
    assert rows == [DATABASE.encode()]


async def test_replication_connection_passes_through(
    make_emulator: Callable[..., Awaitable[Emulator]], proxy: ProxyFactory,
) -> None:
    """``replication=database`` reaches the endpoint: its refusal comes back
    unchanged, and once the role may replicate, the walsender answers."""
    emu = await make_emulator()
    async with asyncio.timeout(30):
        p = await proxy(emu)

        async def identify_system() -> tuple[int, str, str]:
            child = await asyncio.create_subprocess_exec(
                PSQL, "-X", "-A", "-t", "-c", "IDENTIFY_SYSTEM", p.conninfo(replication="database"),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env={"PATH": os.environ.get("PATH", "/usr/bin")},
            )
            out, err = await child.communicate()
            assert child.returncode is not None
            return child.returncode, out.decode(), err.decode()

        code, _, err = await identify_system()
        assert code == 2
        assert "FATAL:  must be superuser or replication role to start walsender" in err
        await asyncio.to_thread(emu.pg.psql, f'ALTER ROLE "{emu.role}" REPLICATION')
        code, out, err = await identify_system()
    assert code == 0, err
    assert out.strip().endswith(f"|{DATABASE}")  # systemid|timeline|xlogpos|dbname


async def test_psycopg_pipeline_mode(emulator: Emulator, proxy: ProxyFactory) -> None:
    async with asyncio.timeout(30):
        p = await proxy(emulator)
        async with await p.psycopg(application_name="pipeline-test") as conn:
            async with conn.pipeline() as pipeline:
                cursors = [await conn.execute("SELECT %s::int * 2", (i,)) for i in range(200)]
                who = await conn.execute(
                    "SELECT current_setting('application_name'), current_user")
                await pipeline.sync()
            assert [(await c.fetchone()) for c in cursors] == [(i * 2,) for i in range(200)]
            assert await who.fetchone() == ("pipeline-test", emulator.role)


@pytest.mark.skipif(psycopg.pq.version() < 180000, reason="libpq < 18 cannot ask for 3.2")
async def test_libpq_asking_for_protocol_3_2_is_negotiated_down(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    """libpq 18 with max_protocol_version=3.2 gets NegotiateProtocolVersion (3.0) and
    goes on at 3.0, cancel included."""
    async with asyncio.timeout(30):
        p = await proxy(emulator)
        async with await p.psycopg(max_protocol_version="3.2") as conn:
            assert conn.pgconn.protocol_version == 3
            cur = await conn.execute("SELECT current_user")
            assert await cur.fetchone() == (emulator.role,)
            query = asyncio.create_task(conn.execute("SELECT pg_sleep(30)"))
            await asyncio.sleep(0.3)
            await conn.cancel_safe(timeout=5)
            with pytest.raises(psycopg.errors.QueryCanceled):
                await query


def _copy_rows(total: int) -> list[bytes]:
    """COPY text rows ``n<TAB>hex\\n`` of random data, about ``total`` bytes in all."""
    blob = os.urandom(total // 2).hex().encode()
    width = 4000
    return [b"%d\t%s\n" % (n, blob[start:start + width])
            for n, start in enumerate(range(0, len(blob), width), 1)]


async def test_psycopg_copy_in_and_out_50mb(emulator: Emulator, proxy: ProxyFactory) -> None:
    rows = _copy_rows(COPY_BYTES)
    sent = hashlib.sha256()
    for row in rows:
        sent.update(row)
    async with asyncio.timeout(90):
        p = await proxy(emulator)
        async with await p.psycopg() as conn:
            await conn.execute("CREATE TEMP TABLE blob (n int PRIMARY KEY, data text)")
            async with conn.cursor() as cur:
                async with cur.copy("COPY blob (n, data) FROM STDIN") as copy:
                    batch: list[bytes] = []
                    for row in rows:
                        batch.append(row)
                        if len(batch) == 64:
                            await copy.write(b"".join(batch))
                            batch.clear()
                    await copy.write(b"".join(batch))
                assert cur.rowcount == len(rows)
                received = hashlib.sha256()
                nbytes = 0
                async with cur.copy("COPY (SELECT n, data FROM blob ORDER BY n) TO STDOUT") \
                        as copy:
                    async for chunk in copy:
                        received.update(chunk)
                        nbytes += len(chunk)
    assert nbytes == sum(len(r) for r in rows) >= COPY_BYTES
    assert received.hexdigest() == sent.hexdigest()


async def test_asyncpg_prepared_statements_and_a_million_rows(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    async with asyncio.timeout(60):
        p = await proxy(emulator)
        conn = await p.asyncpg(ssl="prefer")  # the proxy answers the SSLRequest with 'N'
        try:
            stmt = await conn.prepare("SELECT $1::int + $2::int AS s, current_user AS u")
            for i in range(50):
                row = await stmt.fetchrow(i, 1)
                assert row is not None
                assert (row["s"], row["u"]) == (i + 1, emulator.role)
            assert [a.name for a in stmt.get_attributes()] == ["s", "u"]
            rows = await conn.fetch("SELECT g FROM generate_series(1, 1000000) g")
            assert len(rows) == 1_000_000
            assert sum(r[0] for r in rows) == 1_000_000 * 1_000_001 // 2
            many = await conn.fetchval(
                "SELECT count(*) FROM (SELECT $1::text FROM generate_series(1, $2)) s",
                "x", 1000)
            assert many == 1000
        finally:
            await conn.close()


async def test_listen_notify_across_two_sessions(emulator: Emulator, proxy: ProxyFactory) -> None:
    async with asyncio.timeout(30):
        p = await proxy(emulator)
        listener = await p.asyncpg()
        sender = await p.asyncpg()
        got: asyncio.Queue[tuple[int, str, str]] = asyncio.Queue()
        try:
            await listener.add_listener(
                "lakeproxy_test",
                lambda _c, pid, channel, payload: got.put_nowait((pid, channel, payload)))
            sender_pid = await sender.fetchval("SELECT pg_backend_pid()")
            # The pid from BackendKeyData (what the client was told) is the backend's.
            assert sender.get_server_pid() == sender_pid
            await sender.execute("SELECT pg_notify('lakeproxy_test', 'hello through the proxy')")
            pid, channel, payload = await asyncio.wait_for(got.get(), 5)
        finally:
            await listener.close()
            await sender.close()
    assert (pid, channel, payload) == (sender_pid, "lakeproxy_test", "hello through the proxy")


async def test_psycopg_cancel_safe_of_pg_sleep(emulator: Emulator, proxy: ProxyFactory) -> None:
    async with asyncio.timeout(30):
        p = await proxy(emulator)
        async with await p.psycopg() as conn:
            query = asyncio.create_task(conn.execute("SELECT pg_sleep(30)"))
            await asyncio.sleep(0.5)
            started = time.monotonic()
            await conn.cancel_safe(timeout=5)
            with pytest.raises(psycopg.errors.QueryCanceled):
                await query
            assert time.monotonic() - started < 2
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)


#: Run in a child process: libpq's PQcancel (psycopg's ``conn.cancel()``) holds
#: the GIL while it waits for the server to close the cancel connection, so it
#: cannot run in the process that hosts the proxy.
_CANCEL_SCRIPT = """
import sys, threading, time, psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
def cancel_soon():
    time.sleep(0.5)
    global started
    started = time.monotonic()
    conn.cancel()
threading.Thread(target=cancel_soon).start()
try:
    conn.execute("SELECT pg_sleep(30)")
    print("not cancelled")
except psycopg.errors.QueryCanceled as exc:
    print(exc.sqlstate, round(time.monotonic() - started, 3))
print(conn.execute("SELECT 1").fetchone()[0])
"""


async def test_psycopg_cancel_of_pg_sleep(emulator: Emulator, proxy: ProxyFactory) -> None:
    async with asyncio.timeout(30):
        p = await proxy(emulator)
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CANCEL_SCRIPT, p.conninfo(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await child.communicate()
    assert child.returncode == 0, err.decode()
    cancelled, took, one = out.decode().split()
    assert (cancelled, one) == ("57014", "1")
    assert float(took) < 2


async def test_asyncpg_timeout_cancels_pg_sleep(emulator: Emulator, proxy: ProxyFactory) -> None:
    async with asyncio.timeout(30):
        p = await proxy(emulator)
        conn = await p.asyncpg()
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await conn.fetch("SELECT pg_sleep(30)", timeout=0.5)
            # asyncpg sent a CancelRequest and waits for the query to end: only a
            # cancel that reached the backend makes the next query this quick.
            assert await conn.fetchval("SELECT 42") == 42
            assert time.monotonic() - started < 2
        finally:
            await conn.close()


async def test_cancel_key_is_lakeproxys(emulator: Emulator, proxy: ProxyFactory) -> None:
    """The client holds lakeproxy's secret (not the endpoint's); a CancelRequest with
    it cancels, one with any other secret is dropped."""
    async with asyncio.timeout(30):
        p = await proxy(emulator)
        client = await RawClient.open(p.port)
        try:
            key = await client.login({"user": CLIENT_USER, "database": DATABASE})
            target = p.server.cancels.lookup(key.process_id, key.secret)
            assert target is not None
            assert target.process_id == key.process_id
            assert target.secret != key.secret

            client.send(query_bytes("SELECT pg_sleep(30)"))
            await asyncio.sleep(0.3)
            wrong = await RawClient.open(p.port)
            wrong.send(encode(CancelRequest(key.process_id, bytes(b ^ 0xFF for b in key.secret))))
            assert await wrong.read_until_closed() == []
            await wrong.close()
            with pytest.raises(TimeoutError):  # dropped: the query is still running
                await asyncio.wait_for(client.read_message(), 0.7)

            started = time.monotonic()
            right = await RawClient.open(p.port)
            right.send(encode(CancelRequest(key.process_id, key.secret)))
            assert await right.read_until_closed() == []
            await right.close()
            errors: list[ErrorResponse] = []
            while not isinstance(msg := await client.read_message(), ReadyForQuery):
                assert msg is not None
                if isinstance(msg, ErrorResponse):
                    errors.append(msg)
            assert time.monotonic() - started < 2
            assert [e.sqlstate for e in errors] == ["57014"]
        finally:
            await client.close()


async def test_queries_sent_with_the_startup_arrive_in_order(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    """Bytes a client sends before its login completes wait, and go upstream
    first once the splice starts, in order."""
    async with asyncio.timeout(30):
        p = await proxy(emulator)
        client = await RawClient.open(p.port)
        try:
            client.send(startup_bytes({"user": CLIENT_USER, "database": DATABASE})
                        + b"".join(query_bytes(f"SELECT {i}") for i in range(100)))
            rows: list[bytes] = []
            ready = 0
            while ready < 101:  # the login's ReadyForQuery, then one per query
                msg = await client.expect_message()
                if isinstance(msg, ReadyForQuery):
                    ready += 1
                elif isinstance(msg, OtherMessage) and msg.tag == b"D":
                    rows.append(msg.body[6:])  # one column: count, length, value
        finally:
            await client.close()
    assert rows == [str(i).encode() for i in range(100)]


async def test_pg_terminate_backend_of_a_proxied_session(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    async with asyncio.timeout(30):
        p = await proxy(emulator)
        async with await p.psycopg() as victim, await p.psycopg() as killer:
            pid = victim.info.backend_pid
            cur = await victim.execute("SELECT pg_backend_pid()")
            assert await cur.fetchone() == (pid,)
            cur = await killer.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
            assert await cur.fetchone() == (True,)
            with pytest.raises(psycopg.OperationalError) as info:
                await victim.execute("SELECT 1")
            assert info.value.sqlstate == "57P01"  # PostgreSQL's FATAL, relayed before the close
            assert victim.closed or victim.broken
            cur = await killer.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                       (pid,))
            assert await cur.fetchone() == (0,)


async def test_many_sessions_at_once(emulator: Emulator, proxy: ProxyFactory) -> None:
    """20 concurrent clients each run queries; every one sees its own backend."""
    async with asyncio.timeout(60):
        p = await proxy(emulator)

        async def one(i: int) -> int:
            conn = await p.asyncpg()
            try:
                pid: int = await conn.fetchval("SELECT pg_backend_pid()")
                assert conn.get_server_pid() == pid
                total = await conn.fetchval("SELECT sum(g) FROM generate_series(1, $1) g", i)
                assert total == i * (i + 1) // 2
                return pid
            finally:
                await conn.close()

        pids = await asyncio.gather(*(one(i) for i in range(1, 21)))
    assert len(set(pids)) == 20
    assert isinstance(pids[0], int)


async def test_lakeproxy_demo_prints_a_psql_line_that_works(tmp_path: Path) -> None:
    """README's first command: ``lakeproxy demo`` starts the emulator and a proxy,
    prints the psql line; that line works; Ctrl-C stops it with exit status 0."""
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PG", "DATABRICKS_", "LAKEPROXY_", "ENDPOINT_NAME"))}
    env["LAKEPROXY_LISTEN"] = f"127.0.0.1:{port}"
    log = tmp_path / "demo.stderr"
    with log.open("wb") as stderr:
        demo = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lakeproxy", "demo", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=stderr, env=env, cwd=tmp_path,
        )
        try:
            async with asyncio.timeout(60):
                assert demo.stdout is not None
                text = ""
                while "Ctrl-C" not in text:  # the end of the ready message
                    line = (await demo.stdout.readline()).decode()
                    assert line, f"demo ended early:\n{text}\n{log.read_text()}"
                    text += line
                [psql_line] = [ln for ln in text.splitlines() if ln.strip().startswith("psql ")]
                argv = shlex.split(psql_line)
                assert f"port={port}" in argv[1]
                psql = await asyncio.create_subprocess_exec(
                    PSQL, "-X", "-A", "-t", *argv[1:], stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env={"PATH": env.get("PATH", "/usr/bin"), "HOME": str(tmp_path)},
                )
                out, err = await psql.communicate()
                assert psql.returncode == 0, err.decode()
                user, _, database = out.decode().strip().partition("|")
                assert f"as role {user}" in text
                assert database == DATABASE
                demo.send_signal(signal.SIGINT)
                await demo.stdout.read()
                assert await demo.wait() == 0, log.read_text()
        finally:
            if demo.returncode is None:
                demo.kill()
                await demo.wait()
    assert "lakeproxy demo: stopped." in log.read_text()
