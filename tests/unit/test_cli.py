"""The command line: version, help, exit codes, dispatch, token, wait, emulator."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import types
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import pytest
from aiohttp import web

import lakeproxy
from lakeproxy import cli
from lakeproxy.config import Config
from lakeproxy.emulator.api import FakeWorkspace

REPO = Path(__file__).resolve().parents[2]
ENDPOINT = "projects/p/branches/b/endpoints/e"
GOOD_ENV: Mapping[str, str] = {
    "DATABRICKS_HOST": "https://x.cloud.databricks.com",
    "DATABRICKS_CLIENT_ID": "client",
    "DATABRICKS_CLIENT_SECRET": "not-a-real-secret-value",
    "ENDPOINT_NAME": ENDPOINT,
}


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A minimal environment for a subprocess: no Databricks settings, empty HOME."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    env.update(extra)
    return env


def run_cli(
    args: list[str], env: Mapping[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lakeproxy", *args],
        env=dict(env), cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
    )


async def run_cli_async(args: list[str], env: Mapping[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lakeproxy", *args, env=dict(env), cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() installs a stderr handler on the root logger; undo it after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


# --------------------------------------------------------------------------
# Subprocess: version, help, exit 2


def test_version() -> None:
    result = run_cli(["--version"], os.environ)
    assert result.returncode == 0
    assert result.stdout.strip() == f"lakeproxy {lakeproxy.__version__}"


@pytest.mark.parametrize("command", [None, *cli.COMMANDS])
def test_help(command: str | None) -> None:
    args = ["--help"] if command is None else [command, "--help"]
    result = run_cli(args, os.environ)
    assert result.returncode == 0, result.stderr
    usage = "usage: lakeproxy" if command is None else f"usage: lakeproxy {command}"
    assert result.stdout.startswith(usage)
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("args", "extra", "starts"),
    [
        ([], {"LAKEBASE_SSLMODE": "disable"},
         "lakeproxy: LAKEBASE_SSLMODE=disable (environment): must be"),
        (["run"], {"LAKEPROXY_MAX_CLIENTS": "0"},
         "lakeproxy: LAKEPROXY_MAX_CLIENTS=0 (environment): must be a positive integer"),
        (["check"], {"LAKEPROXY_LISTEN": "0.0.0.0:6432"},
         "lakeproxy: LAKEPROXY_LISTEN=0.0.0.0:6432 (environment): 0.0.0.0:6432 is not a "
         "loopback address"),
        (["token"], {"DATABRICKS_HOST": "http://example.com"},
         "lakeproxy: DATABRICKS_HOST=http://example.com (environment): must use https://"),
        (["--config", "/nonexistent.toml"], {},
         "lakeproxy: --config=/nonexistent.toml (command line): file not found"),
        (["run", "--listen", "127.0.0.1:1", "--log-level", "debug"], {"PGPORT": "x"},
         "lakeproxy: PGPORT=x (environment): must be a port number"),
        (["wait"], {}, "lakeproxy: --admin: required"),
        (["wait", "--admin", "nope", "--timeout", "5"], {},
         "lakeproxy: --admin=nope (command line): must be HOST:PORT"),
        (["demo"], {"LAKEPROXY_LOG_FORMAT": "xml"},
         "lakeproxy: LAKEPROXY_LOG_FORMAT=xml (environment): must be one of text, json"),
    ],
)
def test_bad_config_exits_2_with_one_line(
    tmp_path: Path, args: list[str], extra: dict[str, str], starts: str
) -> None:
    result = run_cli(args, clean_env(tmp_path, **{**GOOD_ENV, **extra}))
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(starts), result.stderr
    assert "Traceback" not in result.stderr
    assert GOOD_ENV["DATABRICKS_CLIENT_SECRET"] not in result.stderr


def test_one_problem_per_line_most_specific_first(tmp_path: Path) -> None:
    """Issue #11.5: not one ~500-character line; the real mistake comes first."""
    cfg = tmp_path / "lp.toml"
    cfg.write_text('[proxy]\nmax_client = 5\n')
    result = run_cli(["run", "--listen", "0.0.0.0:6432", "--config", str(cfg)],
                     clean_env(tmp_path, LAKEBASE_SSLMODE="allow"))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert all(line.startswith("lakeproxy: ") for line in lines), lines
    assert lines[0] == (f"lakeproxy: [proxy] max_client ({cfg}): unknown key "
                        "(did you mean max_clients?)")
    assert lines[1].startswith("lakeproxy: LAKEBASE_SSLMODE=allow (environment): must be one of")
    assert lines[2].startswith("lakeproxy: --listen=0.0.0.0:6432 (command line): 0.0.0.0:6432 "
                               "is not a loopback address")
    assert lines[3].startswith("lakeproxy: DATABRICKS_HOST: required")
    assert lines[4].startswith("lakeproxy: DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET")
    assert lines[5].startswith("lakeproxy: ENDPOINT_NAME or LAKEBASE_INSTANCE: one is required")
    assert len(lines) == 6, lines


