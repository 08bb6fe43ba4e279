"""Running a sign-in CLI (databricks auth token, az account get-access-token):
real subprocesses, their failures, the timeout, and parsing of what they print."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from lakeproxy.auth.signin import AzureCliSignIn, DatabricksCliSignIn
from lakeproxy.auth.signin.base import run_cli_json
from lakeproxy.errors import CredentialError

HOST = "https://ws.cloud.databricks.com"


def script(tmp_path: Path, name: str, body: str) -> str:
    """An executable Python script ``name`` in ``tmp_path`` running ``body``."""
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\nimport json, os, sys, time\n{body}\n")
    path.chmod(0o755)
    return str(path)


class NoHttp:
    """The CLIs make no HTTP request themselves."""

    host = HOST

    async def request_json(self, *args: object, **kwargs: object) -> dict[str, object]:
        raise AssertionError("no HTTP expected")


async def test_databricks_cli_token_and_expiry(tmp_path: Path) -> None:
    expiry = time.time() + 1800
    local = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(expiry)) + time.strftime(
        "%z", time.localtime(expiry))
    local = local[:-2] + ":" + local[-2:]
    cli = script(tmp_path, "databricks", f"""
assert sys.argv[1:] == ["auth", "token", "--host", {HOST!r}], sys.argv
print(json.dumps({{"access_token": "tok-1", "token_type": "Bearer", "expiry": {local!r}}}))
""")
    cred = await DatabricksCliSignIn(cli, HOST).token(NoHttp(), deadline=_later(10))
    assert cred.token == "tok-1"
    assert cred.expires_wall == pytest.approx(int(expiry), abs=1)
    assert "tok-1" not in repr(cred)


async def test_az_expires_on_and_legacy_expires_on_local_time(tmp_path: Path) -> None:
    expiry = int(time.time()) + 3000
    legacy = time.strftime("%Y-%m-%d %H:%M:%S.000000", time.localtime(expiry))
    for body, name in (({"accessToken": "a1", "expires_on": expiry, "expiresOn": "ignored"}, "az"),
                       ({"accessToken": "a2", "expiresOn": legacy}, "az-old")):
        az = script(tmp_path, name, f"print(json.dumps({body!r}))")
        cred = await AzureCliSignIn(az).token(NoHttp(), deadline=_later(10))
        assert cred.expires_wall == pytest.approx(expiry, abs=1)


async def test_a_failing_cli_gives_its_error_line_and_the_fix(tmp_path: Path) -> None:
    cli = script(tmp_path, "databricks", """
sys.stderr.write("some progress\\nError: cache: databricks OAuth is not configured for this host\\n"
                 "more advice\\n")
sys.exit(1)
""")
    with pytest.raises(CredentialError) as info:
        await DatabricksCliSignIn(cli, HOST, "dev").token(NoHttp(), deadline=_later(10))
    err = info.value
    assert not err.retryable
    assert err.sqlstate == "28000"
    assert str(err).endswith("Error: cache: databricks OAuth is not configured for this host")
    assert err.hint == "run `databricks auth login --profile dev`, then try again"


@pytest.mark.parametrize(
    ("stdout", "retryable", "text"),
    [
        ("not json", False, "printed no JSON"),
        ("[1, 2]", False, "printed no JSON object"),
        ('{"token_type": "Bearer"}', True, "no 'access_token' string"),
        ('{"access_token": "t", "expiry": "tomorrow"}', True, "not an RFC 3339 time"),
    ],
)
async def test_bad_cli_output(tmp_path: Path, stdout: str, retryable: bool, text: str) -> None:
    cli = script(tmp_path, "databricks", f"print({stdout!r})")
    with pytest.raises(CredentialError) as info:
        await DatabricksCliSignIn(cli, HOST).token(NoHttp(), deadline=_later(10))
    assert info.value.retryable is retryable
    assert text in str(info.value)


async def test_a_hanging_cli_is_killed_at_the_deadline(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    cli = script(tmp_path, "slow", f"""
open({str(pid_file)!r}, "w").write(str(os.getpid()))
time.sleep(600)
""")
    with pytest.raises(CredentialError) as info:
        await run_cli_json([cli], what="token", fix="f", missing_fix="m", deadline=_later(1.0))
    assert info.value.retryable
    assert "did not answer" in str(info.value)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_a_cancelled_run_kills_the_cli(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    cli = script(tmp_path, "slow", f"""
open({str(pid_file)!r}, "w").write(str(os.getpid()))
time.sleep(600)
""")
    task = asyncio.ensure_future(
        run_cli_json([cli], what="token", fix="f", missing_fix="m", deadline=_later(30)))
    while not pid_file.exists() or not pid_file.read_text():
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


async def test_missing_and_not_executable(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("not a program")
    for path, text in ((str(tmp_path / "absent"), "not found"), (str(plain), "not executable")):
        with pytest.raises(CredentialError) as info:
            await run_cli_json([path], what="token", fix="f", missing_fix="install it",
                               deadline=_later(5))
        assert not info.value.retryable
        assert text in str(info.value)
        assert info.value.hint == "install it"


def test_output_never_reaches_the_error(tmp_path: Path) -> None:
    # stdout holds the token: it is parsed, never quoted, even when malformed.
    cli = script(tmp_path, "databricks", 'print("secret-token-value not-json")')
    with pytest.raises(CredentialError) as info:
        asyncio.run(DatabricksCliSignIn(cli, HOST).token(NoHttp(), deadline=_far()))
    assert "secret-token-value" not in str(info.value) + (info.value.hint or "")


def _later(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


def _far() -> float:
    return time.monotonic() + 10
