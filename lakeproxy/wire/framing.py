"""Cut complete frames out of a byte stream, whatever the chunk boundaries.

Uses ``int.from_bytes`` on headers only; bodies go to the codec whole.
"""

from __future__ import annotations


class FrameReader:
    """Buffers bytes and hands back complete frames.

    ``tagged=False``: untagged startup packets (Int32 length incl. itself);
    ``tagged=True``: tag byte + Int32 length incl. itself.
    ``max_length`` bounds the length field; a longer (or impossible, < 4) length
    raises ProtocolError before any body byte is awaited.

    Usage: ``feed(data)``; then ``next_frame()`` returns one whole frame
    (header included) or ``None`` when more bytes are needed; ``set_tagged()``
    switches modes between frames (startup packet, then tagged messages);
    ``trailing()`` returns and clears everything buffered but not yet consumed.
    """

    def __init__(self, *, tagged: bool, max_length: int) -> None:
        raise NotImplementedError

    def feed(self, data: bytes) -> None:
        raise NotImplementedError

    def next_frame(self) -> bytes | None:
        raise NotImplementedError

    def set_mode(self, *, tagged: bool, max_length: int) -> None:
        raise NotImplementedError

    @property
    def buffered(self) -> int:
        """Number of bytes held and not yet returned as frames."""
        raise NotImplementedError

    def trailing(self) -> bytes:
        raise NotImplementedError
