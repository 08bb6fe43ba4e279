"""Cut complete frames out of a byte stream, whatever the chunk boundaries.

Uses ``int.from_bytes`` on headers only; bodies go to the codec whole.
"""

from __future__ import annotations

from typing import Final

from lakeproxy.wire.errors import ProtocolError

#: Smallest valid length field: untagged packets carry at least a 4-byte code,
#: tagged messages at least the length itself.
_MIN_UNTAGGED: Final = 8
_MIN_TAGGED: Final = 4


class FrameReader:
    """Buffers bytes and hands back complete frames.

    ``tagged=False``: untagged startup packets (Int32 length incl. itself, at
    least 8: the length and a 4-byte code);
    ``tagged=True``: tag byte + Int32 length incl. itself (at least 4).
    ``max_length`` bounds the length field; a longer (or impossible) length
    raises ProtocolError as soon as the header is buffered, before any body
    byte is awaited (for a startup packet with ``reply=False``: PostgreSQL
    closes such a connection silently). The error is sticky: the bad header
    stays buffered, so calling ``next_frame()`` again raises again.

    Usage: ``feed(data)``; then ``next_frame()`` returns one whole frame
    (header included) or ``None`` when more bytes are needed; ``set_mode()``
    switches modes between frames (startup packet, then tagged messages);
    ``trailing()`` returns and clears everything buffered but not yet consumed.

    Cost: ``feed`` appends to one ``bytearray`` (amortised O(len(data))), and
    ``next_frame`` copies each frame out once and drops it from the front of the
    buffer (CPython shrinks a bytearray from the front without moving the rest),
    so feeding a stream one byte at a time is linear, not quadratic.
    """

    __slots__ = ("_buf", "_max_length", "_tagged")

    def __init__(self, *, tagged: bool, max_length: int) -> None:
        self._buf = bytearray()
        self._tagged = tagged
        self._max_length = max_length

    def feed(self, data: bytes) -> None:
        """Append ``data`` (any chunk of the stream, possibly empty)."""
        self._buf += data

    def next_frame(self) -> bytes | None:
        """Return the next complete frame, or ``None`` if more bytes are needed.

        Raises:
            ProtocolError: the buffered header's length field is below the
                minimum or above ``max_length`` (08P01).
        """
        buf = self._buf
        if self._tagged:
            if len(buf) < 5:
                return None
            length = int.from_bytes(buf[1:5], "big")
            if length < _MIN_TAGGED or length > self._max_length:
                raise ProtocolError(
                    f"invalid message length {length} for message type {buf[0]} "
                    f"(allowed {_MIN_TAGGED}..{self._max_length})"
                )
            size = length + 1
        else:
            if len(buf) < 4:
                return None
            length = int.from_bytes(buf[:4], "big")
            # PostgreSQL (postmaster.c, ProcessStartupPacket) closes the
            # connection without a reply here: the peer may not speak the
            # protocol at all (node-postgres sends Terminate, 'X\0\0\0\4',
            # before its startup when a client ends before connecting).
            if length > self._max_length:
                raise ProtocolError(
                    f"invalid length of startup packet ({length} bytes, more than "
                    f"{self._max_length})", reply=False,
                )
            if length < _MIN_UNTAGGED:
                raise ProtocolError(
                    f"invalid length of startup packet ({length} bytes)", reply=False
                )
            size = length
        if len(buf) < size:
            return None
        if len(buf) == size:
            frame = bytes(buf)
            buf.clear()
        else:
            frame = bytes(buf[:size])
            del buf[:size]
        return frame

    def set_mode(self, *, tagged: bool, max_length: int) -> None:
        """Switch framing for the frames that follow (already-buffered bytes included)."""
        self._tagged = tagged
        self._max_length = max_length

    @property
    def tagged(self) -> bool:
        """True while reading tagged messages."""
        return self._tagged

    @property
    def buffered(self) -> int:
        """Number of bytes held and not yet returned as frames."""
        return len(self._buf)

    def trailing(self) -> bytes:
        """Return and clear everything buffered but not yet returned as a frame."""
        data = bytes(self._buf)
        self._buf.clear()
        return data
