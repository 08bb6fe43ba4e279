"""Session reuse (SPEC "Session reuse"): real PostgreSQL behind the emulator, real clients.

Each test names its own ``application_name`` so its sessions have a key of
their own (the session emulator is shared by the whole run).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import psycopg
import pytest

from lakeproxy import pool as pool_module
from lakeproxy.emulator import Emulator
from lakeproxy.wire.codec import (
    BackendKeyData,
    BackendMessage,
    CancelRequest,
    ErrorResponse,
    OtherMessage,
    ParameterStatus,
    ReadyForQuery,
    encode,
)

from .conftest import ProxyFactory
from .proxy_rig import (
    CLIENT_USER,
    DATABASE,
    Proxy,
    RawClient,
    eventually,
    query_bytes,
    role_backends,
    startup_bytes,
)

MakeEmulator = Callable[..., Awaitable[Emulator]]

TERMINATE = b"X\x00\x00\x00\x04"


def _name() -> str:
    return "pool-" + uuid.uuid4().hex[:10]


def metric(p: Proxy, name: str, **labels: str) -> float:
    """One sample of the proxy's /metrics text."""
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels
                   else "")
    for line in p.metrics.render().decode().splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no sample {want}")


class Login:
    """A raw client logged in: its ParameterStatus set (in order) and its key."""

    def __init__(self, client: RawClient, params: dict[str, str], key: BackendKeyData) -> None:
        self.client = client
        self.params = params
        self.key = key

    @property
    def pid(self) -> int:
        return self.key.process_id

    async def query(self, sql: str) -> list[BackendMessage]:
        """Send a simple Query; every message up to ReadyForQuery (included)."""
        self.client.send(query_bytes(sql))
        return await self.until_ready()

    async def until_ready(self) -> list[BackendMessage]:
        out: list[BackendMessage] = []
        while True:
            msg = await self.client.read_message()
            assert msg is not None, f"closed after {out}"
            out.append(msg)
            if isinstance(msg, ReadyForQuery):
                return out

    async def value(self, sql: str) -> str | None:
        """The first column of the first row of ``sql`` (text)."""
        msgs = await self.query(sql)
        errors = [m for m in msgs if isinstance(m, ErrorResponse)]
        assert not errors, errors
        for m in msgs:
            if isinstance(m, OtherMessage) and m.tag == b"D":
                n = int.from_bytes(m.body[2:6], "big", signed=True)
                return None if n < 0 else m.body[6:6 + n].decode()
        raise AssertionError(f"no row: {msgs}")

    async def terminate(self) -> None:
        """End cleanly: Terminate, then wait for the proxy to close."""
        self.client.send(TERMINATE)
        await self.client.read_until_closed()
        await self.client.close()


async def login(p: Proxy, app: str, **extra: str) -> Login:
    client = await RawClient.open(p.port)
    client.send(startup_bytes({"user": CLIENT_USER, "database": DATABASE,
                               "application_name": app, **extra}))
    params: dict[str, str] = {}
    key: BackendKeyData | None = None
    while True:
        msg = await client.expect_message()
        if isinstance(msg, ParameterStatus):
            params[msg.name] = msg.value
        elif isinstance(msg, BackendKeyData):
            key = msg
        elif isinstance(msg, ReadyForQuery):
            assert msg.status == "I"
            assert key is not None
            return Login(client, params, key)


async def parked(p: Proxy, n: int) -> None:
    """Wait until ``n`` sessions are parked (the reset runs after the client is gone)."""
    async def check() -> bool:
        return len(p.server.pool) == n
    await eventually(check, timeout=10)


# ------------------------------------------------------------------------ isolation


