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
- ``direct``: no proxy at all (the loopback floor; no proxy CPU);
- with ``--variants``, any of :mod:`benchmarks.splice_variants` (Protocol vs
  BufferedProtocol halves, uvloop's SSL vs TLS by hand, TCP_NODELAY, write
  limits), e.g. ``protocol/sslproto,splice/bio,buffered/bio/hw64``.

With ``--tls`` the upstream leg is TLS (the upstream process is a TLS server
with a throwaway certificate; the proxies dial it with TLS, ``direct`` does the
TLS in the source), as the product's upstream leg is.

Cases:

- ``bulk64k``: one-way stream of ``--bulk-mib`` MiB in 64 KiB writes (MB/s);
- ``bulk_small``: one-way stream of ``--small-mib`` MiB in ``--small-write``-byte
  writes with TCP_NODELAY (MB/s; the source's own per-write cost bounds this);
- ``bulk_down``: ``--bulk-mib`` MiB from the upstream to the source in 8 KiB
  writes (PostgreSQL's send buffer: a COPY out arrives in records of that size);
- ``pingpong``: ``--rounds-trips`` round trips of a ``--msg``-byte request and
  an equal reply (µs per round trip).

For each, the proxy process's CPU time (``getrusage()`` user + system, read inside the
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
import resource
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Literal, cast, get_args

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import describe, markdown
from benchmarks.splice_variants import Variant, dial, relay

LoopName = Literal["uvloop", "asyncio"]
RelayName = Literal["splice", "streams", "direct"]
CaseName = Literal["bulk64k", "bulk_small", "bulk_down", "pingpong"]

#: Header the source sends first: mode (b"B" bulk, b"P" ping-pong, b"Q" quit),
#: message/write size, and total bytes (bulk) or round trips (ping-pong).
HEADER = struct.Struct("!cIQ")
READY = b"r"  # upstream -> source once the upstream side is connected
DONE = b"k"  # upstream -> source once all bulk bytes have arrived
BULK_WRITE = 64 * 1024
DOWN_WRITE = 8 * 1024  # the upstream's writes in bulk_down (PostgreSQL's send buffer)
TLS_NAME = "upstream.splice-micro.test"  # the upstream's certificate name
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


def _upstream_main(
    listener: socket.socket, cpus: set[int] | None, tls: tuple[str, str] | None = None
) -> None:
    """Serve one connection at a time; ``tls`` is (certificate chain, key) files."""
    _pin(cpus)
    big = bytearray(1 << 20)
    ctx: ssl.SSLContext | None = None
    if tls is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*tls)
    while True:
        raw, _ = listener.accept()
        _nodelay(raw)
        try:
            conn = ctx.wrap_socket(raw, server_side=True) if ctx is not None else raw
        except (OSError, ssl.SSLError):
            raw.close()
            continue
        with conn:
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
            elif mode == b"D":
                chunk = memoryview(bytes(size))
                for _ in range(count // size):
                    conn.sendall(chunk)
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
    """Server side: on accept, dial upstream the variant's way and relay."""

    tasks: set[asyncio.Task[None]] = set()  # noqa: RUF012  (strong refs to running relays)

    def __init__(
        self, variant: Variant, upstream: tuple[str, int], ctx: ssl.SSLContext | None
    ) -> None:
        super().__init__()
        self.variant = variant
        self.upstream = upstream
        self.ctx = ctx

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        task = asyncio.get_running_loop().create_task(self._relay())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _relay(self) -> None:
        client = self.transport
        assert client is not None
        upstream, held = await dial(self.variant, *self.upstream, self.ctx, TLS_NAME)
        await relay(self.variant, client, upstream, bytes(self.buffer), held)


async def _stream_relay(
    upstream: tuple[str, int],
    ctx: ssl.SSLContext | None,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """The naive relay: read, write, drain, one task per direction."""
    up_reader, up_writer = await asyncio.open_connection(
        *upstream, ssl=ctx, server_hostname=TLS_NAME if ctx is not None else None
    )
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


def _client_context(ca_file: str | None) -> ssl.SSLContext | None:
    if ca_file is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=ca_file)
    return ctx


async def _serve(
    relay_name: str, upstream: tuple[str, int], ctrl: Connection, ca_file: str | None
) -> None:
    loop = asyncio.get_running_loop()
    server: asyncio.AbstractServer
    ctx = _client_context(ca_file)
    if relay_name != "streams":
        variant = Variant.parse("splice/bio" if relay_name == "splice" else relay_name)
        server = await loop.create_server(
            lambda: _SpliceAccept(variant, upstream, ctx), "127.0.0.1", 0
        )
    else:

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await _stream_relay(upstream, ctx, r, w)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
    ctrl.send(server.sockets[0].getsockname()[1])
    stop: asyncio.Future[None] = loop.create_future()

    def on_ctrl() -> None:
        msg = ctrl.recv()
        if msg == "cpu":
            r = resource.getrusage(resource.RUSAGE_SELF)  # µs resolution (os.times: 10 ms)
            ctrl.send((r.ru_utime, r.ru_stime))
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
    relay_name: str,
    upstream: tuple[str, int],
    ctrl: Connection,
    cpus: set[int] | None,
    ca_file: str | None = None,
) -> None:
    _pin(cpus)
    with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
        runner.run(_serve(relay_name, upstream, ctrl, ca_file))


@dataclass
class _Proxy:
    loop: str  # a LoopName, or "-" for the direct path
    relay: str  # a RelayName or a variant of benchmarks.splice_variants
    port: int
    ctrl: Connection | None = None
    process: mp.process.BaseProcess | None = None
    tls: ssl.SSLContext | None = None  # the source does TLS itself (direct path, --tls)

    def cpu(self) -> tuple[float, float]:
        """The proxy process's (user, system) CPU seconds so far."""
        if self.ctrl is None:
            return 0.0, 0.0
        self.ctrl.send("cpu")
        user, system = self.ctrl.recv()
        return float(user), float(system)

    def stop(self) -> None:
        if self.ctrl is not None and self.process is not None:
            self.ctrl.send("stop")
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()


# --------------------------------------------------------------------------
# the source (this process)


def _connect(proxy: _Proxy, mode: bytes, size: int, count: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    _nodelay(sock)
    if proxy.tls is not None:
        sock = proxy.tls.wrap_socket(sock, server_hostname=TLS_NAME)
    sock.sendall(HEADER.pack(mode, size, count))
    ready = bytearray(1)
    _recv_exact(sock, ready)
    assert bytes(ready) == READY
    return sock


def _bulk(proxy: _Proxy, total: int, write: int) -> tuple[float, int]:
    """Send ``total`` bytes in ``write``-byte writes; return (seconds, bytes)."""
    n = total // write
    chunk = memoryview(bytes(write))
    with _connect(proxy, b"B", write, n * write) as sock:
        t0 = time.perf_counter()
        for _ in range(n):
            sock.sendall(chunk)
        done = bytearray(1)
        _recv_exact(sock, done)
        elapsed = time.perf_counter() - t0
    assert bytes(done) == DONE
    return elapsed, n * write


def _bulk_down(proxy: _Proxy, total: int) -> tuple[float, int]:
    """Receive ``total`` bytes the upstream sends in 8 KiB writes; return (seconds, bytes)."""
    n = total // DOWN_WRITE * DOWN_WRITE
    buf = memoryview(bytearray(1 << 20))
    with _connect(proxy, b"D", DOWN_WRITE, n) as sock:
        t0 = time.perf_counter()
        left = n
        while left:
            got = sock.recv_into(buf[: min(left, len(buf))])
            if got == 0:
                raise ConnectionError("peer closed mid-stream")
            left -= got
        return time.perf_counter() - t0, n


def _pingpong(proxy: _Proxy, size: int, count: int) -> float:
    """Do ``count`` round trips of ``size`` bytes; return seconds."""
    msg = bytes(size)
    reply = bytearray(size)
    with _connect(proxy, b"P", size, count) as sock:
        t0 = time.perf_counter()
        for _ in range(count):
            sock.sendall(msg)
            _recv_exact(sock, reply)
        return time.perf_counter() - t0


@dataclass
class Sample:
    """One measurement: ``value`` is MB/s (bulk) or µs per round trip (ping-pong);
    ``cpu`` is proxy CPU seconds per GB (bulk) or µs per round trip (ping-pong);
    ``syscalls`` the proxy's read and write system calls (socket reads and
    writes; epoll not included) per MB (bulk) or per round trip (ping-pong);
    ``user`` the user-mode part of ``cpu`` (our code, OpenSSL, the loop: what
    the relay variants differ in; the kernel's part mostly follows the
    syscalls and varies more on a shared machine)."""

    value: float
    cpu: float
    syscalls: float = 0.0
    user: float = 0.0


@dataclass
class Series:
    loop: str
    relay: str
    case: CaseName
    unit: str
    cpu_unit: str
    samples: list[Sample] = field(default_factory=list)

    def median(self) -> float:
        return statistics.median(s.value for s in self.samples)

    def cpu_median(self) -> float:
        return statistics.median(s.cpu for s in self.samples)

    def syscalls_median(self) -> float:
        return statistics.median(s.syscalls for s in self.samples)

    def user_median(self) -> float:
        return statistics.median(s.user for s in self.samples)


def _syscalls(proxy: _Proxy) -> int:
    """Read and write system calls the proxy process made so far (/proc/<pid>/io)."""
    if proxy.process is None or proxy.process.pid is None:
        return 0
    try:
        text = Path(f"/proc/{proxy.process.pid}/io").read_text()
    except OSError:
        return 0
    fields = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    return int(fields.get("syscr", 0)) + int(fields.get("syscw", 0))


def _measure(proxy: _Proxy, case: CaseName, args: argparse.Namespace) -> Sample:
    user0, sys0 = proxy.cpu()
    calls0 = _syscalls(proxy)
    if case == "pingpong":
        seconds = _pingpong(proxy, args.msg, args.round_trips)
        user1, sys1 = proxy.cpu()
        calls = _syscalls(proxy) - calls0
        per = 1e6 / args.round_trips
        return Sample(
            seconds * per, (user1 - user0 + sys1 - sys0) * per, calls / args.round_trips,
            (user1 - user0) * per,
        )
    if case == "bulk64k":
        seconds, nbytes = _bulk(proxy, args.bulk_mib << 20, BULK_WRITE)
    elif case == "bulk_down":
        seconds, nbytes = _bulk_down(proxy, args.bulk_mib << 20)
    else:
        seconds, nbytes = _bulk(proxy, args.small_mib << 20, args.small_write)
    user1, sys1 = proxy.cpu()
    calls = _syscalls(proxy) - calls0
    gb = nbytes / 1e9
    return Sample(
        nbytes / seconds / 1e6, (user1 - user0 + sys1 - sys0) / gb, calls / (nbytes / 1e6),
        (user1 - user0) / gb,
    )


# --------------------------------------------------------------------------
# reporting


def _fmt(series: Series) -> tuple[str, str, str]:
    vals = [s.value for s in series.samples]
    cpus = [s.cpu for s in series.samples]
    digits = 0 if series.case != "pingpong" else 1
    value = f"{series.median():.{digits}f} [{min(vals):.{digits}f}, {max(vals):.{digits}f}]"
    users = [s.user for s in series.samples]
    cpu = (
        f"{series.cpu_median():.2f} [{min(cpus):.2f}, {max(cpus):.2f}] "
        f"| {series.user_median():.2f} [{min(users):.2f}, {max(users):.2f}]"
    )
    calls = f"{series.syscalls_median():.1f}"
    if series.relay == "direct":
        cpu, calls = "- | -", "-"
    return value, cpu, calls


def report(series: list[Series], args: argparse.Namespace) -> str:
    """Return the results as markdown: one table per case, then splice ÷ streams."""
    out: list[str] = []
    if args.tls:
        out.append("\nThe upstream leg is TLS (`--tls`).")
    titles = {
        "bulk64k": f"bulk, {args.bulk_mib} MiB in 64 KiB writes",
        "bulk_small": f"bulk, {args.small_mib} MiB in {args.small_write}-byte writes",
        "bulk_down": f"bulk down (upstream to client), {args.bulk_mib} MiB in 8 KiB writes",
        "pingpong": f"ping-pong, {args.round_trips} round trips of {args.msg} bytes",
    }
    for case in get_args(CaseName):
        rows = [s for s in series if s.case == case]
        if not rows:
            continue
        out.append(f"\n### {titles[case]}\n")
        per = "round trip" if case == "pingpong" else "MB"
        out.append(
            f"| loop | relay | {rows[0].unit} median [min, max] | proxy CPU {rows[0].cpu_unit} "
            f"| of which user | proxy read+write syscalls / {per} |"
        )
        out.append("| --- | --- | --- | --- | --- | --- |")
        for s in rows:
            value, cpu, calls = _fmt(s)
            out.append(f"| {s.loop} | {s.relay} | {value} | {cpu} | {calls} |")
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
    p.add_argument(
        "--variants",
        default="",
        help="comma-separated splice variants to add (see benchmarks/splice_variants.py), "
        "e.g. protocol/sslproto,splice/bio,buffered/bio/hw64",
    )
    p.add_argument(
        "--cases",
        default=",".join(get_args(CaseName)),
        help=f"comma-separated cases ({','.join(get_args(CaseName))})",
    )
    p.add_argument("--tls", action="store_true", help="TLS on the upstream leg")
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
    cases = [x for x in args.cases.split(",") if x]
    for x in loops:
        if x not in get_args(LoopName):
            raise SystemExit(f"unknown loop {x!r}")
    for x in relays:
        if x not in get_args(RelayName):
            raise SystemExit(f"unknown relay {x!r}")
    for x in cases:
        if x not in get_args(CaseName):
            raise SystemExit(f"unknown case {x!r}")
    for x in filter(None, args.variants.split(",")):
        try:
            Variant.parse(x)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        relays.append(x)
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
    certdir = tempfile.TemporaryDirectory(prefix="splice-micro-")
    tls_files: tuple[str, str] | None = None
    ca_file: str | None = None
    source_tls: ssl.SSLContext | None = None
    if args.tls:
        from lakeproxy.emulator.certs import make_certs

        files = make_certs(Path(certdir.name), [TLS_NAME])
        tls_files = (str(files.cert_file), str(files.key_file))
        ca_file = str(files.ca_file)
        source_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        source_tls.load_verify_locations(cafile=ca_file)
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    upstream_addr = ("127.0.0.1", int(listener.getsockname()[1]))
    upstream_proc = ctx.Process(
        target=_upstream_main, args=(listener, peer_cpus, tls_files), daemon=True
    )
    upstream_proc.start()
    listener.close()

    proxies: list[_Proxy] = []
    started = time.perf_counter()
    try:
        _pin(peer_cpus)  # this process is the source; restored below
        for relay_name in relays:
            if relay_name == "direct":
                proxies.append(_Proxy("-", "direct", upstream_addr[1], tls=source_tls))
                continue
            for loop in loops:
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_proxy_main,
                    args=(loop, relay_name, upstream_addr, child, proxy_cpus, ca_file),
                    daemon=True,
                )
                proc.start()
                child.close()
                proxies.append(_Proxy(loop, relay_name, int(parent.recv()), parent, proc))
        series: dict[tuple[str, str, str], Series] = {}
        for rnd in range(args.rounds):
            for case in cases:
                for proxy in proxies:
                    key = (proxy.loop, proxy.relay, case)
                    if key not in series:
                        unit, cpu_unit = (
                            ("µs/round trip", "µs/round trip")
                            if case == "pingpong"
                            else ("MB/s", "s/GB")
                        )
                        series[key] = Series(
                            proxy.loop, proxy.relay, cast(CaseName, case), unit, cpu_unit
                        )
                    series[key].samples.append(_measure(proxy, cast(CaseName, case), args))
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        for proxy in proxies:
            proxy.stop()
        with contextlib.suppress(OSError):
            q = socket.create_connection(upstream_addr)
            if source_tls is not None:
                q = source_tls.wrap_socket(q, server_hostname=TLS_NAME)
            with q:
                q.sendall(HEADER.pack(b"Q", 0, 0))
        upstream_proc.join(10)
        if upstream_proc.is_alive():
            upstream_proc.kill()
        os.sched_setaffinity(0, all_cpus)
        certdir.cleanup()
    elapsed = time.perf_counter() - started
    ordered = sorted(
        series.values(),
        key=lambda s: (
            get_args(CaseName).index(s.case),
            (*get_args(LoopName), "-").index(s.loop),
            relays.index(s.relay),
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
                asdict(s)
            | {
                "median": s.median(),
                "cpu_median": s.cpu_median(),
                "syscalls_median": s.syscalls_median(),
                "user_median": s.user_median(),
            }
            for s in ordered
            ],
            "ratios": _ratios(ordered),
        }
        args.json.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
