"""Listening sockets and the accept loop, with an answer when descriptors run out.

Why not ``loop.create_server``: when ``accept(2)`` fails with EMFILE, libuv
(under uvloop) silently accepts and closes every waiting connection (its
"EMFILE trick"), and asyncio logs the failure and retries a second later while
the clients wait; either way nothing is counted and clients see a bare EOF or
reset. :class:`Acceptor` accepts itself instead (``add_reader`` + non-blocking
``accept``) and hands each socket to the loop with ``connect_accepted_socket``,
so the transports are the loop's own (uvloop's when it runs). When ``accept``
fails for lack of descriptors it closes a descriptor it keeps in reserve,
accepts the waiting client, sends it ``refusal`` (a FATAL ErrorResponse, as
PostgreSQL's postmaster does when it cannot fork), closes it, re-opens the
reserve, and reports the failure (``on_exhausted``) for the log and the metric.

Nothing here runs per chunk of a session: only per accepted connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Final

from lakeproxy.fds import FD_EXHAUSTION_ERRNOS

log = logging.getLogger("lakeproxy.listen")

#: Connections accepted per readiness callback at most (others wait for the next
#: loop iteration, so a burst of connections does not starve open sessions).
ACCEPT_BATCH: Final = 64

#: Seconds accepting pauses when descriptors ran out and no reserve is left.
EXHAUSTED_PAUSE: Final = 0.1

BACKLOG: Final = 1024

#: Builds the protocol of one accepted connection from the address ``accept()``
#: returned: the only record of a client that reset the connection at once
#: (``getpeername()`` then fails with ENOTCONN, and uvloop's transports read
#: the peer name lazily, after ``accept()``).
ProtocolFactory = Callable[[object], asyncio.Protocol]


async def bind_tcp(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for ``host:port`` (one per address ``host`` resolves to).

    Raises:
        OSError: an address cannot be resolved or bound (sockets already made are closed).
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, family=socket.AF_UNSPEC,
                                   type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def bind_unix(path: str) -> socket.socket:
    """A listening unix socket at ``path`` (the caller removed any stale file).

    Raises:
        OSError: it cannot be bound.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Acceptor:
    """Accepts on one listening socket until :meth:`close`.

    Args:
        sock: a bound, listening, non-blocking socket (owned from now on).
        factory: the protocol for each accepted connection.
        refusal: bytes sent to a client accepted with the reserve descriptor.
        on_exhausted: called once per connection that could not be served
            for lack of descriptors, with the accept error.
    """

    def __init__(
        self,
        sock: socket.socket,
        factory: ProtocolFactory,
        *,
        refusal: bytes,
        on_exhausted: Callable[[OSError], None],
    ) -> None:
        self.sock = sock
        self._factory = factory
        self._refusal = refusal
        self._on_exhausted = on_exhausted
        self._loop = asyncio.get_running_loop()
        self._reserve: int | None = _open_reserve()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._paused: asyncio.TimerHandle | None = None
        self._loop.add_reader(sock.fileno(), self._on_readable)

    def close(self) -> None:
        """Stop accepting and close the socket (accepted connections go on)."""
        if self._closed:
            return
        self._closed = True
        if self._paused is not None:
            self._paused.cancel()
        else:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None

    def _on_readable(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in FD_EXHAUSTION_ERRNOS:
                    if not self._refuse_one(exc):
                        return
                    continue
                log.error("accept failed on %s: %s", _name(self.sock), exc)
                self._pause()  # a persistent error must not spin or flood the log
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._serve(conn, addr))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket, addr: object) -> None:
        try:
            await self._loop.connect_accepted_socket(lambda: self._factory(addr), conn)
        except OSError as exc:  # e.g. reset before the transport was made
            log.debug("accepted connection lost at once: %s", exc)
            conn.close()
        except BaseException:
            conn.close()
            raise

    def _refuse_one(self, exc: OSError) -> bool:
        """Answer one waiting client with the reserve descriptor. Returns False
        when accepting must pause (no reserve left)."""
        self._on_exhausted(exc)
        if self._reserve is None:
            self._reserve = _open_reserve()
        if self._reserve is None:
            self._pause()
            return False
        os.close(self._reserve)
        self._reserve = None
        try:
            conn, _ = self.sock.accept()
        except OSError:
            conn = None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.setblocking(False)
                conn.send(self._refusal)
            conn.close()
        self._reserve = _open_reserve()
        if conn is None or self._reserve is None:
            # Nothing was refused (ENFILE, ENOBUFS, or the freed descriptor was
            # taken): pause instead of trying again at once.
            self._pause()
            return False
        return True

    def _pause(self) -> None:
        if self._closed or self._paused is not None:
            return
        self._loop.remove_reader(self.sock.fileno())
        self._paused = self._loop.call_later(EXHAUSTED_PAUSE, self._resume)

    def _resume(self) -> None:
        self._paused = None
        if not self._closed:
            self._loop.add_reader(self.sock.fileno(), self._on_readable)


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _name(sock: socket.socket) -> str:
    try:
        return str(sock.getsockname())
    except OSError:
        return "a closed socket"
