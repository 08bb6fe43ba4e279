"""The soak, short: 200 concurrent clients with churn for 30 s through a
``python -m lakeproxy run`` process, then 10 s at rest (benchmarks/soak.py; the
full runs are 1,000 clients for 10 minutes and issue #15's churn mix, 300
clients for 6 minutes, see RELIABILITY.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECONDS = os.environ.get("LAKEPROXY_SOAK_SECONDS", "30")
CLIENTS = os.environ.get("LAKEPROXY_SOAK_CLIENTS", "200")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_soak_smoke(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "-m", "benchmarks.soak", "--seconds", SECONDS, "--clients", CLIENTS,
           "--ramp", "5", "--credential-lifetime", "20", "--rest", "10", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280,
                          check=False)
    assert out.exists(), proc.stdout + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    text = proc.stdout
    assert r["errors"] == {}, text
    assert r["leaked"] == {"proxy_sessions": 0, "frontdoor_sessions": 0, "backends": 0,
                           "fds": 0, "sockets": 0}, text
    assert r["checksums"]["mismatches"] == 0, text
    assert r["checksums"]["payloads"] > 50, text
    assert r["peak_concurrent_clients"] >= int(CLIENTS) // 2, text
    assert all(v["ok"] > 0 for v in r["scenarios"].values()), text
    # A database credential lifetime of 20 s: refreshed in the background under load.
    assert r["proxy_metrics"].get(
        'lakeproxy_credential_requests_total{kind="database",result="ok"}', 0) >= 2, text
    assert r["proxy_exit_code"] == 0, text
    # Memory comes back (issue #15): 10 s after the last client left, within
    # 32 MiB of the start (it stayed ~250 MiB up when ended sessions waited for
    # the garbage collector and the heap was never trimmed).
    rss = r["rss_mib"]
    assert rss["rest"] <= rss["start"] + 32, text
    assert r["passed"], text
