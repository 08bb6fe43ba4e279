"""The machine a benchmark ran on, recorded next to every result."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import ssl
import sys
from pathlib import Path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    """Return the installed version of distribution ``name``, or ``"not installed"``."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def describe(**extra: str) -> dict[str, str]:
    """Return the CPU model, core count, kernel, Python, uvloop and OpenSSL versions.

    ``extra`` adds further entries (e.g. ``postgresql="15.8"``) as they are.
    """
    info = {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0] + f" ({platform.python_implementation()})",
        "uvloop": package_version("uvloop"),
        "openssl": ssl.OPENSSL_VERSION,
    }
    info.update(extra)
    return info


def markdown(info: dict[str, str]) -> str:
    """Return ``info`` as a two-column markdown table."""
    rows = ["| | |", "| --- | --- |"]
    rows += [f"| {k} | {v} |" for k, v in info.items()]
    return "\n".join(rows)
