"""FrameReader: frames out of a byte stream, whatever the chunk boundaries."""

from __future__ import annotations

import pytest

from lakeproxy.wire import limits
from lakeproxy.wire.errors import ProtocolError
from lakeproxy.wire.framing import FrameReader

SSL = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
STARTUP = b"\x00\x00\x00\x14\x00\x03\x00\x00user\x00alice\x00\x00"
PASSWORD = b"p\x00\x00\x00\x0chunter2\x00"
EMPTY_SASL = b"p\x00\x00\x00\x04"
READY = b"Z\x00\x00\x00\x05I"


def startup_reader() -> FrameReader:
    return FrameReader(tagged=False, max_length=limits.MAX_STARTUP_PACKET)


def tagged_reader(max_length: int = limits.MAX_STARTUP_PHASE_MESSAGE) -> FrameReader:
    return FrameReader(tagged=True, max_length=max_length)


def drain(reader: FrameReader) -> list[bytes]:
    frames: list[bytes] = []
    while (frame := reader.next_frame()) is not None:
        frames.append(frame)
    return frames


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 1000])
def test_untagged_any_chunking(chunk: int) -> None:
    stream = SSL + STARTUP + SSL
    reader = startup_reader()
    frames: list[bytes] = []
    for i in range(0, len(stream), chunk):
        reader.feed(stream[i : i + chunk])
        frames += drain(reader)
    assert frames == [SSL, STARTUP, SSL]
    assert reader.buffered == 0


@pytest.mark.parametrize("chunk", [1, 2, 4, 5, 6, 1000])
def test_tagged_any_chunking(chunk: int) -> None:
    stream = PASSWORD + EMPTY_SASL + READY + PASSWORD
    reader = tagged_reader()
    frames: list[bytes] = []
    for i in range(0, len(stream), chunk):
        reader.feed(stream[i : i + chunk])
        frames += drain(reader)
    assert frames == [PASSWORD, EMPTY_SASL, READY, PASSWORD]
    assert reader.buffered == 0


def test_needs_more_data_then_completes() -> None:
    reader = tagged_reader()
    assert reader.next_frame() is None
    reader.feed(b"")
    assert reader.next_frame() is None
    reader.feed(READY[:4])
    assert reader.next_frame() is None  # header incomplete
    reader.feed(READY[4:5])
    assert reader.next_frame() is None  # header complete, body missing
    assert reader.buffered == 5
    reader.feed(READY[5:])
    assert reader.next_frame() == READY
    assert reader.next_frame() is None
    assert reader.buffered == 0


def test_frames_are_bytes_and_independent_of_the_buffer() -> None:
    reader = tagged_reader()
    data = bytearray(READY + READY)
    reader.feed(bytes(data))
    first = reader.next_frame()
    data[:] = b"x" * len(data)
    assert type(first) is bytes
    assert first == READY
    assert reader.next_frame() == READY


def test_set_mode_between_frames() -> None:
    """SSLRequest and StartupMessage, then a password, arriving in one chunk."""
    reader = startup_reader()
    reader.feed(SSL + STARTUP + PASSWORD + b"Q\x00")
    assert reader.next_frame() == SSL
    assert reader.next_frame() == STARTUP
    modes = [reader.tagged]
    reader.set_mode(tagged=True, max_length=limits.MAX_STARTUP_PHASE_MESSAGE)
    modes.append(reader.tagged)
    assert modes == [False, True]
    assert reader.next_frame() == PASSWORD
    assert reader.next_frame() is None
    assert reader.buffered == 2
    assert reader.trailing() == b"Q\x00"
    assert reader.buffered == 0
    assert reader.trailing() == b""


def test_trailing_returns_partial_and_whole_frames() -> None:
    reader = tagged_reader()
    reader.feed(READY + READY + READY[:3])
    assert reader.next_frame() == READY
    assert reader.buffered == len(READY) + 3
    assert reader.trailing() == READY + READY[:3]
    assert reader.next_frame() is None


def test_tagged_length_bounded_before_body() -> None:
    reader = tagged_reader(max_length=100)
    reader.feed(b"R" + (101).to_bytes(4, "big"))  # no body byte at all yet
    with pytest.raises(ProtocolError, match=r"invalid message length 101") as info:
        reader.next_frame()
    assert info.value.sqlstate == "08P01"
    # Sticky: the bad header is still there.
    with pytest.raises(ProtocolError):
        reader.next_frame()


def test_tagged_length_at_the_bound_is_accepted() -> None:
    reader = tagged_reader(max_length=100)
    frame = b"R" + (100).to_bytes(4, "big") + b"x" * 96
    reader.feed(frame)
    assert reader.next_frame() == frame


@pytest.mark.parametrize("length", [0, 1, 3, 0xFFFFFFFF, 0x80000000])
def test_tagged_impossible_length(length: int) -> None:
    reader = tagged_reader()
    reader.feed(b"E" + length.to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="invalid message length"):
        reader.next_frame()


def test_startup_length_bounded_before_body() -> None:
    reader = startup_reader()
    reader.feed((10_001).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="invalid length of startup packet") as info:
        reader.next_frame()
    assert "more than 10000" in str(info.value)
    assert info.value.sqlstate == "08P01"
    assert info.value.reply is False  # PostgreSQL closes without a reply


def test_startup_length_at_the_bound_is_accepted() -> None:
    reader = startup_reader()
    frame = (10_000).to_bytes(4, "big") + b"\x00" * 9996
    reader.feed(frame[:9999])
    assert reader.next_frame() is None
    reader.feed(frame[9999:])
    assert reader.next_frame() == frame


@pytest.mark.parametrize("length", [0, 4, 7])
def test_startup_impossible_length(length: int) -> None:
    reader = startup_reader()
    reader.feed(length.to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="invalid length of startup packet") as info:
        reader.next_frame()
    assert info.value.reply is False


def test_http_request_is_refused_at_once() -> None:
    """'GET ' read as a length is 1195725856: refused before waiting for a body."""
    reader = startup_reader()
    reader.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProtocolError, match="more than 10000"):
        reader.next_frame()


def test_many_small_frames_in_one_chunk() -> None:
    reader = tagged_reader()
    reader.feed(READY * 10_000)
    frames = drain(reader)
    assert len(frames) == 10_000
    assert set(frames) == {READY}
    assert reader.buffered == 0


def test_large_frame_fed_one_byte_at_a_time() -> None:
    body = bytes(range(256)) * 256
    frame = b"D" + (len(body) + 4).to_bytes(4, "big") + body
    reader = tagged_reader()
    got: list[bytes] = []
    for i in range(len(frame)):
        reader.feed(frame[i : i + 1])
        got += drain(reader)
    assert got == [frame]
