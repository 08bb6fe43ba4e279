"""lakeproxy.upstream against a real TLS PostgreSQL and scripted fake endpoints.

The module's cluster has three roles, one per password method, reachable only
over TLS (hostssl): role_pw (password = cleartext), role_md5 (md5, with an MD5
stored password) and role_scram (scram-sha-256; PostgreSQL 15 offers
SCRAM-SHA-256-PLUS over TLS). A few scenarios run again on uvloop.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trustme
import uvloop

from lakeproxy.emulator.certs import TlsFiles
from lakeproxy.emulator.pgcluster import PgCluster, free_port
from lakeproxy.errors import UpstreamConnectError, UpstreamRejected
from lakeproxy.retry import is_auth_failure, is_retryable
from lakeproxy.upstream import (
    UpstreamConnection,
    UpstreamTarget,
    connect,
    connect_with_retry,
    make_ssl_context,
    send_cancel,
)
from lakeproxy.wire.codec import (
    AuthenticationCleartextPassword,
    AuthenticationOk,
    BackendKeyData,
    ErrorResponse,
    ParameterStatus,
    ReadyForQuery,
    decode_backend,
    encode,
    error_response,
)
from lakeproxy.wire.framing import FrameReader

ROLES = {
    "role_pw": ("pw-cleartext", "password", "cleartext"),
    "role_md5": ("pw-md5", "md5", "md5"),
    "role_scram": ("pw-scram", "scram-sha-256", "SCRAM-SHA-256-PLUS"),
}
SCRAM_PARAMS = {"user": "role_scram", "database": "postgres"}
SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
NOTIFICATION = b"A" + (4 + 4 + 3 + 3).to_bytes(4, "big") + (77).to_bytes(4, "big") + b"ch\x00hi\x00"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory: pytest.TempPathFactory, server_tls: TlsFiles) -> Iterator[PgCluster]:
    hba = ["local all all trust"] + [
        f"hostssl all {role} 127.0.0.1/32 {method}" for role, (_, method, _) in ROLES.items()
    ]
    pg = PgCluster(tmp_path_factory.mktemp("pg_upstream"), ssl_cert=server_tls.cert_file,
                   ssl_key=server_tls.key_file, hba=hba)
    pg.start()
    try:
        pg.psql(
            "SET password_encryption = 'md5';"
            f"CREATE ROLE role_md5 LOGIN PASSWORD '{ROLES['role_md5'][0]}';"
            "SET password_encryption = 'scram-sha-256';"
            f"CREATE ROLE role_pw LOGIN PASSWORD '{ROLES['role_pw'][0]}';"
            f"CREATE ROLE role_scram LOGIN PASSWORD '{ROLES['role_scram'][0]}';"
        )
        assert pg.psql("SELECT rolpassword LIKE 'md5%' FROM pg_authid "
                       "WHERE rolname = 'role_md5'").strip() == "t"
        yield pg
    finally:
        pg.close()


@pytest.fixture(scope="module")
def ca_ctx(server_tls: TlsFiles) -> ssl.SSLContext:
    return make_ssl_context("verify-full", str(server_tls.ca_file))


def _target(pg: PgCluster, host: str = "localhost") -> UpstreamTarget:
    return UpstreamTarget(host, pg.port, hostaddr="127.0.0.1")


def _in(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


# --------------------------------------------------------------------------- helpers


class Sink(asyncio.Protocol):
    """Takes over an upstream connection and collects what it sends."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.changed = asyncio.Event()
        self.closed = False

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.changed.set()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.changed.set()

    async def closed_by(self, conn: UpstreamConnection) -> None:
        """Close ``conn`` and wait for the TLS close to finish."""
        conn.close()
        while not self.closed:
            self.changed.clear()
            await self.changed.wait()

    async def until_ready(self, start: int) -> list[bytes]:
        """Frames from offset ``start`` up to and including a ReadyForQuery."""
        while True:
            reader = FrameReader(tagged=True, max_length=1 << 24)
            reader.feed(bytes(self.data[start:]))
            frames: list[bytes] = []
            while (frame := reader.next_frame()) is not None:
                frames.append(frame)
                if frame[:1] == b"Z":
                    return frames
            assert not self.closed, "the endpoint closed the connection"
            self.changed.clear()
            await self.changed.wait()


