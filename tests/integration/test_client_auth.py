"""Client authentication and client TLS, with ``lakeproxy run`` as a subprocess.

LAKEPROXY_CLIENT_PASSWORD (SCRAM-SHA-256, any user name), LAKEPROXY_TLS_CERT/KEY
(SSLRequest -> 'S', and direct TLS with ALPN ``postgresql``), LAKEPROXY_CLIENT_TLS=
require, and the refusal to start a non-loopback listener without a password.
Real clients: psql (libpq 15), psycopg (its bundled libpq 18, for
``require_auth`` and ``sslnegotiation=direct``) and asyncpg (for SQLSTATEs).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import ssl
import tempfile
from pathlib import Path

import asyncpg
import psycopg
import pytest

from lakeproxy.emulator import Emulator
from lakeproxy.emulator.certs import TlsFiles, make_certs
from lakeproxy.wire import codec
from lakeproxy.wire.framing import FrameReader

from .conftest import ProxyFactory
from .proxy_process import psql, run_cli, running

PASSWORD = "client-pw-" + "7f3a9c" * 4
DB = "databricks_postgres"
T = 60


def _env(emu: Emulator, **extra: str) -> dict[str, str]:
    return {**emu.env(), "LAKEPROXY_LISTEN": "127.0.0.1:0", **extra}


@pytest.fixture(scope="module")
def client_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """The proxy's own certificate (for localhost and 127.0.0.1) and its CA."""
    return make_certs(tmp_path_factory.mktemp("client-tls"), ["localhost", "127.0.0.1"])


def _tls_env(emu: Emulator, tls: TlsFiles, **extra: str) -> dict[str, str]:
    return _env(emu, LAKEPROXY_TLS_CERT=str(tls.cert_file),
                LAKEPROXY_TLS_KEY=str(tls.key_file), **extra)


async def test_client_password_scram(emulator: Emulator) -> None:
    async with asyncio.timeout(T), running(_env(emulator, LAKEPROXY_CLIENT_PASSWORD=PASSWORD)) as p:
        port = p.tcp_port()
        info = f"host=127.0.0.1 port={port} dbname={DB} user=whoever"

        # psql with the right password (any user name).
        code, out, err = await psql(info, "SELECT current_user", password=PASSWORD)
        assert (code, out) == (0, f"{emulator.role}\n"), err

        # libpq 18 insisting on SCRAM-SHA-256 proves that is what the proxy asked for.
        async with await psycopg.AsyncConnection.connect(
            info, password=PASSWORD, require_auth="scram-sha-256"
        ) as conn:
            cur = await conn.execute("SELECT 41 + 1")
            assert await cur.fetchone() == (42,)

        # Wrong password: 28P01, from asyncpg (which exposes the SQLSTATE) and psql.
        with pytest.raises(asyncpg.InvalidPasswordError) as wrong:
            await asyncpg.connect(host="127.0.0.1", port=port, user="whoever", database=DB,
                                  password="not-the-password", ssl=False, timeout=10)
        assert wrong.value.sqlstate == "28P01"
        assert str(wrong.value).startswith("lakeproxy: password authentication failed")
        code, _, err = await psql(info, "SELECT 1", password="not-the-password")
        assert code == 2
        assert "password authentication failed" in err

        # No password at all: the client cannot answer the SCRAM request.
        code, _, err = await psql(info, "SELECT 1")
        assert code == 2
        assert "no password supplied" in err

        # No TLS configured: a direct TLS client is refused, not left hanging.
        with pytest.raises(psycopg.OperationalError):
            await psycopg.AsyncConnection.connect(
                info, password=PASSWORD, sslmode="require", sslnegotiation="direct",
                connect_timeout=10)

        # Every failed client login went no further: one endpoint login only.
        assert emulator.frontdoor.logins == 2
        ends = p.lines_matching("session end")
    outcomes = [line.split("outcome=")[1].split()[0] for line in ends]
    assert outcomes.count("ok") == 2
    assert outcomes.count("client_error") >= 2  # the wrong passwords
    assert set(outcomes) <= {"ok", "client_error"}, outcomes


