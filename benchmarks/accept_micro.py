"""Micro-benchmark of accepting a connection: the loop's server vs lakeproxy's Acceptor.

lakeproxy accepts with :class:`lakeproxy.listen.Acceptor` (``add_reader`` +
non-blocking ``accept`` + ``connect_accepted_socket``) instead of
``loop.create_server``, so that running out of descriptors is answered rather
than silent (see that module). This measures what that costs per connection,
side by side in one process and one run: a server of each kind on the same
event loop (uvloop when importable), a client thread that opens and closes
``--n`` connections to each in alternating blocks, and the server's CPU time
(``getrusage``, whole process: the client thread's share is the same for both)
per accepted connection, plus the wall time per connection.

Run: ``python -m benchmarks.accept_micro [--n 2000] [--blocks 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import statistics
import threading
import time
from collections.abc import Callable

from lakeproxy.listen import Acceptor, bind_tcp


class _Counting(asyncio.Protocol):
    made = 0
    done: asyncio.Event | None = None
    target = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cls = type(self)
        cls.made += 1
        if cls.made >= cls.target and cls.done is not None:
            cls.done.set()

    def eof_received(self) -> bool:
        return False


def _client(port: int, n: int) -> None:
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.close()


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _block(port: int, n: int) -> tuple[float, float]:
    """(wall µs, CPU µs) per connection for ``n`` connections to ``port``."""
    _Counting.made = 0
    _Counting.target = n
    _Counting.done = asyncio.Event()
    t0, c0 = time.perf_counter(), _cpu()
    thread = threading.Thread(target=_client, args=(port, n))
    thread.start()
    await _Counting.done.wait()
    thread.join()
    return (time.perf_counter() - t0) / n * 1e6, (_cpu() - c0) / n * 1e6


async def main(n: int, blocks: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Counting, "127.0.0.1", 0, backlog=1024)
    server_port = int(server.sockets[0].getsockname()[1])
    socks = await bind_tcp("127.0.0.1", 0)
    acceptor = Acceptor(socks[0], lambda _addr: _Counting(), refusal=b"",
                        on_exhausted=lambda exc: None)
    acceptor_port = int(socks[0].getsockname()[1])
    kinds: dict[str, int] = {"create_server": server_port, "Acceptor": acceptor_port}
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    await _block(server_port, 200)  # warm-up
    await _block(acceptor_port, 200)
    for i in range(blocks):
        order = list(kinds) if i % 2 == 0 else list(reversed(kinds))
        for kind in order:
            results[kind].append(await _block(kinds[kind], n))
    server.close()
    acceptor.close()
    med: Callable[[list[float]], float] = statistics.median
    print(f"loop: {type(loop).__module__}.{type(loop).__name__}; {blocks} blocks of {n} "
          "connections each, alternating; medians")
    print(f"{'server':<14} {'wall µs/conn':>13} {'CPU µs/conn':>12}")
    for kind, rows in results.items():
        print(f"{kind:<14} {med([w for w, _ in rows]):>13.1f} {med([c for _, c in rows]):>12.1f}")
    base = med([c for _, c in results["create_server"]])
    print(f"Acceptor / create_server CPU: {med([c for _, c in results['Acceptor']]) / base:.2f}x")


def _run() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="connections per block")
    ap.add_argument("--blocks", type=int, default=10, help="blocks per server kind")
    args = ap.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main(args.n, args.blocks))
        return
    uvloop.run(main(args.n, args.blocks))


if __name__ == "__main__":
    _run()
