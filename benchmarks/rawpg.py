"""A small raw PostgreSQL protocol client for load tests (asyncio streams).

It gives the soak what libpq does not: reading a result as slowly as wanted
(the stream's buffer fills, then TCP pushes back on the proxy), closing with a
reset in the middle of anything, COPY payloads as raw bytes to checksum, and
the CancelRequest key the proxy handed out. Simple query protocol only; text
results.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

#: Cap on the StreamReader buffer: past 2x this the transport stops reading.
READ_LIMIT = 64 * 1024


class ServerError(Exception):
    """The server (or the proxy) sent an ErrorResponse; ``sqlstate`` is its code."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(f"{sqlstate}: {message}")
        self.sqlstate = sqlstate
        self.message = message


def parse_error(body: bytes) -> ServerError:
    fields: dict[str, str] = {}
    for part in body.split(b"\x00"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return ServerError(fields.get("C", "?????"), fields.get("M", ""))


def _msg(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("!I", len(body) + 4) + body


def startup_packet(params: dict[str, str]) -> bytes:
    body = struct.pack("!I", 3 << 16)
    for k, v in params.items():
        body += k.encode() + b"\x00" + v.encode() + b"\x00"
    body += b"\x00"
    return struct.pack("!I", len(body) + 4) + body


@dataclass(slots=True)
class PgConn:
    """One connection. Create with :meth:`connect`."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pid: int = 0
    key: bytes = field(default=b"", repr=False)

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        database: str = "databricks_postgres",
        user: str = "soak",
        ssl_request: bool = False,
        app: str = "soak",
    ) -> PgConn:
        """Open a session (optionally sending SSLRequest first, expecting 'N').

        Raises:
            ServerError: the login was refused (the proxy's or the server's SQLSTATE).
            OSError, asyncio.IncompleteReadError: the connection failed or was closed.
        """
        reader, writer = await asyncio.open_connection(host, port, limit=READ_LIMIT)
        conn = cls(reader, writer)
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ssl_request:
                writer.write(struct.pack("!II", 8, (1234 << 16) | 5679))
                answer = await reader.readexactly(1)
                if answer != b"N":
                    raise ServerError("08P01", f"unexpected SSL answer {answer!r}")
            writer.write(
                startup_packet({"user": user, "database": database, "application_name": app})
            )
            while True:
                tag, body = await conn.read_message()
                if tag == b"K":
                    conn.pid = struct.unpack("!I", body[:4])[0]
                    conn.key = body[4:]
                elif tag == b"Z":
                    return conn
                elif tag == b"E":
                    raise parse_error(body)
        except BaseException:
            conn.abort()
            raise

    async def read_message(self) -> tuple[bytes, bytes]:
        """The next (tag, body). Raises asyncio.IncompleteReadError at EOF."""
        head = await self.reader.readexactly(5)
        length = struct.unpack("!I", head[1:])[0]
        body = await self.reader.readexactly(length - 4) if length > 4 else b""
        return head[:1], body

    async def until_ready(self) -> ServerError | None:
        """Read until ReadyForQuery; return the ErrorResponse seen on the way, if any."""
        error: ServerError | None = None
        while True:
            tag, body = await self.read_message()
            if tag == b"E":
                error = parse_error(body)
            elif tag == b"Z":
                return error

    async def query(self, sql: str) -> list[list[str | None]]:
        """Run ``sql`` (simple protocol); return the rows of the last result.

        Raises:
            ServerError: the statement failed.
        """
        self.writer.write(_msg(b"Q", sql.encode() + b"\x00"))
        rows: list[list[str | None]] = []
        error: ServerError | None = None
        while True:
            tag, body = await self.read_message()
            if tag == b"T":
                rows = []
            elif tag == b"D":
                n = struct.unpack("!H", body[:2])[0]
                pos = 2
                row: list[str | None] = []
                for _ in range(n):
                    size = struct.unpack("!i", body[pos : pos + 4])[0]
                    pos += 4
                    if size < 0:
                        row.append(None)
                    else:
                        row.append(body[pos : pos + size].decode())
                        pos += size
                rows.append(row)
            elif tag == b"E":
                error = parse_error(body)
            elif tag == b"Z":
                if error is not None:
                    raise error
                return rows

    async def _start_copy(self, sql: str, tag: bytes, what: str) -> None:
        """Send a COPY query and read its Copy{In,Out}Response (``tag``).

        Raises:
            ServerError: the server refused the COPY, or answered something else.
        """
        self.writer.write(_msg(b"Q", sql.encode() + b"\x00"))
        got, body = await self.read_message()
        if got == b"E":
            await self.until_ready()
            raise parse_error(body)
        if got != tag:
            raise ServerError("08P01", f"expected {what}, got {got!r}")

    async def copy_in(self, sql: str, chunks: Iterable[bytes]) -> int:
        """``COPY ... FROM STDIN`` with ``chunks`` as CopyData; returns the row count.

        Raises:
            ServerError: the COPY failed.
        """
        await self._start_copy(sql, b"G", "CopyInResponse")
        for chunk in chunks:
            self.writer.write(_msg(b"d", chunk))
            await self.writer.drain()
        self.writer.write(_msg(b"c", b""))
        count = 0
        error: ServerError | None = None
        while True:
            tag, body = await self.read_message()
            if tag == b"C":
                count = int(body.rstrip(b"\x00").split()[-1])
            elif tag == b"E":
                error = parse_error(body)
            elif tag == b"Z":
                if error is not None:
                    raise error
                return count

    async def copy_out(self, sql: str) -> AsyncIterator[bytes]:
        """``COPY ... TO STDOUT``: yield each CopyData payload as it is read.

        The caller sets the pace: nothing more is read while it holds a chunk,
        so a slow consumer is a slow reader on the socket.

        Raises:
            ServerError: the COPY failed.
        """
        await self._start_copy(sql, b"H", "CopyOutResponse")
        while True:
            tag, body = await self.read_message()
            if tag == b"d":
                yield body
            elif tag == b"c":
                break
            elif tag == b"E":
                await self.until_ready()
                raise parse_error(body)
        error = await self.until_ready()
        if error is not None:
            raise error

    async def copy_out_paced(self, sql: str, bytes_per_s: float) -> tuple[bytes, int]:
        """:meth:`copy_out` read no faster than ``bytes_per_s`` (checked every
        64 KiB), as a slow client reads; returns the SHA-256 of the data and
        its length.

        Raises:
            ServerError: the COPY failed.
        """
        got = hashlib.sha256()
        n = 0
        pace = 0
        started = time.monotonic()
        async for data in self.copy_out(sql):
            got.update(data)
            n += len(data)
            pace += len(data)
            if pace >= 64 * 1024:
                pace = 0
                ahead = n / bytes_per_s - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        return got.digest(), n

    def send_query(self, sql: str) -> None:
        """Send a query without waiting for anything (then read or abort)."""
        self.writer.write(_msg(b"Q", sql.encode() + b"\x00"))

    async def close(self) -> None:
        """Terminate politely and close."""
        with contextlib.suppress(OSError):
            self.writer.write(_msg(b"X", b""))
            self.writer.close()
            async with asyncio.timeout(5):
                await self.writer.wait_closed()

    def abort(self) -> None:
        """Close with a TCP reset, mid-whatever."""
        reset(self.writer)


def reset(writer: asyncio.StreamWriter | None) -> None:
    """Close ``writer``'s connection with a TCP reset (SO_LINGER 0) instead of a FIN."""
    if writer is None or writer.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def cancel(host: str, port: int, pid: int, key: bytes) -> None:
    """Send a CancelRequest and wait for the server to close the connection."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        body = struct.pack("!II", (1234 << 16) | 5678, pid) + key
        writer.write(struct.pack("!I", len(body) + 4) + body)
        try:
            async with asyncio.timeout(10):
                await reader.read()
        except TimeoutError:
            raise TimeoutError("the cancel connection stayed open for 10 s") from None
    finally:
        writer.close()