async def test_client_tls_verify_full_and_direct(
    emulator: Emulator, client_tls: TlsFiles
) -> None:
    ca = str(client_tls.ca_file)
    async with asyncio.timeout(T), running(_tls_env(emulator, client_tls)) as p:
        port = p.tcp_port()
        verified = (f"host=localhost hostaddr=127.0.0.1 port={port} dbname={DB} "
                    f"sslmode=verify-full sslrootcert={ca}")

        # psql (SSLRequest, then TLS) with full verification of the proxy's certificate.
        code, out, err = await psql(verified, "\\conninfo")
        assert code == 0, err
        assert "SSL connection (protocol: TLSv1." in out, out

        # psycopg: the same, then direct TLS (no SSLRequest; ALPN "postgresql").
        for negotiation in ("postgres", "direct"):
            async with await psycopg.AsyncConnection.connect(
                verified, sslnegotiation=negotiation
            ) as conn:
                assert conn.pgconn.ssl_in_use
                cur = await conn.execute("SELECT current_user")
                assert await cur.fetchone() == (emulator.role,)

        # The check is real: a client trusting another CA refuses the proxy.
        code, _, err = await psql(verified.replace(ca, str(emulator.ca_file)), "SELECT 1")
        assert code == 2
        assert "certificate verify failed" in err

        # LAKEPROXY_CLIENT_TLS defaults to allow: plaintext still works.
        code, out, err = await psql(f"host=127.0.0.1 port={port} dbname={DB} sslmode=disable",
                                    "SELECT 1")
        assert (code, out) == (0, "1\n"), err


async def test_direct_tls_on_asyncio_loop(
    emulator: Emulator, client_tls: TlsFiles, proxy: ProxyFactory
) -> None:
    """The subprocess runs uvloop; in-process the proxy runs on asyncio's own loop,
    whose TLS protocol must take the already-read ClientHello the same way."""
    async with asyncio.timeout(T):
        p = await proxy(emulator, LAKEPROXY_TLS_CERT=str(client_tls.cert_file),
                        LAKEPROXY_TLS_KEY=str(client_tls.key_file))
        async with await psycopg.AsyncConnection.connect(
            f"host=localhost hostaddr=127.0.0.1 port={p.port} dbname={DB} "
            f"sslmode=verify-full sslrootcert={client_tls.ca_file} sslnegotiation=direct"
        ) as conn:
            assert conn.pgconn.ssl_in_use
            cur = await conn.execute("SELECT repeat('x', 100000)")
            row = await cur.fetchone()
            assert row is not None
            assert len(str(row[0])) == 100000


async def test_direct_tls_without_alpn_is_refused(
    emulator: Emulator, client_tls: TlsFiles
) -> None:
    """As PostgreSQL 17 does: direct TLS needs ALPN "postgresql" (no cross-protocol use)."""
    async with asyncio.timeout(T), running(_tls_env(emulator, client_tls)) as p:
        port = p.tcp_port()
        for alpn, ok in ((None, False), (["http/1.1"], False), (["postgresql"], True)):
            ctx = ssl.create_default_context(cafile=str(client_tls.ca_file))
            if alpn is not None:
                ctx.set_alpn_protocols(alpn)
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="localhost")
            writer.write(codec.encode(codec.StartupMessage(3, 0, {"user": "x", "database": DB})))
            frames = FrameReader(tagged=True, max_length=1 << 20)
            first: codec.BackendMessage | None = None
            while first is None:
                data = await reader.read(65536)
                assert data, "closed without a message"
                frames.feed(data)
                frame = frames.next_frame()
                if frame is not None:
                    first = codec.decode_backend(frame)
            writer.close()
            if ok:
                assert isinstance(first, codec.AuthenticationOk), first
            else:
                assert isinstance(first, codec.ErrorResponse), first
                assert first.get("C") == "08P01"
                assert "ALPN" in first.get("M")


