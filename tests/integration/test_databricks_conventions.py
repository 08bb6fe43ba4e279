"""What Databricks users already have: ``~/.databrickscfg`` profiles, the endpoint
host looked up from ENDPOINT_NAME, and ``lakeproxy wait`` for sidecars."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

from lakeproxy.emulator import Emulator
from lakeproxy.emulator.api import POSTGRES_CREDENTIALS_PATH, POSTGRES_PREFIX

from .proxy_process import psql, run_cli, running, spawn

DB = "databricks_postgres"
T = 60
#: What Emulator.env() sets that a .databrickscfg profile replaces.
IDENTITY = ("DATABRICKS_HOST", "DATABRICKS_CLIENT_ID", "DATABRICKS_CLIENT_SECRET",
            "LAKEBASE_USER")


def _without(env: dict[str, str], *keys: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in keys}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_cfg(home: Path, emu: Emulator, *, profile: str) -> None:
    (home / ".databrickscfg").write_text(
        "[DEFAULT]\nhost = https://wrong.cloud.databricks.com\ntoken = dapi-not-this-one\n\n"
        f"[{profile}]\n"
        f"host          = {emu.workspace.url}\n"
        f"client_id     = {emu.client_id}\n"
        f"client_secret = {emu.client_secret}\n"
    )


async def test_named_profile_from_home_databrickscfg(emulator: Emulator, tmp_path: Path) -> None:
    _write_cfg(tmp_path, emulator, profile="lakebase-emu")
    env = {**_without(emulator.env(), *IDENTITY), "HOME": str(tmp_path),
           "DATABRICKS_CONFIG_PROFILE": "lakebase-emu", "LAKEPROXY_LISTEN": "127.0.0.1:0"}
    async with asyncio.timeout(T), running(env) as p:
        # The role defaults to the profile's client_id, as with DATABRICKS_CLIENT_ID.
        assert f"as {emulator.role}" in p.lines_matching("lakeproxy listening on")[0]
        code, out, err = await psql(f"host=127.0.0.1 port={p.tcp_port()} dbname={DB}",
                                    "SELECT current_user")
        assert (code, out) == (0, f"{emulator.role}\n"), err
    assert emulator.client_secret not in p.output


async def test_default_profile_and_config_file_variable(
    emulator: Emulator, tmp_path: Path
) -> None:
    """No profile named and no credentials in the environment: [DEFAULT] of
    DATABRICKS_CONFIG_FILE (HOME unused)."""
    cfg = tmp_path / "elsewhere.cfg"
    cfg.write_text(f"[DEFAULT]\nhost = {emulator.workspace.url}\nclient_id = {emulator.client_id}"
                   f"\nclient_secret = {emulator.client_secret}\n")
    env = {**_without(emulator.env(), *IDENTITY), "DATABRICKS_CONFIG_FILE": str(cfg),
           "LAKEPROXY_LISTEN": "127.0.0.1:0"}
    async with asyncio.timeout(T), running(env) as p:
        code, out, err = await psql(f"host=127.0.0.1 port={p.tcp_port()} dbname={DB}",
                                    "SELECT current_user")
        assert (code, out) == (0, f"{emulator.role}\n"), err


async def test_missing_profile_is_one_line(emulator: Emulator, tmp_path: Path) -> None:
    _write_cfg(tmp_path, emulator, profile="other")
    env = {**_without(emulator.env(), *IDENTITY), "HOME": str(tmp_path),
           "DATABRICKS_CONFIG_PROFILE": "nope"}
    code, out, err = await run_cli(env, ["run"])
    assert code == 2
    assert err.count("\n") == 0
    assert "profile [nope] not found" in err
    assert "profiles: DEFAULT, other" in err
    assert emulator.client_secret not in out + err


async def test_host_looked_up_when_pghost_is_unset(emulator: Emulator) -> None:
    """PGHOST unset: GET /api/2.0/postgres/{ENDPOINT_NAME} once; PGHOSTADDR still dialled,
    and TLS verifies the looked-up name (the emulator's certificate is for it)."""
    env = {**_without(emulator.env(), "LAKEBASE_HOST"), "LAKEPROXY_LISTEN": "127.0.0.1:0"}
    assert env["LAKEBASE_HOSTADDR"] == "127.0.0.1"
    lookup = POSTGRES_PREFIX + emulator.endpoint_name
    async with asyncio.timeout(T), running(env) as p:
        assert "(host looked up)" in p.lines_matching("lakeproxy listening on")[0]
        for i in range(3):
            code, out, err = await psql(f"host=127.0.0.1 port={p.tcp_port()} dbname={DB}",
                                        f"SELECT {i}")
            assert (code, out) == (0, f"{i}\n"), err
        line = await p.wait_for_line("host is")
        assert emulator.host in line
    assert emulator.workspace.calls[lookup] == 1
    assert emulator.workspace.calls[POSTGRES_CREDENTIALS_PATH] >= 1


# --------------------------------------------------------------------------- lakeproxy wait


async def test_wait_exits_0_once_ready(emulator: Emulator) -> None:
    admin_port = _free_port()
    env = {**emulator.env(), "LAKEPROXY_LISTEN": "127.0.0.1:0",
           "LAKEPROXY_ADMIN_LISTEN": f"127.0.0.1:{admin_port}"}
    async with asyncio.timeout(T):
        # Started before the proxy, as a compose healthcheck or sidecar would be.
        waiter = await spawn({}, ["wait", "--admin", f"127.0.0.1:{admin_port}",
                                  "--timeout", "30"], wait_started=False)
        await asyncio.sleep(0.5)
        assert waiter.proc.returncode is None
        async with running(env) as p:
            assert await waiter.wait(20) == 0
            assert (await p.readyz())[0] == 200
            # LAKEPROXY_ADMIN_LISTEN is the default address, as in the container.
            code, _, err = await run_cli({"LAKEPROXY_ADMIN_LISTEN": f"127.0.0.1:{admin_port}"},
                                         ["wait", "--timeout", "5"])
            assert code == 0, err


async def test_wait_times_out_non_zero(emulator: Emulator) -> None:
    async with asyncio.timeout(T):
        port = _free_port()  # nothing listens there
        started = time.monotonic()
        code, _, err = await run_cli({}, ["wait", "--admin", f"127.0.0.1:{port}",
                                            "--timeout", "1"])
        assert code == 1
        assert time.monotonic() - started < 10
        assert "not ready after 1s" in err

        # A proxy that answers but is not ready (no credential): the reason is shown.
        emulator.workspace.inject(POSTGRES_CREDENTIALS_PATH, status=403)
        env = {**emulator.env(), "LAKEPROXY_LISTEN": "127.0.0.1:0",
               "LAKEPROXY_ADMIN_LISTEN": "127.0.0.1:0"}
        async with running(env) as p:
            await p.wait_for_line("could not mint a credential")
            code, _, err = await run_cli({}, ["wait", "--admin", str(p.admin),
                                                "--timeout", "1"])
        assert code == 1
        assert "HTTP 503" in err
        assert "no usable credential" in err
