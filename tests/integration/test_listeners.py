"""Listeners of ``lakeproxy run``: unix sockets, IPv6, several endpoints on several ports."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import stat
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lakeproxy.emulator import Emulator
from lakeproxy.emulator.api import DATABASE_CREDENTIALS_PATH, POSTGRES_CREDENTIALS_PATH
from lakeproxy.wire.codec import ErrorResponse, OtherMessage

from .proxy_process import psql, run_cli, running
from .proxy_rig import RawClient, query_bytes

DB = "databricks_postgres"
T = 60


def _env(emu: Emulator, **extra: str) -> dict[str, str]:
    return {**emu.env(), **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


async def _database_when_none_named(port: int) -> str:
    """Log in with a StartupMessage without ``database``; current_database()."""
    client = await RawClient.open(port)
    try:
        await client.login({"user": "app"})
        client.send(query_bytes("SELECT current_database()"))
        while True:
            msg = await client.read_message()
            assert msg is not None
            assert not isinstance(msg, ErrorResponse), msg
            if isinstance(msg, OtherMessage) and msg.tag == b"D":
                # DataRow: int16 column count, then int32 length + bytes per column.
                length = int.from_bytes(msg.body[2:6], "big")
                return msg.body[6 : 6 + length].decode()
    finally:
        await client.close()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory (unix socket paths are limited to ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="lp-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_unix_socket_listener(emulator: Emulator, socket_dir: Path) -> None:
    port = _free_port()  # only names the socket file; nothing binds it on TCP
    env = _env(emulator, LAKEPROXY_LISTEN=f"127.0.0.1:0,unix:{socket_dir}:{port}")
    sock = socket_dir / f".s.PGSQL.{port}"
    async with asyncio.timeout(T), running(env) as p:
        assert p.listen == [p.listen[0], f"unix:{sock}"]
        assert stat.S_ISSOCK(sock.stat().st_mode)

        # What a user types: psql -h /DIR -p PORT.
        code, out, err = await psql(f"host={socket_dir} port={port} dbname={DB}",
                                    "SELECT current_user, current_database()")
        assert (code, out) == (0, f"{emulator.role}|{DB}\n"), err
        code, out, err = await psql(f"host=127.0.0.1 port={p.tcp_port()} dbname={DB}",
                                    "SELECT 1")
        assert (code, out) == (0, "1\n"), err

        await p.wait_for_line("session end client=unix ")
        p.signal(signal.SIGTERM)
        assert await p.wait() == 0
    assert not sock.exists()  # removed on exit


async def test_unix_socket_default_port_and_stale_file(
    emulator: Emulator, socket_dir: Path
) -> None:
    """``unix:/DIR`` means port 6432; a socket file left by a killed run is replaced."""
    stale = socket_dir / ".s.PGSQL.6432"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening: what a crash leaves behind
    env = _env(emulator, LAKEPROXY_LISTEN=f"unix:{socket_dir}")
    async with asyncio.timeout(T), running(env) as p:
        assert p.listen == [f"unix:{stale}"]
        code, out, err = await psql(f"host={socket_dir} port=6432 dbname={DB}", "SELECT 1")
        assert (code, out) == (0, "1\n"), err


async def test_address_in_use_is_one_line_and_exit_1(
    emulator: Emulator, socket_dir: Path
) -> None:
    """A listener that cannot be bound stops start-up with one line, no traceback; a
    live unix socket of another server is never taken over."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = await run_cli(_env(emulator, LAKEPROXY_LISTEN=f"127.0.0.1:{port}"),
                                     ["run"])
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err
    assert "Traceback" not in err

    env = _env(emulator, LAKEPROXY_LISTEN=f"unix:{socket_dir}:7000")
    async with asyncio.timeout(T), running(env) as first:
        code, _, err = await run_cli(env, ["run"])
        assert code == 1
        assert (f"cannot listen on unix:{socket_dir}/.s.PGSQL.7000: another server is "
                "listening there") in err
        assert "Traceback" not in err
        code, out, err = await psql(f"host={socket_dir} port=7000 dbname={DB}", "SELECT 1")
        assert (code, out) == (0, "1\n"), err  # the first one still serves
        assert first.proc.returncode is None


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
async def test_ipv6_listener(emulator: Emulator) -> None:
    env = _env(emulator, LAKEPROXY_LISTEN="[::1]:0")
    async with asyncio.timeout(T), running(env) as p:
        assert p.listen[0].startswith("[::1]:")
        port = p.tcp_port()
        code, out, err = await psql(f"host=::1 port={port} dbname={DB}",
                                    "SELECT inet_client_addr() IS NOT NULL, current_user")
        assert (code, out) == (0, f"t|{emulator.role}\n"), err
        await p.wait_for_line(r"session end client=\[::1\]:\d+ ")
        # Bound to ::1 only: nothing on 127.0.0.1 at that port.
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)