async def test_client_tls_require_refuses_plaintext(
    emulator: Emulator, client_tls: TlsFiles
) -> None:
    env = _tls_env(emulator, client_tls, LAKEPROXY_CLIENT_TLS="require")
    async with asyncio.timeout(T), running(env) as p:
        port = p.tcp_port()
        with pytest.raises(asyncpg.PostgresError) as refused:
            await asyncpg.connect(host="127.0.0.1", port=port, user="u", database=DB,
                                  ssl=False, timeout=10)
        assert refused.value.sqlstate == "28000"
        assert "requires an encrypted connection" in str(refused.value)

        code, _, err = await psql(f"host=127.0.0.1 port={port} dbname={DB} sslmode=disable",
                                  "SELECT 1")
        assert code == 2
        assert "lakeproxy: this proxy requires an encrypted connection" in err

        code, out, err = await psql(
            f"host=localhost hostaddr=127.0.0.1 port={port} dbname={DB} "
            f"sslmode=verify-full sslrootcert={client_tls.ca_file}", "SELECT 1")
        assert (code, out) == (0, "1\n"), err


async def test_password_and_tls_together(emulator: Emulator, client_tls: TlsFiles) -> None:
    """The set-up for a container network: TLS required and a client password."""
    env = _tls_env(emulator, client_tls, LAKEPROXY_CLIENT_TLS="require",
                   LAKEPROXY_CLIENT_PASSWORD=PASSWORD)
    async with asyncio.timeout(T), running(env) as p:
        info = (f"host=localhost hostaddr=127.0.0.1 port={p.tcp_port()} dbname={DB} "
                f"sslmode=verify-full sslrootcert={client_tls.ca_file}")
        async with await psycopg.AsyncConnection.connect(
            info, password=PASSWORD, require_auth="scram-sha-256", sslnegotiation="direct"
        ) as conn:
            assert conn.pgconn.ssl_in_use
            cur = await conn.execute("SELECT current_user")
            assert await cur.fetchone() == (emulator.role,)
        code, _, err = await psql(info, "SELECT 1", password="wrong-password")
        assert code == 2
        assert "password authentication failed" in err


# --------------------------------------------------------------------------- remote listeners


async def test_non_loopback_listener_needs_password_or_flag(emulator: Emulator) -> None:
    async with asyncio.timeout(T):
        code, out, err = await run_cli(_env(emulator, LAKEPROXY_LISTEN="0.0.0.0:0"), ["run"])
        assert code == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("lakeproxy: LAKEPROXY_LISTEN=0.0.0.0:0 (environment)")
        assert "not a loopback address" in lines[0]
        assert "LAKEPROXY_CLIENT_PASSWORD" in lines[0]
        assert "--allow-remote-trust" in lines[0]
        assert out == ""

        # --allow-remote-trust (a private container network) starts it.
        env = _env(emulator, LAKEPROXY_LISTEN="0.0.0.0:0")
        async with running(env, ["run", "--allow-remote-trust"]) as p:
            assert p.listen[0].startswith("0.0.0.0:")
            code, out, err = await psql(f"host=127.0.0.1 port={p.tcp_port()} dbname={DB}",
                                        "SELECT 1")
            assert (code, out) == (0, "1\n"), err
            p.signal(signal.SIGTERM)
            assert await p.wait() == 0

        # So does a client password.
        env = _env(emulator, LAKEPROXY_LISTEN="0.0.0.0:0", LAKEPROXY_CLIENT_PASSWORD=PASSWORD)
        async with running(env) as p:
            assert p.listen[0].startswith("0.0.0.0:")



# --------------------------------------------------------------------------- adversarial review


