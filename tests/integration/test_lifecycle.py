"""Signals and limits of a real ``python -m lakeproxy run`` in front of the emulator.

SIGTERM drains (stop accepting at once, /readyz 503, open sessions keep working
for LAKEPROXY_SHUTDOWN_GRACE, then are closed, exit 0), a second SIGINT forces
the exit, SIGHUP re-reads the config file (a broken file is reported and the
old configuration kept), and LAKEPROXY_MAX_CLIENTS turns the next client away
with 53300.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import asyncpg
import psycopg
import pytest

from lakeproxy.emulator import Emulator
from lakeproxy.emulator.api import OIDC_PATH, POSTGRES_CREDENTIALS_PATH
from lakeproxy.emulator.certs import make_certs

from .proxy_process import ProxyProcess, running

DB = "databricks_postgres"
T = 60


def _env(emu: Emulator, **extra: str) -> dict[str, str]:
    return {**emu.env(), "LAKEPROXY_LISTEN": "127.0.0.1:0",
            "LAKEPROXY_ADMIN_LISTEN": "127.0.0.1:0", **extra}


async def _connect(p: ProxyProcess) -> psycopg.AsyncConnection[tuple[object, ...]]:
    return await psycopg.AsyncConnection.connect(
        f"host=127.0.0.1 port={p.tcp_port()} dbname={DB} user=app connect_timeout=10",
        autocommit=True)


async def _one(conn: psycopg.AsyncConnection[tuple[object, ...]], sql: str) -> object:
    cur = await conn.execute(sql)
    row = await cur.fetchone()
    assert row is not None
    return row[0]


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def _asyncpg_refusal(port: int) -> asyncpg.PostgresError:
    try:
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="app", database=DB,
                                     ssl=False, timeout=10)
    except asyncpg.PostgresError as exc:
        return exc
    await conn.close()
    raise AssertionError("connected")


async def test_sigterm_drains_an_open_session(emulator: Emulator) -> None:
    grace = 2.0
    env = _env(emulator, LAKEPROXY_SHUTDOWN_GRACE=str(grace))
    async with asyncio.timeout(T), running(env) as p:
        port = p.tcp_port()
        conn = await _connect(p)
        assert await _one(conn, "SELECT 1") == 1
        await p.wait_ready()

        p.signal(signal.SIGTERM)
        signalled = time.monotonic()
        await p.wait_for_line(r"shutting down: 1 open session\(s\), grace 2s")
        # Stops accepting at once; /readyz says why.
        while not await _refused(port):
            assert time.monotonic() - signalled < 0.5, "still accepting"
            await asyncio.sleep(0.01)
        assert await p.readyz() == (503, "draining")
        assert await p.get("/healthz") == (200, "ok\n")

        # The open session keeps working during the grace period ...
        for i in range(5):
            assert await _one(conn, f"SELECT {i} + 1") == i + 1
            await asyncio.sleep(0.1)
        assert time.monotonic() - signalled < grace
        # ... and is closed when it is over.
        async def query_until_closed() -> None:
            while True:
                await _one(conn, "SELECT 1")
                await asyncio.sleep(0.05)

        with pytest.raises(psycopg.OperationalError):
            await query_until_closed()
        closed_after = time.monotonic() - signalled
        assert grace - 0.2 < closed_after < grace + 3
        await conn.close()

        assert await p.wait() == 0
    assert p.lines_matching(r"shutdown grace over: closed 1 open session\(s\)")
    ends = p.lines_matching("session end")
    assert len(ends) == 1
    assert "closed_by=proxy" in ends[0]
    assert p.lines_matching("lakeproxy stopped")


async def test_sigterm_exits_as_soon_as_the_last_session_ends(emulator: Emulator) -> None:
    async with asyncio.timeout(T), running(_env(emulator, LAKEPROXY_SHUTDOWN_GRACE="30")) as p:
        conn = await _connect(p)
        assert await _one(conn, "SELECT 1") == 1
        p.signal(signal.SIGTERM)
        await p.wait_for_line("shutting down")
        await asyncio.sleep(0.3)
        assert p.proc.returncode is None  # waiting for the session
        await conn.close()
        closed = time.monotonic()
        assert await p.wait(10) == 0
        assert time.monotonic() - closed < 2
    assert not p.lines_matching("shutdown grace over")


async def test_second_sigint_forces_exit(emulator: Emulator) -> None:
    async with asyncio.timeout(T), running(_env(emulator, LAKEPROXY_SHUTDOWN_GRACE="30")) as p:
        conn = await _connect(p)
        assert await _one(conn, "SELECT 1") == 1
        p.signal(signal.SIGINT)
        await p.wait_for_line("shutting down")
        assert await _one(conn, "SELECT 2") == 2  # still draining, not stopped
        p.signal(signal.SIGINT)
        assert await p.wait(5) == 130
        assert p.lines_matching("second SIGINT: exiting now")
        with pytest.raises(psycopg.OperationalError):
            await _one(conn, "SELECT 3")
        await conn.close()


async def test_sigint_with_no_sessions_exits_0(emulator: Emulator) -> None:
    async with asyncio.timeout(T), running(_env(emulator)) as p:
        p.signal(signal.SIGINT)
        assert await p.wait(10) == 0


async def _sighup(p: ProxyProcess, expect: str) -> str:
    """Send SIGHUP; return the first log line after it that matches ``expect`` (a regex)."""
    mark = len(p.stderr)
    p.signal(signal.SIGHUP)
    return await p.wait_for_line(expect, after=mark)


# --------------------------------------------------------------------------- SIGHUP


async def test_sighup_rereads_the_config_file(emulator: Emulator, tmp_path: Path) -> None:
    config = tmp_path / "lakeproxy.toml"
    config.write_text("[proxy]\nmax_clients = 5\n")
    env = _env(emulator, LAKEPROXY_CONFIG=str(config))
    async with asyncio.timeout(T), running(env) as p:
        await p.wait_ready()
        port = p.tcp_port()
        first = await _connect(p)
        second = await _connect(p)  # 2 of 5
        await second.close()
        calls = dict(emulator.workspace.calls)

        # Lower the limit to 1: applies to new connections at once.
        config.write_text("[proxy]\nmax_clients = 1\n")
        await _sighup(p, f"configuration reloaded from {config}")
        refusal = await _asyncpg_refusal(port)
        assert refusal.sqlstate == "53300"
        assert "too many clients already (1)" in str(refusal)
        assert await p.readyz() == (503, "at the client limit")
        assert await _one(first, "SELECT 1") == 1  # the open session is untouched
        # Same identity and endpoint: the cached credential was kept, no new API calls.
        assert dict(emulator.workspace.calls) == calls

        # A broken file is reported; the last good configuration stays.
        config.write_text("[proxy\nmax_clients = 7\n")
        line = await _sighup(p, "reload failed, keeping the old configuration")
        assert "not valid TOML" in line
        assert (await _asyncpg_refusal(port)).sqlstate == "53300"

        # A bad value too (one line naming the key and the file).
        config.write_text("[proxy]\nmax_clients = -1\n")
        line = await _sighup(p, "reload failed")
        assert "max_clients" in line
        assert (await _asyncpg_refusal(port)).sqlstate == "53300"
        assert await _one(first, "SELECT 2") == 2

        # Fixed again: the limit goes back up.
        config.write_text("[proxy]\nmax_clients = 3\n")
        await _sighup(p, "configuration reloaded")
        again = await _connect(p)
        assert await _one(again, "SELECT 3") == 3
        await again.close()
        await first.close()
        assert p.proc.returncode is None


async def test_sighup_new_credentials_apply_to_new_connections(
    emulator: Emulator, tmp_path: Path
) -> None:
    """The identity moves to the file: the reload mints with it for new clients."""
    config = tmp_path / "lakeproxy.toml"
    env = _env(emulator, LAKEPROXY_CONFIG=str(config))
    secret = env.pop("DATABRICKS_CLIENT_SECRET")
    config.write_text(f'[databricks]\nclient_secret = "{secret}-old-wrong"\n')
    async with asyncio.timeout(T), running(env) as p:
        await p.wait_for_line("could not mint a credential")
        assert await p.readyz() == (503, "no usable credential")
        refusal = await _asyncpg_refusal(p.tcp_port())
        assert refusal.sqlstate == "28000"

        config.write_text(f'[databricks]\nclient_secret = "{secret}"\n')
        oauth_calls = emulator.workspace.calls[OIDC_PATH]
        p.signal(signal.SIGHUP)
        await p.wait_ready()  # the reload mints a credential at once
        assert emulator.workspace.calls[POSTGRES_CREDENTIALS_PATH] >= 1
        assert emulator.workspace.calls[OIDC_PATH] > oauth_calls
        conn = await _connect(p)
        assert await _one(conn, "SELECT current_user") == emulator.role
        await conn.close()
    assert secret not in p.output


async def test_sighup_rereads_a_ca_file_replaced_in_place(
    emulator: Emulator, tmp_path: Path
) -> None:
    """LAKEBASE_SSLROOTCERT keeps its path but gets new contents (a CA rotation): the
    reload verifies new connections against the new file, though no setting
    changed."""
    ca = tmp_path / "root.pem"
    other = make_certs(tmp_path / "other", ["elsewhere.test"])
    ca.write_bytes(other.ca_file.read_bytes())  # not the emulator's CA
    env = _env(emulator, LAKEBASE_SSLROOTCERT=str(ca))
    async with asyncio.timeout(T), running(env) as p:
        await p.wait_ready()
        with pytest.raises(psycopg.OperationalError, match="certificate"):
            await _connect(p)

        ca.write_bytes(emulator.ca_file.read_bytes())
        await _sighup(p, "configuration reloaded")
        conn = await _connect(p)
        assert await _one(conn, "SELECT 1") == 1
        await conn.close()

        # A CA file that no longer loads: reported, and the last good one stays.
        ca.write_text("not a certificate\n")
        line = await _sighup(p, "reload failed")
        assert str(ca) in line
        conn = await _connect(p)
        assert await _one(conn, "SELECT 2") == 2
        await conn.close()


# --------------------------------------------------------------------------- client limit


async def test_max_clients_third_gets_53300(emulator: Emulator) -> None:
    async with asyncio.timeout(T), running(_env(emulator, LAKEPROXY_MAX_CLIENTS="2")) as p:
        await p.wait_ready()
        port = p.tcp_port()
        a, b = await _connect(p), await _connect(p)
        assert await p.readyz() == (503, "at the client limit")

        with pytest.raises(asyncpg.TooManyConnectionsError) as third:
            await asyncpg.connect(host="127.0.0.1", port=port, user="app", database=DB,
                                  ssl=False, timeout=10)
        assert third.value.sqlstate == "53300"
        assert third.value.args[0] == "lakeproxy: sorry, too many clients already (2)"
        assert third.value.hint == "raise LAKEPROXY_MAX_CLIENTS or use fewer connections"
        # psycopg (libpq) sees the same FATAL.
        with pytest.raises(psycopg.OperationalError, match="too many clients already"):
            await _connect(p)

        assert await _one(a, "SELECT 1") == 1
        assert await _one(b, "SELECT 2") == 2
        await b.close()
        deadline = time.monotonic() + 5
        while True:  # the slot frees once the proxy has seen b go
            try:
                c = await _connect(p)
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        assert await _one(c, "SELECT 3") == 3
        await c.close()
        await a.close()
        _, text = await p.get("/metrics")
        assert 'lakeproxy_client_connections_total{outcome="too_many"} 2.0' in text


async def test_sighup_client_password_applies_to_new_connections(
    emulator: Emulator, tmp_path: Path
) -> None:
    """Adding (or changing) LAKEPROXY_CLIENT_PASSWORD in the file takes effect on reload."""
    config = tmp_path / "lakeproxy.toml"
    config.write_text("[proxy]\nmax_clients = 10\n")
    async with asyncio.timeout(T), running(_env(emulator, LAKEPROXY_CONFIG=str(config))) as p:
        port = p.tcp_port()
        trusted = await _connect(p)  # no password needed yet

        config.write_text('[proxy]\nclient_password = "now-a-password-1"\n')
        await _sighup(p, "configuration reloaded")
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(host="127.0.0.1", port=port, user="app", database=DB,
                                  password="wrong", ssl=False, timeout=10)
        with pytest.raises(psycopg.OperationalError, match="no password supplied"):
            await _connect(p)
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="app", database=DB,
                                     password="now-a-password-1", ssl=False, timeout=10)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        assert await _one(trusted, "SELECT 2") == 2  # open sessions are not touched
        await trusted.close()
    assert "now-a-password-1" not in p.output
