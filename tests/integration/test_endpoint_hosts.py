"""Lakebase as it is deployed (SPEC "Endpoint hosts"): host kinds, provisioned
instances, endpoint and instance state, against the emulator.

The emulator serves the endpoint's four hosts and the instance's two, each its
own SNI name on one front door; the read-only ones reach a real hot standby of
the primary (pg_basebackup -R, streaming), started on the first read-only login.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path

import aiohttp
import pytest

from lakeproxy.emulator import Emulator
from lakeproxy.emulator.api import (
    DATABASE_CREDENTIALS_PATH,
    INSTANCES_PREFIX,
    POSTGRES_CREDENTIALS_PATH,
    POSTGRES_PREFIX,
)
from lakeproxy.wire.codec import ErrorResponse

from .conftest import ProxyFactory
from .proxy_process import psql, running
from .proxy_rig import CLIENT_USER, DATABASE, RawClient, eventually, startup_bytes

T = 60
#: field of status.hosts (or of the instance) each kind uses
ENDPOINT_FIELD = {"read_write": "host", "read_only": "read_only_host",
                  "pooled": "read_write_pooled_host",
                  "read_only_pooled": "read_only_pooled_host"}


def _lookup_env(emulator: Emulator, **extra: str) -> dict[str, str]:
    """The emulator's environment with no LAKEBASE_HOST: the host is looked up."""
    env = {k: v for k, v in emulator.env().items() if k != "LAKEBASE_HOST"}
    return {**env, **extra}


def _instance_env(emulator: Emulator, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in _lookup_env(emulator).items() if k != "ENDPOINT_NAME"}
    return {**env, "LAKEBASE_INSTANCE": emulator.instance_name, **extra}


async def _login_error(port: int) -> ErrorResponse:
    """Log in by hand; return the ErrorResponse the proxy answers with."""
    client = await RawClient.open(port)
    try:
        client.send(_startup())
        msg = await client.read_message()
        assert isinstance(msg, ErrorResponse), msg
        return msg
    finally:
        await client.close()


def _startup() -> bytes:
    return startup_bytes({"user": CLIENT_USER, "database": DATABASE})


# --------------------------------------------------------------------------- host kinds


@pytest.mark.parametrize("kind", ["read_write", "read_only", "pooled", "read_only_pooled"])
async def test_each_host_kind_through_psql(
    emulator: Emulator, proxy: ProxyFactory, kind: str
) -> None:
    """LAKEBASE_HOST_KIND picks the host from status.hosts; the read-only kinds
    reach the standby (in recovery), the others the primary."""
    async with asyncio.timeout(T):
        p = await proxy(_lookup_env(emulator, LAKEBASE_HOST_KIND=kind))
        out = await p.psql("SELECT pg_is_in_recovery(), current_user")
    recovery = "t" if kind.startswith("read_only") else "f"
    assert out == f"{recovery}|{emulator.role}\n"
    expected = emulator.hosts[ENDPOINT_FIELD[kind]]
    assert f" at {expected}:" in p.runtime.dialers[0].describe()
    assert emulator.workspace.calls[POSTGRES_PREFIX + emulator.endpoint_name] == 1


async def test_read_only_refuses_writes_and_sees_replicated_rows(
    emulator: Emulator, proxy: ProxyFactory
) -> None:
    table = f"hosts_{uuid.uuid4().hex[:12]}"
    async with asyncio.timeout(T):
        rw = await proxy(_lookup_env(emulator))
        ro = await proxy(_lookup_env(emulator, LAKEBASE_HOST_KIND="read_only"))
        create = f"CREATE TABLE {table} (v text); INSERT INTO {table} VALUES ('from-rw')"  # noqa: S608
        await rw.psql(create)

        async def replicated() -> bool:
            code, out, _ = await ro.run_psql(f"SELECT v FROM {table}")  # noqa: S608
            return code == 0 and out == "from-rw\n"

        await eventually(replicated, timeout=30)
        code, _, err = await ro.run_psql(f"INSERT INTO {table} VALUES ('from-ro')")  # noqa: S608
        assert code != 0
        assert "cannot execute INSERT in a read-only transaction" in err
        await rw.psql(f"DROP TABLE {table}")


