"""``python -m lakeproxy`` as a real subprocess, for the operations tests.

:func:`spawn` starts the command with a clean environment (the given variables
plus PATH), collects its stdout and stderr line by line while it runs, and for
``run`` waits for the start-up line, from which it learns the bound listeners
and the admin port (tests bind port 0). :class:`ProxyProcess` then offers
signals, the admin endpoints and the collected output. The ``proxy_process``
fixture (in this package's conftest) kills whatever a test left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[2]

_STARTUP = re.compile(r"lakeproxy listening on (?P<listen>.+?) for (?P<endpoints>.+?)"
                      r"(?:; admin on (?P<admin>\S+))?$")


class ProcessExited(Exception):
    """The process ended while the test waited for something."""


def base_env(**extra: str) -> dict[str, str]:
    """The minimal environment a subprocess needs (no DATABRICKS_*/LAKEPROXY_* of ours)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8",
           "HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1"}
    env.update(extra)
    return env


def message(line: str) -> str:
    """A log line's message: ``msg`` of a JSON line, else the line itself."""
    if line.startswith("{"):
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict):
                return str(obj.get("msg", ""))
    return line


@dataclass
class ProxyProcess:
    """A running ``python -m lakeproxy ...`` and its output so far."""

    proc: asyncio.subprocess.Process
    args: tuple[str, ...]
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    listen: list[str] = field(default_factory=list)
    admin: str | None = None
    _readers: list[asyncio.Task[None]] = field(default_factory=list)

    # -- output --------------------------------------------------------

    @property
    def output(self) -> str:
        """Everything printed so far, stdout then stderr."""
        return "\n".join(self.stdout + self.stderr)

    def lines_matching(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        return [line for line in self.stderr if rx.search(message(line))]

    async def wait_for_line(self, pattern: str, *, timeout: float = 15.0,
                            after: int = 0) -> str:
        """The first stderr line (from index ``after``) whose message matches ``pattern``.

        Raises TimeoutError, or ProcessExited when the process ends first.
        """
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = after
        while True:
            for line in self.stderr[seen:]:
                if rx.search(message(line)):
                    return line
            seen = max(seen, len(self.stderr))
            if self.proc.returncode is not None:
                await self._drain_readers()
                for line in self.stderr[seen:]:
                    if rx.search(message(line)):
                        return line
                raise ProcessExited(f"exited {self.proc.returncode} before {pattern!r}:\n"
                                    + self.output)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no line matching {pattern!r} in:\n{self.output}")
            await asyncio.sleep(0.02)

    # -- addresses -----------------------------------------------------

    def tcp_port(self, index: int = 0) -> int:
        """Port of the ``index``-th TCP listener from the start-up line."""
        tcp = [a for a in self.listen if not a.startswith("unix:")]
        return int(tcp[index].rsplit(":", 1)[1])

    @property
    def admin_url(self) -> str:
        assert self.admin is not None, "started without LAKEPROXY_ADMIN_LISTEN"
        return f"http://{self.admin}"

    async def get(self, path: str) -> tuple[int, str]:
        """GET ``path`` on the admin server: (status, body)."""
        async with aiohttp.ClientSession() as s, s.get(self.admin_url + path) as r:
            return r.status, await r.text()

    async def readyz(self) -> tuple[int, str]:
        """(status, reason or "ready")."""
        status, body = await self.get("/readyz")
        obj = json.loads(body)
        return status, str(obj.get("reason", obj.get("status")))

    async def wait_ready(self, *, timeout: float = 15.0) -> None:
        """Until /readyz answers 200. Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        last: tuple[int, str] = (0, "")
        while time.monotonic() < deadline:
            last = await self.readyz()
            if last[0] == 200:
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"/readyz still {last}")

    # -- lifecycle -----------------------------------------------------

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 20.0) -> int:
        """The exit status (after the output is fully read). Raises TimeoutError."""
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
        await self._drain_readers()
        return code

    async def stop(self) -> int:
        """SIGTERM, wait; SIGKILL if it does not exit within 20 s."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                return await self.wait(20)
            except TimeoutError:
                self.kill()
        return await self.wait(5)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    async def _drain_readers(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await asyncio.gather(*self._readers, return_exceptions=True)


async def _collect(stream: asyncio.StreamReader, into: list[str]) -> None:
    while line := await stream.readline():
        into.append(line.decode("utf-8", "replace").rstrip("\n"))


async def spawn(env: Mapping[str, str], args: Sequence[str] = ("run",), *,
                wait_started: bool = True, timeout: float = 20.0,
                prefix: Sequence[str] = ()) -> ProxyProcess:
    """Start ``python -m lakeproxy *args`` with ``base_env() | env``.

    ``prefix`` runs it under another command that ends by exec'ing its arguments
    (e.g. ``unshare --net``, ``prlimit``), so signals still reach lakeproxy itself.

    With ``wait_started`` (for ``run``), returns once the start-up line is out,
    with :attr:`ProxyProcess.listen` and :attr:`ProxyProcess.admin` filled in.
    Raises ProcessExited or TimeoutError (the process is killed then).
    """
    full = {**base_env(), **env}
    proc = await asyncio.create_subprocess_exec(
        *prefix, sys.executable, "-m", "lakeproxy", *args, env=full, cwd=REPO,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    p = ProxyProcess(proc, tuple(args))
    assert proc.stdout is not None
    assert proc.stderr is not None
    loop = asyncio.get_running_loop()
    p._readers = [loop.create_task(_collect(proc.stdout, p.stdout)),
                  loop.create_task(_collect(proc.stderr, p.stderr))]
    if not wait_started:
        return p
    try:
        line = await p.wait_for_line(_STARTUP.pattern, timeout=timeout)
    except BaseException:
        p.kill()
        await p.wait(5)
        raise
    m = _STARTUP.search(message(line))
    assert m is not None
    p.listen = [a.strip() for a in m.group("listen").split(", ")]
    p.admin = m.group("admin")
    return p


async def run_cli(env: Mapping[str, str], args: Sequence[str], *,
                  timeout: float = 30.0) -> tuple[int, str, str]:
    """Run ``python -m lakeproxy *args`` to completion: (exit status, stdout, stderr)."""
    p = await spawn(env, args, wait_started=False)
    try:
        code = await p.wait(timeout)
    except TimeoutError:
        p.kill()
        await p.wait(5)
        raise
    return code, "\n".join(p.stdout), "\n".join(p.stderr)


@contextlib.asynccontextmanager
async def running(env: Mapping[str, str], args: Sequence[str] = ("run",), *,
                  wait_started: bool = True, timeout: float = 20.0,
                  prefix: Sequence[str] = ()) -> AsyncIterator[ProxyProcess]:
    """:func:`spawn` for the ``async with`` block; killed at the end if still running."""
    p = await spawn(env, args, wait_started=wait_started, timeout=timeout, prefix=prefix)
    try:
        yield p
    finally:
        if p.proc.returncode is None:
            p.kill()
        await p.wait(10)


PSQL = "/usr/bin/psql"


async def psql(conninfo: str, sql: str, *, password: str | None = None,
               timeout: float = 30.0) -> tuple[int, str, str]:
    """``psql -X -A -t -c sql conninfo`` with a clean environment (PGPASSWORD when
    ``password``): (exit status, stdout, stderr)."""
    env = base_env(PGCONNECT_TIMEOUT=str(int(timeout)))
    if password is not None:
        env["PGPASSWORD"] = password
    proc = await asyncio.create_subprocess_exec(
        PSQL, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql, conninfo,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
