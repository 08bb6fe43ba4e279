"""Session reuse (issue #12): new connections and per-transaction cost, side by side.

Run from the repository root::

    python -m benchmarks.pool            # 3 rounds, ~6 minutes on 2 cores
    python -m benchmarks.pool --quick    # 1 short round

Paths (:class:`benchmarks.stack.Stack`): direct TLS, PgBouncer in session
mode, lakeproxy with ``pool_mode=off`` and lakeproxy with
``pool_mode=session``, all in front of one TLS PostgreSQL. Per round, in a
rotating order:

- ``pgbench -S -C`` (a new connection per transaction) on every path:
  connections/s, and proxy CPU per connection;
- ``pgbench -S -c 8`` on both lakeproxy modes: proxy CPU per transaction
  (session mode walks message headers, off mode is the plain splice).

Then round trips: both lakeproxy modes are restarted behind a relay that
counts, per endpoint connection, the turns of the conversation (bytes from
the endpoint after bytes to it: one round trip each) and, with ``--rtt``,
delays each chunk by half the round trip each way. A client logs in and
ends with Terminate, ``--logins`` times in a row; the relay's counts give
the endpoint round trips a login costs with and without reuse (the TCP
handshake counted as one more per new connection), and the client's
measured login time at the delayed round trip checks the count.

Writes ``results/pool-<date>.md`` and ``.json``. On this shared 2-core machine
absolute figures drift with other work; the ratios pair runs taken back to back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import socket
import statistics
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import describe, markdown
from benchmarks.pgclients import PGBENCH, pgbench, pgbench_init
from benchmarks.procstat import cpu_seconds
from benchmarks.stack import DATABASE, Stack, Target, TargetName, version_of
from lakeproxy.wire.codec import ReadyForQuery, StartupMessage, decode_backend, encode
from lakeproxy.wire.framing import FrameReader

RESULTS_DIR: Final = Path(__file__).resolve().parent / "results"
PATHS: Final[tuple[TargetName, ...]] = ("direct", "pgbouncer", "lakeproxy", "lakeproxy_session")
TERMINATE: Final = b"X\x00\x00\x00\x04"

Results = dict[str, dict[str, list[float]]]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- relay


@dataclass
class _Conn:
    turns: int = 0
    last: str = ""


@dataclass
class CountingRelay:
    """127.0.0.1:port -> target; counts round-trip turns per connection; optional delay."""

    target_port: int
    one_way: float = 0.0
    conns: list[_Conn] = field(default_factory=list)
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.Server | None = None
    _main: asyncio.Task[None] | None = None

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop

            async def main() -> None:
                self._main = asyncio.current_task()
                self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
                self.port = self._server.sockets[0].getsockname()[1]
                ready.set()
                try:
                    await self._server.serve_forever()
                finally:
                    self._server.close()
                    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)

            try:
                loop.run_until_complete(main())
            except asyncio.CancelledError:
                pass
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)

    def stop(self) -> None:
        loop, main = self._loop, self._main
        if loop is not None and main is not None:
            loop.call_soon_threadsafe(main.cancel)
        if self._thread is not None:
            self._thread.join(10)

    def reset(self) -> None:
        self.conns.clear()

    def round_trips(self) -> int:
        """Turns counted so far on every connection, plus one TCP handshake each."""
        return sum(c.turns for c in self.conns) + len(self.conns)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # stop(): end quietly
            await self._relay(reader, writer)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn()
        self.conns.append(conn)
        _nodelay(writer)
        writers = [writer]
        try:
            if self.one_way:
                await asyncio.sleep(2 * self.one_way)  # the TCP handshake's round trip
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    "127.0.0.1", self.target_port)
            except OSError:
                return
            writers.append(up_writer)
            _nodelay(up_writer)
            await asyncio.gather(
                self._pump(reader, up_writer, conn, "to"),
                self._pump(up_reader, writer, conn, "from"),
                return_exceptions=True,
            )
        finally:
            for w in writers:
                w.close()
            for w in writers:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await w.wait_closed()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    conn: _Conn, direction: str) -> None:
        loop = asyncio.get_running_loop()
        while data := await reader.read(65536):
            if direction == "from" and conn.last == "to":
                conn.turns += 1
            conn.last = direction
            if self.one_way:
                loop.call_later(self.one_way, _write, writer, data)
            else:
                writer.write(data)
        if self.one_way:
            await asyncio.sleep(self.one_way)  # what is still delayed goes first
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
    if not writer.is_closing():
        writer.write(data)


async def _login_once(host: str, port: int, role: str, relay: CountingRelay
                      ) -> tuple[float, int]:
    """Log in (plaintext to the proxy), wait for ReadyForQuery, then Terminate.

    Returns the seconds to ReadyForQuery and the endpoint round trips counted
    up to then (a new TCP connection counts one).
    """
    before = relay.round_trips()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(encode(StartupMessage(3, 0, {"user": role, "database": DATABASE,
                                              "application_name": "pool-bench"})))
    frames = FrameReader(tagged=True, max_length=1 << 20)
    while True:
        frame = frames.next_frame()
        if frame is None:
            data = await reader.read(65536)
            if not data:
                raise RuntimeError("closed during login")
            frames.feed(data)
            continue
        if isinstance(decode_backend(frame), ReadyForQuery):
            break
    elapsed = time.perf_counter() - t0
    during = relay.round_trips() - before
    writer.write(TERMINATE)
    await reader.read()
    writer.close()
    await writer.wait_closed()
    return elapsed, during


# ---------------------------------------------------------------------------- bench


class PoolBench:
    def __init__(self, stack: Stack, args: argparse.Namespace) -> None:
        self.stack = stack
        self.args = args
        self.results: Results = defaultdict(lambda: defaultdict(list))
        self.pool_stats: dict[str, float] = {}

    def _cpu(self, t: Target) -> float:
        return cpu_seconds(t.pid) if t.pid is not None else 0.0

    def connect(self, t: Target) -> None:
        cpu0 = self._cpu(t)
        r = pgbench(t.conninfo, self.stack.client_env(t), clients=self.args.connect_clients,
                    threads=min(2, self.args.connect_clients), seconds=self.args.duration,
                    connect_each=True)
        cpu = self._cpu(t) - cpu0
        self.results[t.name]["connect_per_s"].append(r.tps)
        if t.pid is not None:
            self.results[t.name]["connect_cpu_ms"].append(cpu / r.transactions * 1000)
        log(f"  {t.name:17} -C: {r.tps:,.0f} conn/s, cpu {cpu:.2f} s")

    def s8(self, t: Target) -> None:
        cpu0 = self._cpu(t)
        r = pgbench(t.conninfo, self.stack.client_env(t), clients=8, threads=2,
                    seconds=self.args.duration)
        cpu = self._cpu(t) - cpu0
        self.results[t.name]["s8_tps"].append(r.tps)
        self.results[t.name]["s8_cpu_s_per_10k"].append(cpu / r.transactions * 10_000)
        log(f"  {t.name:17} -c 8: {r.tps:,.0f} tps, cpu {cpu:.2f} s")

    def rounds(self) -> None:
        names = [n for n in PATHS if n in self.stack.targets]
        for rnd in range(self.args.rounds):
            k = rnd % len(names)
            order = names[k:] + names[:k]
            log(f"round {rnd + 1}/{self.args.rounds}: {', '.join(order)}")
            for name in order:
                self.connect(self.stack.targets[name])
            # -c 8 pairs the two lakeproxy modes back to back, each first every other round.
            pair = [n for n in names if n.startswith("lakeproxy")]
            for name in pair if rnd % 2 == 0 else pair[::-1]:
                self.s8(self.stack.targets[name])

    def round_trips(self) -> dict[str, dict[str, float]]:
        """Endpoint round trips and login time per login, pool off vs session."""
        cluster = self.stack.cluster
        assert cluster is not None
        out: dict[str, dict[str, float]] = {}
        relay = CountingRelay(cluster.port, one_way=self.args.rtt / 2000)
        relay.start()
        try:
            self.stack.upstream_port = relay.port
            for name in ("lakeproxy", "lakeproxy_session"):
                t = self.stack.restart(name)
                assert t.host is not None
                assert t.port is not None
                relay.reset()
                times: list[float] = []
                waited: list[int] = []
                after_rt: list[int] = []
                for i in range(self.args.logins + 1):
                    before = relay.round_trips()
                    seconds, during = asyncio.run(
                        _login_once(t.host, t.port, self.stack.role, relay))
                    # let the reset (session mode) finish before counting and the next login
                    time.sleep(max(0.2, 6 * self.args.rtt / 1000))
                    if i:  # the first login warms the credential and the pool
                        times.append(seconds)
                        waited.append(during)
                        # after ReadyForQuery: the reset, and a TLS close_notify
                        # answering the Terminate of a fresh session
                        after_rt.append(relay.round_trips() - before - during)
                out[name] = {
                    "login_ms": statistics.median(times) * 1000,
                    "endpoint_round_trips": statistics.median(waited),
                    "round_trips_after": statistics.median(after_rt),
                    "new_endpoint_connections": float(len(relay.conns)),
                }
                log(f"  {name:17} login {out[name]['login_ms']:.1f} ms at {self.args.rtt} ms "
                    f"RTT, {out[name]['endpoint_round_trips']} endpoint round trips per login, "
                    f"{out[name]['round_trips_after']} after it, "
                    f"{len(relay.conns)} endpoint connections")
        finally:
            self.stack.upstream_port = None
            relay.stop()
        return out


def _med(runs: list[float]) -> float:
    return statistics.median(runs)


def _cell(runs: list[float] | None, digits: int) -> str:
    if not runs:
        return "-"
    med = statistics.median(runs)
    if len(runs) == 1:
        return f"{med:,.{digits}f}"
    return f"{med:,.{digits}f} [{min(runs):,.{digits}f}, {max(runs):,.{digits}f}]"


def _pool_metrics(stack: Stack) -> str:
    """The session proxy's pool counters from its log (it has no admin port here)."""
    path = stack.workdir / "lakeproxy_session.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    reused = len(re.findall(r"reused=True", text))
    fresh = len(re.findall(r"reused=False", text))
    parked = len(re.findall(r"endpoint_session=parked", text))
    return f"{reused:,} logins reused, {fresh:,} dialed, {parked:,} sessions parked"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pool", description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--connect-clients", type=int, default=4)
    p.add_argument("--rtt", type=float, default=20.0, help="relay round trip, ms (20)")
    p.add_argument("--logins", type=int, default=10)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--name")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.logins = 1, min(args.duration, 3), 4
    stamp = dt.datetime.now(dt.UTC)
    started = time.perf_counter()
    load0 = os.getloadavg()[0]
    with Stack(PATHS, max_connections=200) as stack:
        direct = stack.targets["direct"]
        pgbench_init(direct.conninfo, stack.client_env(direct), scale=1)
        bench = PoolBench(stack, args)
        bench.rounds()
        pool_line = _pool_metrics(stack)
        rtt = bench.round_trips()
        versions = dict(stack.versions)
    versions["pgbench"] = version_of([PGBENCH, "--version"])
    versions["load average (1 min) at start / end"] = f"{load0:.2f} / {os.getloadavg()[0]:.2f}"
    machine = describe(**versions)
    r = bench.results
    conn = {n: _med(r[n]["connect_per_s"]) for n in PATHS if r[n]["connect_per_s"]}
    ratios = {
        "session_vs_direct_connect": conn["lakeproxy_session"] / conn["direct"],
        "session_vs_pgbouncer_connect": conn["lakeproxy_session"] / conn["pgbouncer"],
        "session_vs_off_connect": conn["lakeproxy_session"] / conn["lakeproxy"],
        "session_cpu_ms_per_connection": _med(r["lakeproxy_session"]["connect_cpu_ms"]),
        "off_cpu_ms_per_connection": _med(r["lakeproxy"]["connect_cpu_ms"]),
        "s8_cpu_per_txn_session_vs_off": (_med(r["lakeproxy_session"]["s8_cpu_s_per_10k"])
                                          / _med(r["lakeproxy"]["s8_cpu_s_per_10k"])),
    }
    paired = [a / b for a, b in zip(r["lakeproxy_session"]["s8_cpu_s_per_10k"],
                                     r["lakeproxy"]["s8_cpu_s_per_10k"], strict=True)]
    fresh_rt = rtt["lakeproxy"]["endpoint_round_trips"]
    reused_rt = rtt["lakeproxy_session"]["endpoint_round_trips"]
    # The reset after a client leaves costs one round trip but runs after the
    # client has gone: a reused login itself waits for none (for one when the
    # session was parked over 5 s and is checked first).
    saved = fresh_rt - reused_rt
    rows = [
        ("pgbench -S -C: connections/s", "connect_per_s", 0),
        ("pgbench -S -C: proxy CPU ms / connection", "connect_cpu_ms", 3),
        ("pgbench -S -c 8: TPS", "s8_tps", 0),
        ("pgbench -S -c 8: proxy CPU s / 10k txn", "s8_cpu_s_per_10k", 3),
    ]
    lines = [
        f"# Session reuse benchmark, {stamp:%Y-%m-%d %H:%M} UTC",
        "",
        f"`python -m benchmarks.pool {' '.join(argv if argv is not None else sys.argv[1:])}`"
        f": {args.rounds} round(s) of {args.duration} s runs, "
        f"-C with {args.connect_clients} clients; "
        f"{(time.perf_counter() - started) / 60:.1f} minutes. Cells: median [min, max].",
        "Shared, noisy 2-core machine: read the ratios (runs paired back to back), not the"
        " absolute figures.",
        "",
        "| metric | " + " | ".join(PATHS) + " |",
        "| --- |" + " --- |" * len(PATHS),
    ]
    for label, key, digits in rows:
        lines.append(f"| {label} | " + " | ".join(_cell(r[n].get(key), digits) for n in PATHS)
                     + " |")
    lines += [
        "",
        f"Session proxy over the whole run: {pool_line}.",
        "",
        "## Ratios (issue #12 targets)",
        "",
        "| what | goal | reached |",
        "| --- | --- | --- |",
        f"| -C connections/s, session ÷ direct TLS | >= 8x | "
        f"{ratios['session_vs_direct_connect']:.2f}x |",
        f"| -C connections/s, session ÷ PgBouncer (session mode) | >= 0.5x | "
        f"{ratios['session_vs_pgbouncer_connect']:.2f}x |",
        f"| -C connections/s, session ÷ off | - | {ratios['session_vs_off_connect']:.2f}x |",
        f"| proxy CPU per reused connection | <= 0.5 ms | "
        f"{ratios['session_cpu_ms_per_connection']:.3f} ms (off: "
        f"{ratios['off_cpu_ms_per_connection']:.3f} ms) |",
        f"| -c 8 proxy CPU per txn, session ÷ off | <= 1.10x | "
        f"{ratios['s8_cpu_per_txn_session_vs_off']:.2f}x (per round: "
        + ", ".join(f"{x:.2f}" for x in paired) + ") |",
        "",
        "## Round trips to the endpoint per login",
        "",
        f"Counted by a relay between lakeproxy and PostgreSQL ({args.logins} logins each, "
        "median; a new TCP connection counts one for its handshake: TCP, SSLRequest, TLS 1.3,"
        " startup, password); login time measured by the"
        f" client with the relay adding {args.rtt:g} ms of round trip.",
        "",
        "| | endpoint round trips the login waits for | after the client left |"
        " endpoint connections opened | login time |",
        "| --- | --- | --- | --- | --- |",
        f"| pool off (fresh login) | {fresh_rt:g} | "
        f"{rtt['lakeproxy']['round_trips_after']:g} (TLS close_notify after Terminate) | "
        f"{rtt['lakeproxy']['new_endpoint_connections']:g} | "
        f"{rtt['lakeproxy']['login_ms']:.1f} ms |",
        f"| session (reused) | {reused_rt:g} | "
        f"{rtt['lakeproxy_session']['round_trips_after']:g} (the reset) | "
        f"{rtt['lakeproxy_session']['new_endpoint_connections']:g} | "
        f"{rtt['lakeproxy_session']['login_ms']:.1f} ms |",
        "",
        f"A reused login waits for none of the {saved:g} round trips a fresh one does"
        " (one, when the session was parked over 5 s and is checked first):",
        "",
        "| network round trip | fresh login waits | reused login saves |",
        "| --- | --- | --- |",
    ]
    for ms in (1, 10, 50):
        lines.append(f"| {ms} ms | {saved * ms:g} ms | {saved * ms:g} ms "
                     f"({(saved - 1) * ms:g} ms when checked) |")
    lines += ["", "## Machine", "", markdown(machine), ""]
    md = "\n".join(lines)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"pool-{stamp:%Y%m%d-%H%M}" + ("-quick" if args.quick else "")
    (args.out / f"{stem}.md").write_text(md)
    doc = {"benchmark": "pool", "date": stamp.isoformat(timespec="seconds"),
           "params": {k: str(v) for k, v in vars(args).items()},
           "results": {k: dict(v) for k, v in r.items()}, "ratios": ratios,
           "round_trips": rtt, "pool": pool_line, "machine": machine}
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {args.out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
