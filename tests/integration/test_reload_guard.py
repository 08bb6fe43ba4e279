"""SIGHUP never leaves a non-loopback listener without client authentication.

A reload keeps the listeners that are open (a new ``listen`` needs a restart),
so the start-up rule (a non-loopback listener needs LAKEPROXY_CLIENT_PASSWORD or
--allow-remote-trust) is checked again against those listeners at every reload.

The non-loopback address is one the test adds to the loopback device of a
network namespace it makes itself (``unshare --net``, root only): lakeproxy runs
inside it and the clients join it with ``nsenter``. No real interface is touched.
The Databricks host is unreachable from there, which does not matter: what is
checked is whether a client must give a password before anything else happens.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from .proxy_process import ProxyProcess, base_env, running

#: An address that exists only on ``lo`` inside the test's own network namespace.
REMOTE = "10.77.0.1"
PSQL = "/usr/bin/psql"
T = 60


def _netns_usable() -> str | None:
    """None when the test can make a network namespace, else why not."""
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        done = subprocess.run(
            ["unshare", "--net", "--", "ip", "addr", "add", f"{REMOTE}/32", "dev", "lo"],
            capture_output=True, timeout=10, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare --net failed: {exc}"
    if done.returncode != 0:
        return ("cannot make a network namespace with an extra loopback address (needs root "
                f"or CAP_SYS_ADMIN): {done.stderr.decode(errors='replace').strip()}")
    return None


_WHY_NOT = _netns_usable()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")

#: Runs lakeproxy in a fresh network namespace whose ``lo`` also has REMOTE.
NETNS = (
    "unshare", "--net", "--", "sh", "-c",
    f'ip link set lo up && ip addr add {REMOTE}/32 dev lo && exec "$0" "$@"',
)


def _env(config: Path) -> dict[str, str]:
    # Nothing answers at DATABRICKS_HOST (the namespace has only lo): a trusted
    # client gets a credential error after the (short) connect deadline.
    return {
        "DATABRICKS_HOST": "http://127.0.0.1:9",
        "DATABRICKS_TOKEN": "not-used-here",
        "ENDPOINT_NAME": "projects/p/branches/b/endpoints/e",
        "PGHOST": "ep.invalid",
        "PGUSER": "app",
        "LAKEPROXY_CONFIG": str(config),
        "LAKEPROXY_CONNECT_DEADLINE": "1",
    }


async def _psql_in(p: ProxyProcess, port: int) -> str:
    """psql, without a password, from inside the proxy's namespace: its stderr."""
    proc = await asyncio.create_subprocess_exec(
        "nsenter", f"--net=/proc/{p.proc.pid}/ns/net", "--",
        PSQL, "-X", "-A", "-t", "-c", "SELECT 1",
        f"host={REMOTE} port={port} user=app dbname=d sslmode=disable connect_timeout=10",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=base_env(),
    )
    _, err = await proc.communicate()
    assert proc.returncode != 0
    return err.decode()


async def _sighup(p: ProxyProcess, expect: str) -> str:
    mark = len(p.stderr)
    p.signal(signal.SIGHUP)
    return await p.wait_for_line(expect, after=mark)


async def test_reload_cannot_drop_the_password_of_an_open_remote_listener(
    tmp_path: Path,
) -> None:
    config = tmp_path / "lakeproxy.toml"
    config.write_text(f'[proxy]\nlisten = "{REMOTE}:0"\nclient_password = "pw-long-enough-1"\n')
    async with asyncio.timeout(T), running(_env(config), prefix=NETNS) as p:
        assert p.listen[0].startswith(f"{REMOTE}:")
        port = p.tcp_port()
        assert "no password supplied" in await _psql_in(p, port)

        # The attack: a loopback listen and no password. The open listener on
        # REMOTE would stay (listen needs a restart) and take the empty auth.
        config.write_text('[proxy]\nlisten = "127.0.0.1:0"\n')
        line = await _sighup(p, "reload failed|configuration reloaded")
        assert "reload failed, keeping the old configuration" in line
        assert f"{REMOTE}:{port}" in line
        assert "LAKEPROXY_CLIENT_PASSWORD" in line
        assert "no password supplied" in await _psql_in(p, port)

        # Keeping the password is a valid reload (the listen change waits for a restart).
        config.write_text('[proxy]\nlisten = "127.0.0.1:0"\nclient_password = "pw-long-enough-2"\n')
        await _sighup(p, "configuration reloaded")
        assert "no password supplied" in await _psql_in(p, port)

        # So is an explicit --allow-remote-trust (in the file, here): the operator's choice.
        config.write_text(f'[proxy]\nlisten = "{REMOTE}:0"\nallow_remote_trust = true\n')
        await _sighup(p, "configuration reloaded")
        err = await _psql_in(p, port)
        assert "no password supplied" not in err
        assert "lakeproxy:" in err  # trusted: on to the (unreachable) credential API
        assert p.proc.returncode is None
    assert "pw-long-enough" not in p.output
