"""Session reuse: parked endpoint sessions, their keys, their reset (SPEC "Session reuse").

An endpoint session whose client ended cleanly (see :mod:`lakeproxy.boundaries`)
is reset here — ``ROLLBACK`` when its last ReadyForQuery said ``T`` or ``E``,
then ``DISCARD ALL``, both sent at once and answered within
:data:`RESET_TIMEOUT` — and parked under its key: the endpoint (its dialer)
and the exact startup parameters the client sent, ``user`` excepted. The next
client with the same key takes it instead of dialing and is shown the login a
fresh session would show (:meth:`Lease.startup_messages`).

Bounds: a parked session is closed ``idle_timeout`` after it was parked,
when it reaches ``lifetime`` (and is never parked past it), when its key
already holds ``max_idle`` (the longest-parked goes), when the pool holds
``max_total`` (``max_clients``), on :meth:`Pool.close_all` (drain) and on
:meth:`Pool.drop` (a reload that changed the endpoint or identity).

Liveness: a parked session is read while parked; anything it receives (a
57P01 FATAL when the compute scales to zero, EOF) closes it at once. One
parked longer than :data:`PROBE_AFTER` is sent a lone ``Sync`` and must
answer ``ReadyForQuery 'I'`` within :data:`PROBE_TIMEOUT` before it is handed
out; else it is closed and the next one (or a fresh dial) is used.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from lakeproxy.metrics import PoolDiscardReason
from lakeproxy.wire.codec import (
    BackendKeyData,
    ParameterStatus,
    ReadyForQuery,
    decode_backend,
    encode,
)
from lakeproxy.wire.errors import ProtocolError
from lakeproxy.wire.framing import FrameReader

log = logging.getLogger("lakeproxy.pool")

#: ``lakeproxy_pool_discards_total{reason}`` (SPEC).
DiscardReason = PoolDiscardReason

#: The reset (ROLLBACK, DISCARD ALL) must be answered within this, else the session is closed.
RESET_TIMEOUT: Final = 5.0
#: A session parked longer than this is checked with a round trip before it is handed out.
PROBE_AFTER: Final = 5.0
#: How long that check may take.
PROBE_TIMEOUT: Final = 2.0
#: Largest frame read during a reset or probe (a NoticeResponse, a ParameterStatus).
_MAX_FRAME: Final = 1 << 20

_SYNC: Final = b"S\x00\x00\x00\x04"


def _query(sql: str) -> bytes:
    body = sql.encode() + b"\x00"
    return b"Q" + (len(body) + 4).to_bytes(4, "big") + body


_ROLLBACK: Final = _query("ROLLBACK")
_DISCARD_ALL: Final = _query("DISCARD ALL")
_READY_IDLE: Final = encode(ReadyForQuery("I"))


class Metrics(Protocol):
    """What the pool reports (implemented by :class:`lakeproxy.metrics.Metrics`)."""

    def pool_idle(self, count: int) -> None: ...
    def pool_request(self, result: Literal["hit", "miss"]) -> None: ...
    def pool_discard(self, reason: DiscardReason) -> None: ...


def pool_key(endpoint: object, params: Mapping[str, str], version: tuple[int, int]
             ) -> tuple[object, ...]:
    """The key of a session: the endpoint, the protocol version and every startup
    parameter but ``user`` (lakeproxy replaces it anyway), in a stable order."""
    return (endpoint, version, tuple(sorted((k, v) for k, v in params.items() if k != "user")))


def poolable(params: Mapping[str, str]) -> bool:
    """False for replication connections (never reused)."""
    return params.get("replication", "").lower() in ("", "false", "0", "off", "no")


@dataclass(slots=True, eq=False)
class Lease:
    """An endpoint session the pool may keep: what a client needs to be shown it.

    Implements :class:`lakeproxy.session.Upstream` for the session that uses it.
    """

    transport: asyncio.Transport
    key: tuple[object, ...]
    process_id: int
    secret: bytes = field(repr=False)
    #: The ParameterStatus values as the endpoint last reported them, in first-seen order.
    parameters: dict[str, str]
    #: Bytes after ReadyForQuery to relay first: none for a parked session.
    trailing: bytes = b""
    #: When the endpoint session was logged in (the event loop's clock).
    created: float = 0.0
    parked_at: float = 0.0
    uses: int = 0
    _timer: asyncio.TimerHandle | None = None
    #: The encoded ParameterStatus frames, kept while ``parameters`` is unchanged.
    _status_frames: list[bytes] | None = None

    @classmethod
    def from_login(cls, transport: asyncio.Transport, key: tuple[object, ...],
                   frames: Sequence[bytes]) -> Lease | None:
        """From a fresh login's frames (after AuthenticationOk); None without a BackendKeyData."""
        params: dict[str, str] = {}
        pid: int | None = None
        secret = b""
        for frame in frames:
            tag = frame[:1]
            if tag == b"S" or tag == b"K":
                msg = decode_backend(frame)
                if isinstance(msg, ParameterStatus):
                    params[msg.name] = msg.value
                elif isinstance(msg, BackendKeyData):
                    pid, secret = msg.process_id, msg.secret
        if pid is None:
            return None
        return cls(transport, key, pid, secret, params,
                   created=asyncio.get_running_loop().time())

    @property
    def startup_messages(self) -> list[bytes]:
        """What a fresh login shows after AuthenticationOk: the current
        ParameterStatus set, the backend's key, ReadyForQuery ``I``."""
        frames = self._status_frames
        if frames is None:
            frames = [encode(ParameterStatus(k, v)) for k, v in self.parameters.items()]
            frames.append(encode(BackendKeyData(self.process_id, self.secret)))
            frames.append(_READY_IDLE)
            self._status_frames = frames
        return frames

    def report(self, name: str, value: str) -> None:
        """The endpoint reported a ParameterStatus (e.g. during the reset)."""
        if self.parameters.get(name) != value:
            self.parameters[name] = value
            self._status_frames = None


