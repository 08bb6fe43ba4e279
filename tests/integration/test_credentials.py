"""The credential provider against the emulator's real HTTP API (FakeWorkspace)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from lakeproxy.auth import (
    CachedCredentials,
    Credential,
    CredentialProvider,
    CredentialUnavailable,
    DatabricksApi,
    check_host,
    parse_rfc3339,
)
from lakeproxy.auth import databricks as dbx
from lakeproxy.auth.backoff import backoff_delays, parse_retry_after
from lakeproxy.emulator.api import FakeWorkspace
from lakeproxy.errors import ConfigError, CredentialError

CLIENT_ID = "c00f575e-d706-4f6b-b62c-e7a14850571b"
CLIENT_SECRET = "dose-SUPERSECRET-client-secret-0123456789"
PAT = "dapi-SUPERSECRET-pat-0123456789abcdef"
ENDPOINT = "projects/p1/branches/br-main/endpoints/ep-primary"
INSTANCE = "inst-1"
ENDPOINT_HOST = "ep-primary.database.us-east-1.cloud.databricks.com"
OIDC = dbx.OIDC_TOKEN_PATH
CREDS = dbx.POSTGRES_CREDENTIALS_PATH
DB_CREDS = dbx.DATABASE_CREDENTIALS_PATH

Factory = Callable[..., CachedCredentials]


def now() -> float:
    return asyncio.get_running_loop().time()


async def eventually(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


@pytest.fixture
async def ws() -> AsyncIterator[FakeWorkspace]:
    workspace = FakeWorkspace(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, endpoint_name=ENDPOINT,
        instance_name=INSTANCE, endpoint_host=ENDPOINT_HOST, pat=PAT,
    )
    await workspace.start()
    yield workspace
    await workspace.stop()


class Recorder:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.credentials: list[tuple[str, float]] = []

    def on_request(self, kind: str, result: str) -> None:
        self.requests.append((kind, result))

    def on_credential(self, kind: str, expires_wall: float) -> None:
        self.credentials.append((kind, expires_wall))


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def make(ws: FakeWorkspace, recorder: Recorder) -> AsyncIterator[Factory]:
    made: list[CachedCredentials] = []

    def factory(**overrides: object) -> CachedCredentials:
        kwargs: dict[str, object] = {
            "host": ws.url, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
            "endpoint_name": ENDPOINT, "request_timeout": 2.0,
        }
        kwargs.update(overrides)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        api = DatabricksApi(**kwargs)  # type: ignore[arg-type]
        provider = CachedCredentials(
            api, on_request=recorder.on_request, on_credential=recorder.on_credential,
            backoff_initial=0.05, backoff_max=0.2,
        )
        made.append(provider)
        return provider

    yield factory
    for provider in made:
        await provider.close()


async def timed(aw: Awaitable[Credential]) -> tuple[Credential, float]:
    start = now()
    cred = await aw
    return cred, now() - start


# ---------------------------------------------------------------- happy paths


async def test_autoscaling_happy_path(
    ws: FakeWorkspace, make: Factory, recorder: Recorder
) -> None:
    provider: CredentialProvider = make()
    assert not provider.ready()
    cred = await provider.get(deadline=now() + 5)
    assert ws.is_valid_credential(CLIENT_ID, cred.token)
    assert 3590 < cred.lifetime <= 3600.5
    assert cred.usable(now())
    assert ws.calls[OIDC] == 1
    assert ws.calls[CREDS] == 1
    assert provider.ready()
    # Cached: no further calls.
    again = await provider.get(deadline=now() + 5)
    assert again is cred
    assert ws.calls[CREDS] == 1
    body = json.loads(next(r.body for r in ws.requests if r.path == CREDS))
    assert body == {"endpoint": ENDPOINT}
    assert recorder.requests == [("oauth", "ok"), ("database", "ok")]
    assert [k for k, _ in recorder.credentials] == ["oauth", "database"]
    assert abs(recorder.credentials[1][1] - cred.expires_wall) < 1e-6


async def test_provisioned_happy_path(ws: FakeWorkspace, make: Factory) -> None:
    provider = make(endpoint_name=None, instance_name=INSTANCE)
    cred = await provider.get(deadline=now() + 5)
    assert ws.is_valid_credential(CLIENT_ID, cred.token)
    assert ws.calls[DB_CREDS] == 1
    assert ws.calls[CREDS] == 0
    body = json.loads(next(r.body for r in ws.requests if r.path == DB_CREDS))
    assert body["instance_names"] == [INSTANCE]
    uuid.UUID(body["request_id"])


async def test_pat_replaces_oauth(ws: FakeWorkspace, make: Factory, recorder: Recorder) -> None:
    provider = make(client_id=None, client_secret=None, token=PAT)
    cred = await provider.get(deadline=now() + 5)
    assert ws.is_valid_credential(CLIENT_ID, cred.token)
    assert ws.calls[OIDC] == 0
    assert ws.calls[CREDS] == 1
    assert recorder.requests == [("database", "ok")]
    assert [r.authorization_scheme for r in ws.requests] == ["Bearer"]


async def test_pat_refused_is_final_with_hint(ws: FakeWorkspace, make: Factory) -> None:
    provider = make(client_id=None, client_secret=None, token="dapi-wrong")
    with pytest.raises(CredentialError) as info:
        await provider.get(deadline=now() + 5)
    assert info.value.sqlstate == "28000"
    assert info.value.status == 401
    assert info.value.hint == dbx.HINT_PAT
    assert ws.calls[CREDS] == 1  # a static token is not "refreshed"


# ---------------------------------------------------------------- caching


async def test_single_flight(ws: FakeWorkspace, make: Factory) -> None:
    provider = make()
    ws.inject(CREDS, status=200, delay=0.3)  # a slow (but successful) answer
    async with asyncio.timeout(5):
        creds = await asyncio.gather(*(provider.get(deadline=now() + 5) for _ in range(50)))
    assert len({c.token for c in creds}) == 1
    assert ws.calls[OIDC] == 1
    assert ws.calls[CREDS] == 1


async def test_background_refresh_at_half_life(ws: FakeWorkspace, make: Factory) -> None:
    ws.credential_lifetime = 2.0
    provider = make()
    first = await provider.get(deadline=now() + 5)
    assert ws.calls[CREDS] == 1
    await asyncio.sleep(1.1)
    _, took = await timed(provider.get(deadline=now() + 5))
    assert took < 0.05
    await eventually(lambda: ws.calls[CREDS] == 2)
    await asyncio.sleep(0.05)
    newer = await provider.get(deadline=now() + 5)
    assert newer.newer_than(first)
    assert ws.is_valid_credential(CLIENT_ID, newer.token)
    assert ws.calls[OIDC] == 1


async def test_oauth_token_is_cached_and_refreshed(ws: FakeWorkspace, make: Factory) -> None:
    ws.oauth_lifetime = 1.0
    provider = make()
    token = await provider.workspace_token(deadline=now() + 5)
    assert token.lifetime == pytest.approx(1.0, abs=0.1)
    await provider.get(deadline=now() + 5)
    assert ws.calls[OIDC] == 1
    await eventually(lambda: ws.calls[OIDC] == 2)  # refreshed at half-life


async def test_never_returns_a_credential_with_under_a_tenth_left(
    ws: FakeWorkspace, make: Factory
) -> None:
    ws.credential_lifetime = 1.0
    provider = make()
    first = await provider.get(deadline=now() + 5)
    ws.inject(CREDS, status=200, delay=1.2)  # the background refresh (at ~0.5 s) is slow
    await asyncio.sleep(max(0.0, first.issued_at + 0.7 - now()))
    cred, took = await timed(provider.get(deadline=now() + 5))
    assert cred is first  # 30 % left: still handed out at once
    assert took < 0.05
    await asyncio.sleep(max(0.0, first.issued_at + 0.95 - now()))
    cred, took = await timed(provider.get(deadline=now() + 5))
    assert cred.newer_than(first)  # 5 % left: waited for the refresh instead
    assert took > 0.3
    assert cred.remaining(now()) >= 0.1 * cred.lifetime
    assert ws.calls[CREDS] == 2  # it joined the in-flight refresh


async def test_failed_background_refresh_keeps_serving(
    ws: FakeWorkspace, make: Factory
) -> None:
    ws.credential_lifetime = 2.0
    provider = make()
    first = await provider.get(deadline=now() + 5)
    ws.inject(CREDS, count=3, status=503, delay=0.2)
    await asyncio.sleep(1.2)
    cred, took = await timed(provider.get(deadline=now() + 5))
    assert cred is first
    assert took < 0.05
    await eventually(lambda: ws.calls[CREDS] == 5)
    await asyncio.sleep(0.05)
    cred = await provider.get(deadline=now() + 5)
    assert cred.newer_than(first)
    assert provider.ready()


async def test_refused_background_refresh_keeps_serving(
    ws: FakeWorkspace, make: Factory
) -> None:
    ws.credential_lifetime = 2.0
    provider = make()
    first = await provider.get(deadline=now() + 5)
    ws.inject(CREDS, status=403)
    await eventually(lambda: ws.calls[CREDS] == 2)  # the refresh at half-life, refused
    await asyncio.sleep(0.05)
    cred, took = await timed(provider.get(deadline=now() + 5))
    assert cred is first  # a refusal in the background does not disturb callers
    assert took < 0.05
    assert provider.ready()
    await eventually(lambda: ws.calls[CREDS] == 3)  # that get() asked again
    await asyncio.sleep(0.05)
    assert (await provider.get(deadline=now() + 5)).newer_than(first)


async def test_invalidate_mints_a_newer_credential(ws: FakeWorkspace, make: Factory) -> None:
    provider = make()
    first = await provider.get(deadline=now() + 5)
    provider.invalidate(first)
    second = await provider.get(deadline=now() + 5)
    assert second.newer_than(first)
    assert second.token != first.token
    assert ws.calls[CREDS] == 2
    provider.invalidate(first)  # stale: the current one stays
    assert await provider.get(deadline=now() + 5) is second
    assert ws.calls[CREDS] == 2
    assert ws.calls[OIDC] == 1


# ---------------------------------------------------------------- retries


async def test_5xx_then_ok(ws: FakeWorkspace, make: Factory, recorder: Recorder) -> None:
    ws.inject(CREDS, count=2, status=500)
    provider = make()
    cred = await provider.get(deadline=now() + 5)
    assert ws.is_valid_credential(CLIENT_ID, cred.token)
    assert ws.calls[CREDS] == 3
    assert recorder.requests.count(("database", "error")) == 2
    assert recorder.requests.count(("database", "ok")) == 1


async def test_oauth_5xx_then_ok(ws: FakeWorkspace, make: Factory) -> None:
    ws.inject(OIDC, count=2, status=503)
    provider = make()
    await provider.get(deadline=now() + 5)
    assert ws.calls[OIDC] == 3


async def test_429_retry_after_is_honoured(ws: FakeWorkspace, make: Factory) -> None:
    ws.inject(CREDS, status=429, retry_after=1)
    provider = make()
    _, took = await timed(provider.get(deadline=now() + 5))
    assert took >= 0.95
    assert ws.calls[CREDS] == 2


async def test_retry_after_beyond_the_deadline_fails_early(
    ws: FakeWorkspace, make: Factory
) -> None:
    ws.inject(CREDS, status=429, retry_after=30)
    provider = make()
    start = now()
    with pytest.raises(CredentialUnavailable) as info:
        await provider.get(deadline=start + 2)
    assert now() - start < 1.0
    assert info.value.sqlstate == "08006"
    assert "429" in str(info.value)


@pytest.mark.parametrize(
    "body", [b"{not json", b"[]", b'{"token": 42}', b'{"token": "x", "expire_time": "soon"}']
)
async def test_malformed_2xx_is_retried(ws: FakeWorkspace, make: Factory, body: bytes) -> None:
    ws.inject(CREDS, status=200, body=body)
    provider = make()
    cred = await provider.get(deadline=now() + 5)
    assert ws.is_valid_credential(CLIENT_ID, cred.token)
    assert ws.calls[CREDS] == 2


async def test_dropped_connection_is_retried(ws: FakeWorkspace, make: Factory) -> None:
    ws.inject(CREDS, status=0)
    provider = make()
    await provider.get(deadline=now() + 5)
    assert ws.calls[CREDS] == 2


async def test_401_on_step_2_refreshes_oauth_once(ws: FakeWorkspace, make: Factory) -> None:
    provider = make()
    first = await provider.get(deadline=now() + 5)
    ws.revoke_oauth_tokens()
    provider.invalidate(first)
    cred = await provider.get(deadline=now() + 5)
    assert ws.is_valid_credential(CLIENT_ID, cred.token)
    assert ws.calls[OIDC] == 2
    assert ws.calls[CREDS] == 3  # ok, 401, ok


async def test_401_twice_on_step_2_is_final(ws: FakeWorkspace, make: Factory) -> None:
    ws.inject(CREDS, count=2, status=401)
    provider = make()
    with pytest.raises(CredentialError) as info:
        await provider.get(deadline=now() + 5)
    assert info.value.sqlstate == "28000"
    assert info.value.status == 401
    assert info.value.hint == dbx.HINT_WRONG_WORKSPACE
    assert ws.calls[OIDC] == 2
    assert ws.calls[CREDS] == 2


# ---------------------------------------------------------------- refusals


async def test_bad_secret_is_final_with_code_and_hint(
    ws: FakeWorkspace, make: Factory, recorder: Recorder
) -> None:
    provider = make(client_secret="wrong-secret")
    start = now()
    with pytest.raises(CredentialError) as info:
        await provider.get(deadline=start + 5)
    assert now() - start < 0.5
    err = info.value
    assert err.sqlstate == "28000"
    assert not err.retryable
    assert err.error_code == "invalid_client"
    assert "invalid_client" in str(err)
    assert "Client authentication failed" in str(err)
    assert err.client_message.startswith("lakeproxy: ")
    assert err.hint == "check DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET"
    assert ws.calls[OIDC] == 1
    assert ws.calls[CREDS] == 0
    assert recorder.requests == [("oauth", "refused")]
    assert not provider.ready()


async def test_workspace_access_disabled_hint(ws: FakeWorkspace, make: Factory) -> None:
    body = {"error_code": "PERMISSION_DENIED",
            "message": "API is disabled for users without workspace access"}
    ws.inject(CREDS, status=403, body=json.dumps(body).encode())
    provider = make()
    with pytest.raises(CredentialError) as info:
        await provider.get(deadline=now() + 5)
    assert info.value.sqlstate == "28000"
    assert info.value.error_code == "PERMISSION_DENIED"
    assert "API is disabled for users without workspace access" in str(info.value)
    assert info.value.hint == "enable 'Workspace access' for the service principal"
    assert ws.calls[CREDS] == 1


@pytest.mark.parametrize(
    ("status", "body", "hint"),
    [
        (400, {"error_code": "INVALID_PARAMETER_VALUE",
               "message": "Field 'endpoint' is required"}, dbx.HINT_ENDPOINT),
        (404, {"error_code": "RESOURCE_DOES_NOT_EXIST",
               "message": "Endpoint 'x' does not exist."}, dbx.HINT_ENDPOINT_NOT_FOUND),
        (403, {"error_code": "PERMISSION_DENIED",
               "message": "role \"abc\" does not exist"}, dbx.HINT_ROLE),
    ],
)
async def test_refusal_hints(
    ws: FakeWorkspace, make: Factory, status: int, body: dict[str, str], hint: str
) -> None:
    ws.inject(CREDS, status=status, body=json.dumps(body).encode())
    provider = make()
    with pytest.raises(CredentialError) as info:
        await provider.get(deadline=now() + 5)
    assert info.value.sqlstate == "28000"
    assert info.value.hint == hint
    assert body["error_code"] in str(info.value)


async def test_unknown_endpoint_is_refused(ws: FakeWorkspace, make: Factory) -> None:
    provider = make(endpoint_name="projects/p1/branches/br-main/endpoints/nope")
    with pytest.raises(CredentialError) as info:
        await provider.get(deadline=now() + 5)
    assert info.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    # A name of the right shape that the workspace does not know: "not found",
    # not "set ENDPOINT_NAME to projects/..." (issue #11, point 6).
    assert info.value.hint == dbx.HINT_ENDPOINT_NOT_FOUND
    assert info.value.hint.startswith("endpoint not found")


async def test_unknown_instance_is_refused(ws: FakeWorkspace, make: Factory) -> None:
    provider = make(endpoint_name=None, instance_name="nope")
    with pytest.raises(CredentialError) as info:
        await provider.get(deadline=now() + 5)
    assert info.value.hint == dbx.HINT_INSTANCE_NOT_FOUND


# ---------------------------------------------------------------- deadlines


async def test_persistent_5xx_gives_up_within_the_deadline(
    ws: FakeWorkspace, make: Factory
) -> None:
    ws.inject(CREDS, count=1000, status=503)
    provider = make()
    start = now()
    with pytest.raises(CredentialUnavailable) as info:
        await provider.get(deadline=start + 1.0)
    assert now() - start <= 1.05
    assert info.value.sqlstate == "08006"
    assert info.value.retryable
    assert "TEMPORARILY_UNAVAILABLE" in str(info.value)
    assert ws.calls[CREDS] >= 3


async def test_hanging_api_gives_up_at_the_deadline(ws: FakeWorkspace, make: Factory) -> None:
    ws.inject(CREDS, status=200, delay=3.0)
    provider = make()
    start = now()
    with pytest.raises(CredentialUnavailable) as info:
        await provider.get(deadline=start + 0.5)
    assert 0.45 <= now() - start <= 0.6
    assert info.value.sqlstate == "08006"


async def test_unreachable_api_gives_up_with_hint(ws: FakeWorkspace, make: Factory) -> None:
    provider = make()
    await ws.stop()
    start = now()
    with pytest.raises(CredentialUnavailable) as info:
        await provider.get(deadline=start + 0.5)
    assert now() - start <= 0.6
    assert info.value.hint == dbx.HINT_UNREACHABLE
    assert "ClientConnectorError" in str(info.value)


async def test_cancelled_caller_does_not_cancel_the_shared_request(
    ws: FakeWorkspace, make: Factory
) -> None:
    ws.inject(CREDS, status=200, delay=0.3)
    provider = make()
    impatient = asyncio.create_task(provider.get(deadline=now() + 5))
    patient = asyncio.create_task(provider.get(deadline=now() + 5))
    await asyncio.sleep(0.1)
    impatient.cancel()
    cred = await patient
    assert ws.is_valid_credential(CLIENT_ID, cred.token)
    assert ws.calls[CREDS] == 1
    with pytest.raises(asyncio.CancelledError):
        await impatient


async def test_close_fails_waiters(ws: FakeWorkspace, make: Factory) -> None:
    ws.inject(CREDS, status=200, delay=2.0)
    provider = make()
    waiter = asyncio.create_task(provider.get(deadline=now() + 5))
    await asyncio.sleep(0.1)
    await provider.close()
    with pytest.raises(CredentialError):
        await waiter


# ---------------------------------------------------------------- endpoint host


async def test_endpoint_host_lookup(ws: FakeWorkspace, make: Factory) -> None:
    ws.inject(f"{dbx.POSTGRES_API_PREFIX}{ENDPOINT}", status=502)
    provider = make()
    assert await provider.endpoint_host(deadline=now() + 5) == ENDPOINT_HOST
    assert await provider.endpoint_host(deadline=now() + 5) == ENDPOINT_HOST
    assert ws.calls[f"{dbx.POSTGRES_API_PREFIX}{ENDPOINT}"] == 2  # 502, ok; then remembered
    with pytest.raises(CredentialError) as info:
        await provider.endpoint_host(
            "projects/p1/branches/br-main/endpoints/other", deadline=now() + 5
        )
    assert info.value.status == 404
    assert info.value.hint == dbx.HINT_ENDPOINT_NOT_FOUND


# ---------------------------------------------------------------- secrets


async def test_no_secret_in_reprs_or_logs(
    ws: FakeWorkspace, make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ws.inject(CREDS, status=500)
    ws.inject(OIDC, status=200, body=b"garbage")
    provider = make()
    cred = await provider.get(deadline=now() + 5)
    oauth = await provider.workspace_token(deadline=now() + 5)
    errors: list[CredentialError] = []
    for bad in (make(client_secret="wrong-" + CLIENT_SECRET),
                make(client_id=None, client_secret=None, token=PAT + "x")):
        with pytest.raises(CredentialError) as info:
            await bad.get(deadline=now() + 5)
        errors.append(info.value)
    texts = [caplog.text, repr(cred), repr(oauth), repr(provider), str(cred), *map(str, errors),
             *(e.client_message for e in errors), *(str(e.hint) for e in errors)]
    for text in texts:
        for secret in (CLIENT_SECRET, PAT, cred.token, oauth.token):
            assert secret not in text
    assert "token=" not in repr(cred)
    assert "500" in caplog.text  # statuses are logged


# ---------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-28T10:00:00Z", 1795860000.0),
        ("2026-11-28T10:00:00.5Z", 1795860000.5),
        ("2026-11-28T10:00:00.123456789Z", 1795860000.123456789),
        ("2026-11-28T11:30:00+01:30", 1795860000.0),
        ("2026-11-28T08:00:00.25-02:00", 1795860000.25),
        ("2026-11-28t10:00:00z", 1795860000.0),
    ],
)
def test_parse_rfc3339(text: str, expected: float) -> None:
    assert parse_rfc3339(text) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("text", ["", "2026-11-28", "2026-11-28T10:00:00", "tomorrow"])
def test_parse_rfc3339_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_rfc3339(text)


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("1.5") == 1.5
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    when = "Wed, 21 Oct 2026 07:28:00 GMT"
    assert parse_retry_after(when, now=parse_rfc3339("2026-10-21T07:27:00Z")) == 60.0
    assert parse_retry_after(when, now=parse_rfc3339("2026-10-21T08:00:00Z")) == 0.0


def test_backoff_delays_are_jittered_and_capped() -> None:
    delays: Iterator[float] = backoff_delays(0.1, 5.0)
    caps = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    for cap in caps:
        assert 0.0 <= next(delays) <= cap


@pytest.mark.parametrize(
    "host",
    ["http://example.com", "ftp://x", "https://user:pw@example.com", "example.com",
     "http://10.0.0.1:8080"],
)
def test_host_must_be_https_unless_loopback(host: str) -> None:
    with pytest.raises(ConfigError, match="DATABRICKS_HOST"):
        check_host(host)


@pytest.mark.parametrize(
    ("host", "expected"),
    [("https://adb-1.azuredatabricks.net/", "https://adb-1.azuredatabricks.net"),
     ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
     ("http://[::1]:80/", "http://[::1]:80"),
     ("http://localhost:1", "http://localhost:1")],
)
def test_host_accepted(host: str, expected: str) -> None:
    assert check_host(host) == expected


def test_api_config_problems_are_collected() -> None:
    with pytest.raises(ConfigError) as info:
        DatabricksApi(host="http://example.com", endpoint_name="ep")
    problems = " | ".join(info.value.problems)
    assert "DATABRICKS_HOST" in problems
    assert "DATABRICKS_CLIENT_ID" in problems
    assert "ENDPOINT_NAME" in problems
    with pytest.raises(ConfigError, match="not both"):
        DatabricksApi(host="https://h", client_id="a", client_secret="b", token="c",
                      endpoint_name=ENDPOINT)
    api = DatabricksApi(host="https://h", client_id="a", client_secret=CLIENT_SECRET,
                        endpoint_name=ENDPOINT)
    assert CLIENT_SECRET not in repr(api)
