"""Smoke tests: the benchmarks run end to end on tiny sizes (no timings asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import splice_micro


def test_splice_micro_runs_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "micro.json"
    argv = ["--quick", "--bulk-mib", "2", "--small-mib", "1", "--round-trips", "50"]
    assert splice_micro.main([*argv, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "splice_micro"
    assert {"cpu", "cores", "kernel", "python", "uvloop", "openssl"} <= doc["machine"].keys()
    keys = {(s["loop"], s["relay"], s["case"]) for s in doc["series"]}
    # 2 loops x 2 relays + the direct path, for each of 3 cases
    assert len(keys) == 15
    assert all(s["median"] > 0 for s in doc["series"])
    assert len(doc["ratios"]) == 6