async def test_two_listeners_read_write_and_read_only_from_one_toml(
    emulator: Emulator, tmp_path: Path
) -> None:
    """The common setup: the application on one port, BI tools read-only on
    another; one identity, one process, one file."""
    common = (f'name = "{emulator.endpoint_name}"\nhostaddr = "127.0.0.1"\n'
              f'port = {emulator.port}\nuser = "{emulator.role}"\n'
              f'sslrootcert = "{emulator.ca_file}"\n')
    config = tmp_path / "lakeproxy.toml"
    config.write_text(
        "[databricks]\n"
        f'host = "{emulator.workspace.url}"\n'
        f'client_id = "{emulator.client_id}"\n'
        "\n[[endpoints]]\n" + common + 'listen = "127.0.0.1:0"\n'
        "\n[[endpoints]]\n" + common + 'host_kind = "read_only"\nlisten = "127.0.0.1:0"\n'
    )
    env = {"DATABRICKS_CLIENT_SECRET": emulator.client_secret, "LAKEPROXY_CONFIG": str(config)}
    async with asyncio.timeout(T), running(env) as p:
        assert len(p.listen) == 2
        for i, recovery in ((0, "f"), (1, "t")):
            code, out, err = await psql(f"host=127.0.0.1 port={p.tcp_port(i)} dbname={DATABASE}",
                                        "SELECT pg_is_in_recovery()")
            assert (code, out) == (0, f"{recovery}\n"), err
        code, _, err = await psql(f"host=127.0.0.1 port={p.tcp_port(1)} dbname={DATABASE}",
                                  "CREATE TABLE must_not_exist (x int)")
        assert code != 0
        assert "cannot execute CREATE TABLE in a read-only transaction" in err
    assert emulator.client_secret not in p.output