async def test_plaintext_refused_under_require_is_the_clients_error(
    emulator: Emulator, client_tls: TlsFiles
) -> None:
    """The refusal is counted as client_error (never internal) and logged at INFO."""
    env = _tls_env(emulator, client_tls, LAKEPROXY_CLIENT_TLS="require",
                   LAKEPROXY_ADMIN_LISTEN="127.0.0.1:0")
    async with asyncio.timeout(T), running(env) as p:
        for _ in range(3):
            code, _, err = await psql(
                f"host=127.0.0.1 port={p.tcp_port()} dbname={DB} sslmode=disable", "SELECT 1")
            assert code == 2
            assert "requires an encrypted connection" in err
        await p.wait_for_line("session end .*outcome=client_error")
        _, metrics = await p.get("/metrics")
        ends = p.lines_matching("session end")
    assert 'lakeproxy_client_connections_total{outcome="client_error"} 3.0' in metrics
    assert 'lakeproxy_client_connections_total{outcome="internal"} 0.0' in metrics
    assert len(ends) == 3
    for line in ends:
        assert " INFO " in line, line
        assert "outcome=client_error" in line, line
        assert "sqlstate=28000" in line, line


async def test_unix_socket_listener_is_exempt_from_require(
    emulator: Emulator, client_tls: TlsFiles
) -> None:
    """libpq never uses TLS on a unix socket: require applies to TCP listeners only."""
    sock_dir = Path(tempfile.mkdtemp(prefix="lp-"))
    try:
        env = _tls_env(emulator, client_tls, LAKEPROXY_CLIENT_TLS="require",
                       LAKEPROXY_LISTEN=f"127.0.0.1:0,unix:{sock_dir}:6499")
        async with asyncio.timeout(T), running(env) as p:
            code, out, err = await psql(f"host={sock_dir} port=6499 dbname={DB}",
                                        "SELECT current_user")
            assert (code, out) == (0, f"{emulator.role}\n"), err
            code, _, err = await psql(
                f"host=127.0.0.1 port={p.tcp_port()} dbname={DB} sslmode=disable", "SELECT 1")
            assert code == 2
            assert "requires an encrypted connection" in err
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


#: Passwords SASLprep refuses (a control character; a right-to-left letter before
#: a left-to-right one). PostgreSQL and libpq salt such a password as it is.
ODD_PASSWORDS = ("bell\x07ringer-" + "9c" * 8, "\u05d0mixed-bidi-" + "4e" * 8)


async def test_password_saslprep_refuses_works_at_start_up(emulator: Emulator) -> None:
    """Never a traceback: the proxy starts with such a password and psql (libpq)
    logs in with it."""
    first = ODD_PASSWORDS[0]
    env = _env(emulator, LAKEPROXY_CLIENT_PASSWORD=first)
    async with asyncio.timeout(T), running(env) as p:
        info = f"host=127.0.0.1 port={p.tcp_port()} dbname={DB}"
        code, out, err = await psql(info, "SELECT 1", password=first)
        assert (code, out) == (0, "1\n"), err
        code, _, err = await psql(info, "SELECT 1", password="bellringer")
        assert code == 2
        assert "password authentication failed" in err
        p.signal(signal.SIGTERM)
        assert await p.wait() == 0
    assert "Traceback" not in p.output


async def test_password_saslprep_refuses_works_after_sighup(
    emulator: Emulator, tmp_path: Path,
) -> None:
    """The file's password changes to one SASLprep refuses: the reload applies it
    (no asyncio traceback) and psql logs in with it."""
    second = ODD_PASSWORDS[1]
    config = tmp_path / "lakeproxy.toml"
    config.write_text('[proxy]\nclient_password = "correct-horse-battery"\n')
    env = _env(emulator, LAKEPROXY_CONFIG=str(config))
    async with asyncio.timeout(T), running(env) as p:
        info = f"host=127.0.0.1 port={p.tcp_port()} dbname={DB}"
        escaped = second.encode("unicode_escape").decode()  # \u05d0..., as TOML writes it
        config.write_text(f'[proxy]\nclient_password = "{escaped}"\n')
        mark = len(p.stderr)
        p.signal(signal.SIGHUP)
        await p.wait_for_line("configuration reloaded|reload failed", after=mark)
        code, out, err = await psql(info, "SELECT 2", password=second)
        assert (code, out) == (0, "2\n"), err + p.output
        p.signal(signal.SIGTERM)
        assert await p.wait() == 0
    assert "Traceback" not in p.output
    assert not p.lines_matching("reload failed")