def take_over(conn: UpstreamConnection) -> Sink:
    sink = Sink()
    sink.data += conn.take_over(sink)
    conn.transport.resume_reading()
    return sink


async def query(conn: UpstreamConnection, sink: Sink, sql: str) -> list[list[str | None]]:
    """Run one simple query; return its rows (raises on an ErrorResponse)."""
    start = len(sink.data)
    body = sql.encode() + b"\x00"
    conn.transport.write(b"Q" + (len(body) + 4).to_bytes(4, "big") + body)
    rows: list[list[str | None]] = []
    for frame in await sink.until_ready(start):
        if frame[:1] == b"E":
            raise AssertionError(decode_backend(frame))
        if frame[:1] == b"D":
            n, pos, row = int.from_bytes(frame[5:7], "big"), 7, []
            for _ in range(n):
                size = int.from_bytes(frame[pos : pos + 4], "big", signed=True)
                pos += 4
                row.append(None if size < 0 else frame[pos : pos + size].decode())
                pos += max(size, 0)
            rows.append(row)
    return rows


@asynccontextmanager
async def fake_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 running ``handler`` per connection; yields its port."""
    tasks: set[asyncio.Task[None]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def read_startup(reader: asyncio.StreamReader) -> bytes:
    length = int.from_bytes(await reader.readexactly(4), "big")
    return await reader.readexactly(length - 4)


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    header = await reader.readexactly(5)
    return header + await reader.readexactly(int.from_bytes(header[1:], "big") - 4)


class FrontDoor:
    """A scripted TLS endpoint: answers the first ``not_yet`` logins with the
    front door's XX000 "Couldn't connect to compute node", then accepts the
    cleartext password ``token`` and sends a NotificationResponse right after
    its ReadyForQuery. Records the SNI of each handshake."""

    def __init__(self, tls: TlsFiles, *, not_yet: int, token: str) -> None:
        self.ctx = tls.server_context()
        self.sni: list[str | None] = []
        self.ctx.sni_callback = lambda _obj, name, _ctx: self.sni.append(name)
        self.not_yet = not_yet
        self.token = token
        self.logins = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readexactly(8) == SSL_REQUEST
        writer.write(b"S")
        await writer.drain()
        await writer.start_tls(self.ctx)
        await read_startup(reader)
        self.logins += 1
        if self.logins <= self.not_yet:
            writer.write(encode(error_response("XX000", "Couldn't connect to compute node")))
            await writer.drain()
            return
        writer.write(encode(AuthenticationCleartextPassword()))
        password = await read_frame(reader)
        if password[5:-1] != self.token.encode():
            writer.write(encode(error_response("28P01", "password authentication failed")))
            await writer.drain()
            return
        writer.write(b"".join([
            encode(AuthenticationOk()), encode(ParameterStatus("server_version", "15.0")),
            encode(BackendKeyData(77, b"abcd")), encode(ReadyForQuery("I")), NOTIFICATION,
        ]))
        await writer.drain()
        await reader.read()  # until the client closes


# --------------------------------------------------------------------------- real PostgreSQL


async def _login_and_query(pg: PgCluster, ctx: ssl.SSLContext, role: str) -> None:
    password, _, method = ROLES[role]
    conn = await connect(_target(pg), password, {"user": role, "database": "postgres",
                                                 "application_name": "upstream-test"},
                         deadline=_in(10), ssl_context=ctx)
    try:
        assert conn.auth_method == method
        assert conn.backend_key is not None
        assert conn.parameters["session_authorization"] == role
        assert conn.parameters["application_name"] == "upstream-test"
        assert conn.startup_messages[-1] == encode(ReadyForQuery("I"))
        assert encode(ParameterStatus("application_name", "upstream-test")) in \
            conn.startup_messages
        assert conn.trailing == b""
        sink = take_over(conn)
        rows = await query(conn, sink, "SELECT current_user, current_database(), "
                                       "pg_backend_pid(), ssl FROM pg_stat_ssl "
                                       "WHERE pid = pg_backend_pid()")
        assert rows == [[role, "postgres", str(conn.backend_key.process_id), "t"]]
        await sink.closed_by(conn)
    finally:
        conn.close()


@pytest.mark.parametrize("role", list(ROLES))
async def test_login_with_each_password_method(
    tls_pg: PgCluster, ca_ctx: ssl.SSLContext, role: str,
) -> None:
    async with asyncio.timeout(30):
        await _login_and_query(tls_pg, ca_ctx, role)


async def test_wrong_password_is_a_login_error_28p01(
    tls_pg: PgCluster, ca_ctx: ssl.SSLContext,
) -> None:
    async with asyncio.timeout(30):
        with pytest.raises(UpstreamRejected) as info:
            await connect(_target(tls_pg), "wrong", SCRAM_PARAMS, deadline=_in(10),
                          ssl_context=ca_ctx)
    assert info.value.sqlstate == "28P01"
    assert is_auth_failure(info.value)
    err = decode_backend(info.value.raw)
    assert isinstance(err, ErrorResponse)
    assert err.sqlstate == "28P01"


async def _raw_login_error(pg: PgCluster, ca_file: Path, user: str, password: str,
                           database: str) -> bytes:
    """An independent minimal client: returns the ErrorResponse frame that follows
    the password (PostgreSQL checks the database after AuthenticationOk)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", pg.port)
    try:
        writer.write(SSL_REQUEST)
        assert await reader.readexactly(1) == b"S"
        await writer.start_tls(ssl.create_default_context(cafile=str(ca_file)),
                               server_hostname="localhost")
        body = (196608).to_bytes(4, "big") + b"".join(
            k.encode() + b"\x00" + v.encode() + b"\x00"
            for k, v in (("user", user), ("database", database))
        ) + b"\x00"
        writer.write((len(body) + 4).to_bytes(4, "big") + body)
        assert await read_frame(reader) == encode(AuthenticationCleartextPassword())
        pw = password.encode() + b"\x00"
        writer.write(b"p" + (len(pw) + 4).to_bytes(4, "big") + pw)
        while (frame := await read_frame(reader))[:1] != b"E":
            pass
        return frame
    finally:
        writer.close()


