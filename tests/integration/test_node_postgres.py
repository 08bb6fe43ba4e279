"""node-postgres (the ``pg`` package on npm) through the proxy.

``pg`` comes from ``tests/clients/node`` (its lockfile; ``.ci/run`` installs
it with ``npm ci``); when it is not installed yet the fixture runs that
``npm ci`` itself (the npm registry is reachable from the test machines). The
tests skip, saying why, only when node or npm is missing or the install fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lakeproxy.emulator import Emulator, PgCluster

from .conftest import ProxyFactory
from .proxy_process import REPO, base_env

NODE_DIR = REPO / "tests" / "clients" / "node"

#: ``client.connect(); client.end();`` without awaiting either, as an application
#: that gives up at once does. node-postgres then writes Terminate before its
#: startup packet; an ErrorResponse from the server rejects connect() (and is
#: emitted as 'error'), which ends the process with a non-zero status.
CONNECT_THEN_END = """
const { Client } = require('pg');
const client = new Client(JSON.parse(process.argv[1]));
client.connect();
client.end();
"""


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """``tests/clients/node/node_modules`` with ``pg`` in it (``npm ci`` once)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed to run node-postgres")
    modules = NODE_DIR / "node_modules"
    if not (modules / "pg" / "package.json").is_file():
        try:
            subprocess.run(
                [npm, "ci", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund",
                 "--loglevel=error"],
                check=True, capture_output=True, timeout=300,
                env={**os.environ, "npm_config_update_notifier": "false"},
            )
        except (subprocess.SubprocessError, OSError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            pytest.skip(f"npm ci --prefix {NODE_DIR} failed: {exc} {detail.decode()[-500:]}")
    return modules


async def _node(modules: Path, script: str, options: dict[str, object]) -> tuple[int, str]:
    """Run ``script`` with node (``pg`` importable); returns (exit status, output)."""
    node = shutil.which("node")
    assert node is not None
    proc = await asyncio.create_subprocess_exec(
        node, "-e", script, json.dumps(options),
        env=base_env(NODE_PATH=str(modules)), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(30):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_connect_then_end_directly_exits_0(node_modules: Path, pg_cluster: PgCluster) -> None:
    """The rig: against PostgreSQL itself the script exits 0."""
    code, out = await _node(node_modules, CONNECT_THEN_END, {
        "host": pg_cluster.host, "port": pg_cluster.port, "user": "postgres",
        "database": "postgres"})
    assert code == 0, out


async def test_connect_then_end_through_the_proxy_exits_0(
    node_modules: Path, emulator: Emulator, proxy: ProxyFactory,
) -> None:
    p = await proxy(emulator)
    code, out = await _node(node_modules, CONNECT_THEN_END, {
        "host": "127.0.0.1", "port": p.port, "user": "someone", "database": p.database})
    assert code == 0, out


async def test_a_query_through_the_proxy(
    node_modules: Path, emulator: Emulator, proxy: ProxyFactory,
) -> None:
    p = await proxy(emulator)
    script = """
const { Client } = require('pg');
(async () => {
  const client = new Client(JSON.parse(process.argv[1]));
  await client.connect();
  const res = await client.query('SELECT current_user AS u, 40 + 2 AS n');
  console.log(JSON.stringify(res.rows[0]));
  await client.end();
})();
"""
    code, out = await _node(node_modules, script, {
        "host": "127.0.0.1", "port": p.port, "user": "someone", "database": p.database})
    assert code == 0, out
    assert json.loads(out.strip().splitlines()[-1]) == {"u": emulator.role, "n": 42}