async def test_reused_session_is_the_same_backend_and_keeps_nothing(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    """Everything a client can leave in a session is gone for the next one, which
    gets the same backend and the ParameterStatus set a fresh login shows."""
    other_role = "pool_other_" + uuid.uuid4().hex[:8]
    await asyncio.to_thread(emulator.pg.psql, f"CREATE ROLE {other_role}; "
                            f'GRANT {other_role} TO "{emulator.role}"')
    app = _name()
    async with asyncio.timeout(60):
        p = await proxy(emulator, LAKEPROXY_POOL_MODE="session")
        first = await login(p, app)
        fresh = await login(p, app)  # a second login at the same time: a fresh dial
        assert fresh.pid != first.pid
        assert fresh.params == first.params
        role_before = await first.value("SELECT current_user")
        for sql in [
            "SET statement_timeout = '4321ms'",
            "SELECT set_config('search_path', 'elsewhere', false)",
            "SET DateStyle = 'SQL, DMY'",
            "SET TimeZone = 'Asia/Tokyo'",
            "SET application_name = 'changed-by-client'",
            "SET intervalstyle = 'iso_8601'",
            f"SET SESSION AUTHORIZATION \"{emulator.role}\"",
            f"SET ROLE {other_role}",
            "CREATE TEMP TABLE leftover(x int)",
            "PREPARE leftover_stmt AS SELECT 1",
            "LISTEN leftover_channel",
            "SELECT pg_advisory_lock(4242)",
            "BEGIN",
            "DECLARE leftover_cursor CURSOR WITH HOLD FOR SELECT 1",
            "COMMIT",
        ]:
            msgs = await first.query(sql)
            assert not [m for m in msgs if isinstance(m, ErrorResponse)], (sql, msgs)
        assert await first.value("SELECT current_user") == other_role
        # A protocol-level prepared statement: Parse (named), Sync.
        body = b"leftover_proto\x00SELECT 2\x00\x00\x00"
        first.client.send(b"P" + (len(body) + 4).to_bytes(4, "big") + body
                          + b"S\x00\x00\x00\x04")
        await first.until_ready()
        # Leave a transaction open: the reset rolls it back.
        await first.query("BEGIN")
        await first.query("INSERT INTO leftover VALUES (1)")
        await first.terminate()
        await parked(p, 1)

        second = await login(p, app)
        assert second.pid == first.pid
        assert second.params == fresh.params
        assert second.key.secret != first.key.secret
        assert await second.value("SELECT current_user") == role_before
        assert await second.value("SHOW statement_timeout") == "0"
        assert await second.value("SHOW search_path") == '"$user", public'
        assert await second.value("SELECT to_regclass('pg_temp.leftover') IS NULL") == "t"
        assert await second.value("SELECT count(*) FROM pg_prepared_statements") == "0"
        assert await second.value("SELECT count(*) FROM pg_listening_channels()") == "0"
        assert await second.value(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            "AND pid = pg_backend_pid()") == "0"
        assert await second.value("SELECT count(*) FROM pg_cursors") == "0"
        assert await second.value("SELECT current_setting('application_name')") == app
        await second.terminate()
        await fresh.terminate()
    assert metric(p, "lakeproxy_pool_requests_total", result="hit") == 1
    assert metric(p, "lakeproxy_pool_requests_total", result="miss") == 2


async def test_real_clients_reuse_one_backend(emulator: Emulator, proxy: ProxyFactory) -> None:
    """psql, psycopg and asyncpg, one after another with the same parameters, share
    one backend; each sees a clean session."""
    async with asyncio.timeout(60):
        p = await proxy(emulator, LAKEPROXY_POOL_MODE="session")
        pids: set[str] = set()
        for n in range(2):
            out = await p.psql("SELECT pg_backend_pid(); SET search_path = nowhere")
            pids.add(out.split()[0])
            await parked(p, n + 1 if n == 0 else 1)
        assert len(pids) == 1

        app = _name()
        seen = []
        for _ in range(2):
            async with await p.psycopg(application_name=app) as conn:
                cur = await conn.execute("SELECT pg_backend_pid(), current_setting('search_path')")
                seen.append(await cur.fetchone())
                await conn.execute("SET search_path = nowhere")
                # psycopg prepares a statement on the server after a few uses
                for _ in range(6):
                    await conn.execute("SELECT %s::int", (1,), prepare=True)
            await parked(p, 2)
        assert seen[0] == seen[1]
        assert seen[0] is not None
        assert seen[0][1] == '"$user", public'

        app = _name()
        rows = []
        for _ in range(2):
            conn = await p.asyncpg(server_settings={"application_name": app})
            try:
                rows.append(await conn.fetchrow(
                    "SELECT pg_backend_pid() AS pid, "
                    "(SELECT count(*) FROM pg_prepared_statements) AS prepared"))
                await conn.fetch("SELECT $1::int", 5)
            finally:
                await conn.close()
            await parked(p, 3)
        assert rows[0]["pid"] == rows[1]["pid"]
        assert rows[1]["prepared"] == rows[0]["prepared"]  # asyncpg's own, none left over


# ------------------------------------------------------------------------ not reused


async def _next_pid(p: Proxy, app: str) -> int:
    nxt = await login(p, app)
    try:
        assert await nxt.value("SELECT 1") == "1"
        return nxt.pid
    finally:
        await nxt.terminate()


async def test_vanishing_mid_query_is_not_reused(emulator: Emulator, proxy: ProxyFactory) -> None:
    app = _name()
    async with asyncio.timeout(30):
        p = await proxy(emulator, LAKEPROXY_POOL_MODE="session")
        gone = await login(p, app)
        gone.client.send(query_bytes("SELECT pg_sleep(0.3)"))
        gone.client.abort()
        assert await _next_pid(p, app) != gone.pid
    assert metric(p, "lakeproxy_pool_discards_total", reason="unclean") >= 1


@pytest.mark.parametrize("how", ["copy_in", "copy_out"])
async def test_terminate_mid_copy_is_not_reused(
    emulator: Emulator, proxy: ProxyFactory, how: str,
) -> None:
    app = _name()
    async with asyncio.timeout(30):
        p = await proxy(emulator, LAKEPROXY_POOL_MODE="session")
        c = await login(p, app)
        await c.query("CREATE TEMP TABLE t(x int)")
        sql = ("COPY t FROM STDIN" if how == "copy_in"
               else "COPY (SELECT generate_series(1, 100000)) TO STDOUT")
        c.client.send(query_bytes(sql))
        msg = await c.client.expect_message()
        assert isinstance(msg, OtherMessage)
        assert msg.tag in (b"G", b"H")
        await c.terminate()
        assert await _next_pid(p, app) != c.pid
        await parked(p, 1)  # only the clean one just above
    assert metric(p, "lakeproxy_pool_discards_total", reason="unclean") == 1


async def test_eof_mid_transaction_is_not_reused(emulator: Emulator, proxy: ProxyFactory) -> None:
    app = _name()
    async with asyncio.timeout(30):
        p = await proxy(emulator, LAKEPROXY_POOL_MODE="session")
        c = await login(p, app)
        msgs = await c.query("BEGIN")
        assert msgs[-1] == ReadyForQuery("T")
        await c.client.close()  # FIN without Terminate
        assert await _next_pid(p, app) != c.pid


async def test_extended_messages_without_sync_are_not_clean(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    app = _name()
    async with asyncio.timeout(30):
        p = await proxy(emulator, LAKEPROXY_POOL_MODE="session")
        c = await login(p, app)
        body = b"\x00SELECT 1\x00\x00\x00"
        c.client.send(b"P" + (len(body) + 4).to_bytes(4, "big") + body)  # Parse, no Sync
        await c.terminate()
        assert await _next_pid(p, app) != c.pid


async def test_after_a_fatal_the_next_client_gets_a_fresh_session(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    app = _name()
    async with asyncio.timeout(30):
        p = await proxy(emulator, LAKEPROXY_POOL_MODE="session")
        c = await login(p, app)
        killer = await login(p, _name())
        await killer.query(f"SELECT pg_terminate_backend({c.pid})")
        await killer.terminate()
        fatal = await c.client.read_message()
        assert isinstance(fatal, ErrorResponse)
        assert fatal.sqlstate == "57P01"
        c.client.send(TERMINATE)
        await c.client.read_until_closed()
        await c.client.close()
        assert await _next_pid(p, app) != c.pid


async def test_different_startup_parameters_get_another_session(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    app = _name()
    async with asyncio.timeout(30):
        p = await proxy(emulator, LAKEPROXY_POOL_MODE="session")
        a = await login(p, app)
        await a.terminate()
        await parked(p, 1)
        b = await login(p, app, options="-c work_mem=8MB")
        assert b.pid != a.pid
        assert await b.value("SHOW work_mem") == "8MB"
        await b.terminate()
        c = await login(p, app, DateStyle="ISO, YMD")
        assert c.pid not in (a.pid, b.pid)
        await c.terminate()
        assert await _next_pid(p, app) == a.pid


async def test_pool_mode_off_keeps_no_session(emulator: Emulator, proxy: ProxyFactory) -> None:
    app = _name()
    async with asyncio.timeout(30):
        p = await proxy(emulator)
        a = await login(p, app)
        await a.terminate()
        assert len(p.server.pool) == 0
        assert await _next_pid(p, app) != a.pid


# ------------------------------------------------------------------------ cancel keys


async def test_old_key_cancels_nothing_new_key_cancels(
    emulator: Emulator, proxy: ProxyFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="lakeproxy.session")
    app = _name()
    async with asyncio.timeout(30):
        p = await proxy(emulator, LAKEPROXY_POOL_MODE="session")
        old = await login(p, app)
        await old.terminate()
        await parked(p, 1)
        new = await login(p, app)
        assert new.pid == old.pid
        assert p.server.cancels.lookup(old.pid, old.key.secret) is None
        new.client.send(query_bytes("SELECT pg_sleep(30)"))

        async def sleeping() -> bool:
            out = await asyncio.to_thread(
                emulator.pg.psql,
                f"SELECT count(*) FROM pg_stat_activity WHERE pid = {new.pid} "  # noqa: S608
                "AND state = 'active' AND query LIKE 'SELECT pg_sleep%'")
            return out.strip() == "1"
        await eventually(sleeping, timeout=10)
        stale = await RawClient.open(p.port)
        stale.send(encode(CancelRequest(old.pid, old.key.secret)))
        assert await stale.read_until_closed() == []
        await stale.close()
        assert await sleeping()  # the old key was dropped: still running
        assert any("cancel request for unknown key" in r.getMessage() for r in caplog.records)

        right = await RawClient.open(p.port)
        right.send(encode(CancelRequest(new.pid, new.key.secret)))
        assert await right.read_until_closed() == []
        await right.close()
        msgs = await new.until_ready()
        assert [m.sqlstate for m in msgs if isinstance(m, ErrorResponse)] == ["57014"]
        await new.terminate()


# ------------------------------------------------------------------------ scale to zero, bounds


async def test_compute_suspended_while_parked_next_client_dials_fresh(
    make_emulator: MakeEmulator, proxy: ProxyFactory,
) -> None:
    emu = await make_emulator()
    app = _name()
    async with asyncio.timeout(60):
        p = await proxy(emu, LAKEPROXY_POOL_MODE="session")
        a = await login(p, app)
        await a.terminate()
        await parked(p, 1)
        await emu.frontdoor.suspend()  # 57P01 to the parked session's backend
        await parked(p, 0)
        b = await login(p, app)  # wakes the compute, no error
        assert b.pid != a.pid
        assert await b.value("SELECT 1") == "1"
        await b.terminate()
    assert metric(p, "lakeproxy_pool_discards_total", reason="dead") == 1


async def test_parked_session_is_checked_after_a_while(
    emulator: Emulator, proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One parked longer than PROBE_AFTER answers a Sync before use (0 here)."""
    monkeypatch.setattr(pool_module, "PROBE_AFTER", 0.0)
    app = _name()
    async with asyncio.timeout(30):
        p = await proxy(emulator, LAKEPROXY_POOL_MODE="session")
        a = await login(p, app)
        await a.terminate()
        await parked(p, 1)
        assert await _next_pid(p, app) == a.pid


async def test_idle_timeout_closes_parked_sessions_and_the_compute_suspends(
    make_emulator: MakeEmulator, proxy: ProxyFactory,
) -> None:
    emu = await make_emulator(idle_suspend=0.5)
    app = _name()
    async with asyncio.timeout(60):
        p = await proxy(emu, LAKEPROXY_POOL_IDLE_TIMEOUT="1", LAKEPROXY_POOL_MODE="session")
        a = await login(p, app)
        await a.terminate()
        await parked(p, 1)

        async def suspended() -> bool:
            return emu.frontdoor.state == "SUSPENDED"
        await eventually(suspended, timeout=20)
    assert len(p.server.pool) == 0
    assert metric(p, "lakeproxy_pool_discards_total", reason="idle_timeout") == 1


async def test_max_idle_per_key(emulator: Emulator, proxy: ProxyFactory) -> None:
    app = _name()
    async with asyncio.timeout(30):
        p = await proxy(emulator, LAKEPROXY_POOL_MAX_IDLE="2", LAKEPROXY_POOL_MODE="session")
        clients = [await login(p, app) for _ in range(3)]
        for c in clients:
            await c.terminate()
        await eventually(lambda: _true_after(p), timeout=10)
        assert len(p.server.pool) == 2
    assert metric(p, "lakeproxy_pool_discards_total", reason="max_idle") == 1


async def _true_after(p: Proxy) -> bool:
    return metric(p, "lakeproxy_pool_discards_total", reason="max_idle") == 1


async def test_lifetime_closes_instead_of_parking(emulator: Emulator, proxy: ProxyFactory) -> None:
    app = _name()
    async with asyncio.timeout(30):
        p = await proxy(emulator, LAKEPROXY_POOL_LIFETIME="0.2", LAKEPROXY_POOL_MODE="session")
        a = await login(p, app)
        await asyncio.sleep(0.3)  # older than the lifetime when it ends
        await a.terminate()

        async def closed() -> bool:
            return metric(p, "lakeproxy_pool_discards_total", reason="lifetime") == 1
        await eventually(closed, timeout=10)
        assert len(p.server.pool) == 0


async def test_drain_closes_parked_sessions_at_once(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    app = _name()
    async with asyncio.timeout(30):
        p = await proxy(emulator, LAKEPROXY_POOL_MODE="session")
        a = await login(p, app)
        await a.terminate()
        await parked(p, 1)
        before = await role_backends(emulator.pg, emulator.role)
        assert before >= 1
        await p.server.drain(30)
        assert len(p.server.pool) == 0

        async def gone() -> bool:
            return await role_backends(emulator.pg, emulator.role) == before - 1
        await eventually(gone, timeout=10)
    assert metric(p, "lakeproxy_pool_discards_total", reason="shutdown") == 1


async def test_session_end_log_says_parked_or_closed(
    emulator: Emulator, proxy: ProxyFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="lakeproxy.server")
    app = _name()
    async with asyncio.timeout(30):
        p = await proxy(emulator, LAKEPROXY_POOL_MODE="session")
        a = await login(p, app)
        await a.terminate()
        await parked(p, 1)
        b = await login(p, app)
        b.client.abort()

        async def two() -> bool:
            return len([r for r in caplog.records if r.getMessage() == "session end"]) >= 2
        await eventually(two, timeout=10)
    ends = [r for r in caplog.records if r.getMessage() == "session end"]
    fields: list[Mapping[str, object]] = [getattr(r, "fields", {}) for r in ends]
    assert [(f.get("reused"), f.get("endpoint_session"), f.get("endpoint_session_reason"))
            for f in fields[:2]] == [(False, "parked", "reset"), (True, "closed", "unclean")]
    assert re.search(r"\d", str(fields[0].get("duration_s")))


# ------------------------------------------------------------------------ real drivers


async def test_psycopg_transaction_left_open_is_rolled_back(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    """A driver that leaves a transaction open (psycopg without autocommit) ends it
    with Terminate: the next one sees nothing of it."""
    await asyncio.to_thread(
        emulator.pg.psql, "CREATE TABLE IF NOT EXISTS pool_tx(x int); "
        f'GRANT ALL ON pool_tx TO "{emulator.role}"', database=DATABASE)
    app = _name()
    async with asyncio.timeout(30):
        p = await proxy(emulator, LAKEPROXY_POOL_MODE="session")
        conn = await psycopg.AsyncConnection.connect(p.conninfo(application_name=app))
        await conn.execute("INSERT INTO pool_tx VALUES (1)")  # opens a transaction
        pid = conn.info.backend_pid
        await conn.close()  # no commit: Terminate with the transaction open
        await parked(p, 1)
        async with await p.psycopg(application_name=app) as again:
            assert again.info.backend_pid == pid
            cur = await again.execute("SELECT count(*) FROM pool_tx")
            assert await cur.fetchone() == (0,)


async def test_reload_drops_parked_sessions_only_when_the_endpoint_changes(
    emulator: Emulator, proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = _name()
    async with asyncio.timeout(30):
        p = await proxy(emulator, LAKEPROXY_POOL_MODE="session")
        for k, v in p.env.items():
            monkeypatch.setenv(k, v)
        a = await login(p, app)
        await a.terminate()
        await parked(p, 1)
        monkeypatch.setenv("LAKEPROXY_POOL_MAX_IDLE", "5")  # same endpoint and identity
        p.runtime.reload()
        assert len(p.server.pool) == 1
        assert p.server.pool.max_idle == 5
        monkeypatch.setenv("LAKEBASE_PORT", str(emulator.port + 1))  # another endpoint
        p.runtime.reload()
        assert len(p.server.pool) == 0
    assert metric(p, "lakeproxy_pool_discards_total", reason="reload") == 1


async def test_parked_sessions_make_room_at_the_endpoints_connection_limit(
    make_emulator: MakeEmulator, proxy: ProxyFactory,
) -> None:
    """A client never gets 53300 because of our own parked sessions: at the limit,
    the longest-parked one is closed and the login tried again."""
    emu = await make_emulator(role="pool_limited_" + uuid.uuid4().hex[:8])
    await asyncio.to_thread(emu.pg.psql, f'ALTER ROLE "{emu.role}" CONNECTION LIMIT 2')
    async with asyncio.timeout(60):
        p = await proxy(emu, LAKEPROXY_POOL_MODE="session")
        for n in range(2):
            c = await login(p, _name())
            await c.terminate()
            await parked(p, n + 1)
        third = await login(p, _name())  # a third key: only room if one parked goes
        assert await third.value("SELECT 1") == "1"
        await third.terminate()
    assert metric(p, "lakeproxy_pool_discards_total", reason="max_idle") >= 1


JDBC_JAR = Path("/usr/share/java/postgresql.jar")
JDBC_CHECK = Path(__file__).resolve().parent.parent / "data" / "jdbc" / "PoolCheck.java"


async def test_jdbc_reuses_one_backend_and_sees_a_clean_session(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    """pgjdbc (extended protocol, named server-side statements, a transaction left
    open at close) three times in a row: one backend, nothing left over."""
    java = shutil.which("java")
    assert java is not None, "java is needed (apt-get install default-jre-headless)"
    assert JDBC_JAR.is_file(), "the PostgreSQL JDBC driver is needed (libpostgresql-jdbc-java)"
    async with asyncio.timeout(120):
        p = await proxy(emulator, LAKEPROXY_POOL_MODE="session")
        url = (f"jdbc:postgresql://127.0.0.1:{p.port}/{DATABASE}"
               f"?sslmode=disable&ApplicationName={_name()}")
        proc = await asyncio.create_subprocess_exec(
            java, "-cp", str(JDBC_JAR), str(JDBC_CHECK), url, "3", "500",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    rows = [line.split("|") for line in out.decode().splitlines()]
    assert len(rows) == 3
    assert len({r[0] for r in rows}) == 1  # the same backend each time
    assert [r[1:] for r in rows] == [['"$user", public', "0", emulator.role]] * 3


async def test_a_reset_that_hangs_closes_the_session(
    emulator: Emulator, proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The backend stops answering (SIGSTOP) when the client leaves: the reset
    times out, the session is closed, and the next client gets a fresh one."""
    monkeypatch.setattr(pool_module, "RESET_TIMEOUT", 0.5)
    app = _name()
    async with asyncio.timeout(30):
        p = await proxy(emulator, LAKEPROXY_POOL_MODE="session")
        a = await login(p, app)
        os.kill(a.pid, signal.SIGSTOP)
        try:
            await a.terminate()

            async def failed() -> bool:
                return metric(p, "lakeproxy_pool_discards_total", reason="reset_failed") == 1
            await eventually(failed, timeout=10)
        finally:
            os.kill(a.pid, signal.SIGCONT)
        assert len(p.server.pool) == 0
        assert await _next_pid(p, app) != a.pid


async def test_a_client_whose_session_is_being_reset_no_longer_counts(
    emulator: Emulator, proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the reset waits for the endpoint, the client that left is not one of
    the active clients (max_clients, readiness, drain wait only for real ones)."""
    monkeypatch.setattr(pool_module, "RESET_TIMEOUT", 60.0)
    app = _name()
    async with asyncio.timeout(30):
        p = await proxy(emulator, LAKEPROXY_POOL_MODE="session")
        a = await login(p, app)
        os.kill(a.pid, signal.SIGSTOP)  # the reset cannot finish until SIGCONT
        try:
            await a.terminate()

            async def not_counted() -> bool:
                return p.server.active_clients == 0 and not p.server.sessions
            await eventually(not_counted, timeout=10)
            assert len(p.server.pool) == 0  # still resetting
        finally:
            os.kill(a.pid, signal.SIGCONT)
        await parked(p, 1)
        assert await _next_pid(p, app) == a.pid
