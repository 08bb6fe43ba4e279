"""File descriptors: the limit at start-up, /readyz and accept past the limit
(issue #10, findings 6 and 2).

A real ``lakeproxy run`` under ``prlimit`` (a low open-files limit for that
process only): start-up raises the soft limit to the hard one and says what it
allows; running out of descriptors turns /readyz 503; and a client that cannot
be accepted for lack of them gets a 53300 ErrorResponse, is logged and counted,
instead of a bare EOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from pathlib import Path

import pytest

from lakeproxy.emulator import Emulator
from lakeproxy.wire.codec import ErrorResponse

from .proxy_process import ProxyProcess, running
from .proxy_rig import RawClient

T = 120

pytestmark = pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit is not installed")


def _env(emu: Emulator, **extra: str) -> dict[str, str]:
    return {**emu.env(), "LAKEPROXY_LISTEN": "127.0.0.1:0",
            "LAKEPROXY_ADMIN_LISTEN": "127.0.0.1:0", **extra}


def _limits(p: ProxyProcess) -> tuple[int, int]:
    """(soft, hard) open-files limit of the running process, from /proc."""
    text = Path(f"/proc/{p.proc.pid}/limits").read_text()
    m = re.search(r"Max open files\s+(\d+)\s+(\d+)", text)
    assert m is not None, text
    return int(m.group(1)), int(m.group(2))


async def test_startup_raises_the_soft_limit_and_says_what_it_allows(emulator: Emulator) -> None:
    prefix = ("prlimit", "--nofile=256:1024", "--")
    async with asyncio.timeout(T), running(_env(emulator), prefix=prefix) as p:
        assert _limits(p) == (1024, 1024)
        line = await p.wait_for_line("open files limit")
        # (1024 - 128 reserved) // 3 per client
        assert "open files limit 1024 (hard 1024, raised from 256): room for max_clients 298 " \
               "(configured 1000)" in line
        warning = await p.wait_for_line("leaves room for")
        assert "WARNING" in warning
        assert "LAKEPROXY_MAX_CLIENTS is 1000" in warning

    env = _env(emulator, LAKEPROXY_MAX_CLIENTS="100")
    async with asyncio.timeout(T), running(env, prefix=prefix) as p:
        await p.wait_for_line("open files limit 1024")
        await p.wait_ready()
        assert p.lines_matching("leaves room for") == []


async def _refused_or_idle(port: int) -> tuple[RawClient, ErrorResponse | None]:
    """Connect; an ErrorResponse the proxy sends at once, or None (accepted, waiting
    for the startup packet)."""
    client = await RawClient.open(port)
    with contextlib.suppress(TimeoutError):
        msg = await asyncio.wait_for(client.read_message(), 1.0)
        assert isinstance(msg, ErrorResponse), msg
        return client, msg
    return client, None


async def test_out_of_descriptors_readyz_503_and_accept_refused_with_53300(
    emulator: Emulator,
) -> None:
    prefix = ("prlimit", "--nofile=100:100", "--")
    env = _env(emulator, LAKEPROXY_LOGIN_TIMEOUT="300")
    async with asyncio.timeout(T), running(env, prefix=prefix) as p:
        await p.wait_ready()
        port = p.tcp_port()
        idle: list[RawClient] = []
        try:
            # Sockets that never send a startup, one descriptor each in the proxy,
            # until the proxy says it is out of them (it still answers /readyz).
            while True:
                assert len(idle) < 100, "never reported out of file descriptors"
                idle.append(await RawClient.open(port))
                status, reason = await p.readyz()
                if status == 503:
                    assert reason == "out of file descriptors"
                    break
                assert status == 200

            # Past the limit: a refusal with a reason, not a bare EOF.
            refusal = None
            for _ in range(30):
                client, refusal = await _refused_or_idle(port)
                idle.append(client)
                if refusal is not None:
                    break
            assert refusal is not None, "no connection was refused"
            assert refusal.get("C") == "53300"
            assert "out of file descriptors" in refusal.get("M")
            await p.wait_for_line(r"refused \d+ connection\(s\): out of file descriptors")
        finally:
            for c in idle:
                c.writer.close()

        # Descriptors back: ready again, and the refusal was counted.
        for _ in range(200):
            with contextlib.suppress(Exception):
                if (await p.readyz())[0] == 200:
                    break
            await asyncio.sleep(0.1)
        assert await p.readyz() == (200, "ready")
        _, text = await p.get("/metrics")
        m = re.search(r"^lakeproxy_accept_fd_exhausted_total (\S+)$", text, re.M)
        assert m is not None
        assert float(m.group(1)) >= 1