async def test_database_does_not_exist_is_forwarded_exactly(
    tls_pg: PgCluster, ca_ctx: ssl.SSLContext, server_tls: TlsFiles,
) -> None:
    refreshes = 0

    async def refresh() -> str:
        nonlocal refreshes
        refreshes += 1
        return "unused"

    async with asyncio.timeout(30):
        expected = await _raw_login_error(tls_pg, server_tls.ca_file, "role_pw",
                                          ROLES["role_pw"][0], "nope")
        with pytest.raises(UpstreamRejected) as info:
            await connect_with_retry(
                _target(tls_pg), ROLES["role_pw"][0], {"user": "role_pw", "database": "nope"},
                deadline=_in(20), ssl_context=ca_ctx, refresh_credential=refresh,
            )
    assert info.value.raw == expected
    assert info.value.sqlstate == "3D000"
    assert str(info.value) == 'database "nope" does not exist'
    assert refreshes == 0


async def test_auth_failure_refreshes_the_credential_once(
    tls_pg: PgCluster, ca_ctx: ssl.SSLContext,
) -> None:
    tokens = ["pw-scram"]

    async def refresh() -> str:
        return tokens.pop()

    retries: list[BaseException] = []
    async with asyncio.timeout(30):
        conn = await connect_with_retry(
            _target(tls_pg), "stale-token", SCRAM_PARAMS, deadline=_in(20),
            ssl_context=ca_ctx, refresh_credential=refresh, on_retry=retries.append,
        )
    conn.close()
    assert tokens == []
    assert retries == []  # a credential refresh is not a backoff retry


async def test_auth_failure_twice_is_28p01(tls_pg: PgCluster, ca_ctx: ssl.SSLContext) -> None:
    calls = 0

    async def refresh() -> str:
        nonlocal calls
        calls += 1
        return "still-wrong"

    async with asyncio.timeout(30):
        with pytest.raises(UpstreamConnectError) as info:
            await connect_with_retry(
                _target(tls_pg), "stale-token", SCRAM_PARAMS, deadline=_in(20),
                ssl_context=ca_ctx, refresh_credential=refresh,
            )
    assert calls == 1
    assert info.value.sqlstate == "28P01"
    assert "endpoint rejected the fresh credential twice" in str(info.value)
    assert info.value.client_message.startswith("lakeproxy: ")


