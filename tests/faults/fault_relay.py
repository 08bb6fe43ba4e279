"""A fault-injecting TCP relay for tests: 127.0.0.1:PORT -> a target, with faults.

Put it between lakeproxy and the endpoint (``LAKEBASE_HOSTADDR=127.0.0.1``,
``LAKEBASE_PORT=relay.port``; TLS still checks and sends SNI for ``LAKEBASE_HOST``). Faults
apply to the *next* connections (``count`` of them, or all while set):

* ``pass``: relay both ways;
* ``blackhole``: accept, read and discard, never answer (a dead path);
* ``reset``: accept, then reset at once (RST, like a refused route);
* ``delay``: relay, each chunk held ``delay`` seconds (a slow path);
* ``cut``: relay until ``cut_after`` bytes have come back from the target,
  then reset both sides (``cut_after=1``: just the SSLRequest's 'S' gets
  through, so TLS is cut mid-handshake; larger values cut inside it).

:meth:`FaultRelay.cut_all` resets every open relayed connection now (a cut
mid-session). All sockets are closed by :meth:`FaultRelay.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Literal

from benchmarks.rawpg import reset

Mode = Literal["pass", "blackhole", "reset", "delay", "cut"]
_CHUNK = 65_536


@dataclass(slots=True)
class _Fault:
    mode: Mode
    delay: float
    cut_after: int
    count: int | None  # None: until changed


class FaultRelay:
    """See the module docstring."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.accepted = 0
        self._fault = _Fault("pass", 0.0, 0, None)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    @property
    def open_pairs(self) -> int:
        """Relayed connections currently open."""
        return len(self._pairs)

    def set_fault(
        self, mode: Mode, *, delay: float = 0.0, cut_after: int = 0, count: int | None = None
    ) -> None:
        """Apply ``mode`` to the next ``count`` connections (None: all until changed)."""
        self._fault = _Fault(mode, delay, cut_after, count)

    def _take_fault(self) -> _Fault:
        fault = self._fault
        if fault.count is not None:
            fault.count -= 1
            if fault.count <= 0:
                self._fault = _Fault("pass", 0.0, 0, None)
        return fault

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut_all(self) -> int:
        """Reset every open relayed connection now; returns how many."""
        pairs = list(self._pairs)
        for client, upstream in pairs:
            reset(client)
            reset(upstream)
        return len(pairs)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.cut_all()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> FaultRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ relaying

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        fault = self._take_fault()
        upstream: asyncio.StreamWriter | None = None
        graceful = False
        try:
            if fault.mode == "reset":
                return
            if fault.mode == "blackhole":
                while await reader.read(_CHUNK):
                    pass
                return
            up_reader, upstream = await asyncio.open_connection(*self.target)
            pair = (writer, upstream)
            self._pairs.add(pair)
            try:
                budget = [fault.cut_after] if fault.mode == "cut" else None
                delay = fault.delay if fault.mode == "delay" else 0.0
                eofs = asyncio.Semaphore(0)
                down = asyncio.ensure_future(
                    self._pump(up_reader, writer, delay, budget, pair, eofs))
                up = asyncio.ensure_future(self._pump(reader, upstream, delay, None, pair, eofs))
                try:
                    await eofs.acquire()  # one direction ended (EOF or error)
                    if not (down.done() and up.done()):
                        # half-closed: give the other direction time to finish
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(30):
                                await eofs.acquire()
                    graceful = all(t.done() and not t.cancelled() and t.result()
                                   for t in (down, up))
                finally:
                    for t in (down, up):
                        t.cancel()
                    await asyncio.gather(down, up, return_exceptions=True)
            finally:
                self._pairs.discard(pair)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            for w in (writer, upstream):
                if graceful and w is not None:
                    w.close()
                else:
                    reset(w)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        delay: float,
        budget: list[int] | None,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        eofs: asyncio.Semaphore,
    ) -> bool:
        """Copy until EOF (True: clean EOF passed on) or an error / a cut (False)."""
        try:
            while data := await reader.read(_CHUNK):
                if delay:
                    await asyncio.sleep(delay)
                if budget is not None:
                    if len(data) >= budget[0]:
                        writer.write(data[: budget[0]])
                        with contextlib.suppress(OSError):
                            await writer.drain()
                        for w in pair:
                            reset(w)
                        return False
                    budget[0] -= len(data)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof() and not writer.is_closing():
                writer.write_eof()  # pass the half-close on
            return True
        except OSError:
            return False
        finally:
            eofs.release()
