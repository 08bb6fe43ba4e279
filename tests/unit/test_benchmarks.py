"""Smoke tests: the benchmarks run end to end on tiny sizes (no timings asserted)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks import pool, procstat, report, run, splice_micro


def test_splice_micro_runs_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "micro.json"
    argv = ["--quick", "--bulk-mib", "2", "--small-mib", "1", "--round-trips", "50"]
    assert splice_micro.main([*argv, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "splice_micro"
    assert {"cpu", "cores", "kernel", "python", "uvloop", "openssl"} <= doc["machine"].keys()
    keys = {(s["loop"], s["relay"], s["case"]) for s in doc["series"]}
    # 2 loops x 2 relays + the direct path, for each of 4 cases
    assert len(keys) == 20
    assert all(s["median"] > 0 for s in doc["series"])
    assert len(doc["ratios"]) == 8


def test_splice_micro_tls_variants(tmp_path: Path) -> None:
    """The upstream leg over TLS, with the variants of benchmarks.splice_variants."""
    out = tmp_path / "micro.json"
    argv = ["--quick", "--tls", "--bulk-mib", "1", "--round-trips", "20", "--loops", "uvloop",
            "--relays", "splice,streams,direct", "--cases", "bulk64k,bulk_down,pingpong",
            "--variants", "protocol/sslproto,buffered/sslproto,bare/bio,shared/bio/hw64,"
            "protocol/biosimple/nodelay0"]
    assert splice_micro.main([*argv, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    relays = {s["relay"] for s in doc["series"]}
    assert "protocol/sslproto" in relays
    assert "shared/bio/hw64" in relays
    assert all(s["median"] > 0 for s in doc["series"])


def test_procstat_reads_this_process() -> None:
    sum(i * i for i in range(200_000))  # burn a little CPU
    assert procstat.cpu_seconds(os.getpid()) > 0
    mem = procstat.memory(os.getpid())
    assert 0 < mem.rss <= mem.hwm


def test_report_ratios_and_checks() -> None:
    results = {
        "direct": {"s1_tps": [10_000.0, 12_000.0, 11_000.0], "copy_out_mb_s": [200.0]},
        "pgbouncer": {"s1_tps": [8_000.0], "s8_cpu_s_per_10k": [0.45]},
        "lakeproxy": {
            "s1_tps": [8_800.0],
            "s8_cpu_s_per_10k": [0.60],
            "copy_out_mb_s": [230.0],
            "idle_kib_per_session": [40.0],
        },
    }
    assert report.median(results, "direct", "s1_tps") == 11_000.0
    assert report.ratio(results, "s1_tps", "direct") == pytest.approx(0.8)
    assert report.ratio(results, "s1_tps", "pgbouncer") == pytest.approx(1.1)
    by_what = {c.what: c for c in report.checks(results)}
    assert by_what["1-client `pgbench -S` TPS vs PgBouncer"].met is True
    assert by_what["proxy CPU per transaction at 8 clients"].met is False
    assert by_what["COPY out MB/s vs direct TLS"].met is True
    assert by_what["RSS per idle session (1,000 sessions)"].met is True
    assert by_what["COPY in MB/s vs direct TLS"].met is None
    metric_list = report.metrics(copy_mb=300, idle=1000, connect_clients=4)
    md = report.table(results, metric_list)
    assert (
        "| pgbench -S, 1 client: TPS | 11,000 [10,000, 12,000] | 8,000 | 8,800 | 0.80x | 1.10x |"
        in md
    )
    assert "COPY FROM STDIN" not in md  # rows nobody measured are left out
    assert report.ratios(results, metric_list)["s1_tps"] == {
        "lakeproxy/direct": pytest.approx(0.8),
        "lakeproxy/pgbouncer": pytest.approx(1.1),
    }



def test_round_by_round_ratios() -> None:
    results = {
        "direct": {"s1_tps": [10_000.0, 20_000.0, 10_000.0], "connect_per_s": [100.0, 0.0]},
        "pgbouncer": {"s1_tps": [8_000.0, 16_000.0, 5_000.0], "s8_tps": [1.0]},
        "lakeproxy": {
            "s1_tps": [8_000.0, 16_000.0, 6_000.0],
            "s8_tps": [2.0],  # one round: no row
            "connect_per_s": [90.0, 80.0],  # a zero on the other side: no row
        },
    }
    assert report.paired(results, "s1_tps", "direct") == pytest.approx([0.8, 0.8, 0.6])
    assert report.paired(results, "s1_tps", "pgbouncer") == pytest.approx([1.0, 1.0, 1.2])
    assert report.paired(results, "connect_per_s", "direct") is None
    assert report.paired(results, "copy_in_mb_s", "direct") is None
    uneven = {"direct": {"s1_tps": [1.0, 2.0]}, "lakeproxy": {"s1_tps": [1.0]}}
    assert report.paired(uneven, "s1_tps", "direct") is None
    metric_list = report.metrics(copy_mb=300, idle=1000, connect_clients=4)
    md = report.rounds_table(results, metric_list)
    assert md.splitlines() == [
        "| lakeproxy ÷ | round 1 | round 2 | round 3 | median |",
        "| --- | ---: | ---: | ---: | ---: |",
        "| pgbench -S, 1 client: TPS ÷ direct TLS | 0.80x | 0.80x | 0.60x | 0.80x |",
        "| pgbench -S, 1 client: TPS ÷ PgBouncer | 1.00x | 1.00x | 1.20x | 1.00x |",
    ]
    assert report.rounds_table({"lakeproxy": {"s1_tps": [1.0]}}, metric_list) == ""

@pytest.mark.slow
def test_side_by_side_harness_smoke(tmp_path: Path) -> None:
    """The whole harness on tiny sizes: TLS PostgreSQL, PgBouncer, every test."""
    argv = [
        "--quick",
        "--targets",
        "direct,pgbouncer",
        "--duration",
        "1",
        "--copy-mb",
        "2",
        "--idle",
        "10",
        "--out",
        str(tmp_path),
        "--name",
        "smoke",
    ]
    assert run.main(argv) == 0
    doc = json.loads((tmp_path / "smoke.json").read_text())
    assert {"postgresql", "pgbouncer", "pgbench", "openssl"} <= doc["machine"].keys()
    assert doc["results"]["direct"]["s1_tps"]["median"] > 0
    assert doc["results"]["pgbouncer"]["idle_kib_per_session"]["runs"]
    assert doc["results"]["pgbouncer"]["copy_in_cpu_s_per_gb"]["runs"]
    assert (tmp_path / "smoke.md").read_text().startswith("# lakeproxy benchmark")


def test_splice_micro_restores_cpu_affinity() -> None:
    before = os.sched_getaffinity(0)
    splice_micro.main(
        [
            "--quick",
            "--bulk-mib",
            "1",
            "--small-mib",
            "1",
            "--round-trips",
            "10",
            "--loops",
            "uvloop",
            "--relays",
            "splice",
        ]
    )
    assert os.sched_getaffinity(0) == before


@pytest.mark.slow
def test_session_reuse_benchmark_smoke(tmp_path: Path) -> None:
    """benchmarks.pool end to end on tiny sizes: all four paths, the counting relay."""
    argv = ["--quick", "--duration", "1", "--rtt", "2", "--out", str(tmp_path), "--name", "p"]
    assert pool.main(argv) == 0
    doc = json.loads((tmp_path / "p.json").read_text())
    assert set(doc["results"]) == {"direct", "pgbouncer", "lakeproxy", "lakeproxy_session"}
    rt = doc["round_trips"]
    # A fresh login opens an endpoint connection each time; reuse opens one for all.
    assert rt["lakeproxy"]["new_endpoint_connections"] > rt["lakeproxy_session"][
        "new_endpoint_connections"]
    assert rt["lakeproxy_session"]["new_endpoint_connections"] == 1
    assert (tmp_path / "p.md").read_text().startswith("# Session reuse benchmark")
