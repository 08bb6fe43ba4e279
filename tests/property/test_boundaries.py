"""Session mode's header walk (lakeproxy.boundaries._Track) against a whole-message model.

The walk sees the byte stream in whatever pieces the sockets deliver; it must
reach the same verdict as a reader that sees whole messages, for any split
(headers and ReadyForQuery's status byte cut anywhere).
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from lakeproxy.boundaries import _Track

MANY = settings(max_examples=400, deadline=None)


def msg(tag: str, body: bytes = b"") -> bytes:
    return tag.encode() + (len(body) + 4).to_bytes(4, "big") + body


def ready(status: str) -> bytes:
    return msg("Z", status.encode())


# (client message, server reply) steps of a conversation.
STEPS: dict[str, tuple[list[bytes], list[bytes]]] = {
    "query": ([msg("Q", b"SELECT 1\x00")],
              [msg("T", b"\x00\x01" + b"x" * 30), msg("D", b"\x00\x01" + b"y" * 300),
               msg("C", b"SELECT 1\x00"), ready("I")]),
    "begin": ([msg("Q", b"BEGIN\x00")], [msg("C", b"BEGIN\x00"), ready("T")]),
    "fail": ([msg("Q", b"oops\x00")], [msg("E", b"SERROR\x00\x00"), ready("E")]),
    "set": ([msg("Q", b"SET x\x00")], [msg("C", b"SET\x00"), msg("S", b"a\x00b\x00"),
                                       ready("I")]),
    "extended": ([msg("P", b"\x00q\x00\x00\x00"), msg("B", b"\x00" * 10),
                  msg("E", b"\x00\x00\x00\x00\x00"), msg("S")],
                 [msg("1"), msg("2"), msg("C", b"SELECT 1\x00"), ready("I")]),
    "big_row": ([msg("Q", b"SELECT big\x00")],
                [msg("D", b"z" * 70000), msg("C", b"SELECT 1\x00"), ready("I")]),
    "notice": ([], [msg("N", b"SNOTICE\x00\x00"), msg("A", b"\x00\x00\x00\x01c\x00p\x00")]),
    "copy_in_done": ([msg("Q", b"COPY t FROM STDIN\x00")], [msg("G", b"\x00\x00\x00")]),
}


def conversation(names: list[str]) -> tuple[bytes, bytes]:
    up = b""
    down = b""
    for name in names:
        c, s = STEPS[name]
        up += b"".join(c)
        down += b"".join(s)
    return up, down


def feed(track: _Track, data: bytes, cuts: list[int], direction: str) -> int:
    """Feed ``data`` cut at ``cuts``; returns the absolute Terminate offset or -1."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    found = -1
    for a, b in itertools.pairwise(points):
        if direction == "up":
            at = track.up(memoryview(data[a:b]))
            if at >= 0 and found < 0:
                found = a + at
        else:
            track.down(data[a:b])
    return found


def verdict(track: _Track) -> tuple[bool, int, int, bool]:
    return track.clean(), track.pending, track.status, track.in_copy


@MANY
@given(
    st.lists(st.sampled_from(sorted(STEPS)), max_size=6),
    st.lists(st.integers(min_value=0, max_value=200000), max_size=12),
    st.lists(st.integers(min_value=0, max_value=200000), max_size=12),
)
def test_any_split_gives_the_whole_message_verdict(
    names: list[str], up_cuts: list[int], down_cuts: list[int],
) -> None:
    up, down = conversation(names)
    whole = _Track()
    whole.up(up)
    whole.down(down)
    split = _Track()
    feed(split, up, up_cuts, "up")
    feed(split, down, down_cuts, "down")
    assert verdict(split) == verdict(whole)


@MANY
@given(st.lists(st.sampled_from(["query", "begin", "fail", "set", "extended", "big_row"]),
                max_size=5),
       st.lists(st.integers(min_value=0, max_value=200000), max_size=8))
def test_terminate_is_found_where_it_is(names: list[str], cuts: list[int]) -> None:
    up, down = conversation(names)
    track = _Track()
    assert feed(track, up, cuts, "up") == -1
    track.down(down)
    assert track.clean()  # every step above is answered
    assert track.up(msg("X")) == 0


def test_rules() -> None:
    up, down = conversation(["query"])
    t = _Track()
    t.up(up)
    assert not t.clean()  # the answer has not arrived
    t.down(down)
    assert t.clean()

    t = _Track()
    t.up(msg("P", b"\x00q\x00\x00\x00"))  # Parse without Sync
    assert not t.clean()

    up, down = conversation(["copy_in_done"])
    t = _Track()
    t.up(up)
    t.down(down)
    t.up(msg("d", b"1\n") + msg("c"))
    assert not t.clean()  # CopyDone sent, CommandComplete/ReadyForQuery not yet
    t.down(msg("C", b"COPY 1\x00") + ready("I"))
    assert t.clean()  # COPY data belongs to its Query, which is answered

    t = _Track()
    t.down(msg("E", b"SFATAL\x00C57P01\x00\x00"))  # answers nothing: a FATAL
    assert not t.clean()

    t = _Track()
    t.down(msg("W", b"\x00\x00\x00"))  # CopyBoth (replication)
    assert not t.clean()

    t = _Track()
    stream = msg("Q", b"x\x00")
    t.up(stream)
    t.down(ready("T"))
    assert t.status == ord("T")
    assert t.up(msg("X") + b"junk") == 0
    assert not t.clean()  # bytes after Terminate

    t = _Track()
    assert t.up(msg("X")[:2]) == -1
    assert t.up(msg("X")[2:]) == -1  # a Terminate split across reads
    assert not t.clean()
