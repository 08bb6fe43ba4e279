"""Backpressure: a client reading a large result slowly must not grow the proxy.

One client runs ``COPY (SELECT repeat('x', 1023) FROM generate_series(1, N))
TO STDOUT`` (N KiB rows: ``--mib`` MiB in all) through ``python -m lakeproxy
run`` and reads it at ``--rate`` MiB/s, while the proxy's RSS is sampled from
/proc. The splice stops reading the endpoint whenever the client's write
buffer passes its high-water mark (256 KiB), so the proxy should hold at most
a few hundred KiB for this session, whatever the result's size; the bound
checked is ``start RSS + --bound-mib`` (16 MiB by default). The payload's
sha256 is checked too.

    .venv/bin/python -m benchmarks.backpressure --mib 1024 --rate 1     # ~17 min
    .venv/bin/python -m benchmarks.backpressure --mib 200 --rate 20     # ~10 s

``tests/soak/test_backpressure.py`` runs the 200 MiB version.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass

from benchmarks.rawpg import PgConn
from benchmarks.soakkit import EmulatorProcess, MiB, ProxyProcess, Sampler, workdir

ROW = b"x" * 1023 + b"\n"


@dataclass(frozen=True, slots=True)
class Result:
    mib: int
    rate_mib_s: float
    seconds: float
    bytes_read: int
    checksum_ok: bool
    rss_start_mib: float
    rss_peak_mib: float
    rss_end_mib: float
    bound_mib: float
    samples: int

    @property
    def passed(self) -> bool:
        return (
            self.checksum_ok
            and self.bytes_read == self.mib * MiB
            and self.rss_peak_mib <= self.rss_start_mib + self.bound_mib
        )

    def text(self) -> str:
        return (
            f"backpressure: {self.mib} MiB read at {self.rate_mib_s} MiB/s in "
            f"{self.seconds:.1f} s; checksum {'ok' if self.checksum_ok else 'MISMATCH'}; "
            f"proxy RSS start {self.rss_start_mib:.1f} MiB, peak {self.rss_peak_mib:.1f} MiB "
            f"(+{self.rss_peak_mib - self.rss_start_mib:.1f}), end {self.rss_end_mib:.1f} MiB; "
            f"bound start + {self.bound_mib:.0f} MiB: {'PASS' if self.passed else 'FAIL'}"
        )


def expected_digest(rows: int) -> bytes:
    h = hashlib.sha256()
    block = ROW * 1024
    for _ in range(rows // 1024):
        h.update(block)
    h.update(ROW * (rows % 1024))
    return h.digest()


async def slow_read(
    port: int, pid: int, *, mib: int, rate: float, bound_mib: float = 16.0, interval: float = 0.1
) -> Result:
    """Read ``mib`` MiB through the proxy at ``rate`` MiB/s, sampling ``pid``'s RSS."""
    rows = mib * 1024
    conn = await PgConn.connect("127.0.0.1", port)
    sampler = Sampler(pid, interval=interval)
    start = sampler.sample()
    sampler.start()
    started = time.monotonic()
    try:
        sql = f"COPY (SELECT repeat('x', 1023) FROM generate_series(1, {rows})) TO STDOUT"  # noqa: S608
        digest, n = await conn.copy_out_paced(sql, rate * MiB)
    finally:
        seconds = time.monotonic() - started
        await sampler.stop()
        await conn.close()
    end = sampler.sample()
    return Result(
        mib=mib,
        rate_mib_s=rate,
        seconds=seconds,
        bytes_read=n,
        checksum_ok=digest == expected_digest(rows),
        rss_start_mib=start.rss / MiB,
        rss_peak_mib=sampler.peak_rss / MiB,
        rss_end_mib=end.rss / MiB,
        bound_mib=bound_mib,
        samples=len(sampler.samples),
    )


async def run(mib: int, rate: float, bound_mib: float) -> Result:
    base = workdir("lakeproxy-backpressure-")
    try:
        async with EmulatorProcess(base / "emulator", max_connections=50) as emu:
            assert emu.info is not None
            async with ProxyProcess(base / "proxy", emu.info.env) as proxy:
                # One small session first, so start-up allocations are behind us.
                warm = await PgConn.connect("127.0.0.1", proxy.port)
                await warm.query("SELECT 1")
                await warm.close()
                await asyncio.sleep(0.5)
                return await slow_read(
                    proxy.port, proxy.pid, mib=mib, rate=rate, bound_mib=bound_mib, interval=0.25
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.backpressure",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--rate", type=float, default=1.0, help="MiB/s the client reads at")
    p.add_argument("--bound-mib", type=float, default=16.0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import uvloop

    result = uvloop.run(run(args.mib, args.rate, args.bound_mib))
    print(result.text())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**asdict(result), "passed": result.passed}, f, indent=2)
            f.write("\n")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