class _Reader(asyncio.Protocol):
    """Reads the endpoint's answers during a reset or a probe."""

    def __init__(self) -> None:
        self.frames = FrameReader(tagged=True, max_length=_MAX_FRAME)
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        self.frames.feed(data)
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def frame(self) -> bytes:
        """The next frame; raises ConnectionError at EOF, ProtocolError on a bad length."""
        while (f := self.frames.next_frame()) is None:
            if self.closed:
                raise ConnectionResetError("the endpoint closed the session")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return f


class _Parked(asyncio.Protocol):
    """A parked session's protocol: anything at all from the endpoint ends it."""

    def __init__(self, pool: Pool, lease: Lease) -> None:
        self.pool = pool
        self.lease = lease

    def data_received(self, data: bytes) -> None:
        self.pool._discard(self.lease, "dead")

    def eof_received(self) -> bool:
        self.pool._discard(self.lease, "dead")
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.pool._discard(self.lease, "dead")


async def _exchange(lease: Lease, out: bytes, answers: int, seconds: float) -> str | None:
    """Send ``out`` and read ``answers`` ReadyForQuery replies, which must all say ``I``.

    Updates ``lease.parameters`` from ParameterStatus on the way. Returns None
    on success, else what went wrong (for the log).
    """
    transport = lease.transport
    if transport.is_closing():
        return "closed"
    reader = _Reader()
    transport.set_protocol(reader)
    transport.write(out)
    transport.resume_reading()
    try:
        async with asyncio.timeout(seconds):
            while answers:
                frame = await reader.frame()
                tag = frame[:1]
                if tag == b"Z":
                    answers -= 1
                    if frame[5:6] != b"I":
                        return f"ReadyForQuery {frame[5:6]!r} after the reset"
                elif tag == b"S":
                    msg = decode_backend(frame)
                    if isinstance(msg, ParameterStatus):
                        lease.report(msg.name, msg.value)
                elif tag == b"E":
                    return "ErrorResponse"
                elif tag not in (b"C", b"N", b"A"):  # CommandComplete, notices, notifications
                    return f"unexpected message {tag!r}"
    except TimeoutError:
        return "timed out"
    except (ConnectionError, ProtocolError) as exc:
        return type(exc).__name__
    finally:
        if not transport.is_closing():
            transport.pause_reading()
    if reader.frames.buffered:
        return "unexpected bytes after ReadyForQuery"
    return None


