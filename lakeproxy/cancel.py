"""CancelRequest routing.

Each session's client is handed the endpoint's process ID (so ``backend_pid``,
NOTIFY sender pids and ``pg_terminate_backend`` keep working) and a random
4-byte secret of lakeproxy's. The endpoint's own key (any length) stays here.
A CancelRequest that matches both pid and secret is forwarded to the endpoint
serving that session; any other is dropped, as PostgreSQL does.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CancelTarget(Generic[T]):
    """Where a session's cancel goes: the endpoint (opaque to this module) and its key."""

    endpoint: T
    process_id: int
    secret: bytes = field(repr=False)


class CancelRegistry(Generic[T]):
    """Maps the keys lakeproxy handed out to the endpoint keys they stand for."""

    def __init__(self) -> None:
        self._by_pid: dict[int, list[tuple[bytes, CancelTarget[T]]]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_pid.values())

    def register(self, target: CancelTarget[T]) -> bytes:
        """Remember ``target`` and return the 4-byte secret to give the client."""
        ours = secrets.token_bytes(4)
        self._by_pid.setdefault(target.process_id, []).append((ours, target))
        return ours

    def unregister(self, process_id: int, ours: bytes) -> None:
        entries = self._by_pid.get(process_id)
        if not entries:
            return
        entries[:] = [e for e in entries if e[0] != ours]
        if not entries:
            del self._by_pid[process_id]

    def lookup(self, process_id: int, secret: bytes) -> CancelTarget[T] | None:
        """The target for a client's (pid, secret), compared in constant time."""
        for ours, target in self._by_pid.get(process_id, ()):
            if hmac.compare_digest(ours, secret):
                return target
        return None
