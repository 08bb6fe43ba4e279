"""connect_with_retry driven by scripted connect outcomes (no network)."""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from collections.abc import Mapping

import pytest

import lakeproxy.upstream.login as upstream_login
from lakeproxy.errors import UpstreamConnectError, UpstreamRejected
from lakeproxy.retry import RetryPolicy
from lakeproxy.upstream import UpstreamConnection, UpstreamTarget, connect_with_retry

TARGET = UpstreamTarget("ep.example.com", 5432)
FAST = RetryPolicy(base=0.01, cap=0.02, floor=0.001)
OK = object()
CTX = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def rejected(code: str, message: str) -> UpstreamRejected:
    return UpstreamRejected(b"E-frame-" + code.encode(), code, message)


class Script:
    """Replaces lakeproxy.upstream.login.connect: each call pops the next outcome
    (an exception to raise, OK to succeed, or a float to sleep that long first)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *outcomes: object) -> None:
        self.outcomes = list(outcomes)
        self.tokens: list[str] = []
        self.budgets: list[float] = []
        self.conn = object()
        monkeypatch.setattr(upstream_login, "connect", self)

    async def __call__(
        self, endpoint: UpstreamTarget, token: str, params: Mapping[str, str], *,
        deadline: float, ssl_context: ssl.SSLContext, protocol: tuple[int, int],
    ) -> object:
        assert endpoint is TARGET
        assert ssl_context is CTX
        loop = asyncio.get_running_loop()
        self.tokens.append(token)
        self.budgets.append(deadline - loop.time())
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, float):
            async with asyncio.timeout_at(deadline):
                await asyncio.sleep(outcome)
            raise AssertionError("slept past the attempt deadline")
        if isinstance(outcome, BaseException):
            raise outcome
        return self.conn


async def run(script: Script, *, seconds: float = 5.0, **kwargs: object) -> UpstreamConnection:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(10):
        return await connect_with_retry(
            TARGET, "token-1", {"user": "r"}, deadline=loop.time() + seconds, ssl_context=CTX,
            policy=FAST, **kwargs,  # type: ignore[arg-type]
        )


async def test_refused_refused_ok(monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(monkeypatch, ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
                    ConnectionResetError(errno.ECONNRESET, "reset"), OK)
    retries: list[BaseException] = []
    assert await run(script, on_retry=retries.append) is script.conn
    assert script.outcomes == []
    assert [type(r) for r in retries] == [ConnectionRefusedError, ConnectionResetError]


async def test_not_yet_login_errors_are_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(monkeypatch, rejected("57P03", "the database system is starting up"),
                    rejected("XX000", "Couldn't connect to compute node"),
                    rejected("08006", "connection failure"), OK)
    assert await run(script) is script.conn
    assert script.outcomes == []


async def test_final_login_error_is_raised_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    err = rejected("3D000", 'database "x" does not exist')
    script = Script(monkeypatch, err, OK)
    with pytest.raises(UpstreamRejected) as info:
        await run(script)
    assert info.value is err
    assert script.outcomes == [OK]


async def test_auth_failure_refreshes_once_without_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    script = Script(monkeypatch, rejected("28P01", "password authentication failed"), OK)
    calls = 0

    async def refresh() -> str:
        nonlocal calls
        calls += 1
        return "token-2"

    retries: list[BaseException] = []
    assert await run(script, refresh_credential=refresh, on_retry=retries.append) is script.conn
    assert calls == 1
    assert script.tokens == ["token-1", "token-2"]
    assert retries == []


async def test_front_door_auth_failure_counts_as_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(monkeypatch,
                    rejected("XX000", "password authentication failed for user 'r'"), OK)

    async def refresh() -> str:
        return "token-2"

    assert await run(script, refresh_credential=refresh) is script.conn
    assert script.tokens == ["token-1", "token-2"]


async def test_auth_failure_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(monkeypatch, rejected("28P01", "password authentication failed"),
                    rejected("28000", "password authentication failed for user \"r\""), OK)

    async def refresh() -> str:
        return "token-2"

    with pytest.raises(UpstreamConnectError) as info:
        await run(script, refresh_credential=refresh)
    assert info.value.sqlstate == "28P01"
    assert "twice" in str(info.value)
    assert 'password authentication failed for user "r"' in str(info.value)
    assert script.outcomes == [OK]


async def test_28000_that_is_not_about_the_password_is_final(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pg_hba refusing the startup (e.g. replication=true) is the endpoint's answer
    to the client: forwarded as it is, no fresh credential, no retry."""
    refusal = rejected("28000", "no pg_hba.conf entry for replication connection")
    script = Script(monkeypatch, refusal, OK)
    refreshed: list[str] = []

    async def refresh() -> str:
        refreshed.append("x")
        return "token-2"

    with pytest.raises(UpstreamRejected) as info:
        await run(script, refresh_credential=refresh)
    assert info.value.sqlstate == "28000"
    assert refreshed == []
    assert script.tokens == ["token-1"]
    assert script.outcomes == [OK]


async def test_auth_failure_without_refresh_is_forwarded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    err = rejected("28P01", "password authentication failed")
    script = Script(monkeypatch, err)
    with pytest.raises(UpstreamRejected) as info:
        await run(script)
    assert info.value is err


async def test_refresh_that_outlives_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(monkeypatch, rejected("28P01", "password authentication failed"))

    async def refresh() -> str:
        await asyncio.sleep(30)
        return "late"

    with pytest.raises(UpstreamConnectError) as info:
        await run(script, seconds=0.3, refresh_credential=refresh)
    assert info.value.sqlstate == "08006"
    assert "password authentication failed" in str(info.value)


async def test_deadline_gives_08006_with_the_last_error(monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(monkeypatch, *[ConnectionRefusedError(errno.ECONNREFUSED, "nope")] * 500)
    retries: list[BaseException] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamConnectError) as info:
        await run(script, seconds=0.3, on_retry=retries.append)
    assert 0.25 <= loop.time() - started < 0.6
    assert info.value.sqlstate == "08006"
    assert "last error: [Errno 111] nope" in str(info.value)
    assert f"({len(retries)} retries)" in str(info.value)
    # every counted retry was attempted
    assert len(script.tokens) == len(retries) + 1


async def test_each_attempt_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(monkeypatch, 5.0, OK)
    assert await run(script, seconds=3.0, attempt_timeout=0.2) is script.conn
    assert script.budgets[0] == pytest.approx(0.2, abs=0.05)
    assert script.outcomes == []


async def test_last_attempt_is_bounded_by_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(monkeypatch, 5.0, 5.0, 5.0)
    with pytest.raises(UpstreamConnectError, match="timed out"):
        await run(script, seconds=0.3, attempt_timeout=10.0)
    assert script.budgets[0] == pytest.approx(0.3, abs=0.05)


@pytest.mark.parametrize(
    "exc",
    [
        UpstreamConnectError("endpoint refused TLS", retryable=False),
        OSError(errno.EACCES, "permission denied"),
        socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
        ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
    ],
)
async def test_permanent_failures_are_not_retried(
    monkeypatch: pytest.MonkeyPatch, exc: BaseException,
) -> None:
    script = Script(monkeypatch, exc, OK)
    retries: list[BaseException] = []
    with pytest.raises(UpstreamConnectError) as info:
        await run(script, on_retry=retries.append)
    assert not info.value.retryable
    assert retries == []
    assert script.outcomes == [OK]
    if not isinstance(exc, UpstreamConnectError):
        assert info.value.__cause__ is exc
