"""Read a process's CPU time and memory from /proc (Linux)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """Return user + system CPU seconds of process ``pid`` (all its threads).

    Resolution is one clock tick (usually 10 ms). Raises OSError when the
    process is gone.
    """
    stat = Path(f"/proc/{pid}/stat").read_text()
    # the command name (field 2) may hold spaces or parentheses: split after the last ')'
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
    return (utime + stime) / _CLK_TCK


@dataclass(frozen=True, slots=True)
class Memory:
    """Resident set now (``rss``) and its peak (``hwm``), in bytes."""

    rss: int
    hwm: int


def memory(pid: int) -> Memory:
    """Return VmRSS and VmHWM of process ``pid``. Raises OSError when it is gone."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024  # reported in kB
    return Memory(values.get("VmRSS", 0), values.get("VmHWM", 0))


def smaps(pid: int) -> dict[str, float]:
    """Resident MiB of ``pid`` by kind of mapping, from /proc/PID/smaps:
    ``heap`` (glibc's main arena, brk), ``anon`` (anonymous mappings: other
    arenas, mmapped allocations, thread stacks), ``file`` (libraries, mapped
    files), plus ``anon_maps``, the number of anonymous mappings. Raises
    OSError when the process is gone."""
    out = {"heap": 0.0, "anon": 0.0, "file": 0.0, "anon_maps": 0.0}
    kind = "anon"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(maxsplit=6)
        if "-" in first[0] and len(first) >= 5 and ":" in first[3]:  # a mapping's header
            name = first[5] if len(first) > 5 else ""
            kind = "heap" if name == "[heap]" else "file" if name.startswith("/") else "anon"
            if kind == "anon" and not name:
                out["anon_maps"] += 1
        elif first[0] == "Rss:":
            out[kind] += int(first[1]) / 1024
    return {k: round(v, 1) for k, v in out.items()}
