"""Backpressure, scaled for CI: a client reads a 200 MiB result at 20 MiB/s
through a ``python -m lakeproxy run`` process; the proxy's RSS may not grow by
more than 16 MiB (the splice holds at most its 256 KiB write-buffer high-water
mark per direction). The 1 GiB at 1 MiB/s run is in RELIABILITY.md."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from benchmarks.backpressure import slow_read
from benchmarks.rawpg import PgConn
from benchmarks.soakkit import ProxyProcess
from lakeproxy.emulator import Emulator


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_slow_reader_of_a_large_result(emulator: Emulator, tmp_path: Path) -> None:
    async with asyncio.timeout(100), ProxyProcess(tmp_path, emulator.env()) as proxy:
        warm = await PgConn.connect("127.0.0.1", proxy.port)
        await warm.query("SELECT 1")
        await warm.close()
        await asyncio.sleep(0.5)
        result = await slow_read(proxy.port, proxy.pid, mib=200, rate=20.0, bound_mib=16.0)
        assert result.checksum_ok, result.text()
        assert result.bytes_read == 200 * 1024 * 1024, result.text()
        assert result.seconds >= 9.0, "the client set the pace"
        assert result.rss_peak_mib <= result.rss_start_mib + 16, result.text()
        assert result.passed
