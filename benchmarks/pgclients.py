"""The clients that drive the measurements: pgbench, psql COPY and idle sessions."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

PGBENCH: Final = shutil.which("pgbench") or "/usr/bin/pgbench"
PSQL: Final = shutil.which("psql") or "/usr/bin/psql"
PROTOCOL_3_0: Final = 196608


class ClientError(RuntimeError):
    """A client command failed; the message carries its output."""


@dataclass(frozen=True, slots=True)
class PgbenchResult:
    """``tps`` as pgbench reports it, average latency in ms, transactions done."""

    tps: float
    latency_ms: float
    transactions: int


def _run(argv: Sequence[str], env: Mapping[str, str], *, timeout: float, **kw: object) -> str:
    proc = subprocess.run(  # type: ignore[call-overload]
        list(argv),
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kw,
    )
    assert isinstance(proc, subprocess.CompletedProcess)
    if proc.returncode != 0:
        raise ClientError(
            f"{Path(argv[0]).name} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
        )
    out: str = proc.stdout
    return out


def pgbench(
    conninfo: str,
    env: Mapping[str, str],
    *,
    clients: int,
    threads: int,
    seconds: int,
    connect_each: bool = False,
) -> PgbenchResult:
    """Run ``pgbench -S`` (select-only) for ``seconds``; with ``connect_each``
    also ``-C`` (a new connection per transaction).

    Raises ClientError when pgbench fails or its output cannot be read.
    """
    argv = [PGBENCH, "-n", "-S", "-c", str(clients), "-j", str(threads), "-T", str(seconds)]
    if connect_each:
        argv.append("-C")
    out = _run([*argv, conninfo], env, timeout=seconds + 120)
    tps = re.search(r"^tps = ([0-9.]+)", out, re.M)
    lat = re.search(r"^latency average = ([0-9.]+) ms", out, re.M)
    txns = re.search(r"^number of transactions actually processed: (\d+)", out, re.M)
    failed = re.search(r"^number of failed transactions: (\d+)", out, re.M)
    if tps is None or lat is None or txns is None:
        raise ClientError(f"cannot read pgbench output:\n{out}")
    if failed is not None and int(failed.group(1)):
        raise ClientError(f"pgbench had failed transactions:\n{out}")
    return PgbenchResult(float(tps.group(1)), float(lat.group(1)), int(txns.group(1)))


def pgbench_init(conninfo: str, env: Mapping[str, str], *, scale: int) -> None:
    """``pgbench -i -s scale`` (quietly). Raises ClientError on failure."""
    _run([PGBENCH, "-i", "-q", "-s", str(scale), conninfo], env, timeout=1800)


def psql(conninfo: str, env: Mapping[str, str], sql: str) -> str:
    """Run ``sql`` with psql (unaligned, tuples only); return its output."""
    return _run(
        [PSQL, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql, conninfo],
        env,
        timeout=600,
    )


def copy_out(conninfo: str, env: Mapping[str, str], sql: str) -> float:
    """Run ``COPY (...) TO STDOUT`` with psql, output to /dev/null; return seconds
    (wall clock, including psql's connection set-up)."""
    t0 = time.perf_counter()
    with open("/dev/null", "wb") as sink:
        proc = subprocess.run(
            [PSQL, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql, conninfo],
            env=dict(env),
            stdout=sink,
            stderr=subprocess.PIPE,
            timeout=1800,
            check=False,
        )
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise ClientError(f"psql COPY TO STDOUT exited {proc.returncode}: {proc.stderr!r}")
    return elapsed


def copy_in(conninfo: str, env: Mapping[str, str], table: str, data: Path) -> float:
    """``COPY table FROM STDIN`` with psql reading ``data``; return seconds
    (wall clock, including psql's connection set-up)."""
    t0 = time.perf_counter()
    with data.open("rb") as src:
        proc = subprocess.run(
            [PSQL, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", f"COPY {table} FROM STDIN", conninfo],
            env=dict(env),
            stdin=src,
            capture_output=True,
            timeout=1800,
            check=False,
        )
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise ClientError(f"psql COPY FROM STDIN exited {proc.returncode}: {proc.stderr!r}")
    return elapsed


# --------------------------------------------------------------------------
# idle sessions: a minimal protocol-3 client, plaintext, no password


def _startup(user: str, database: str) -> bytes:
    params = b"".join(
        k + b"\0" + v.encode() + b"\0" for k, v in ((b"user", user), (b"database", database))
    )
    body = struct.pack("!i", PROTOCOL_3_0) + params + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def _query(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!i", len(body) + 4) + body


async def _until_ready(reader: asyncio.StreamReader) -> None:
    """Read messages up to ReadyForQuery; raise ClientError on ErrorResponse or
    on a password request."""
    while True:
        header = await reader.readexactly(5)
        kind, length = header[:1], int.from_bytes(header[1:], "big")
        body = await reader.readexactly(length - 4)
        if kind == b"E":
            fields = [f[1:].decode(errors="replace") for f in body.split(b"\0") if f]
            raise ClientError("server error: " + "; ".join(fields))
        if kind == b"R" and int.from_bytes(body[:4], "big") != 0:
            raise ClientError("the server asked for a password")
        if kind == b"Z":
            return


class IdleSessions:
    """Opens ``count`` sessions to ``host:port`` and keeps them idle.

    Each logs in (no TLS, no password), runs ``SELECT 1`` (so a pooler has to
    give it a server connection) and then stays open until :meth:`close`.
    """

    def __init__(self, host: str, port: int, user: str, database: str) -> None:
        self.host, self.port, self.user, self.database = host, port, user, database
        self.writers: list[asyncio.StreamWriter] = []

    async def _open_one(self) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(_startup(self.user, self.database))
            await _until_ready(reader)
            writer.write(_query("SELECT 1"))
            await _until_ready(reader)
        except BaseException:
            writer.close()
            raise
        self.writers.append(writer)

    async def open(self, count: int, *, concurrency: int = 16, timeout: float = 300.0) -> float:
        """Open ``count`` sessions, ``concurrency`` at a time; return seconds taken.

        Raises ClientError (or OSError) when one fails; those already open stay
        open until :meth:`close`.
        """
        sem = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with sem:
                await self._open_one()

        t0 = time.perf_counter()
        async with asyncio.timeout(timeout):
            results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise ClientError(f"{len(errors)} of {count} sessions failed; first: {errors[0]!r}")
        return time.perf_counter() - t0

    async def close(self) -> None:
        """Close every session (Terminate, then the socket)."""
        for w in self.writers:
            with contextlib.suppress(OSError, RuntimeError):
                w.write(b"X\0\0\0\x04")
                w.close()
        for w in self.writers:
            with contextlib.suppress(OSError, ConnectionError):
                await w.wait_closed()
        self.writers.clear()