async def test_two_endpoints_on_two_ports(emulator: Emulator, tmp_path: Path) -> None:
    """Two [[endpoints]] in one file, one identity: an autoscaling endpoint and a
    provisioned instance (the emulator serves both from one front door)."""
    common = (f'host = "{emulator.host}"\nhostaddr = "127.0.0.1"\nport = {emulator.port}\n'
              f'user = "{emulator.role}"\nsslrootcert = "{emulator.ca_file}"\n')
    config = tmp_path / "lakeproxy.toml"
    config.write_text(
        "[databricks]\n"
        f'host = "{emulator.workspace.url}"\n'
        f'client_id = "{emulator.client_id}"\n'
        "\n[[endpoints]]\n"
        f'name = "{emulator.endpoint_name}"\n'
        'listen = "127.0.0.1:0"\n' + common +
        "\n[[endpoints]]\n"
        f'instance = "{emulator.instance_name}"\n'
        'listen = "127.0.0.1:0"\n'
        'database = "postgres"\n' + common
    )
    env = {"DATABRICKS_CLIENT_SECRET": emulator.client_secret, "LAKEPROXY_CONFIG": str(config)}
    async with asyncio.timeout(T), running(env) as p:
        assert len(p.listen) == 2
        line = p.lines_matching("lakeproxy listening on")[0]
        assert emulator.endpoint_name in line
        assert emulator.instance_name in line

        # Each listener leads to its own endpoint ...
        for i, dbname in ((0, DB), (1, "postgres")):
            code, out, err = await psql(f"host=127.0.0.1 port={p.tcp_port(i)} dbname={dbname}",
                                        "SELECT current_user, current_database()")
            assert (code, out) == (0, f"{emulator.role}|{dbname}\n"), err
        # ... with its own default database (for a client that names none).
        for i, dbname in ((0, DB), (1, "postgres")):
            assert await _database_when_none_named(p.tcp_port(i)) == dbname
    # One credential API per endpoint kind.
    assert emulator.workspace.calls[POSTGRES_CREDENTIALS_PATH] >= 1
    assert emulator.workspace.calls[DATABASE_CREDENTIALS_PATH] >= 1
    assert emulator.client_secret not in p.output
    assert not os.environ.get("LAKEPROXY_LISTEN")  # the test's own env was not used


# --------------------------------------------------------------------------- adversarial review


async def test_clients_that_reset_at_once_are_logged_with_their_address(
    emulator: Emulator,
) -> None:
    """A TCP client that resets right after connecting is logged with the address
    accept() returned (getpeername() fails once the connection is reset)."""
    env = _env(emulator, LAKEPROXY_LISTEN="127.0.0.1:0")
    async with asyncio.timeout(T), running(env) as p:
        ports: set[int] = set()
        for _ in range(20):
            with socket.socket() as s:
                s.connect(("127.0.0.1", p.tcp_port()))
                ports.add(s.getsockname()[1])
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        deadline = asyncio.get_running_loop().time() + 20
        while len(p.lines_matching("session end")) < 20:
            assert asyncio.get_running_loop().time() < deadline, p.output
            await asyncio.sleep(0.05)
        ends = p.lines_matching("session end")
    assert not [line for line in ends if "client=unix" in line], ends
    logged = {int(m.group(1)) for line in ends
              if (m := re.search(r"client=127\.0\.0\.1:(\d+) ", line))}
    assert logged == ports, ends
