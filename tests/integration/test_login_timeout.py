"""The pre-login phase has one deadline and its own budget (issue #10, finding 5).

LAKEPROXY_LOGIN_TIMEOUT bounds the whole pre-login phase (SSL/GSS negotiation,
startup, client password), whatever the pace of each message; and connections
still in that phase do not count against LAKEPROXY_MAX_CLIENTS, so sockets that
never send their startup cannot lock real clients out (nor turn /readyz 503).
A real ``lakeproxy run`` in front of the emulator, raw sockets for the attacker
and psycopg (libpq) for the real client.
"""

from __future__ import annotations

import asyncio
import contextlib

import psycopg

from lakeproxy.emulator import Emulator
from lakeproxy.wire.codec import (
    AuthenticationSASL,
    AuthenticationSASLContinue,
    SASLInitialResponse,
    StartupMessage,
    encode,
)

from .proxy_process import ProxyProcess, running
from .proxy_rig import RawClient

DB = "databricks_postgres"
T = 90
GSSENC_REQUEST = (8).to_bytes(4, "big") + ((1234 << 16) | 5680).to_bytes(4, "big")
SSL_REQUEST = (8).to_bytes(4, "big") + ((1234 << 16) | 5679).to_bytes(4, "big")


def _env(emu: Emulator, **extra: str) -> dict[str, str]:
    return {**emu.env(), "LAKEPROXY_LISTEN": "127.0.0.1:0",
            "LAKEPROXY_ADMIN_LISTEN": "127.0.0.1:0", **extra}


async def _select_1(p: ProxyProcess, **extra: str) -> object:
    params = " ".join(f"{k}={v}" for k, v in extra.items())
    async with await psycopg.AsyncConnection.connect(
        f"host=127.0.0.1 port={p.tcp_port()} dbname={DB} user=app connect_timeout=10 {params}",
        autocommit=True,
    ) as conn:
        cur = await conn.execute("SELECT 1")
        row = await cur.fetchone()
        assert row is not None
        return row[0]


async def test_sockets_that_never_log_in_do_not_lock_out_real_clients(
    emulator: Emulator,
) -> None:
    n = 3
    async with asyncio.timeout(T), running(_env(emulator, LAKEPROXY_MAX_CLIENTS=str(n))) as p:
        await p.wait_ready()
        port = p.tcp_port()
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(n)]
        # max_clients sockets that sent nothing: no client counts yet.
        assert await p.readyz() == (200, "ready")
        assert await _select_1(p) == 1  # not 53300

        # Three times as many: the pre-login budget (n) closes the oldest.
        idle += [await asyncio.open_connection("127.0.0.1", port) for _ in range(2 * n)]
        assert await _select_1(p) == 1
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(idle[0][0].read(), 10) == b""
        assert await p.readyz() == (200, "ready")

        # Logged-in clients still count against max_clients.
        held = [await psycopg.AsyncConnection.connect(
            f"host=127.0.0.1 port={port} dbname={DB} user=app connect_timeout=10")
            for _ in range(n)]
        assert await p.readyz() == (503, "at the client limit")
        for conn in held:
            await conn.close()
        for _, writer in idle:
            writer.close()
        _, text = await p.get("/metrics")
        assert 'lakeproxy_client_connections_total{outcome="too_many"}' in text
    assert p.lines_matching("connection\\(s\\) still logging in closed")


async def test_a_client_stepping_slowly_is_closed_at_the_login_deadline(
    emulator: Emulator,
) -> None:
    """Each step comes well within the per-message timeout (10 s), but the whole
    pre-login phase may take LAKEPROXY_LOGIN_TIMEOUT (3 s here) and no more."""
    gap = 1.5
    env = _env(emulator, LAKEPROXY_LOGIN_TIMEOUT="3",
               LAKEPROXY_CLIENT_PASSWORD="slow-client-pw-1")
    async with asyncio.timeout(T), running(env) as p:
        client = await RawClient.open(p.tcp_port())
        answers: list[str] = []
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, AssertionError):
            client.send(GSSENC_REQUEST)
            assert await client.read_byte() == b"N"
            answers.append("gssenc")
            await asyncio.sleep(gap)
            client.send(SSL_REQUEST)
            assert await client.read_byte() == b"N"
            answers.append("ssl")
            await asyncio.sleep(gap)
            client.send(encode(StartupMessage(3, 0, {"user": "app", "database": DB})))
            assert isinstance(await client.read_message(), AuthenticationSASL)
            answers.append("sasl")
            await asyncio.sleep(gap)
            client.send(encode(SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=0123456789abcdef")))
            assert isinstance(await client.read_message(), AuthenticationSASLContinue)
            answers.append("sasl-continue")
        # Cut off before the SCRAM exchange could go on.
        assert "sasl-continue" not in answers, answers
        assert await client.read_message() is None
        client.writer.close()
        line = await p.wait_for_line("session end")
        assert "outcome=client_error" in line
        assert "login timeout" in line
        # A client that keeps pace logs in as before.
        assert await _select_1(p, password="slow-client-pw-1") == 1