async def test_explicit_host_wins_over_the_kind(
    emulator: Emulator, proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async with asyncio.timeout(T):
        p = await proxy(emulator, LAKEBASE_HOST_KIND="read_only")
        assert await p.psql("SELECT pg_is_in_recovery()") == "f\n"
    warnings = [r for r in caplog.records if "host_kind=read_only is ignored" in r.message]
    assert len(warnings) == 1
    assert emulator.workspace.calls[POSTGRES_PREFIX + emulator.endpoint_name] == 0


async def test_kind_the_endpoint_does_not_report_fails_with_a_hint(
    emulator: Emulator, proxy: ProxyFactory
) -> None:
    emulator.workspace.readable_secondaries = False
    async with asyncio.timeout(T):
        p = await proxy(_lookup_env(emulator, LAKEBASE_HOST_KIND="read_only"),
                        LAKEPROXY_CONNECT_DEADLINE="60")
        err = await _login_error(p.port)
    assert err.sqlstate == "08006"
    assert err.message.startswith("lakeproxy:")
    assert "no read_only_host" in err.message
    assert "readable secondaries" in err.get("H")
    assert emulator.frontdoor.connections == 0


# --------------------------------------------------------------------------- state


async def test_disabled_endpoint_fails_at_once_with_a_hint(
    emulator: Emulator, proxy: ProxyFactory
) -> None:
    """spec.disabled: 08006 and what to do, without a dial or a retry loop (the
    deadline is 60 s; the test's own limit is shorter)."""
    emulator.workspace.set_disabled(True)
    async with asyncio.timeout(30):
        p = await proxy(_lookup_env(emulator), LAKEPROXY_CONNECT_DEADLINE="60")
        err = await _login_error(p.port)
    assert err.sqlstate == "08006"
    assert "disabled" in err.message
    assert "spec.disabled=false" in err.get("H")
    assert emulator.frontdoor.connections == 0
    assert emulator.workspace.calls[POSTGRES_PREFIX + emulator.endpoint_name] == 1


async def test_disabled_endpoint_with_explicit_host_stops_retrying_after_a_state_read(
    emulator: Emulator, proxy: ProxyFactory
) -> None:
    """With LAKEBASE_HOST set the state is not read up front; the first failed dial reads
    it, and a disabled endpoint ends the retries there."""
    emulator.workspace.set_disabled(True)
    async with asyncio.timeout(30):
        p = await proxy(emulator, LAKEPROXY_CONNECT_DEADLINE="60")
        err = await _login_error(p.port)
    assert err.sqlstate == "08006"
    assert "spec.disabled=false" in err.get("H")
    assert emulator.frontdoor.connections >= 1
    assert emulator.workspace.calls[POSTGRES_PREFIX + emulator.endpoint_name] == 1


async def test_idle_endpoint_is_dialed_and_woken(
    make_emulator: object, proxy: ProxyFactory
) -> None:
    emu: Emulator = await make_emulator(wake_time=0.5)  # type: ignore[operator]
    await emu.frontdoor.suspend()
    assert emu.workspace.endpoint_object()["status"]["current_state"] == "IDLE"  # type: ignore[index]
    async with asyncio.timeout(T):
        p = await proxy(_lookup_env(emu))
        assert await p.psql("SELECT 1") == "1\n"
    assert emu.frontdoor.wakes == 1
    assert emu.workspace.endpoint_object()["status"]["current_state"] == "ACTIVE"  # type: ignore[index]


# --------------------------------------------------------------------------- provisioned


@pytest.mark.parametrize(("kind", "recovery"), [("read_write", "f"), ("read_only", "t")])
async def test_provisioned_instance_host_is_looked_up(
    emulator: Emulator, proxy: ProxyFactory, kind: str, recovery: str
) -> None:
    async with asyncio.timeout(T):
        p = await proxy(_instance_env(emulator, LAKEBASE_HOST_KIND=kind))
        assert await p.psql("SELECT pg_is_in_recovery()") == f"{recovery}\n"
    field = "read_write_dns" if kind == "read_write" else "read_only_dns"
    assert f" at {emulator.instance_hosts[field]}:" in p.runtime.dialers[0].describe()
    calls = emulator.workspace.calls
    assert calls[INSTANCES_PREFIX + emulator.instance_name] == 1
    assert calls[DATABASE_CREDENTIALS_PATH] >= 1
    assert calls[POSTGRES_CREDENTIALS_PATH] == 0


@pytest.mark.parametrize(("state", "needle", "hint"), [
    ("STOPPED", "stopped", "start the instance"),
    ("DELETING", "being deleted", "another one"),
])
async def test_stopped_or_deleting_instance_fails_at_once(
    emulator: Emulator, proxy: ProxyFactory, state: str, needle: str, hint: str
) -> None:
    emulator.workspace.set_instance_state(state)
    async with asyncio.timeout(30):
        p = await proxy(_instance_env(emulator), LAKEPROXY_CONNECT_DEADLINE="60")
        err = await _login_error(p.port)
    assert err.sqlstate == "08006"
    assert needle in err.message
    assert hint in err.get("H")
    assert emulator.frontdoor.connections == 0


async def test_starting_instance_is_served_once_available(
    emulator: Emulator, proxy: ProxyFactory
) -> None:
    """STARTING: dials get 57P03 and are retried within the deadline until the
    instance is AVAILABLE."""
    async with asyncio.timeout(T):
        p = await proxy(_instance_env(emulator), LAKEPROXY_CONNECT_DEADLINE="30")
        emulator.workspace.start_instance(after=1.5)
        assert await p.psql("SELECT current_user") == f"{emulator.role}\n"
    assert emulator.workspace.instance_state == "AVAILABLE"
    assert emulator.frontdoor.connections >= 2  # refused while starting, then served


async def test_instance_stopped_while_dials_fail_ends_the_retries(
    emulator: Emulator, proxy: ProxyFactory
) -> None:
    """Looked up while STARTING; stopped meanwhile: the re-read (at most every
    5 s) turns the retries into 08006 long before the 60 s deadline."""
    emulator.workspace.set_instance_state("STARTING")
    async with asyncio.timeout(30):
        p = await proxy(_instance_env(emulator), LAKEPROXY_CONNECT_DEADLINE="60")
        login = asyncio.ensure_future(_login_error(p.port))

        async def dialed() -> bool:
            return emulator.frontdoor.connections >= 1

        await eventually(dialed, timeout=20)
        emulator.workspace.set_instance_state("STOPPED")
        err = await login
    assert err.sqlstate == "08006"
    assert "start the instance" in err.get("H")
    assert emulator.workspace.calls[INSTANCES_PREFIX + emulator.instance_name] >= 2


# --------------------------------------------------------------------------- the emulator's API


async def test_emulator_control_api_switches_disabled_and_instance_state(
    emulator: Emulator
) -> None:
    ws = emulator.workspace
    async with aiohttp.ClientSession() as s:
        r = await s.post(ws.url + "/oidc/v1/token",
                         data={"grant_type": "client_credentials", "scope": "all-apis",
                               "client_id": emulator.client_id,
                               "client_secret": emulator.client_secret})
        auth = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
        ep_url = f"{ws.url}{POSTGRES_PREFIX}{emulator.endpoint_name}"
        r = await s.patch(ep_url, params={"update_mask": "spec.disabled"},
                          json={"spec": {"disabled": True}}, headers=auth)
        assert r.status == 200, await r.text()
        body = await (await s.get(ep_url, headers=auth)).json()
        assert body["spec"]["disabled"] is True
        assert body["status"]["disabled"] is True

        async def idle() -> bool:
            got = await (await s.get(ep_url, headers=auth)).json()
            return bool(got["status"]["current_state"] == "IDLE")

        await eventually(idle, timeout=10)  # disabling suspends the compute

        inst_url = f"{ws.url}{INSTANCES_PREFIX}{emulator.instance_name}"
        body = await (await s.get(inst_url, headers=auth)).json()
        assert body["state"] == "AVAILABLE"
        assert body["read_write_dns"] == emulator.instance_hosts["read_write_dns"]
        assert body["read_only_dns"] == emulator.instance_hosts["read_only_dns"]
        r = await s.patch(inst_url, json={"stopped": True}, headers=auth)
        assert (await r.json())["state"] == "STOPPED"
        ws.instance_start_time = 0.2
        r = await s.patch(inst_url, json={"stopped": False}, headers=auth)
        assert (await r.json())["state"] == "STARTING"

        async def available() -> bool:
            got = await (await s.get(inst_url, headers=auth)).json()
            return bool(got["state"] == "AVAILABLE")

        await eventually(available, timeout=10)


# --------------------------------------------------------------------------- check


async def _check(env: Mapping[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lakeproxy", "check", env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_check_prints_state_and_every_host_marking_the_one_in_use(
    emulator: Emulator
) -> None:
    code, out, err = await _check(_lookup_env(emulator, LAKEBASE_HOST_KIND="read_only"))
    assert code == 0, out + err
    assert "endpoint state: ACTIVE" in out
    lines = out.splitlines()
    for field, host in emulator.hosts.items():
        (line,) = [ln for ln in lines if ln.strip(" *").startswith(field + " ")]
        assert host in line
        assert line.startswith("     * ") == (field == "read_only_host"), line
    assert "(in use)" in [ln for ln in lines if emulator.hosts["read_only_host"] in ln][-1]
    assert emulator.client_secret not in out + err


async def test_check_on_a_stopped_instance_fails_with_state_and_fix(emulator: Emulator) -> None:
    emulator.workspace.set_instance_state("STOPPED")
    code, out, _ = await _check(_instance_env(emulator))
    assert code == 1
    assert "[FAIL] endpoint host lookup" in out
    assert "fix: start the instance" in out
    assert "instance state: STOPPED" in out
    assert emulator.instance_hosts["read_write_dns"] in out
