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
