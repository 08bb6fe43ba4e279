"""The Lakebase emulator against real clients: psycopg/libpq, psql, aiohttp, and
a raw protocol client (to read exact SQLSTATEs, which libpq does not expose
for failed connections)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import psycopg
import psycopg.errors
import pytest

from lakeproxy.emulator import Emulator
from lakeproxy.emulator.api import FakeWorkspace
from lakeproxy.emulator.pgcluster import PgCluster, PgClusterError
from lakeproxy.wire import codec, limits
from lakeproxy.wire.framing import FrameReader

MakeEmulator = Callable[..., Awaitable[Emulator]]
FORM = {"grant_type": "client_credentials", "scope": "all-apis"}
T = 30  # seconds: per-test asyncio timeout

# --------------------------------------------------------------------- helpers


async def oauth_token(session: aiohttp.ClientSession, emu: Emulator) -> str:
    r = await session.post(
        emu.workspace.url + "/oidc/v1/token", data=FORM,
        headers={"Authorization": aiohttp.encode_basic_auth(emu.client_id, emu.client_secret)})
    assert r.status == 200, await r.text()
    token: str = (await r.json())["access_token"]
    return token


async def mint(emu: Emulator) -> str:
    """Both API steps, as a client of the emulator would do them."""
    async with aiohttp.ClientSession() as s:
        bearer = await oauth_token(s, emu)
        r = await s.post(emu.workspace.url + "/api/2.0/postgres/credentials",
                         json={"endpoint": emu.endpoint_name},
                         headers={"Authorization": f"Bearer {bearer}"})
        assert r.status == 200, await r.text()
        token: str = (await r.json())["token"]
        return token


def conninfo(emu: Emulator, password: str, **override: str) -> dict[str, str]:
    info = {"host": emu.host, "hostaddr": "127.0.0.1", "port": str(emu.port),
            "user": emu.role, "dbname": "databricks_postgres", "password": password,
            "sslmode": "verify-full", "sslrootcert": str(emu.ca_file),
            "connect_timeout": "10"}
    info.update(override)
    return info


async def connect(emu: Emulator, password: str, **override: str) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(
        psycopg.conninfo.make_conninfo(**conninfo(emu, password, **override)))


def state(emu: Emulator) -> str:
    """The compute state (a plain str: it changes behind mypy's back)."""
    return emu.frontdoor.state


async def raw_login(
    emu: Emulator, *, password: str, sni: str | None = "endpoint", tls: bool = True,
    params: dict[str, str] | None = None,
) -> list[codec.BackendMessage]:
    """Log in speaking the protocol by hand; return the backend's messages up
    to ErrorResponse or ReadyForQuery (or EOF)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", emu.port)
    try:
        if tls:
            writer.write(codec.encode(codec.SSLRequest()))
            assert await reader.readexactly(1) == b"S"
            ctx = ssl.create_default_context(cafile=str(emu.ca_file))
            server_hostname = emu.host if sni == "endpoint" else sni
            if server_hostname != emu.host:
                ctx.check_hostname = False  # other or no SNI; the chain is still verified
            await writer.start_tls(ctx, server_hostname=server_hostname)
        startup = {"user": emu.role, "database": "databricks_postgres", **(params or {})}
        writer.write(codec.encode(codec.StartupMessage(3, 0, startup)))
        frames = FrameReader(tagged=True, max_length=limits.MAX_STARTUP_PHASE_MESSAGE)
        out: list[codec.BackendMessage] = []
        while True:
            while (frame := frames.next_frame()) is None:
                data = await reader.read(65536)
                if not data:
                    return out
                frames.feed(data)
            msg = codec.decode_backend(frame)
            out.append(msg)
            if isinstance(msg, codec.AuthenticationCleartextPassword):
                writer.write(codec.encode(codec.PasswordMessage(password.encode())))
            if isinstance(msg, codec.ErrorResponse | codec.ReadyForQuery):
                return out
    finally:
        writer.close()


def error_of(messages: list[codec.BackendMessage]) -> codec.ErrorResponse:
    assert messages, "connection closed without an ErrorResponse"
    err = messages[-1]
    assert isinstance(err, codec.ErrorResponse), messages
    assert err.severity == "FATAL"
    return err


# --------------------------------------------------------------------- PgCluster


def test_pgcluster_start_psql_stop(tmp_path: Path) -> None:
    pg = PgCluster(tmp_path / "pg", settings={"application_name": "rig"})
    with pg:
        assert pg.host == "127.0.0.1"
        assert pg.port > 0
        assert pg.psql("SELECT 1") == "1\n"
        assert pg.psql("SHOW max_connections").strip() == "300"
        assert pg.psql("SHOW listen_addresses").strip() == "127.0.0.1"
        assert pg.psql("SHOW fsync").strip() == "off"
        assert pg.psql("SHOW application_name").strip() == "psql"  # the client's own wins
        assert pg.psql("SELECT current_user").strip() == "postgres"
        assert (pg.socket_dir / f".s.PGSQL.{pg.port}").is_socket()
        with pytest.raises(PgClusterError, match="does not exist"):
            pg.psql("SELECT * FROM no_such_table")
        with socket.create_connection((pg.host, pg.port), timeout=5):
            pass
        assert pg.logfile.exists()
        assert not pg.has_ssl
    with pytest.raises(ConnectionRefusedError):  # stopped: nothing listens any more
        socket.create_connection((pg.host, pg.port), timeout=5).close()
    assert not pg.socket_dir.exists()


def test_pgcluster_of_a_killed_process_is_reaped(tmp_path: Path) -> None:
    """A run killed before it could stop its cluster leaves no server behind:
    the next PgCluster stops and deletes it."""
    script = (
        "import sys, pathlib\n"
        "from lakeproxy.emulator.pgcluster import PgCluster\n"
        "pg = PgCluster(pathlib.Path(sys.argv[1]))\n"
        "pg.start()\n"
        "print(pg.port, pg.socket_dir, flush=True)\n"
        "sys.stdin.read()\n"
    )
    with subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "orphan")],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None
            port_text, socket_dir = child.stdout.readline().split()
        finally:
            child.kill()
    with socket.create_connection(("127.0.0.1", int(port_text)), timeout=5):
        pass  # the orphan still runs
    PgCluster(tmp_path / "next").close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(port_text)), timeout=5).close()
    assert not Path(socket_dir).exists()


def test_pgcluster_ssl_and_hba(tmp_path: Path) -> None:
    from lakeproxy.emulator.certs import make_certs

    tls = make_certs(tmp_path / "tls", ["localhost", "127.0.0.1"])
    hba = ["local all all trust", "hostssl all all 127.0.0.1/32 trust"]
    with PgCluster(tmp_path / "pg", ssl_cert=tls.cert_file, ssl_key=tls.key_file,
                   hba=hba) as pg:
        assert pg.has_ssl
        out = subprocess.run(
            ["psql", "-X", "-A", "-t", "-c", "SELECT ssl FROM pg_stat_ssl WHERE pid = "
             "pg_backend_pid()"],
            env={**os.environ, "PGHOST": "localhost", "PGHOSTADDR": "127.0.0.1",
                 "PGPORT": str(pg.port), "PGUSER": "postgres", "PGSSLMODE": "verify-full",
                 "PGSSLROOTCERT": str(tls.ca_file)},
            capture_output=True, text=True, timeout=30, check=True).stdout
        assert out.strip() == "t"
        plain = subprocess.run(
            ["psql", "-X", "-c", "SELECT 1"],
            env={**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(pg.port),
                 "PGUSER": "postgres", "PGSSLMODE": "disable"},
            capture_output=True, text=True, timeout=30, check=False)
        assert plain.returncode != 0
        assert "no pg_hba.conf entry" in plain.stderr


# --------------------------------------------------------------------- front door


async def test_login_through_front_door(emulator: Emulator) -> None:
    async with asyncio.timeout(T):
        token = await mint(emulator)
        async with await connect(emulator, token) as conn:
            cur = await conn.execute("SELECT current_user, current_database()")
            assert await cur.fetchone() == (emulator.role, "databricks_postgres")
            info = conn.info
            assert info.parameter_status("server_version")
            assert info.backend_pid > 0
        assert emulator.frontdoor.logins == 1
        assert emulator.frontdoor.connections == 1


async def test_env_works_for_psql(emulator: Emulator) -> None:
    """libpq_env() is all libpq needs (plus the password)."""
    async with asyncio.timeout(T):
        token = await mint(emulator)
        proc = await asyncio.create_subprocess_exec(
            "psql", "-X", "-A", "-t", "-c", "SELECT current_user || ' ' || current_database()",
            env={**os.environ, **emulator.libpq_env(), "PGPASSWORD": token},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        assert out.decode().strip() == f"{emulator.role} databricks_postgres"


async def test_several_credentials_valid_at_once(emulator: Emulator) -> None:
    async with asyncio.timeout(T):
        first, second = await mint(emulator), await mint(emulator)
        assert first != second
        for token in (first, second):
            async with await connect(emulator, token) as conn:
                await conn.execute("SELECT 1")


async def test_wrong_token_is_28P01(emulator: Emulator) -> None:
    async with asyncio.timeout(T):
        with pytest.raises(psycopg.OperationalError,
                           match=f'password authentication failed for user "{emulator.role}"'):
            await connect(emulator, "not-a-token")
        err = error_of(await raw_login(emulator, password="not-a-token"))
        assert err.sqlstate == "28P01"


async def test_token_for_another_role_is_refused(emulator: Emulator) -> None:
    async with asyncio.timeout(T):
        token = await mint(emulator)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await connect(emulator, token, user="postgres")


async def test_expired_token_is_28P01(emulator: Emulator) -> None:
    async with asyncio.timeout(T):
        emulator.workspace.credential_lifetime = 0.3
        token = await mint(emulator)
        await asyncio.sleep(0.4)
        err = error_of(await raw_login(emulator, password=token))
        assert err.sqlstate == "28P01"
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await connect(emulator, token)


async def test_revoked_credentials_are_refused(emulator: Emulator) -> None:
    async with asyncio.timeout(T):
        token = await mint(emulator)
        assert emulator.workspace.is_valid_credential(emulator.role, token)
        async with await connect(emulator, token) as conn:
            emulator.workspace.revoke_credentials()
            await conn.execute("SELECT 1")  # open sessions are not affected
        assert not emulator.workspace.is_valid_credential(emulator.role, token)
        assert error_of(await raw_login(emulator, password=token)).sqlstate == "28P01"
        fresh = await mint(emulator)
        async with await connect(emulator, fresh):
            pass


async def test_without_sni_is_refused(emulator: Emulator) -> None:
    async with asyncio.timeout(T):
        token = await mint(emulator)
        with pytest.raises(psycopg.OperationalError, match="Endpoint ID is not specified"):
            await connect(emulator, token, host="127.0.0.1", hostaddr="127.0.0.1",
                          sslmode="require")
        err = error_of(await raw_login(emulator, password=token, sni=None))
        assert err.sqlstate == "XX000"
        assert emulator.frontdoor.logins == 0


async def test_wrong_sni_is_refused(emulator: Emulator) -> None:
    async with asyncio.timeout(T):
        token = await mint(emulator)
        err = error_of(await raw_login(emulator, password=token,
                                       sni="ep-other-9.database.emulator.lakebase.local"))
        assert err.sqlstate == "XX000"
        assert 'endpoint "ep-other-9" does not exist' in err.message


async def test_endpoint_option_replaces_sni(emulator: Emulator) -> None:
    """Neon's fallback for clients without SNI; the option is not passed on."""
    async with asyncio.timeout(T):
        token = await mint(emulator)
        async with await connect(emulator, token, host="127.0.0.1", sslmode="require",
                                 options="endpoint=ep-emulated-123 -c search_path=pg_catalog"
                                 ) as conn:
            cur = await conn.execute("SHOW search_path")
            assert await cur.fetchone() == ("pg_catalog",)


async def test_plaintext_is_refused(emulator: Emulator) -> None:
    async with asyncio.timeout(T):
        token = await mint(emulator)
        with pytest.raises(psycopg.OperationalError,
                           match=r"connection is insecure \(try using sslmode=require\)"):
            await connect(emulator, token, sslmode="disable")
        err = error_of(await raw_login(emulator, password=token, tls=False))
        assert err.sqlstate == "08P01"


async def test_server_errors_are_relayed(emulator: Emulator) -> None:
    async with asyncio.timeout(T):
        token = await mint(emulator)
        with pytest.raises(psycopg.OperationalError, match='database "nope" does not exist'):
            await connect(emulator, token, dbname="nope")
        err = error_of(await raw_login(emulator, password=token, params={"database": "nope"}))
        assert err.sqlstate == "3D000"


async def test_startup_parameters_pass_through(emulator: Emulator) -> None:
    async with asyncio.timeout(T):
        token = await mint(emulator)
        async with await connect(emulator, token, application_name="rig-test",
                                 options="-c statement_timeout=1234") as conn:
            cur = await conn.execute(
                "SELECT current_setting('application_name'), "
                "current_setting('statement_timeout')")
            assert await cur.fetchone() == ("rig-test", "1234ms")


async def test_cancel_over_tls_is_forwarded(emulator: Emulator) -> None:
    """libpq >= 17's cancel (psycopg's cancel_safe) repeats SSLRequest + SNI."""
    async with asyncio.timeout(T):
        token = await mint(emulator)
        async with await connect(emulator, token) as conn:
            query = asyncio.ensure_future(conn.execute("SELECT pg_sleep(20)"))
            await asyncio.sleep(0.5)
            before = emulator.frontdoor.connections
            await conn.cancel_safe()
            with pytest.raises(psycopg.errors.QueryCanceled):
                await query
            assert emulator.frontdoor.connections == before + 1


async def test_plain_cancel_is_forwarded(emulator: Emulator) -> None:
    """psql (libpq 15) sends the classic unencrypted CancelRequest on SIGINT.

    Not psycopg's conn.cancel(): that blocking call holds the GIL until the
    server closes the socket, which deadlocks against an in-process server.
    """
    async with asyncio.timeout(T):
        token = await mint(emulator)
        proc = await asyncio.create_subprocess_exec(
            "psql", "-X", "-c", "SELECT pg_sleep(20)",
            env={**os.environ, **emulator.libpq_env(), "PGPASSWORD": token},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        while emulator.frontdoor.sessions == 0:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # let the query start
        before = emulator.frontdoor.connections
        proc.send_signal(signal.SIGINT)
        _, err = await proc.communicate()
        assert proc.returncode != 0
        assert "canceling statement due to user request" in err.decode()
        assert emulator.frontdoor.connections == before + 1


async def test_bytes_flow_both_ways(emulator: Emulator) -> None:
    async with asyncio.timeout(T):
        token = await mint(emulator)
        async with await connect(emulator, token) as conn:
            await conn.execute("CREATE TEMP TABLE t (v text)")
            async with conn.cursor().copy("COPY t FROM STDIN") as copy:
                for i in range(2000):
                    await copy.write_row([f"row-{i}-" + "x" * 200])
            cur = await conn.execute("SELECT count(*), sum(length(v)) FROM t")
            count, total = await cur.fetchone() or (0, 0)
            assert count == 2000
            assert total > 400_000
            cur = await conn.execute("SELECT repeat('y', 5000000)")
            row = await cur.fetchone()
            assert row is not None
            assert len(row[0]) == 5_000_000


# --------------------------------------------------------------------- scale to zero


async def test_suspend_ends_open_session_with_57P01(make_emulator: MakeEmulator) -> None:
    async with asyncio.timeout(T):
        emu = await make_emulator()
        token = await mint(emu)
        conn = await connect(emu, token)
        try:
            await conn.execute("SELECT 1")
            assert emu.frontdoor.sessions == 1
            await emu.frontdoor.suspend()
            assert state(emu) == "SUSPENDED"
            with pytest.raises(psycopg.errors.AdminShutdown) as info:
                await conn.execute("SELECT 1")
            assert info.value.sqlstate == "57P01"
            assert "terminating connection due to administrator command" in str(info.value)
            assert emu.frontdoor.sessions == 0
        finally:
            await conn.close()
        # the next login wakes it (wake_time 0: at once)
        async with await connect(emu, token):
            pass
        assert state(emu) == "ACTIVE"
        assert emu.frontdoor.wakes == 1


async def test_wake_error_window_then_success(make_emulator: MakeEmulator) -> None:
    async with asyncio.timeout(T):
        emu = await make_emulator(wake_time=1.0, wake_error_time=0.5)
        token = await mint(emu)
        await emu.frontdoor.suspend()
        assert await _endpoint_state(emu) == "IDLE"
        err = error_of(await raw_login(emu, password=token))
        assert (err.sqlstate, err.message) == ("XX000", "Couldn't connect to compute node")
        assert state(emu) == "WAKING"
        assert emu.frontdoor.wakes == 1
        with pytest.raises(psycopg.OperationalError, match="Couldn't connect to compute node"):
            await connect(emu, token)
        await asyncio.sleep(0.6)
        started = time.monotonic()
        async with await connect(emu, token) as conn:  # waits for the rest of the wake
            waited = time.monotonic() - started
            await conn.execute("SELECT 1")
        assert 0.1 < waited < 1.0
        assert state(emu) == "ACTIVE"
        assert emu.frontdoor.wakes == 1
        assert await _endpoint_state(emu) == "ACTIVE"


async def test_wake_without_error_window_waits(make_emulator: MakeEmulator) -> None:
    async with asyncio.timeout(T):
        emu = await make_emulator(wake_time=0.5)
        token = await mint(emu)
        await emu.frontdoor.suspend()
        started = time.monotonic()
        async with await connect(emu, token):
            assert time.monotonic() - started >= 0.45
        assert emu.frontdoor.wakes == 1


async def test_idle_suspend_and_only_logins_wake(make_emulator: MakeEmulator) -> None:
    async with asyncio.timeout(T):
        emu = await make_emulator(idle_suspend=0.3)
        token = await mint(emu)
        async with await connect(emu, token) as conn:
            await asyncio.sleep(0.5)  # an open session keeps it active
            assert state(emu) == "ACTIVE"
            await conn.execute("SELECT 1")
        await asyncio.sleep(0.6)
        assert state(emu) == "SUSPENDED"
        # neither the API, a TCP probe nor a failed login wakes it
        assert await _endpoint_state(emu) == "IDLE"
        _, w = await asyncio.open_connection("127.0.0.1", emu.port)
        w.close()
        assert error_of(await raw_login(emu, password="wrong")).sqlstate == "28P01"
        await asyncio.sleep(0.1)
        assert state(emu) == "SUSPENDED"
        assert emu.frontdoor.wakes == 0
        async with await connect(emu, token):
            assert state(emu) == "ACTIVE"
        assert emu.frontdoor.wakes == 1


async def _endpoint_state(emu: Emulator) -> str:
    async with aiohttp.ClientSession() as s:
        bearer = await oauth_token(s, emu)
        r = await s.get(f"{emu.workspace.url}/api/2.0/postgres/{emu.endpoint_name}",
                        headers={"Authorization": f"Bearer {bearer}"})
        assert r.status == 200
        body = await r.json()
        assert body["status"]["hosts"]["host"] == emu.host
        state: str = body["status"]["current_state"]
        return state


# --------------------------------------------------------------------- workspace API


async def test_api_token_flow(emulator: Emulator) -> None:
    url = emulator.workspace.url
    async with asyncio.timeout(T), aiohttp.ClientSession() as s:
        r = await s.post(url + "/oidc/v1/token", data=FORM, headers={
            "Authorization": aiohttp.encode_basic_auth(emulator.client_id,
                                                       emulator.client_secret)})
        body = await r.json()
        assert r.status == 200
        assert body["token_type"] == "Bearer"
        assert body["expires_in"] == 3600
        bearer = body["access_token"]
        r = await s.post(url + "/api/2.0/postgres/credentials",
                         json={"endpoint": emulator.endpoint_name},
                         headers={"Authorization": f"Bearer {bearer}"})
        body = await r.json()
        assert r.status == 200
        assert set(body) == {"token", "expire_time"}
        assert body["expire_time"].endswith("Z")
        expiry = datetime.fromisoformat(body["expire_time"])
        assert expiry.tzinfo is not None
        assert 3590 < (expiry - datetime.now(UTC)).total_seconds() <= 3600
        assert emulator.workspace.is_valid_credential(emulator.role, body["token"])
        # provisioned instances
        r = await s.post(url + "/api/2.0/database/credentials",
                         json={"instance_names": [emulator.instance_name],
                               "request_id": str(uuid.uuid4())},
                         headers={"Authorization": f"Bearer {bearer}"})
        body = await r.json()
        assert r.status == 200
        assert set(body) == {"token", "expiration_time"}
        assert emulator.workspace.is_valid_credential(emulator.role, body["token"])
        # the endpoint
        r = await s.get(f"{url}/api/2.0/postgres/{emulator.endpoint_name}",
                        headers={"Authorization": f"Bearer {bearer}"})
        body = await r.json()
        assert body["name"] == emulator.endpoint_name
        assert body["status"] == body["status"] | {
            "current_state": "ACTIVE", "hosts": emulator.hosts, "disabled": False}
        assert body["spec"]["disabled"] is False
        assert len(set(emulator.hosts.values())) == 4
    assert emulator.workspace.calls == {
        "/oidc/v1/token": 1, "/api/2.0/postgres/credentials": 1,
        "/api/2.0/database/credentials": 1, f"/api/2.0/postgres/{emulator.endpoint_name}": 1}


async def test_api_error_shapes(emulator: Emulator) -> None:
    url = emulator.workspace.url
    async with asyncio.timeout(T), aiohttp.ClientSession() as s:
        bad_client = {"Authorization": aiohttp.encode_basic_auth(emulator.client_id, "nope")}
        r = await s.post(url + "/oidc/v1/token", data=FORM, headers=bad_client)
        assert (r.status, await r.json()) == (401, {
            "error": "invalid_client", "error_description": "Client authentication failed"})
        r = await s.post(url + "/oidc/v1/token", data=FORM)
        assert r.status == 401
        assert (await r.json())["error"] == "invalid_client"

        bearer = {"Authorization": f"Bearer {await oauth_token(s, emulator)}"}
        cred = url + "/api/2.0/postgres/credentials"
        r = await s.post(cred, json={}, headers=bearer)
        assert (r.status, await r.json()) == (400, {
            "error_code": "INVALID_PARAMETER_VALUE", "message": "Field 'endpoint' is required"})
        r = await s.post(cred, json={"endpoint": "projects/x/branches/y/endpoints/z"},
                         headers=bearer)
        assert r.status == 404
        assert (await r.json())["error_code"] == "RESOURCE_DOES_NOT_EXIST"
        for headers in ({}, {"Authorization": "Bearer forged"}):
            r = await s.post(cred, json={"endpoint": emulator.endpoint_name}, headers=headers)
            body = await r.json()
            assert r.status == 401
            assert body["error_code"] == "UNAUTHENTICATED"
            assert body["message"]
        r = await s.post(cred, data=b"{not json", headers=bearer)
        assert r.status == 400
        assert (await r.json())["error_code"] == "MALFORMED_REQUEST"
        r = await s.post(url + "/api/2.0/database/credentials",
                         json={"instance_names": ["other"]}, headers=bearer)
        assert r.status == 404
        assert (await r.json())["error_code"] == "RESOURCE_DOES_NOT_EXIST"
        r = await s.get(url + "/api/2.0/no/such/api", headers=bearer)
        assert r.status == 404
        assert (await r.json())["error_code"] == "ENDPOINT_NOT_FOUND"


async def test_api_expired_oauth_token(emulator: Emulator) -> None:
    async with asyncio.timeout(T), aiohttp.ClientSession() as s:
        emulator.workspace.oauth_lifetime = 0.3
        r = await s.post(emulator.workspace.url + "/oidc/v1/token", data=FORM, headers={
            "Authorization": aiohttp.encode_basic_auth(emulator.client_id,
                                                       emulator.client_secret)})
        body = await r.json()
        assert body["expires_in"] == 0.3
        await asyncio.sleep(0.4)
        r = await s.post(emulator.workspace.url + "/api/2.0/postgres/credentials",
                         json={"endpoint": emulator.endpoint_name},
                         headers={"Authorization": f"Bearer {body['access_token']}"})
        assert r.status == 401
        assert (await r.json())["error_code"] == "UNAUTHENTICATED"


async def test_api_pat_is_a_bearer() -> None:
    ws = FakeWorkspace(client_id="cid", client_secret="sec",
                       endpoint_name="projects/p/branches/b/endpoints/e", instance_name="i",
                       endpoint_host="e.local", pat="dapi-test", credential_lifetime=60)
    await ws.start()
    try:
        async with asyncio.timeout(T), aiohttp.ClientSession() as s:
            r = await s.post(ws.url + "/api/2.0/postgres/credentials",
                             json={"endpoint": "projects/p/branches/b/endpoints/e"},
                             headers={"Authorization": "Bearer dapi-test"})
            assert r.status == 200
            assert ws.is_valid_credential("cid", (await r.json())["token"])
            r = await s.post(ws.url + "/oidc/v1/token", data=FORM,
                             headers={"Authorization": "Bearer dapi-test"})
            assert r.status == 401
    finally:
        await ws.stop()


async def test_fault_injection(emulator: Emulator) -> None:
    ws = emulator.workspace
    path = "/api/2.0/postgres/credentials"
    async with asyncio.timeout(T), aiohttp.ClientSession() as s:
        bearer = {"Authorization": f"Bearer {await oauth_token(s, emulator)}"}

        async def call() -> aiohttp.ClientResponse:
            r = await s.post(ws.url + path, json={"endpoint": emulator.endpoint_name},
                             headers=bearer)
            await r.read()
            return r

        ws.inject(path, count=2, status=503, retry_after=2)
        ws.inject(path, status=429, retry_after=0.5)
        ws.inject(path, status=200, body=b'{"token": ')
        ws.inject(path, status=500, delay=0.3, body=b"<html>oops</html>")
        ws.inject(path, status=200, delay=0.3)
        for _ in range(2):
            r = await call()
            assert r.status == 503
            assert r.headers["Retry-After"] == "2"
            assert (await r.json())["error_code"] == "TEMPORARILY_UNAVAILABLE"
        r = await call()
        assert r.status == 429
        assert r.headers["Retry-After"] == "0.5"
        assert (await r.json())["error_code"] == "REQUEST_LIMIT_EXCEEDED"
        r = await call()
        assert r.status == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(await r.read())
        started = time.monotonic()
        r = await call()
        assert r.status == 500
        assert await r.read() == b"<html>oops</html>"
        assert time.monotonic() - started >= 0.3
        started = time.monotonic()
        r = await call()  # delayed, otherwise normal
        assert r.status == 200
        assert "token" in await r.json()
        assert time.monotonic() - started >= 0.3
        r = await call()  # the queue is empty again
        assert r.status == 200
        assert "Retry-After" not in r.headers
        assert ws.calls[path] == 7

        ws.inject("/oidc/v1/token", status=0)
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await s.post(ws.url + "/oidc/v1/token", data=FORM)
        ws.inject("/oidc/v1/token", status=500)
        r = await s.post(ws.url + "/oidc/v1/token", data=FORM)
        assert r.status == 500
        assert "error" in await r.json()
        assert ws.calls["/oidc/v1/token"] == 3
