"""Micro-benchmark of the splice alone: no Postgres, no TLS, loopback TCP.

Three processes: this one is the *source* (blocking socket, no event loop), a
*proxy* process runs one relay on one event loop, and an *upstream* process is
the sink (bulk) or the echo server (ping-pong). Each measurement uses a fresh
connection through the proxy and starts only once the upstream connection is up,
so connection setup is not timed.

Relays compared, each on uvloop and on plain asyncio:

- ``splice``:  :class:`lakeproxy.splice.Splice` (the product's hot path);
- ``streams``: a naive ``StreamReader.read`` / ``StreamWriter.write`` / ``drain``
  copy loop, one task per direction;
- ``direct``: no proxy at all (the loopback floor; no proxy CPU).

Cases:

- ``bulk64k``: one-way stream of ``--bulk-mib`` MiB in 64 KiB writes (MB/s);
- ``bulk_small``: one-way stream of ``--small-mib`` MiB in ``--small-write``-byte
  writes with TCP_NODELAY (MB/s; the source's own per-write cost bounds this);
- ``pingpong``: ``--rounds-trips`` round trips of a ``--msg``-byte request and
  an equal reply (µs per round trip).

For each, the proxy process's CPU time (``time.process_time()`` read inside the
proxy) is reported per GB moved or per round trip. MB and GB are decimal.

Run: ``python -m benchmarks.splice_micro [--quick] [--json FILE]`` from the
repository root (``python benchmarks/splice_micro.py`` works too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Literal, cast, get_args

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import describe, markdown
from lakeproxy.splice import splice

LoopName = Literal["uvloop", "asyncio"]
RelayName = Literal["splice", "streams", "direct"]
CaseName = Literal["bulk64k", "bulk_small", "pingpong"]

#: Header the source sends first: mode (b"B" bulk, b"P" ping-pong, b"Q" quit),
#: message/write size, and total bytes (bulk) or round trips (ping-pong).
HEADER = struct.Struct("!cIQ")
READY = b"r"  # upstream -> source once the upstream side is connected
DONE = b"k"  # upstream -> source once all bulk bytes have arrived
BULK_WRITE = 64 * 1024
RELAY_READ = 64 * 1024  # the streams relay's read size (StreamReader's default limit)


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _recv_exact(sock: socket.socket, buf: bytearray | memoryview) -> None:
    view = memoryview(buf)
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed mid-message")
        got += n


# --------------------------------------------------------------------------
# upstream process: sink or echo, one connection at a time, blocking sockets


def _pin(cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


def _upstream_main(listener: socket.socket, cpus: set[int] | None) -> None:
    _pin(cpus)
    big = bytearray(1 << 20)
    while True:
        conn, _ = listener.accept()
        with conn:
            _nodelay(conn)
            hdr = bytearray(HEADER.size)
            try:
                _recv_exact(conn, hdr)
            except ConnectionError:
                continue
            mode, size, count = HEADER.unpack(hdr)
            if mode == b"Q":
                return
            conn.sendall(READY)
            if mode == b"B":
                left = count
                view = memoryview(big)
                while left:
                    n = conn.recv_into(view[: min(left, len(big))])
                    if n == 0:
                        break
                    left -= n
                conn.sendall(DONE)
            elif mode == b"P":
                msg = bytearray(size)
                for _ in range(count):
                    _recv_exact(conn, msg)
                    conn.sendall(msg)
            # wait for the source to close first, so the proxy sees a clean EOF
            with contextlib.suppress(OSError):
                conn.recv(1)


# --------------------------------------------------------------------------
# proxy process


class _Holding(asyncio.Protocol):
    """Holds a new transport (reading paused) until the splice takes it over."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.buffer += data


class _SpliceAccept(_Holding):
    """Server side: on accept, dial upstream and splice the two."""

    tasks: set[asyncio.Task[None]] = set()  # noqa: RUF012  (strong refs to running relays)

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__()
        self.upstream = upstream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        task = asyncio.get_running_loop().create_task(self._relay())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _relay(self) -> None:
        client = self.transport
        assert client is not None
        loop = asyncio.get_running_loop()
        upstream, held = await loop.create_connection(_Holding, *self.upstream)
        await splice(
            client,
            upstream,
            client_leftover=bytes(self.buffer),
            upstream_leftover=bytes(held.buffer),
        )


