"""Credentials end to end: what clients of lakeproxy see while it mints, caches,
rotates and re-mints database credentials, and logins to a real TLS PostgreSQL
with each password method, the credential being the role's password.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
import trustme

from lakeproxy.auth.cache import MIN_REMINT_INTERVAL
from lakeproxy.emulator import Emulator, FakeWorkspace, PgCluster, make_certs
from lakeproxy.emulator.api import (
    DATABASE_CREDENTIALS_PATH,
    OIDC_PATH,
    POSTGRES_CREDENTIALS_PATH,
)
from lakeproxy.wire.codec import ErrorResponse

from .conftest import ProxyFactory
from .proxy_rig import Proxy, RawClient, startup_bytes

CREDS = POSTGRES_CREDENTIALS_PATH


async def _current_user(p: Proxy) -> str:
    conn = await p.asyncpg()
    try:
        user: str = await conn.fetchval("SELECT current_user")
        return user
    finally:
        await conn.close()


# --------------------------------------------------------------------------- TLS PostgreSQL

DB_HOST = "db.lakeproxy.test"
ENDPOINT = "projects/p/branches/b/endpoints/ep-direct"
#: role -> pg_hba method
METHODS = {"role_password": "password", "role_md5": "md5", "role_scram": "scram-sha-256"}


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PgCluster, Path]]:
    """A PostgreSQL reachable only over TLS (hostssl) with one role per password
    method; yields the cluster and the CA file that signed its certificate."""
    work = tmp_path_factory.mktemp("pg_direct")
    tls = make_certs(work / "tls", [DB_HOST])
    hba = ["local all all trust"] + [
        f"hostssl all {role} 127.0.0.1/32 {method}" for role, method in METHODS.items()
    ]
    pg = PgCluster(work / "pg", ssl_cert=tls.cert_file, ssl_key=tls.key_file, hba=hba)
    pg.start()
    try:
        pg.psql("".join(f"CREATE ROLE {role} LOGIN;" for role in METHODS))
        yield pg, tls.ca_file
    finally:
        pg.close()


@pytest_asyncio.fixture(loop_scope="session")
async def workspace() -> AsyncIterator[FakeWorkspace]:
    ws = FakeWorkspace(client_id="sp-direct", client_secret="dose-direct-secret",
                       endpoint_name=ENDPOINT, instance_name="unused", endpoint_host=DB_HOST)
    await ws.start()
    try:
        yield ws
    finally:
        await ws.stop()


@pytest.mark.parametrize("role", list(METHODS))
async def test_direct_tls_postgres_each_password_method(
    tls_pg: tuple[PgCluster, Path], workspace: FakeWorkspace, proxy: ProxyFactory, role: str,
) -> None:
    pg, ca_file = tls_pg
    env = {
        "DATABRICKS_HOST": workspace.url, "DATABRICKS_CLIENT_ID": "sp-direct",
        "DATABRICKS_CLIENT_SECRET": "dose-direct-secret", "ENDPOINT_NAME": ENDPOINT,
        "PGHOST": DB_HOST, "PGHOSTADDR": "127.0.0.1", "PGPORT": str(pg.port),
        "PGUSER": role, "PGDATABASE": "postgres",
        "PGSSLMODE": "verify-full", "PGSSLROOTCERT": str(ca_file),
    }
    async with asyncio.timeout(30):
        p = await proxy(env)
        # The credential the proxy minted (and caches) becomes the role's password.
        cred = await p.runtime.dialers[0].credentials.get(
            deadline=asyncio.get_running_loop().time() + 10)
        encryption = "md5" if METHODS[role] == "md5" else "scram-sha-256"
        await asyncio.to_thread(
            pg.psql, f"SET password_encryption = '{encryption}'; "
                     f"ALTER ROLE {role} PASSWORD '{cred.token}'")
        out = await p.psql("SELECT current_user, current_database(), ssl "
                           "FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        stored = await asyncio.to_thread(
            pg.psql, f"SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = '{role}'")  # noqa: S608
    assert out == f"{role}|postgres|t\n"
    assert stored.strip() == ("md5" if role == "role_md5" else "SCR")
    assert workspace.calls[CREDS] == 1


# --------------------------------------------------------------------------- the credential API


async def test_short_lived_credentials_rotate_under_steady_connects(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    """4 s OAuth tokens and 4 s credentials: ~20 s of connects never see a
    failure, and an open session outlives every credential it was opened with."""
    ws = emulator.workspace
    ws.oauth_lifetime = ws.credential_lifetime = 4.0
    async with asyncio.timeout(60):
        p = await proxy(emulator)
        long_lived = await p.asyncpg()
        connects = 0
        try:
            ends = time.monotonic() + 20
            while time.monotonic() < ends:
                assert await _current_user(p) == emulator.role
                connects += 1
                await asyncio.sleep(0.1)
            assert await long_lived.fetchval("SELECT 1") == 1
        finally:
            await long_lived.close()
    assert connects > 50
    # Refreshed ahead (at half the lifetime): about every 2 s.
    assert ws.calls[CREDS] >= 6
    assert ws.calls[OIDC_PATH] >= 3


async def test_fifty_simultaneous_first_connections_make_one_credential_call(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    async with asyncio.timeout(60):
        p = await proxy(emulator, warm=False)
        users = await asyncio.gather(*(_current_user(p) for _ in range(50)))
    assert users == [emulator.role] * 50
    assert emulator.workspace.calls[OIDC_PATH] == 1
    assert emulator.workspace.calls[CREDS] == 1


async def test_api_500_500_ok_client_connects(emulator: Emulator, proxy: ProxyFactory) -> None:
    emulator.workspace.inject(CREDS, count=2, status=500)
    async with asyncio.timeout(30):
        p = await proxy(emulator, warm=False)
        assert await p.psql("SELECT current_user") == f"{emulator.role}\n"
    assert emulator.workspace.calls[CREDS] == 3


async def test_api_429_with_retry_after_client_connects(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    emulator.workspace.inject(CREDS, status=429, retry_after=1)
    async with asyncio.timeout(30):
        p = await proxy(emulator, warm=False)
        started = time.monotonic()
        assert await p.psql("SELECT current_user") == f"{emulator.role}\n"
    assert time.monotonic() - started >= 0.9  # Retry-After honoured
    assert emulator.workspace.calls[CREDS] == 2


async def test_token_endpoint_401_gives_28000(emulator: Emulator, proxy: ProxyFactory) -> None:
    async with asyncio.timeout(30):
        p = await proxy(emulator, warm=False, DATABRICKS_CLIENT_SECRET="dose-wrong-secret")
        started = time.monotonic()
        with pytest.raises(asyncpg.PostgresError) as info:
            await p.asyncpg()
        took = time.monotonic() - started
        code, _, err = await p.run_psql("SELECT 1")
    exc = info.value
    assert exc.sqlstate == "28000"
    assert exc.message.startswith("lakeproxy:"), exc.message
    assert exc.hint  # the fix from Databricks' troubleshooting table
    assert took < 3  # a 401 is not retried
    assert emulator.workspace.calls[OIDC_PATH] <= 2  # at most once per client: no retries
    assert emulator.workspace.calls[CREDS] == 0
    assert code == 2
    assert "FATAL:  lakeproxy:" in err
    assert "dose-wrong-secret" not in err + exc.message + (exc.hint or "")


async def test_credential_rejected_by_the_endpoint_is_reminted_once(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    async with asyncio.timeout(30):
        p = await proxy(emulator)
        await p.runtime.dialers[0].credentials.get(
            deadline=asyncio.get_running_loop().time() + 10)
        assert emulator.workspace.calls[CREDS] == 1
        emulator.workspace.revoke_credentials()  # the endpoint now refuses the cached one
        assert await p.psql("SELECT current_user") == f"{emulator.role}\n"
        assert emulator.workspace.calls[CREDS] == 2
        assert await p.psql("SELECT 1") == "1\n"  # the new one is cached
    assert emulator.workspace.calls[CREDS] == 2


async def test_401_on_the_credential_call_refreshes_the_workspace_token(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    """The workspace revokes the OAuth token the proxy holds: the next credential
    refresh gets 401, mints a new token once, and clients never notice."""
    ws = emulator.workspace
    ws.credential_lifetime = 2.0
    async with asyncio.timeout(30):
        p = await proxy(emulator)
        assert await p.psql("SELECT current_user") == f"{emulator.role}\n"
        ws.revoke_oauth_tokens()
        await asyncio.sleep(1.5)  # past half the credential's lifetime: refreshed
        assert await p.psql("SELECT current_user") == f"{emulator.role}\n"
    assert ws.calls[OIDC_PATH] == 2
    assert ws.calls[CREDS] >= 3  # first, refused (401), then the new token's


async def test_provisioned_instance_uses_the_database_credential_api(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    env = {k: v for k, v in emulator.env().items() if k != "ENDPOINT_NAME"}
    async with asyncio.timeout(30):
        p = await proxy(env, warm=False, LAKEBASE_INSTANCE=emulator.instance_name)
        assert await p.psql("SELECT current_user") == f"{emulator.role}\n"
    assert emulator.workspace.calls[DATABASE_CREDENTIALS_PATH] == 1
    assert emulator.workspace.calls[CREDS] == 0


async def test_endpoint_refusing_even_a_fresh_credential_gives_28p01(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    """Credentials minted for the principal do not log in as another role: one
    re-mint, then 28P01 with lakeproxy's message (the endpoint's text in it)."""
    async with asyncio.timeout(30):
        p = await proxy(emulator, warm=False, LAKEBASE_USER="not-the-principals-role")
        with pytest.raises(asyncpg.PostgresError) as info:
            await p.asyncpg()
    exc = info.value
    assert exc.sqlstate == "28P01"
    assert exc.message.startswith("lakeproxy: endpoint rejected the fresh credential twice")
    assert 'password authentication failed for user "not-the-principals-role"' in exc.message
    assert exc.hint
    assert emulator.workspace.calls[CREDS] == 2


# --------------------------------------------------------------------------- adversarial review #4


async def _replication_login(p: Proxy) -> ErrorResponse:
    """A startup asking for a replication connection (the emulator's pg_hba has no
    replication line); returns the ErrorResponse the client got."""
    client = await RawClient.open(p.port)
    try:
        client.send(startup_bytes({"user": "x", "database": p.database, "replication": "true"}))
        msg = await client.read_message()
    finally:
        await client.close()
    assert isinstance(msg, ErrorResponse), msg
    return msg


@pytest.fixture(scope="module")
def pg_without_replication(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgCluster]:
    """A cluster whose pg_hba.conf has no replication line (as a Lakebase endpoint
    refuses replication connections): a replication startup gets 28000."""
    pg = PgCluster(tmp_path_factory.mktemp("pg_norepl"),
                   hba=["local all all trust", "host all all 127.0.0.1/32 trust"])
    pg.start()
    try:
        yield pg
    finally:
        pg.close()


@pytest_asyncio.fixture(loop_scope="session")
async def emulator_without_replication(
    pg_without_replication: PgCluster, tmp_path: Path,
) -> AsyncIterator[Emulator]:
    async with Emulator(tmp_path / "emulator", pg=pg_without_replication) as emu:
        yield emu


async def test_a_28000_about_the_startup_never_touches_the_credential(
    emulator_without_replication: Emulator, proxy: ProxyFactory,
) -> None:
    """50 replication=true startups (refused by the endpoint's pg_hba with 28000):
    each client gets the endpoint's own 28000, the credential is kept, and the
    credential API is asked once (the warm-up), not once per connection."""
    emulator = emulator_without_replication
    async with asyncio.timeout(60):
        p = await proxy(emulator)
        await p.runtime.dialers[0].credentials.get(
            deadline=asyncio.get_running_loop().time() + 10)
        errors: list[ErrorResponse] = []
        for _ in range(5):
            errors += await asyncio.gather(*(_replication_login(p) for _ in range(10)))
        assert await p.psql("SELECT 1") == "1\n"  # the credential still works
    assert len(errors) == 50
    for err in errors:
        assert err.sqlstate == "28000", err
        assert err.message.startswith("no pg_hba.conf entry for replication connection"), err
    assert emulator.workspace.calls[CREDS] <= 2
    assert 'lakeproxy_credential_requests_total{kind="database",result="ok"} 1.0' in (
        p.metrics.render().decode())


async def test_refused_credentials_are_reminted_at_most_once_per_interval(
    emulator: Emulator, proxy: ProxyFactory,
) -> None:
    """The endpoint refuses every credential (a role the principal may not log in
    as): waves of clients each get 28P01, but credentials are minted no more often
    than MIN_REMINT_INTERVAL, and the waits are counted."""
    async with asyncio.timeout(60):
        p = await proxy(emulator, warm=False, LAKEBASE_USER="not-the-principals-role")
        for _ in range(3):
            results = await asyncio.gather(
                *(p.run_psql("SELECT 1") for _ in range(5)))
            for code, _out, err in results:
                assert code == 2
                assert "rejected the fresh credential twice" in err
    mints = [r.at for r in emulator.workspace.requests if r.path == CREDS]
    assert len(mints) >= 2
    gaps = [b - a for a, b in itertools.pairwise(mints)]
    assert min(gaps) >= MIN_REMINT_INTERVAL - 0.05, gaps
    limited = [line for line in p.metrics.render().decode().splitlines()
               if line.startswith("lakeproxy_credential_remints_limited_total ")]
    assert limited
    assert float(limited[0].split()[1]) >= 1, limited


# --------------------------------------------------------------------------- adversarial review #3


async def test_require_with_a_ca_file_never_sends_the_credential_to_another_ca(
    emulator: Emulator, proxy: ProxyFactory, tls_ca: trustme.CA, tmp_path: Path,
) -> None:
    """LAKEBASE_SSLMODE=require with LAKEBASE_SSLROOTCERT naming a CA that did not sign the
    endpoint's certificate: refused (08006) before any password is sent; with the
    endpoint's own CA it logs in."""
    other_ca = tmp_path / "other-ca.pem"
    tls_ca.cert_pem.write_to_path(str(other_ca))
    async with asyncio.timeout(30):
        p = await proxy(emulator, warm=False, LAKEBASE_SSLMODE="require",
                        LAKEBASE_SSLROOTCERT=str(other_ca))
        with pytest.raises(asyncpg.PostgresError) as info:
            await p.asyncpg()
        assert info.value.sqlstate == "08006"
        assert "certificate verif" in info.value.message
        assert emulator.frontdoor.passwords == 0
        good = await proxy(emulator, warm=False, LAKEBASE_SSLMODE="require",
                           LAKEBASE_SSLROOTCERT=str(emulator.ca_file))
        assert await _current_user(good) == emulator.role
    assert emulator.frontdoor.passwords == 1
