"""The session-mode header walk alone (lakeproxy.boundaries._Track), in CPU time.

Run from the repository root::

    python -m benchmarks.boundaries_micro [--json FILE]

Feeds the walk what one transaction moves through the proxy and reports the
best of several repeats of the process CPU time per transaction (CPU time, not
wall time, so other work on a shared machine inflates it less):

- simple protocol (pgbench -S): Query up; RowDescription, DataRow,
  CommandComplete, ReadyForQuery down;
- extended protocol with a prepared statement (pgbench -M prepared): Bind,
  Execute, Sync up; BindComplete, DataRow, CommandComplete, ReadyForQuery down;
- bulk: 64 KiB reads of one 8 MiB DataRow stream (COPY-like), per MB.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import timeit
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import describe
from lakeproxy.boundaries import _Track


def _msg(tag: str, body: bytes = b"") -> bytes:
    return tag.encode() + (len(body) + 4).to_bytes(4, "big") + body


def _per_call(stmt: str, env: dict[str, object], number: int) -> float:
    timer = timeit.Timer(stmt, globals=env, timer=time.process_time)
    return min(timer.repeat(number=number, repeat=9)) / number


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.boundaries_micro")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    t = _Track()
    simple_up = memoryview(bytearray(
        _msg("Q", b"SELECT abalance FROM pgbench_accounts WHERE aid = 12345;\x00")))
    simple_down = (_msg("T", b"\x00\x01abalance\x00" + b"\x00" * 18)
                   + _msg("D", b"\x00\x01\x00\x00\x00\x010") + _msg("C", b"SELECT 1\x00")
                   + _msg("Z", b"I"))
    ext_up = memoryview(bytearray(_msg("B", b"\x00P0_1\x00" + b"\x00" * 16)
                                  + _msg("E", b"\x00\x00\x00\x00\x00") + _msg("S")))
    ext_down = (_msg("2") + _msg("D", b"\x00\x01\x00\x00\x00\x010")
                + _msg("C", b"SELECT 1\x00") + _msg("Z", b"I"))
    env = {"u": t.up, "d": t.down, "su": simple_up, "sd": simple_down, "eu": ext_up,
           "ed": ext_down}
    simple = _per_call("u(su); d(sd)", env, 100_000)
    extended = _per_call("u(eu); d(ed)", env, 100_000)
    big = _msg("D", b"x" * (8 << 20))
    chunks = [big[i:i + 65536] for i in range(0, len(big), 65536)]
    bulk_track = _Track()
    bulk = _per_call("for c in chunks: d(c)", {"chunks": chunks, "d": bulk_track.down}, 20)
    result = {
        "simple_us_per_txn": simple * 1e6,
        "extended_us_per_txn": extended * 1e6,
        "bulk_us_per_mb": bulk / (len(big) / 1e6) * 1e6,
        "machine": describe(),
    }
    print(f"simple protocol:   {result['simple_us_per_txn']:.2f} µs of CPU per transaction")
    print(f"extended protocol: {result['extended_us_per_txn']:.2f} µs of CPU per transaction")
    print(f"bulk 64 KiB reads: {result['bulk_us_per_mb']:.2f} µs of CPU per MB")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