async def _stream_relay(
    upstream: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """The naive relay: read, write, drain, one task per direction."""
    up_reader, up_writer = await asyncio.open_connection(*upstream)
    for w in (writer, up_writer):
        sock = w.get_extra_info("socket")
        if sock is not None:
            _nodelay(sock)

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(RELAY_READ):
                w.write(data)
                await w.drain()
        finally:
            w.close()

    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)


def _loop_factory(name: LoopName) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return None


async def _serve(relay: RelayName, upstream: tuple[str, int], ctrl: Connection) -> None:
    loop = asyncio.get_running_loop()
    server: asyncio.AbstractServer
    if relay == "splice":
        server = await loop.create_server(lambda: _SpliceAccept(upstream), "127.0.0.1", 0)
    else:

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await _stream_relay(upstream, r, w)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
    ctrl.send(server.sockets[0].getsockname()[1])
    stop: asyncio.Future[None] = loop.create_future()

    def on_ctrl() -> None:
        msg = ctrl.recv()
        if msg == "cpu":
            ctrl.send(time.process_time())
        elif not stop.done():
            stop.set_result(None)

    loop.add_reader(ctrl.fileno(), on_ctrl)
    try:
        await stop
    finally:
        loop.remove_reader(ctrl.fileno())
        server.close()


def _proxy_main(
    loop: LoopName,
    relay: RelayName,
    upstream: tuple[str, int],
    ctrl: Connection,
    cpus: set[int] | None,
) -> None:
    _pin(cpus)
    with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
        runner.run(_serve(relay, upstream, ctrl))


@dataclass
class _Proxy:
    loop: str  # a LoopName, or "-" for the direct path
    relay: RelayName
    port: int
    ctrl: Connection | None = None
    process: mp.process.BaseProcess | None = None

    def cpu(self) -> float:
        if self.ctrl is None:
            return 0.0
        self.ctrl.send("cpu")
        value = self.ctrl.recv()
        assert isinstance(value, float)
        return value

    def stop(self) -> None:
        if self.ctrl is not None and self.process is not None:
            self.ctrl.send("stop")
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()


# --------------------------------------------------------------------------
# the source (this process)