def test_usage_error_exits_2(tmp_path: Path) -> None:
    result = run_cli(["frobnicate"], clean_env(tmp_path))
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


# --------------------------------------------------------------------------
# In-process dispatch (the command modules are faked)


def test_default_command_is_run() -> None:
    assert cli._with_default_command([]) == ["run"]
    assert cli._with_default_command(["--config", "f"]) == ["run", "--config", "f"]
    assert cli._with_default_command(["--version"]) == ["--version"]
    assert cli._with_default_command(["check"]) == ["check"]


def fake_module(
    monkeypatch: pytest.MonkeyPatch, name: str, **attrs: object
) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


@pytest.fixture
def good_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith(("DATABRICKS_", "PG", "LAKEPROXY_", "ENDPOINT_NAME", "LAKEBASE_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))
    for key, value in GOOD_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.mark.usefixtures("good_env")
def test_run_dispatches_to_server_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Config] = []

    async def serve(config: Config) -> int:
        seen.append(config)
        return 0

    fake_module(monkeypatch, "lakeproxy.app", serve=serve)
    assert cli.main(["--listen", "127.0.0.1:7777", "--log-format", "json"]) == 0
    assert seen[0].endpoints[0].listen[0].port == 7777
    assert seen[0].log_format == "json"
    assert dict(seen[0].flags)["listen"] == "127.0.0.1:7777"


@pytest.mark.usefixtures("good_env")
def test_repeated_listen_flags_join(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Config] = []

    async def serve(config: Config) -> int:
        seen.append(config)
        return 0

    fake_module(monkeypatch, "lakeproxy.app", serve=serve)
    assert cli.main(["run", "--listen", "127.0.0.1:1", "--listen", "[::1]:2"]) == 0
    assert [lst.describe() for lst in seen[0].endpoints[0].listen] == ["127.0.0.1:1", "[::1]:2"]


@pytest.mark.usefixtures("good_env")
def test_check_dispatches_with_stdout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def run_check(config: Config, out: io.TextIOBase) -> int:
        out.write(f"checked {config.endpoints[0].name}\n")
        return 3

    fake_module(monkeypatch, "lakeproxy.check", run_check=run_check)
    assert cli.main(["check"]) == 3
    assert capsys.readouterr().out == f"checked {ENDPOINT}\n"


def test_demo_dispatches(monkeypatch: pytest.MonkeyPatch) -> None:
    got: list[str] = []

    async def run_demo(listen: str) -> int:
        got.append(listen)
        return 5

    fake_module(monkeypatch, "lakeproxy.demo", run_demo=run_demo)
    monkeypatch.delenv("LAKEPROXY_LISTEN", raising=False)
    assert cli.main(["demo", "--log-level", "warning"]) == 5
    assert logging.getLogger().level == logging.WARNING
    assert cli.main(["demo", "--listen", "127.0.0.1:7777"]) == 5
    monkeypatch.setenv("LAKEPROXY_LISTEN", "127.0.0.1:7778")
    assert cli.main(["demo"]) == 5
    assert got == ["127.0.0.1:6432", "127.0.0.1:7777", "127.0.0.1:7778"]


def test_demo_listen_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--listen", "6433"]) == 2
    err = capsys.readouterr().err
    assert err == ("lakeproxy: --listen=6433 (command line): must be HOST:PORT, "
                   "e.g. 127.0.0.1:6432\n")


def test_missing_command_module_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "lakeproxy.demo", None)  # import fails
    assert cli.main(["demo"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lakeproxy: lakeproxy.demo.run_demo is not available")
    assert err.count("\n") == 1


@pytest.mark.usefixtures("good_env")
def test_keyboard_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    async def serve(config: Config) -> int:
        raise KeyboardInterrupt

    fake_module(monkeypatch, "lakeproxy.app", serve=serve)
    assert cli.main(["run"]) == 130


# --------------------------------------------------------------------------
# token, against the fake workspace API


@pytest.fixture
async def workspace() -> AsyncIterator[FakeWorkspace]:
    ws = FakeWorkspace(
        client_id="cli-client", client_secret="cli-secret-value", endpoint_name=ENDPOINT,
        instance_name="inst", endpoint_host="ep.example.com",
    )
    await ws.start()
    try:
        yield ws
    finally:
        await ws.stop()


async def test_token_prints_only_the_credential(tmp_path: Path, workspace: FakeWorkspace) -> None:
    env = clean_env(
        tmp_path, DATABRICKS_HOST=workspace.url, DATABRICKS_CLIENT_ID="cli-client",
        DATABRICKS_CLIENT_SECRET="cli-secret-value", ENDPOINT_NAME=ENDPOINT,
    )
    code, out, err = await run_cli_async(["token"], env)
    assert code == 0, err
    assert out.endswith("\n")
    assert out.count("\n") == 1
    assert workspace.is_valid_credential("cli-client", out.strip())
    assert out.strip() not in err


async def test_token_refused_is_one_line_exit_1(
    tmp_path: Path, workspace: FakeWorkspace
) -> None:
    env = clean_env(
        tmp_path, DATABRICKS_HOST=workspace.url, DATABRICKS_CLIENT_ID="cli-client",
        DATABRICKS_CLIENT_SECRET="wrong-secret-value", ENDPOINT_NAME=ENDPOINT,
        LAKEPROXY_CONNECT_DEADLINE="5s",
    )
    code, out, err = await run_cli_async(["token"], env)
    assert code == 1
    assert out == ""
    last = err.splitlines()[-1]  # after the auth module's log lines
    assert last.startswith("lakeproxy: ")
    assert "invalid_client" in last
    assert "Traceback" not in err
    assert "wrong-secret-value" not in err


# --------------------------------------------------------------------------
# wait, against a small /readyz server


class ReadyServer:
    """/readyz answers 503 ``not_ready`` times, then 200."""

    def __init__(self, not_ready: int) -> None:
        self.not_ready = not_ready
        self.calls = 0
        self.port = 0
        self.runner: web.AppRunner | None = None

    async def readyz(self, request: web.Request) -> web.Response:
        self.calls += 1
        if self.calls <= self.not_ready:
            return web.json_response({"reason": "no credential yet"}, status=503)
        return web.json_response({"status": "ready"})

    async def __aenter__(self) -> ReadyServer:
        app = web.Application()
        app.router.add_get("/readyz", self.readyz)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def test_wait_ready_after_503s() -> None:
    async with asyncio.timeout(20), ReadyServer(not_ready=3) as server:
        ok, last = await cli.wait_ready("0.0.0.0", server.port, 10, interval=0.01)
    assert (ok, last) == (True, "")
    assert server.calls == 4


async def test_wait_ready_times_out_with_last_answer() -> None:
    async with asyncio.timeout(20), ReadyServer(not_ready=10**6) as server:
        ok, last = await cli.wait_ready("127.0.0.1", server.port, 0.3, interval=0.05)
    assert not ok
    assert last == 'HTTP 503 {"reason": "no credential yet"}'


async def test_wait_ready_nothing_listening() -> None:
    async with asyncio.timeout(20):
        ok, last = await cli.wait_ready("127.0.0.1", 1, 0.2, interval=0.05)
    assert not ok
    assert "ClientConnectorError" in last


async def test_wait_command(tmp_path: Path) -> None:
    async with ReadyServer(not_ready=2) as server:
        code, out, err = await run_cli_async(
            ["wait", "--admin", f"127.0.0.1:{server.port}", "--timeout", "20s"], clean_env(tmp_path)
        )
        assert (code, out, err) == (0, "", "")
        code, out, err = await run_cli_async(
            ["wait", "--timeout", "1"],
            clean_env(tmp_path, LAKEPROXY_ADMIN_LISTEN=f"127.0.0.1:{server.port}"),
        )
        assert (code, out, err) == (0, "", "")
    server2 = ReadyServer(not_ready=10**6)
    async with server2:
        code, out, err = await run_cli_async(
            ["wait", "--admin", f"127.0.0.1:{server2.port}", "--timeout", "500ms"],
            clean_env(tmp_path),
        )
    assert code == 1
    assert err == (
        'lakeproxy: not ready after 0.5s: HTTP 503 {"reason": "no credential yet"}\n'
    )


# --------------------------------------------------------------------------
# emulator (with a fake emulator: the real one is tested with the emulator)


class FakeEmulator:
    def __init__(self) -> None:
        self.started = False
        self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    def env(self) -> dict[str, str]:
        return {"DATABRICKS_HOST": "http://127.0.0.1:1234", "PGSSLROOTCERT": "/tmp/a b/ca.pem"}


async def test_serve_emulator_prints_exports_until_sigterm() -> None:
    emulator, out = FakeEmulator(), io.StringIO()
    task = asyncio.create_task(cli.serve_emulator(emulator, out))
    async with asyncio.timeout(10):
        while "PGSSLROOTCERT" not in out.getvalue():
            await asyncio.sleep(0.01)
        assert not task.done()
        os.kill(os.getpid(), signal.SIGTERM)
        assert await task == 0
    assert emulator.started
    assert emulator.stopped
    assert out.getvalue() == (
        "export DATABRICKS_HOST=http://127.0.0.1:1234\n"
        "export PGSSLROOTCERT='/tmp/a b/ca.pem'\n"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://127.0.0.1:9090", ("127.0.0.1", 9090)),
        ("http://127.0.0.1:9090/", ("127.0.0.1", 9090)),
        ("http://localhost:9090/readyz", ("localhost", 9090)),
        ("http://[::1]:9090", ("::1", 9090)),
    ],
)
def test_wait_admin_accepts_a_url(text: str, expected: tuple[str, int]) -> None:
    assert cli.parse_admin_url(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("https://127.0.0.1:9090", "the admin server speaks plain HTTP"),
        ("http://127.0.0.1", "needs a host and a port"),
        ("http://127.0.0.1:9090/metrics", "lakeproxy wait asks /readyz itself"),
        ("http://127.0.0.1:99999", "must be http://HOST:PORT or HOST:PORT"),
    ],
)
def test_wait_admin_bad_url(
    text: str, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["wait", "--admin", text, "--timeout", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lakeproxy: --admin={text} (command line): ")
    assert reason in err
    assert err.count("\n") == 1


def test_wait_admin_url_polls_it(capsys: pytest.CaptureFixture[str]) -> None:
    """A URL is polled like HOST:PORT (here nothing listens: exit 1, not 2)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli.main(["wait", "--admin", f"http://127.0.0.1:{port}", "--timeout", "0.3"]) == 1
    assert capsys.readouterr().err.startswith("lakeproxy: not ready after 0.3s")