async def test_verify_full_wrong_host_name_fails_at_once(
    tls_pg: PgCluster, ca_ctx: ssl.SSLContext,
) -> None:
    retries: list[BaseException] = []
    started = time.monotonic()
    async with asyncio.timeout(30):
        with pytest.raises(UpstreamConnectError) as info:
            await connect_with_retry(
                _target(tls_pg, "wrong.example.com"), "pw-scram", SCRAM_PARAMS,
                deadline=_in(20), ssl_context=ca_ctx, on_retry=retries.append,
            )
    assert time.monotonic() - started < 3
    assert retries == []
    assert info.value.sqlstate == "08006"
    assert not info.value.retryable
    assert "Hostname mismatch" in str(info.value)
    assert "wrong.example.com" in str(info.value)
    assert info.value.hint


async def test_verify_full_untrusted_ca_fails_at_once(tls_pg: PgCluster) -> None:
    ctx = make_ssl_context("verify-full", "system")
    async with asyncio.timeout(30):
        with pytest.raises(UpstreamConnectError, match="certificate verification failed") as info:
            await connect_with_retry(
                _target(tls_pg), "pw-scram", SCRAM_PARAMS, deadline=_in(20),
                ssl_context=ctx,
            )
    assert "issuer" in str(info.value)
    assert info.value.sqlstate == "08006"


async def test_verify_ca_accepts_a_name_mismatch(
    tls_pg: PgCluster, server_tls: TlsFiles,
) -> None:
    ctx = make_ssl_context("verify-ca", str(server_tls.ca_file))
    async with asyncio.timeout(30):
        conn = await connect(_target(tls_pg, "wrong.example.com"), "pw-scram",
                             SCRAM_PARAMS, deadline=_in(10), ssl_context=ctx)
        conn.close()
        with pytest.raises(UpstreamConnectError, match="certificate verification failed"):
            await connect(_target(tls_pg), "pw-scram", SCRAM_PARAMS,
                          deadline=_in(10), ssl_context=make_ssl_context("verify-ca", "system"))


async def test_require_accepts_an_untrusted_ca(tls_pg: PgCluster) -> None:
    ctx = make_ssl_context("require", "system")
    async with asyncio.timeout(30):
        conn = await connect(_target(tls_pg, "wrong.example.com"), "pw-scram",
                             SCRAM_PARAMS, deadline=_in(10), ssl_context=ctx)
    assert conn.auth_method == "SCRAM-SHA-256-PLUS"
    conn.close()


async def test_require_with_a_ca_file_checks_the_chain_not_the_host_name(
    tls_pg: PgCluster, server_tls: TlsFiles, tls_ca: trustme.CA, tmp_path: Path,
) -> None:
    """libpq: with a root certificate file, ``require`` behaves as ``verify-ca``."""
    other_ca = tmp_path / "other-ca.pem"
    tls_ca.cert_pem.write_to_path(str(other_ca))
    async with asyncio.timeout(30):
        with pytest.raises(UpstreamConnectError, match="certificate verification failed") as info:
            await connect(_target(tls_pg), "pw-scram", SCRAM_PARAMS, deadline=_in(10),
                          ssl_context=make_ssl_context("require", str(other_ca)))
        assert info.value.sqlstate == "08006"
        conn = await connect(_target(tls_pg, "wrong.example.com"), "pw-scram", SCRAM_PARAMS,
                             deadline=_in(10),
                             ssl_context=make_ssl_context("require", str(server_tls.ca_file)))
    conn.close()


async def _cancel_scenario(pg: PgCluster, ctx: ssl.SSLContext) -> None:
    target = _target(pg)
    conn = await connect(target, "pw-scram", SCRAM_PARAMS, deadline=_in(10),
                         ssl_context=ctx)
    try:
        assert conn.backend_key is not None
        sink = take_over(conn)
        start = len(sink.data)
        body = b"SELECT pg_sleep(60)\x00"
        conn.transport.write(b"Q" + (len(body) + 4).to_bytes(4, "big") + body)
        await asyncio.sleep(0.3)
        begun = time.monotonic()
        await send_cancel(target, ctx, conn.backend_key.process_id, conn.backend_key.secret)
        frames = await sink.until_ready(start)
        assert time.monotonic() - begun < 10
        errors = [decode_backend(f) for f in frames if f[:1] == b"E"]
        assert len(errors) == 1
        assert isinstance(errors[0], ErrorResponse)
        assert errors[0].sqlstate == "57014"
        await sink.closed_by(conn)
    finally:
        conn.close()


