"""lakeproxy.memory: the allocator settings and the trim, each in a fresh
Python process (malloc's state is per process and cannot be reset)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap

import pytest

from lakeproxy import memory

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the settings are glibc's (a no-op elsewhere)"
)


def _run(script: str, *args: str) -> dict[str, object]:
    """Run ``script`` in a fresh interpreter; it prints one JSON object."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# A block of 1 MiB after a 4 MiB one was freed: glibc's dynamic threshold has
# risen to 4 MiB by then, so without a fixed threshold the 1 MiB comes from the
# heap (and the heap then keeps up to 8 MiB free at its top).
_THRESHOLD = """
    import json, sys
    from lakeproxy import memory
    applied = memory.configure({}) if sys.argv[1] == "configure" else {}
    info = memory._glibc.mallinfo2
    big = bytearray(4 << 20)
    del big
    before = info().hblks
    block = bytearray(1 << 20)
    print(json.dumps({"applied": applied, "mapped": info().hblks - before}))
"""


def test_configure_fixes_the_mmap_threshold() -> None:
    default = _run(_THRESHOLD, "default")
    assert default["mapped"] == 0  # the dynamic threshold: from the heap
    configured = _run(_THRESHOLD, "configure")
    assert configured["applied"] == {
        "mmap_threshold": memory.MMAP_THRESHOLD,
        "trim_threshold": memory.TRIM_THRESHOLD,
        "arena_max": memory.ARENA_MAX,
    }
    assert configured["mapped"] == 1  # above MMAP_THRESHOLD: mapped on its own


# Eight threads allocating at the same time: without a cap each gets an arena.
_ARENAS = """
    import ctypes, json, os, sys, threading
    from lakeproxy import memory
    applied = memory.configure({}) if sys.argv[1] == "configure" else {}
    barrier = threading.Barrier(8)
    def work():
        keep = [bytearray(1000) for _ in range(100)]
        barrier.wait()
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    # malloc_stats() prints one "Arena N:" block per arena on stderr (fd 2)
    r, w = os.pipe()
    saved = os.dup(2)
    os.dup2(w, 2)
    ctypes.CDLL(None).malloc_stats()
    os.dup2(saved, 2)
    os.close(w)
    text = os.read(r, 1 << 20).decode()
    print(json.dumps({"arenas": text.count("Arena ")}))
"""


def test_configure_caps_the_arenas() -> None:
    assert int(str(_run(_ARENAS, "default")["arenas"])) > memory.ARENA_MAX
    assert int(str(_run(_ARENAS, "configure")["arenas"])) <= memory.ARENA_MAX


def test_a_malloc_variable_in_the_environment_wins() -> None:
    applied = _run("""
        import json
        from lakeproxy import memory
        print(json.dumps(memory.configure({"MALLOC_ARENA_MAX": "4"})))
    """)
    assert "arena_max" not in applied
    assert applied["mmap_threshold"] == memory.MMAP_THRESHOLD


# A burst: 2,000 blocks of 100 KB with a small block kept between each two (as
# sessions' long-lived objects end up between their buffers), then the burst
# freed. free() cannot give back the middle of the heap; the Trimmer does.
_BURST = """
    import json, os
    from lakeproxy import memory
    memory.configure({})
    page = os.sysconf("SC_PAGE_SIZE")
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    trimmer = memory.Trimmer()
    start = rss()
    burst, keep = [], []
    for i in range(2000):
        burst.append(b"x" * 100_000)
        keep.append(bytes(600))  # a call: a new object each time (b"y" * 600 is one constant)
    peak = rss()
    del burst
    freed = rss()
    first = trimmer.tick()
    trimmed = rss()
    second = trimmer.tick()
    print(json.dumps({"start": start, "peak": peak, "freed": freed, "trimmed": trimmed,
                      "first": first, "second": second, "trims": trimmer.trims}))
"""


def test_the_trimmer_gives_a_burst_back() -> None:
    r = {k: int(str(v)) if not isinstance(v, bool) else v for k, v in _run(_BURST).items()}
    mib = 1024 * 1024
    assert r["peak"] - r["start"] > 150 * mib  # the burst was resident
    assert r["freed"] - r["start"] > 150 * mib  # and free() kept it
    assert r["first"] is True
    assert r["trimmed"] - r["start"] < 16 * mib  # the trim gave it back
    assert r["second"] is False  # nothing new was freed since: no second trim
    assert r["trims"] == 1


def test_the_trimmer_runs_on_the_loop() -> None:
    """start() ticks every interval on the running loop; stop() ends it."""
    r = _run("""
        import asyncio, json
        from lakeproxy import memory
        async def main():
            trimmer = memory.Trimmer(interval=0.05, min_bytes=1 << 20)
            trimmer.start()
            burst, keep = [], []
            for _ in range(200):
                burst.append(b"x" * 100_000)
                keep.append(bytes(600))
            del burst
            await asyncio.sleep(0.5)
            trimmer.stop()
            return trimmer.trims
        print(json.dumps({"trims": asyncio.run(main())}))
    """)
    assert r["trims"] == 1