def _connect(port: int, mode: bytes, size: int, count: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    _nodelay(sock)
    sock.sendall(HEADER.pack(mode, size, count))
    ready = bytearray(1)
    _recv_exact(sock, ready)
    assert bytes(ready) == READY
    return sock


def _bulk(port: int, total: int, write: int) -> tuple[float, int]:
    """Send ``total`` bytes in ``write``-byte writes; return (seconds, bytes)."""
    n = total // write
    chunk = memoryview(bytes(write))
    with _connect(port, b"B", write, n * write) as sock:
        t0 = time.perf_counter()
        for _ in range(n):
            sock.sendall(chunk)
        done = bytearray(1)
        _recv_exact(sock, done)
        elapsed = time.perf_counter() - t0
    assert bytes(done) == DONE
    return elapsed, n * write


def _pingpong(port: int, size: int, count: int) -> float:
    """Do ``count`` round trips of ``size`` bytes; return seconds."""
    msg = bytes(size)
    reply = bytearray(size)
    with _connect(port, b"P", size, count) as sock:
        t0 = time.perf_counter()
        for _ in range(count):
            sock.sendall(msg)
            _recv_exact(sock, reply)
        return time.perf_counter() - t0


@dataclass
class Sample:
    """One measurement: ``value`` is MB/s (bulk) or µs per round trip (ping-pong);
    ``cpu`` is proxy CPU seconds per GB (bulk) or µs per round trip (ping-pong)."""

    value: float
    cpu: float


@dataclass
class Series:
    loop: str
    relay: RelayName
    case: CaseName
    unit: str
    cpu_unit: str
    samples: list[Sample] = field(default_factory=list)

    def median(self) -> float:
        return statistics.median(s.value for s in self.samples)

    def cpu_median(self) -> float:
        return statistics.median(s.cpu for s in self.samples)


def _measure(proxy: _Proxy, case: CaseName, args: argparse.Namespace) -> Sample:
    cpu0 = proxy.cpu()
    if case == "pingpong":
        seconds = _pingpong(proxy.port, args.msg, args.round_trips)
        cpu = proxy.cpu() - cpu0
        return Sample(seconds / args.round_trips * 1e6, cpu / args.round_trips * 1e6)
    if case == "bulk64k":
        seconds, nbytes = _bulk(proxy.port, args.bulk_mib << 20, BULK_WRITE)
    else:
        seconds, nbytes = _bulk(proxy.port, args.small_mib << 20, args.small_write)
    cpu = proxy.cpu() - cpu0
    return Sample(nbytes / seconds / 1e6, cpu / (nbytes / 1e9))


# --------------------------------------------------------------------------
# reporting


def _fmt(series: Series) -> tuple[str, str]:
    vals = [s.value for s in series.samples]
    cpus = [s.cpu for s in series.samples]
    digits = 0 if series.case != "pingpong" else 1
    value = f"{series.median():.{digits}f} [{min(vals):.{digits}f}, {max(vals):.{digits}f}]"
    cpu = f"{series.cpu_median():.2f} [{min(cpus):.2f}, {max(cpus):.2f}]"
    if series.relay == "direct":
        cpu = "-"
    return value, cpu


def report(series: list[Series], args: argparse.Namespace) -> str:
    """Return the results as markdown: one table per case, then splice ÷ streams."""
    out: list[str] = []
    titles = {
        "bulk64k": f"bulk, {args.bulk_mib} MiB in 64 KiB writes",
        "bulk_small": f"bulk, {args.small_mib} MiB in {args.small_write}-byte writes",
        "pingpong": f"ping-pong, {args.round_trips} round trips of {args.msg} bytes",
    }
    for case in get_args(CaseName):
        rows = [s for s in series if s.case == case]
        if not rows:
            continue
        out.append(f"\n### {titles[case]}\n")
        out.append(
            f"| loop | relay | {rows[0].unit} median [min, max] | proxy CPU {rows[0].cpu_unit} |"
        )
        out.append("| --- | --- | --- | --- |")
        for s in rows:
            value, cpu = _fmt(s)
            out.append(f"| {s.loop} | {s.relay} | {value} | {cpu} |")
    out.append("\n### splice ÷ streams (medians; >1 is better for MB/s, <1 for µs and CPU)\n")
    out.append("| loop | case | speed | proxy CPU |")
    out.append("| --- | --- | --- | --- |")
    by_key = {(s.loop, s.relay, s.case): s for s in series}
    for loop in get_args(LoopName):
        for case in get_args(CaseName):
            a, b = by_key.get((loop, "splice", case)), by_key.get((loop, "streams", case))
            if a and b and a.samples and b.samples:
                out.append(
                    f"| {loop} | {case} | {a.median() / b.median():.2f}x "
                    f"| {a.cpu_median() / b.cpu_median():.2f}x |"
                )
    return "\n".join(out)


def _ratios(series: list[Series]) -> list[dict[str, object]]:
    by_key = {(s.loop, s.relay, s.case): s for s in series}
    result: list[dict[str, object]] = []
    for loop in get_args(LoopName):
        for case in get_args(CaseName):
            a, b = by_key.get((loop, "splice", case)), by_key.get((loop, "streams", case))
            if a and b and a.samples and b.samples:
                result.append(
                    {
                        "loop": loop,
                        "case": case,
                        "speed_splice_over_streams": a.median() / b.median(),
                        "cpu_splice_over_streams": a.cpu_median() / b.cpu_median(),
                    }
                )
    return result


# --------------------------------------------------------------------------
# main


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.splice_micro",
        description="Micro-benchmark of lakeproxy.splice vs a streams relay (no Postgres).",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, 1 round (smoke run)")
    p.add_argument("--rounds", type=int, default=5, help="rounds, interleaving configs (5)")
    p.add_argument("--bulk-mib", type=int, default=1024, help="MiB per bulk 64 KiB run (1024)")
    p.add_argument("--small-mib", type=int, default=64, help="MiB per small-write run (64)")
    p.add_argument("--small-write", type=int, default=512, help="bytes per small write (512)")
    p.add_argument("--round-trips", type=int, default=20_000, help="ping-pong round trips (20000)")
    p.add_argument("--msg", type=int, default=100, help="ping-pong message bytes (100)")
    p.add_argument(
        "--loops", default="uvloop,asyncio", help="comma-separated: uvloop,asyncio (both)"
    )
    p.add_argument(
        "--relays", default="splice,streams,direct", help="comma-separated: splice,streams,direct"
    )
    p.add_argument(
        "--pin",
        choices=["one", "split", "none"],
        default="one",
        help="CPU placement: all three processes on one CPU (default; the most stable), "
        "the proxy on a CPU of its own (split), or left to the scheduler (none)",
    )
    p.add_argument("--json", type=Path, help="write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = 1
        args.bulk_mib = min(args.bulk_mib, 128)
        args.small_mib = min(args.small_mib, 8)
        args.round_trips = min(args.round_trips, 2000)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print markdown tables; return the exit status."""
    args = _parse(argv)
    loops = [x for x in args.loops.split(",") if x]
    relays = [x for x in args.relays.split(",") if x]
    for x in loops:
        if x not in get_args(LoopName):
            raise SystemExit(f"unknown loop {x!r}")
    for x in relays:
        if x not in get_args(RelayName):
            raise SystemExit(f"unknown relay {x!r}")
    # Placement. Unpinned, the scheduler's choices made the same run vary by 3x
    # here; with the proxy on a CPU of its own every hop is a cross-CPU wakeup
    # (expensive on this VM). All on one CPU, times are sums of CPU costs.
    all_cpus = sorted(os.sched_getaffinity(0))
    proxy_cpus: set[int] | None = None
    peer_cpus: set[int] | None = None
    if args.pin == "one":
        proxy_cpus = peer_cpus = {all_cpus[-1]}
    elif args.pin == "split" and len(all_cpus) >= 2:
        proxy_cpus, peer_cpus = {all_cpus[-1]}, set(all_cpus[:-1])
    ctx = mp.get_context("spawn")
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    upstream_addr = ("127.0.0.1", int(listener.getsockname()[1]))
    upstream_proc = ctx.Process(target=_upstream_main, args=(listener, peer_cpus), daemon=True)
    upstream_proc.start()
    listener.close()

    proxies: list[_Proxy] = []
    started = time.perf_counter()
    try:
        _pin(peer_cpus)  # this process is the source; restored below
        for relay in relays:
            if relay == "direct":
                proxies.append(_Proxy("-", "direct", upstream_addr[1]))
                continue
            for loop in loops:
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_proxy_main,
                    args=(loop, relay, upstream_addr, child, proxy_cpus),
                    daemon=True,
                )
                proc.start()
                child.close()
                proxies.append(_Proxy(loop, relay, int(parent.recv()), parent, proc))
        series: dict[tuple[str, str, str], Series] = {}
        for rnd in range(args.rounds):
            for case in get_args(CaseName):
                for proxy in proxies:
                    key = (proxy.loop, proxy.relay, case)
                    if key not in series:
                        unit, cpu_unit = (
                            ("µs/round trip", "µs/round trip")
                            if case == "pingpong"
                            else ("MB/s", "s/GB")
                        )
                        series[key] = Series(proxy.loop, proxy.relay, case, unit, cpu_unit)
                    series[key].samples.append(_measure(proxy, case, args))
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        for proxy in proxies:
            proxy.stop()
        with contextlib.suppress(OSError), socket.create_connection(upstream_addr) as q:
            q.sendall(HEADER.pack(b"Q", 0, 0))
        upstream_proc.join(10)
        os.sched_setaffinity(0, all_cpus)
    elapsed = time.perf_counter() - started
    ordered = sorted(
        series.values(),
        key=lambda s: (
            get_args(CaseName).index(s.case),
            (*get_args(LoopName), "-").index(s.loop),
            get_args(RelayName).index(s.relay),
        ),
    )
    machine = describe(**{"load average (1 min) at end": f"{os.getloadavg()[0]:.2f}"})
    print("## lakeproxy splice micro-benchmark\n")
    print(markdown(machine))
    print(report(ordered, args))
    print(f"\n{args.rounds} round(s), {elapsed:.0f} s in all.")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "benchmark": "splice_micro",
            "machine": machine,
            "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "seconds": elapsed,
            "series": [
                asdict(s) | {"median": s.median(), "cpu_median": s.cpu_median()} for s in ordered
            ],
            "ratios": _ratios(ordered),
        }
        args.json.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
