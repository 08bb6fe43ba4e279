"""``lakeproxy check``: one-shot diagnosis, one line per step with its time.

Steps: workspace token -> database credential -> (endpoint host lookup) ->
TCP+TLS -> login -> ``SELECT current_user, current_database()``. The first
failure prints the step, the cause and the fix, and the exit status is 1; all
passing gives 0. Secrets are never printed. The output is this report alone
(configuration warnings included); log lines appear only with ``--verbose``.
Fixes name where each value came from (file and key, profile or variable).

After the credential, the endpoint's (or instance's) state and every host it
reports are printed, the one in use marked with ``*``: as the result of the
host lookup step, or, with an explicit host, as information (a status the
API will not give does not fail the check then).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TextIO, TypeVar

from lakeproxy.auth.status import TargetStatus
from lakeproxy.config import Config, name_sources
from lakeproxy.errors import LakeproxyError, UpstreamRejected
from lakeproxy.upstream import UpstreamConnection, UpstreamTarget, connect_with_retry
from lakeproxy.upstream.dialer import EndpointDialer, build_dialer
from lakeproxy.wire import limits
from lakeproxy.wire.codec import SSLRequest, decode_backend, encode
from lakeproxy.wire.framing import FrameReader

T = TypeVar("T")

QUERY = "SELECT current_user, current_database()"


class StepFailed(Exception):
    def __init__(self, cause: str, fix: str | None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.fix = fix


class _Report:
    def __init__(self, out: TextIO, sources: tuple[tuple[tuple[str, str], ...], ...]) -> None:
        self.out = out
        self.sources = sources

    async def step(self, name: str, action: Callable[[], Awaitable[tuple[T, str]]]) -> T:
        start = time.perf_counter()
        try:
            value, detail = await action()
        except StepFailed as exc:
            self._line("FAIL", name, start, exc.cause)
            if exc.fix:
                self.out.write(f"       fix: {name_sources(exc.fix, *self.sources)}\n")
            self.out.flush()
            raise
        self._line("ok", name, start, detail)
        return value

    def _line(self, status: str, name: str, start: float, detail: str) -> None:
        ms = (time.perf_counter() - start) * 1000
        self.out.write(f"[{status:>4}] {name:<22} {ms:8.1f} ms  {detail}\n")
        self.out.flush()


def write_status(out: TextIO, status: TargetStatus, in_use: str | None,
                 *, explicit: bool = False) -> None:
    """The state and every host the object reports; ``*`` marks ``in_use``."""
    out.write(f"       {status.what} state: {status.describe()}\n")
    for kind, host in status.hosts:
        mark = "*" if host == in_use else " "
        note = "  (in use)" if mark == "*" else ""
        out.write(f"     {mark} {status.field(kind):<23} {host}{note}\n")
    if not status.hosts:
        out.write("       (no hosts reported)\n")
    if explicit and in_use not in {h for _, h in status.hosts}:
        out.write(f"     * {'host (set explicitly)':<23} {in_use}  (in use)\n")
    out.flush()


async def _target(dialer: EndpointDialer, deadline: float) -> UpstreamTarget:
    try:
        return await dialer.target(deadline=deadline)
    except LakeproxyError as exc:
        raise _failed(exc) from exc


def _failed(exc: BaseException) -> StepFailed:
    if isinstance(exc, LakeproxyError):
        msg = exc.client_message if isinstance(exc, UpstreamRejected) else str(exc)
        return StepFailed(msg, exc.hint)
    return StepFailed(f"{type(exc).__name__}: {exc}", None)


async def run_check(config: Config, out: TextIO) -> int:
    """Run every step for the first endpoint; returns the exit status (0 all passed)."""
    endpoint = config.endpoints[0]
    dialer = build_dialer(config, endpoint, None)
    creds = dialer.credentials
    sources = (endpoint.sources, config.sources)
    report = _Report(out, sources)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.connect_deadline
    method = config.databricks.auth_type
    out.write(f"lakeproxy check: {endpoint.label}, signing in with {method}\n")
    role = endpoint.user or ""
    for warning in config.warnings:
        out.write(f"warning: {warning}\n")
    try:
        async def token() -> tuple[None, str]:
            try:
                cred = await creds.workspace_token(deadline=deadline)
            except LakeproxyError as exc:
                raise _failed(exc) from exc
            if creds.static:
                return None, f"{method}: using {name_sources('DATABRICKS_TOKEN', *sources)}"
            return None, f"{method}, valid for {cred.remaining(loop.time()) / 60:.0f} min"

        async def identity() -> tuple[str, str]:
            try:
                name = await creds.identity(deadline=deadline)
            except LakeproxyError as exc:
                raise _failed(exc) from exc
            used = "logging in as this role" if endpoint.user is None else (
                f"logging in as role {endpoint.user} (LAKEBASE_USER/PGUSER)")
            return name, f"{name} ({used})"

        async def credential() -> tuple[str, str]:
            try:
                cred = await creds.get(deadline=deadline)
            except LakeproxyError as exc:
                raise _failed(exc) from exc
            left = cred.remaining(loop.time()) / 60
            return cred.token, f"valid for {left:.0f} min"

        await report.step("workspace token", token)
        signed_in = await report.step("identity", identity)
        role = endpoint.user or signed_in
        secret = await report.step("database credential", credential)

        in_use: list[str] = []

        async def host() -> tuple[None, str]:
            try:
                await dialer.read_status(deadline=deadline)
            except LakeproxyError as exc:
                raise _failed(exc) from exc
            target = await _target(dialer, deadline)
            in_use.append(target.host)
            return None, f"{target.host} ({endpoint.kind})"

        if endpoint.host is None:
            try:
                await report.step("endpoint host lookup", host)
            finally:
                if dialer.status is not None:
                    write_status(out, dialer.status, in_use[0] if in_use else None)
        else:
            try:
                status = await dialer.read_status(deadline=min(deadline, loop.time() + 10))
            except LakeproxyError as exc:
                out.write(f"       state: unknown ({exc})\n")
            else:
                write_status(out, status, endpoint.host, explicit=True)

        async def tls() -> tuple[None, str]:
            target = await _target(dialer, deadline)
            transport: asyncio.Transport | None = None
            try:
                async with asyncio.timeout_at(deadline):
                    raw, probe = await loop.create_connection(
                        _Collect, target.dial_host, target.port
                    )
                    transport = raw
                    transport.write(encode(SSLRequest()))
                    answer = await probe.read_some()
                    if answer != b"S":
                        raise StepFailed(
                            f"the endpoint refused TLS (answered {answer[:1]!r})",
                            "check LAKEBASE_HOST/LAKEBASE_PORT point at the Lakebase endpoint",
                        )
                    transport = await loop.start_tls(
                        transport, probe, dialer.ssl_context, server_hostname=target.host
                    )
                    ssl_obj = transport.get_extra_info("ssl_object") if transport else None
                    version = ssl_obj.version() if ssl_obj is not None else "?"
                    cipher = ssl_obj.cipher()[0] if ssl_obj is not None else "?"
            except StepFailed:
                raise
            except Exception as exc:
                if transport is not None:
                    transport.abort()
                raise StepFailed(
                    f"{target}: {type(exc).__name__}: {exc}",
                    "check LAKEBASE_HOST/LAKEBASE_PORT/LAKEBASE_HOSTADDR and the network; for "
                    "certificate errors check LAKEBASE_SSLROOTCERT and LAKEBASE_SSLMODE",
                ) from exc
            if transport is not None:
                transport.close()
            return None, (f"{target.dial_host}:{target.port} {version} {cipher} "
                          f"sslmode={target.sslmode}")

        await report.step("TCP+TLS", tls)

        async def login() -> tuple[UpstreamConnection, str]:
            target = await _target(dialer, deadline)
            params = {"user": role, "database": endpoint.database,
                      "application_name": "lakeproxy check"}

            async def refresh() -> str:
                return (await creds.get(deadline=deadline)).token

            try:
                conn = await connect_with_retry(
                    target, secret, params, deadline=deadline,
                    ssl_context=dialer.ssl_context, refresh_credential=refresh,
                )
            except LakeproxyError as exc:
                raise _failed(exc) from exc
            return conn, f"{conn.auth_method} as {role} to {endpoint.database}"

        conn = await report.step("login", login)

        async def query() -> tuple[None, str]:
            try:
                user, db = await _simple_query(conn, deadline)
            except Exception as exc:
                raise StepFailed(f"{type(exc).__name__}: {exc}", None) from exc
            return None, f"current_user={user} current_database={db}"

        try:
            await report.step("query", query)
        finally:
            conn.close()
    except StepFailed:
        return 1
    finally:
        await dialer.close()
    out.write("all checks passed\n")
    return 0


class _Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = FrameReader(tagged=True, max_length=limits.MAX_STARTUP_PHASE_MESSAGE)
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False

        self.raw = bytearray()

    def data_received(self, data: bytes) -> None:
        self.raw += data
        self._wake()

    def eof_received(self) -> bool:
        return False

    async def read_some(self) -> bytes:
        """Raw bytes received so far (waits for at least one)."""
        while not self.raw and not self.closed:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        data, self.raw = bytes(self.raw), bytearray()
        return data

    def next_frame(self) -> bytes | None:
        if self.raw:
            self.reader.feed(bytes(self.raw))
            self.raw.clear()
        return self.reader.next_frame()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


async def _simple_query(conn: UpstreamConnection, deadline: float) -> tuple[str, str]:
    """Run QUERY with the simple protocol; return the two text columns."""
    proto = _Collect()
    leftover = conn.take_over(proto)
    if leftover:
        proto.raw += leftover
    body = QUERY.encode() + b"\x00"
    conn.transport.write(b"Q" + (len(body) + 4).to_bytes(4, "big") + body)
    conn.transport.resume_reading()
    row: list[str] = []
    async with asyncio.timeout_at(deadline):
        while True:
            frame = proto.next_frame()
            if frame is None:
                if proto.closed:
                    raise ConnectionError("the endpoint closed the connection")
                proto.waiter = asyncio.get_running_loop().create_future()
                await proto.waiter
                continue
            tag = frame[:1]
            if tag == b"D":
                row = _data_row(frame[5:])
            elif tag == b"E":
                err = decode_backend(frame)
                raise RuntimeError(getattr(err, "message", "query failed"))
            elif tag == b"Z":
                break
    if len(row) != 2:
        raise RuntimeError("the query returned no row")
    return row[0], row[1]


def _data_row(body: bytes) -> list[str]:
    count = int.from_bytes(body[:2], "big")
    pos, values = 2, []
    for _ in range(count):
        n = int.from_bytes(body[pos : pos + 4], "big", signed=True)
        pos += 4
        if n < 0:
            values.append("NULL")
            continue
        values.append(body[pos : pos + n].decode("utf-8", "replace"))
        pos += n
    return values
