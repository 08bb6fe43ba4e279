"""Processes for the soak and backpressure runs, and how to watch them.

* :class:`EmulatorProcess`: the Lakebase emulator (workspace API, TLS front
  door, a PostgreSQL sized for the load) in its own process, started with
  ``python -m benchmarks.soakkit emulator``; answers ``stats`` on stdin.
* :class:`ProxyProcess`: ``python -m lakeproxy run`` in front of it, with an
  admin port; its open fds and RSS are read from /proc.
* :class:`Sampler`: samples a pid's RSS and fd count in the background.

Everything binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp

from benchmarks import procstat
from benchmarks.stack import _client_env
from lakeproxy.emulator.pgcluster import free_port

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024


def open_fds(pid: int) -> int:
    """Open file descriptors of ``pid`` (from /proc/PID/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def tcp_sockets(pid: int, *, listen_port: int, upstream_port: int) -> dict[str, int]:
    """``pid``'s open TCP sockets by role: ``listening``, ``client`` (accepted on
    ``listen_port``), ``upstream`` (to ``upstream_port``) and ``other`` (the
    API's keep-alive connection, the admin server, ...)."""
    inodes: set[str] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    counts = {"listening": 0, "client": 0, "upstream": 0, "other": 0}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
            for line in lines:
                cols = line.split()
                if cols[9] not in inodes:
                    continue
                local = int(cols[1].rsplit(":", 1)[1], 16)
                remote = int(cols[2].rsplit(":", 1)[1], 16)
                if cols[3] == "0A":  # TCP_LISTEN
                    counts["listening"] += 1
                elif local == listen_port:
                    counts["client"] += 1
                elif remote == upstream_port:
                    counts["upstream"] += 1
                else:
                    counts["other"] += 1
    return counts


def raise_nofile(limit: int) -> None:
    """Raise RLIMIT_NOFILE's soft limit to ``limit`` (capped by the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# ----------------------------------------------------------------------------- emulator


@dataclass(slots=True)
class EmulatorInfo:
    env: dict[str, str] = field(repr=False)
    psql: str
    socket_dir: str
    pg_port: int
    role: str


class _Managed:
    """``async with``: :meth:`start` on entry (and :meth:`stop` if that fails),
    :meth:`stop` on exit."""

    async def start(self) -> object:
        raise NotImplementedError

    async def stop(self) -> object:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class EmulatorProcess(_Managed):
    """The emulator in a child process (so its CPU and memory are not the proxy's)."""

    def __init__(
        self, workdir: Path, *, max_connections: int = 1200, credential_lifetime: float = 3600.0
    ) -> None:
        self.workdir = workdir
        self.max_connections = max_connections
        self.credential_lifetime = credential_lifetime
        self.proc: asyncio.subprocess.Process | None = None
        self.info: EmulatorInfo | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> EmulatorInfo:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "emulator.log").open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.soakkit",
            "emulator",
            "--workdir",
            str(self.workdir),
            "--max-connections",
            str(self.max_connections),
            "--credential-lifetime",
            str(self.credential_lifetime),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=ROOT,
            env=_client_env({}),
            preexec_fn=lambda: raise_nofile(65536),
        )
        log.close()
        assert self.proc.stdout is not None
        async with asyncio.timeout(120):
            line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the emulator did not start:\n" + self.log_tail())
        doc = json.loads(line)
        self.info = EmulatorInfo(
            env=doc["env"],
            psql=doc["psql"],
            socket_dir=doc["socket_dir"],
            pg_port=doc["pg_port"],
            role=doc["role"],
        )
        return self.info

    def log_tail(self, nbytes: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "emulator.log").read_bytes()[-nbytes:].decode("utf-8", "replace")
        return ""

    async def stats(self) -> dict[str, int]:
        """Front-door counters: sessions (open now), connections, logins, wakes."""
        assert self.proc is not None
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        async with self._lock:
            self.proc.stdin.write(b"stats\n")
            await self.proc.stdin.drain()
            line = await self.proc.stdout.readline()
        return dict(json.loads(line))

    async def sql(self, query: str) -> str:
        """Run ``query`` as the superuser over the cluster's unix socket."""
        assert self.info is not None
        proc = await asyncio.create_subprocess_exec(
            self.info.psql,
            "-h",
            self.info.socket_dir,
            "-p",
            str(self.info.pg_port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-XAtq",
            "-c",
            query,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"psql failed: {err.decode(errors='replace')}")
        return out.decode().strip()

    async def backends(self) -> int:
        """Client backends of the proxy's role open now."""
        assert self.info is not None
        role = self.info.role.replace("'", "''")
        return int(
            await self.sql(
                "SELECT count(*) FROM pg_stat_activity "  # noqa: S608 - our own role name
                f"WHERE backend_type = 'client backend' AND usename = '{role}'"
            )
        )

    async def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(60):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _serve_emulator(workdir: Path, max_connections: int, lifetime: float) -> None:
    """The child side: start, print one JSON line, answer ``stats``, stop on SIGTERM/EOF."""
    from lakeproxy.emulator import Emulator
    from lakeproxy.emulator.pgcluster import PgCluster

    pg = PgCluster(
        workdir / "pg",
        settings={
            "max_connections": str(max_connections),
            "shared_buffers": "128MB",
            "log_connections": "off",
            "log_disconnections": "off",
            "log_min_messages": "warning",
        },
    )
    await asyncio.to_thread(pg.start)
    emu = Emulator(workdir / "emulator", pg=pg, credential_lifetime=lifetime)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        await emu.start()
        print(
            json.dumps(
                {
                    "env": emu.env(),
                    "psql": str(pg.psql_path),
                    "socket_dir": str(pg.socket_dir),
                    "pg_port": pg.port,
                    "role": emu.role,
                }
            ),
            flush=True,
        )
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

        async def commands() -> None:
            while line := await reader.readline():
                if line.strip() == b"stats":
                    fd = emu.frontdoor
                    print(
                        json.dumps(
                            {
                                "sessions": fd.sessions,
                                "connections": fd.connections,
                                "logins": fd.logins,
                                "wakes": fd.wakes,
                            }
                        ),
                        flush=True,
                    )
            stop.set()

        task = asyncio.ensure_future(commands())
        await stop.wait()
        task.cancel()
    finally:
        await emu.stop()
        await asyncio.to_thread(pg.close)


# ----------------------------------------------------------------------------- proxy


class ProxyProcess(_Managed):
    """``python -m lakeproxy run`` in front of the emulator, with an admin port."""

    def __init__(
        self,
        workdir: Path,
        env: Mapping[str, str],
        *,
        max_clients: int = 2000,
        connect_deadline: float = 60.0,
        log_level: str = "info",
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.admin_port = free_port()
        self.env = _client_env(
            {
                "LAKEPROXY_MAX_CLIENTS": str(max_clients),
                "LAKEPROXY_CONNECT_DEADLINE": str(connect_deadline),
                "LAKEPROXY_SHUTDOWN_GRACE": "5",
                "LAKEPROXY_LOG_LEVEL": log_level,
                **env,  # may override the four above
                "LAKEPROXY_LISTEN": f"127.0.0.1:{self.port}",
                "LAKEPROXY_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}",
            }
        )
        self.proc: asyncio.subprocess.Process | None = None
        self.log = workdir / "lakeproxy.log"
        self.exit_code: int | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "lakeproxy",
                "run",
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=ROOT,
                env=self.env,
                preexec_fn=lambda: raise_nofile(65536),
            )
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as http:
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(
                        f"lakeproxy exited {self.proc.returncode}:\n" + self.log_tail()
                    )
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(f"http://127.0.0.1:{self.admin_port}/readyz") as r:
                        if r.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise RuntimeError("lakeproxy not ready within 60 s:\n" + self.log_tail())
                await asyncio.sleep(0.1)

    def log_tail(self, nbytes: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_bytes()[-nbytes:].decode("utf-8", "replace")
        return ""

    async def metrics(self) -> dict[str, float]:
        """The ``lakeproxy_*`` samples of /metrics, keyed by name{labels}."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{self.admin_port}/metrics") as r,
        ):
            text = await r.text()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("lakeproxy_"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def fds(self) -> int:
        return open_fds(self.pid)

    def sockets(self) -> dict[str, int]:
        """Open TCP sockets by role (see :func:`tcp_sockets`)."""
        return tcp_sockets(
            self.pid, listen_port=self.port,
            upstream_port=int(self.env.get("LAKEBASE_PORT") or self.env.get("PGPORT", "0"))
        )

    def memory(self) -> procstat.Memory:
        return procstat.memory(self.pid)

    async def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM; returns the exit code (None if it had to be killed)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    self.exit_code = await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
                self.exit_code = None
        return self.exit_code


# ----------------------------------------------------------------------------- sampling


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # seconds since the sampler started
    rss: int
    fds: int


class Sampler:
    """Samples RSS and open fds of ``pid`` every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[Sample] = []
        self._task: asyncio.Task[None] | None = None
        self._t0 = time.monotonic()

    def sample(self) -> Sample:
        s = Sample(time.monotonic() - self._t0, procstat.memory(self.pid).rss, open_fds(self.pid))
        self.samples.append(s)
        return s

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.sample()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def peak_rss(self) -> int:
        return max((s.rss for s in self.samples), default=0)

    @property
    def peak_fds(self) -> int:
        return max((s.fds for s in self.samples), default=0)


def workdir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.soakkit emulator ...`` (used by :class:`EmulatorProcess`)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soakkit")
    sub = parser.add_subparsers(dest="command", required=True)
    emu = sub.add_parser("emulator", help="serve the emulator; print its env as one JSON line")
    emu.add_argument("--workdir", type=Path, required=True)
    emu.add_argument("--max-connections", type=int, default=1200)
    emu.add_argument("--credential-lifetime", type=float, default=3600.0)
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(_serve_emulator(args.workdir, args.max_connections, args.credential_lifetime))
    return 0


if __name__ == "__main__":
    sys.exit(main())