class Pool:
    """Parked endpoint sessions of one proxy, for every endpoint it serves."""

    def __init__(self, *, idle_timeout: float, max_idle: int, lifetime: float, max_total: int,
                 metrics: Metrics | None = None) -> None:
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.lifetime = lifetime
        self.max_total = max_total
        self.metrics = metrics
        self.closed = False
        #: Parked sessions per key, longest-parked first.
        self._parked: dict[tuple[object, ...], list[Lease]] = {}
        self._count = 0
        #: Keys still wanted after the last :meth:`drop` (a reload): a session of
        #: a replaced endpoint that finishes its reset later is closed, not parked.
        self._keep: Callable[[tuple[object, ...]], bool] | None = None
        #: Resets in flight per key, and the clients waiting for one to finish.
        self._resetting: dict[tuple[object, ...], int] = {}
        self._waiters: dict[tuple[object, ...], list[asyncio.Future[None]]] = {}

    def __len__(self) -> int:
        return self._count

    def draining(self) -> bool:
        """True after :meth:`close_all`: nothing is parked any more."""
        return self.closed

    def configure(self, *, idle_timeout: float, max_idle: int, lifetime: float,
                  max_total: int) -> None:
        """New bounds (SIGHUP); they apply from the next park on."""
        self.idle_timeout, self.max_idle = idle_timeout, max_idle
        self.lifetime, self.max_total = lifetime, max_total

    # -- taking -------------------------------------------------------------------

    async def take(self, key: tuple[object, ...]) -> Lease | None:
        """A live parked session for ``key`` (most recently parked first), or None.

        One parked longer than PROBE_AFTER answers a Sync first; one that does
        not is closed (``dead``) and the next is tried. With none parked but a
        reset of the same key in flight (its client left a moment ago), waits
        for that reset once: it takes one round trip, a fresh login four or five.
        """
        loop = asyncio.get_running_loop()
        waited = False
        while True:
            leases = self._parked.get(key)
            if not leases:
                if not waited and self._resetting.get(key):
                    waited = True
                    await self._wait_for_reset(key)
                    continue
                self._request("miss")
                return None
            lease = leases.pop()
            self._unpark(lease, key, leases)
            if loop.time() - lease.parked_at > PROBE_AFTER:
                try:
                    problem = await _exchange(lease, _SYNC, 1, PROBE_TIMEOUT)
                except asyncio.CancelledError:  # the client's session was ended meanwhile
                    self._close(lease, "shutdown")
                    raise
                if problem is not None:
                    log.info("parked endpoint session (pid %d) failed its check: %s",
                             lease.process_id, problem)
                    self._count_discard("dead")
                    lease.transport.abort()
                    continue
            if lease.transport.is_closing():  # pragma: no cover - _Parked discards first
                self._count_discard("dead")
                continue
            lease.uses += 1
            self._request("hit")
            return lease

    async def _wait_for_reset(self, key: tuple[object, ...]) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(key, [])
        waiters.append(fut)
        try:
            async with asyncio.timeout(RESET_TIMEOUT + 1):
                await fut
        except TimeoutError:
            pass
        finally:
            if fut in waiters:
                waiters.remove(fut)
            if not waiters:
                self._waiters.pop(key, None)

    def _reset_done(self, key: tuple[object, ...]) -> None:
        n = self._resetting.get(key, 0) - 1
        if n > 0:
            self._resetting[key] = n
        else:
            self._resetting.pop(key, None)
        for fut in self._waiters.pop(key, ()):
            if not fut.done():
                fut.set_result(None)

    def _unpark(self, lease: Lease, key: tuple[object, ...], leases: list[Lease]) -> None:
        if not leases:
            self._parked.pop(key, None)
        self._count -= 1
        if lease._timer is not None:
            lease._timer.cancel()
            lease._timer = None
        lease.transport.set_protocol(_Reader())  # nothing arrives: reading is paused
        lease.transport.pause_reading()
        self._gauge()

    # -- parking ------------------------------------------------------------------

    async def reset_and_park(self, lease: Lease, status: int) -> tuple[bool, str]:
        """Reset ``lease`` (its client ended cleanly; ``status`` is its last
        ReadyForQuery byte) and park it. Returns (parked, reason); when not
        parked the session is closed and the discard counted."""
        if self.closed:
            return self._close(lease, "shutdown")
        loop = asyncio.get_running_loop()
        if loop.time() - lease.created >= self.lifetime:
            return self._close(lease, "lifetime")
        out = _DISCARD_ALL
        answers = 1
        if status != ord("I"):
            out = _ROLLBACK + out
            answers = 2
        key = lease.key
        self._resetting[key] = self._resetting.get(key, 0) + 1
        try:
            try:
                problem = await _exchange(lease, out, answers, RESET_TIMEOUT)
            except asyncio.CancelledError:
                self._close(lease, "shutdown")
                raise
            if problem is not None:
                log.info("endpoint session (pid %d) not parked: reset failed: %s",
                         lease.process_id, problem)
                return self._close(lease, "reset_failed")
            if self.draining():  # SIGTERM came during the reset
                return self._close(lease, "shutdown")
            return self._park(lease)
        finally:
            self._reset_done(key)

    def restore(self, lease: Lease) -> None:
        """Put back a session taken for a client that left before using it (no reset needed)."""
        if self.closed:
            self._close(lease, "shutdown")
            return
        self._park(lease)

    def _park(self, lease: Lease) -> tuple[bool, str]:
        if self._keep is not None and not self._keep(lease.key):
            return self._close(lease, "reload")
        loop = asyncio.get_running_loop()
        now = loop.time()
        while len(self._parked.get(lease.key, ())) >= self.max_idle:
            self._discard(self._parked[lease.key][0], "max_idle")
        while self._count and self._count >= self.max_total:
            self._discard(self._longest_parked_list()[0], "max_idle")
        leases = self._parked.setdefault(lease.key, [])
        lease.parked_at = now
        leases.append(lease)
        self._count += 1
        until_idle = self.idle_timeout
        until_old = lease.created + self.lifetime - now
        if until_old < until_idle:
            lease._timer = loop.call_later(max(0.0, until_old), self._expire, lease, "lifetime")
        else:
            lease._timer = loop.call_later(until_idle, self._expire, lease, "idle_timeout")
        lease.transport.set_protocol(_Parked(self, lease))
        lease.transport.resume_reading()
        self._gauge()
        return True, "reset"

    def _longest_parked_list(self) -> list[Lease]:
        return min((v for v in self._parked.values() if v), key=lambda v: v[0].parked_at)

    def _expire(self, lease: Lease, reason: DiscardReason) -> None:
        lease._timer = None
        self._discard(lease, reason)

    def _discard(self, lease: Lease, reason: DiscardReason) -> None:
        """Close a parked session (no-op when it is no longer parked)."""
        leases = self._parked.get(lease.key)
        if not leases or lease not in leases:
            return
        leases.remove(lease)
        self._unpark(lease, lease.key, leases)
        if reason != "dead":
            log.debug("parked endpoint session (pid %d) closed: %s", lease.process_id, reason)
        self._close(lease, reason)

    def _close(self, lease: Lease, reason: DiscardReason) -> tuple[bool, str]:
        t = lease.transport
        if reason in ("dead", "reset_failed", "shutdown"):
            t.abort()
        elif not t.is_closing():
            t.write(b"X\x00\x00\x00\x04")  # Terminate, so the endpoint logs a clean exit
            t.close()
        self._count_discard(reason)
        return False, reason

    # -- dropping -----------------------------------------------------------------

    def evict(self, endpoint: object) -> bool:
        """Close the longest-parked session of ``endpoint`` (any key) to free its
        connection slot; False when it has none parked."""
        oldest: Lease | None = None
        for key, leases in self._parked.items():
            if key[0] is endpoint and leases and (
                    oldest is None or leases[0].parked_at < oldest.parked_at):
                oldest = leases[0]
        if oldest is None:
            return False
        self._discard(oldest, "max_idle")
        return True

    def drop(self, keep: Callable[[tuple[object, ...]], bool], reason: DiscardReason) -> int:
        """Close every parked session whose key ``keep`` refuses, and park none
        such from now on; returns how many were closed."""
        self._keep = keep
        n = 0
        for key in list(self._parked):
            if not keep(key):
                for lease in list(self._parked.get(key, ())):
                    self._discard(lease, reason)
                    n += 1
        return n

    def close_all(self) -> int:
        """Drain: close every parked session at once and park nothing from now on."""
        self.closed = True
        return self.drop(lambda _key: False, "shutdown")

    # -- metrics ------------------------------------------------------------------

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.pool_idle(self._count)

    def _request(self, result: Literal["hit", "miss"]) -> None:
        if self.metrics is not None:
            self.metrics.pool_request(result)

    def _count_discard(self, reason: DiscardReason) -> None:
        if self.metrics is not None:
            self.metrics.pool_discard(reason)

    def count_unclean(self) -> None:
        """A pooled session's client ended it uncleanly: closed as without reuse."""
        self._count_discard("unclean")

    def count_discard(self, reason: DiscardReason) -> None:
        """Count an endpoint session the caller closed itself."""
        self._count_discard(reason)