async def test_send_cancel(tls_pg: PgCluster, ca_ctx: ssl.SSLContext) -> None:
    async with asyncio.timeout(30):
        await _cancel_scenario(tls_pg, ca_ctx)


async def test_send_cancel_is_best_effort() -> None:
    async with asyncio.timeout(30):
        await send_cancel(UpstreamTarget("localhost", free_port(), hostaddr="127.0.0.1"),
                          make_ssl_context("require", "system"), 1, b"abcd")


# --------------------------------------------------------------------------- fake endpoints


async def test_ssl_refused_with_n_is_a_clear_error() -> None:
    async def answer_n(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readexactly(8) == SSL_REQUEST
        writer.write(b"N")
        await writer.drain()
        await reader.read()

    retries: list[BaseException] = []
    async with asyncio.timeout(30), fake_server(answer_n) as port:
        with pytest.raises(UpstreamConnectError) as info:
            await connect_with_retry(
                UpstreamTarget("localhost", port, hostaddr="127.0.0.1", sslmode="require"),
                "tok", {"user": "u"}, deadline=_in(20),
                ssl_context=make_ssl_context("require", "system"), on_retry=retries.append,
            )
    assert "refused TLS" in str(info.value)
    assert info.value.sqlstate == "08006"
    assert retries == []


async def test_bytes_after_s_are_a_protocol_error() -> None:
    async def answer_s_and_more(reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)
        writer.write(b"S\x16\x03\x01 injected")
        await writer.drain()
        await reader.read()

    retries: list[BaseException] = []
    async with asyncio.timeout(30), fake_server(answer_s_and_more) as port:
        with pytest.raises(UpstreamConnectError) as info:
            await connect_with_retry(
                UpstreamTarget("localhost", port, hostaddr="127.0.0.1"), "tok",
                {"user": "u"}, deadline=_in(20),
                ssl_context=make_ssl_context("require", "system"), on_retry=retries.append,
            )
    assert "unexpected byte(s) after 'S'" in str(info.value)
    assert not info.value.retryable
    assert retries == []


async def test_tls_handshake_cut_off_is_retryable() -> None:
    async def cut_off(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)
        writer.write(b"S")
        await writer.drain()
        await reader.read(1)  # the ClientHello begins: hang up
        writer.transport.abort()

    async with asyncio.timeout(30), fake_server(cut_off) as port:
        with pytest.raises(Exception) as info:  # noqa: PT011  (the type is the point)
            await connect(UpstreamTarget("localhost", port, hostaddr="127.0.0.1"), "tok",
                          {"user": "u"}, deadline=_in(10),
                          ssl_context=make_ssl_context("require", "system"))
    assert is_retryable(info.value), repr(info.value)


async def test_silent_endpoint_times_out_until_the_deadline() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with asyncio.timeout(30), fake_server(silent) as port:
        started = time.monotonic()
        with pytest.raises(UpstreamConnectError) as info:
            await connect_with_retry(
                UpstreamTarget("localhost", port, hostaddr="127.0.0.1"), "tok", {"user": "u"},
                deadline=_in(1.0), ssl_context=make_ssl_context("require", "system"),
            )
        assert time.monotonic() - started < 2.0
    assert info.value.sqlstate == "08006"
    assert "timed out during SSLRequest" in str(info.value)


async def test_connection_refused_until_the_deadline() -> None:
    port = free_port()
    retries: list[BaseException] = []
    started = time.monotonic()
    async with asyncio.timeout(30):
        with pytest.raises(UpstreamConnectError) as info:
            await connect_with_retry(
                UpstreamTarget("localhost", port, hostaddr="127.0.0.1"), "tok", {"user": "u"},
                deadline=_in(1.5), ssl_context=make_ssl_context("require", "system"),
                on_retry=retries.append,
            )
    elapsed = time.monotonic() - started
    assert 1.4 <= elapsed < 2.5
    assert len(retries) >= 3
    assert all(isinstance(r, ConnectionRefusedError) for r in retries)
    exc = info.value
    assert exc.sqlstate == "08006"
    assert "last error" in str(exc)
    assert "Connect call failed" in str(exc) or "refused" in str(exc)
    assert exc.hint is not None
    assert "LAKEPROXY_CONNECT_DEADLINE" in exc.hint
    assert exc.client_message.startswith("lakeproxy: ")


async def _front_door_scenario(tls: TlsFiles) -> None:
    door = FrontDoor(tls, not_yet=2, token="fresh-token")
    retries: list[BaseException] = []
    async with fake_server(door) as port:
        conn = await connect_with_retry(
            UpstreamTarget("localhost", port, hostaddr="127.0.0.1"), "fresh-token",
            {"user": "u", "database": "db"}, deadline=_in(20),
            ssl_context=make_ssl_context("verify-full", str(tls.ca_file)),
            on_retry=retries.append,
        )
        try:
            assert door.logins == 3
            assert len(retries) == 2
            assert all(isinstance(r, UpstreamRejected) and r.sqlstate == "XX000"
                       for r in retries)
            assert door.sni == ["localhost"] * 3
            assert conn.backend_key == BackendKeyData(77, b"abcd")
            assert conn.auth_method == "cleartext"
            assert conn.startup_messages == (
                encode(ParameterStatus("server_version", "15.0")),
                encode(BackendKeyData(77, b"abcd")),
                encode(ReadyForQuery("I")),
            )
            # The NotificationResponse sent right after ReadyForQuery is handed
            # to whoever takes the connection over, before anything else.
            sink = Sink()
            assert conn.take_over(sink) == NOTIFICATION
            with pytest.raises(RuntimeError):
                conn.take_over(sink)
            await sink.closed_by(conn)
        finally:
            conn.close()


async def test_front_door_not_yet_errors_are_retried(server_tls: TlsFiles) -> None:
    async with asyncio.timeout(30):
        await _front_door_scenario(server_tls)


async def test_no_sni_for_an_ip_address(server_tls: TlsFiles) -> None:
    door = FrontDoor(server_tls, not_yet=0, token="t")
    async with asyncio.timeout(30), fake_server(door) as port:
        conn = await connect(UpstreamTarget("127.0.0.1", port), "t", {"user": "u"},
                             deadline=_in(10),
                             ssl_context=make_ssl_context("verify-full", str(server_tls.ca_file)))
        conn.close()
    assert door.sni == [None]


# --------------------------------------------------------------------------- uvloop


def _on_uvloop(coro: Awaitable[None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(60):
            await coro

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(bounded())


def test_uvloop_login_query_and_cancel(tls_pg: PgCluster, ca_ctx: ssl.SSLContext) -> None:
    async def scenario() -> None:
        for role in ROLES:
            await _login_and_query(tls_pg, ca_ctx, role)
        await _cancel_scenario(tls_pg, ca_ctx)

    _on_uvloop(scenario())


def test_uvloop_front_door_and_trailing_bytes(server_tls: TlsFiles) -> None:
    _on_uvloop(_front_door_scenario(server_tls))


async def test_error_before_tls_is_not_relayed() -> None:
    """An ErrorResponse answering SSLRequest comes before TLS (anyone could forge it):
    it is refused, never passed on as the endpoint's own error."""
    from lakeproxy.wire.codec import encode, error_response

    forged = encode(error_response("28P01", "FAKE-PROMPT: type your password here", hint="evil"))

    async def answer_error(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)
        writer.write(forged)
        await writer.drain()
        await reader.read()

    async with asyncio.timeout(30), fake_server(answer_error) as port:
        with pytest.raises(UpstreamConnectError) as info:
            await connect_with_retry(
                UpstreamTarget("localhost", port, hostaddr="127.0.0.1"), "tok",
                {"user": "u"}, deadline=_in(20),
                ssl_context=make_ssl_context("require", "system"),
            )
    assert "before TLS" in str(info.value)
    assert "FAKE-PROMPT" not in info.value.client_message
    assert info.value.sqlstate == "08006"
