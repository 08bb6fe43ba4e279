"""Side by side: direct TLS, PgBouncer and lakeproxy in front of one TLS PostgreSQL.

Run from the repository root::

    python -m benchmarks.run            # full run, ~15 minutes on 2 cores
    python -m benchmarks.run --quick    # smoke run, about a minute

What it does (see benchmarks/README.md for how to read the result):

1. starts the :class:`benchmarks.stack.Stack` (PostgreSQL with TLS, the fake
   workspace whose credential is the role's password, PgBouncer, lakeproxy);
2. prepares the data once: ``pgbench -i -s SCALE`` over direct TLS, a table of
   ``--copy-mb`` MB for COPY out and an UNLOGGED table for COPY in (unlogged so
   the server's WAL does not hide the path's cost);
3. for each round, for each test, runs every path in turn (the order rotates
   each round) and records, for the proxies, their process's CPU time from
   /proc/<pid>/stat around the test:

   - ``pgbench -S`` 1 client and 8 clients (``-j 2``) for ``--duration`` s;
   - ``pgbench -S -C`` (a new connection per transaction; lakeproxy's
     credential is cached by then) with ``--connect-clients`` clients;
   - psql ``COPY bench_copy TO STDOUT`` to /dev/null and ``COPY bench_in FROM
     STDIN`` from a file; psql does the TLS itself on the direct path;
   - ``--idle`` idle sessions opened through each proxy (each ran ``SELECT 1``,
     so PgBouncer holds a server connection for it): VmRSS before and after,
     and VmHWM, from /proc/<pid>/status;
4. prints and writes ``<out>/<stem>.md`` and ``<out>/<stem>.json``: medians with
   [min, max] per path, the ratios lakeproxy ÷ direct TLS and lakeproxy ÷
   PgBouncer, the targets of issue #5 met or not, and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Final, get_args

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import report
from benchmarks.machine import describe, markdown
from benchmarks.pgclients import (
    PGBENCH,
    ClientError,
    IdleSessions,
    copy_in,
    copy_out,
    pgbench,
    pgbench_init,
    psql,
)
from benchmarks.procstat import cpu_seconds, memory
from benchmarks.stack import DATABASE, Stack, Target, TargetName, version_of

TESTS: Final = ("s1", "s8", "connect", "copy_out", "copy_in", "idle")
RESULTS_DIR: Final = Path(__file__).resolve().parent / "results"
ROW_BYTES: Final = 1000  # about one COPY text line of bench_copy

Results = dict[str, dict[str, list[float]]]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark lakeproxy side by side with direct TLS and PgBouncer.",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: short, small, 1 round")
    p.add_argument("--rounds", type=int, default=3, help="rounds (3); medians and min-max")
    p.add_argument("--duration", type=int, default=10, help="seconds per pgbench run (10)")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale (10)")
    p.add_argument("--copy-mb", type=int, default=300, help="MB per COPY (300)")
    p.add_argument("--idle", type=int, default=1000, help="idle sessions (1000)")
    p.add_argument("--connect-clients", type=int, default=4, help="clients for -C (4)")
    p.add_argument(
        "--targets",
        default="direct,pgbouncer,lakeproxy",
        help="comma-separated paths to measure: direct,pgbouncer,lakeproxy (all)",
    )
    p.add_argument("--tests", default=",".join(TESTS), help=f"comma-separated ({','.join(TESTS)})")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for .md and .json")
    p.add_argument("--name", help="file stem for the results (default: date and time)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = 1
        args.duration = min(args.duration, 2)
        args.scale = 1
        args.copy_mb = min(args.copy_mb, 20)
        args.idle = min(args.idle, 50)
    args.targets = tuple(t for t in args.targets.split(",") if t)
    args.tests = tuple(t for t in args.tests.split(",") if t)
    for t in args.targets:
        if t not in get_args(TargetName):
            p.error(f"unknown target {t!r}")
    for t in args.tests:
        if t not in TESTS:
            p.error(f"unknown test {t!r}")
    return args


class Bench:
    """Holds the stack, the prepared data and the results while rounds run."""

    def __init__(self, stack: Stack, args: argparse.Namespace) -> None:
        self.stack = stack
        self.args = args
        self.results: Results = defaultdict(lambda: defaultdict(list))
        self.copy_bytes = 0
        self.copy_file = stack.workdir / "copy_in.data"

    # ------------------------------------------------------------------ setup

    def prepare(self) -> None:
        """pgbench tables, the COPY tables and the COPY-in file; warm every path."""
        stack, args = self.stack, self.args
        cluster = stack.cluster
        assert cluster is not None
        direct = stack.targets["direct"]
        log(f"pgbench -i -s {args.scale} (over direct TLS)")
        pgbench_init(direct.conninfo, stack.client_env(direct), scale=args.scale)
        rows = args.copy_mb * 1_000_000 // ROW_BYTES
        log(f"COPY tables: {rows:,} rows of ~{ROW_BYTES} bytes")
        role = f'"{stack.role}"'
        cluster.psql(
            "CREATE TABLE bench_copy (id int, t text);"  # noqa: S608  (our own numbers and role)
            " INSERT INTO bench_copy SELECT g, repeat(md5(g::text), 31)"
            f" FROM generate_series(1, {rows}) g;"
            f" ALTER TABLE bench_copy OWNER TO {role};"
            " CREATE UNLOGGED TABLE bench_in (LIKE bench_copy);"
            f" ALTER TABLE bench_in OWNER TO {role};",
            database=DATABASE,
        )
        cluster.psql("VACUUM ANALYZE bench_copy", database=DATABASE)
        self.copy_bytes = int(
            cluster.psql(
                "SELECT sum(octet_length(id::text) + octet_length(t) + 2) FROM bench_copy",
                database=DATABASE,
            ).strip()
        )
        with self.copy_file.open("wb") as f:
            subprocess.run(
                [
                    str(cluster.psql_path),
                    "-X",
                    "-q",
                    "-c",
                    "COPY bench_copy TO STDOUT",
                    cluster.dsn(database=DATABASE),
                ],
                stdout=f,
                check=True,
                timeout=600,
            )
        for target in stack.targets.values():
            out = psql(target.conninfo, stack.client_env(target), "SELECT current_user")
            log(f"{target.name}: logged in as {out.strip()}")

    # ------------------------------------------------------------------ tests

    def _record(self, target: Target, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.results[target.name][k].append(v)

    def _cpu(self, target: Target) -> float:
        return cpu_seconds(target.pid) if target.pid is not None else 0.0

    def _pgbench(self, target: Target, prefix: str, clients: int, threads: int) -> None:
        cpu0 = self._cpu(target)
        r = pgbench(
            target.conninfo,
            self.stack.client_env(target),
            clients=clients,
            threads=threads,
            seconds=self.args.duration,
        )
        cpu = self._cpu(target) - cpu0
        values = {f"{prefix}_tps": r.tps, f"{prefix}_latency_ms": r.latency_ms}
        if target.pid is not None:
            values[f"{prefix}_cpu_s_per_10k"] = cpu / r.transactions * 10_000
        self._record(target, values)
        log(f"  {target.name:9} {prefix}: {r.tps:,.0f} tps, {r.latency_ms:.3f} ms, cpu {cpu:.2f} s")

    def s1(self, target: Target) -> None:
        self._pgbench(target, "s1", 1, 1)

    def s8(self, target: Target) -> None:
        self._pgbench(target, "s8", 8, 2)

    def connect(self, target: Target) -> None:
        cpu0 = self._cpu(target)
        r = pgbench(
            target.conninfo,
            self.stack.client_env(target),
            clients=self.args.connect_clients,
            threads=min(2, self.args.connect_clients),
            seconds=self.args.duration,
            connect_each=True,
        )
        cpu = self._cpu(target) - cpu0
        values = {"connect_per_s": r.tps}
        if target.pid is not None:
            values["connect_cpu_ms"] = cpu / r.transactions * 1000
        self._record(target, values)
        log(f"  {target.name:9} connect: {r.tps:,.0f} conn/s, cpu {cpu:.2f} s")

    def _copy(self, target: Target, prefix: str, run: Callable[[], float]) -> None:
        cpu0 = self._cpu(target)
        seconds = run()
        cpu = self._cpu(target) - cpu0
        gb = self.copy_bytes / 1e9
        values = {f"{prefix}_mb_s": self.copy_bytes / seconds / 1e6}
        if target.pid is not None:
            values[f"{prefix}_cpu_s_per_gb"] = cpu / gb
        self._record(target, values)
        log(f"  {target.name:9} {prefix}: {values[f'{prefix}_mb_s']:,.0f} MB/s, cpu {cpu:.2f} s")

    def copy_out(self, target: Target) -> None:
        env = self.stack.client_env(target)
        self._copy(
            target, "copy_out", lambda: copy_out(target.conninfo, env, "COPY bench_copy TO STDOUT")
        )

    def copy_in(self, target: Target) -> None:
        cluster = self.stack.cluster
        assert cluster is not None
        cluster.psql("TRUNCATE bench_in", database=DATABASE)
        env = self.stack.client_env(target)
        self._copy(
            target, "copy_in", lambda: copy_in(target.conninfo, env, "bench_in", self.copy_file)
        )

    def idle(self, target: Target) -> None:
        if target.pid is None:
            return  # no proxy process to weigh
        # A fresh proxy process for each idle test: Python (and PgBouncer) keep
        # freed memory for reuse, so a process that already held 1,000 sessions
        # would show almost no growth the second time. A restart also empties
        # PgBouncer's pool, so its server connections from earlier tests are gone.
        target = self.stack.restart(target.name)
        assert target.pid is not None
        assert target.host is not None
        assert target.port is not None
        left = self.stack.wait_backends(at_most=20)
        if left > 20:
            log(f"  warning: {left} server sessions still open before the idle test")
        values = asyncio.run(self._idle(target, target.pid, target.host, target.port))
        self._record(target, values)
        log(
            f"  {target.name:9} idle: {values['idle_kib_per_session']:.1f} KiB/session, "
            f"rss {values['idle_rss_mib']:.1f} MiB (from {values['idle_base_mib']:.1f}), "
            f"opened in {values['idle_open_s']:.1f} s"
        )

    async def _idle(self, target: Target, pid: int, host: str, port: int) -> dict[str, float]:
        n = self.args.idle
        # One session first, so that the baseline includes what any first
        # connection sets up (lakeproxy: credential, TLS context; PgBouncer: pool).
        warm = IdleSessions(host, port, self.stack.role, DATABASE)
        await warm.open(1)
        await warm.close()
        await asyncio.sleep(0.2)
        sessions = IdleSessions(host, port, self.stack.role, DATABASE)
        before = memory(pid)
        try:
            seconds = await sessions.open(n)
            await asyncio.sleep(0.5)  # let the proxy settle (buffers, GC)
            after = memory(pid)
            server_sessions = await asyncio.to_thread(self.stack.backends)
        finally:
            await sessions.close()
        if server_sessions < n:
            log(f"  warning: {target.name} had {server_sessions} server sessions for {n} clients")
        return {
            "idle_kib_per_session": (after.rss - before.rss) / n / 1024,
            "idle_base_mib": before.rss / 2**20,
            "idle_rss_mib": after.rss / 2**20,
            "idle_hwm_mib": after.hwm / 2**20,
            "idle_open_s": seconds,
        }

    # ------------------------------------------------------------------ rounds

    def run(self) -> None:
        names = [n for n in self.args.targets if n in self.stack.targets]
        for rnd in range(self.args.rounds):
            k = rnd % len(names)
            order = names[k:] + names[:k]
            log(f"round {rnd + 1}/{self.args.rounds}: order {', '.join(order)}")
            for test in self.args.tests:
                for name in order:
                    target = self.stack.targets[name]
                    try:
                        getattr(self, test)(target)
                    except ClientError as exc:
                        log(f"  {name} {test} FAILED: {exc}\n{self.stack.proxy_log_tail(name)}")
                        raise


def _rounds_section(table: str) -> list[str]:
    """The round-by-round ratios, when there are at least two rounds."""
    if not table:
        return []
    return [
        "## Round by round",
        "",
        "A round runs the paths back to back, so each ratio below pairs runs taken"
        " minutes apart at most; their median is less exposed to the machine's drift"
        " than the ratio of the medians above (which the targets use).",
        "",
        table,
        "",
    ]


def log(msg: str) -> None:
    """Progress on stderr with a timestamp."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; write the markdown and JSON results; return 0."""
    args = _parse(argv)
    started = time.perf_counter()
    stamp = dt.datetime.now(dt.UTC)
    load_start = os.getloadavg()[0]
    max_conn = max(200, args.idle + 100)
    with Stack(args.targets, max_connections=max_conn, keep=args.keep) as stack:
        log(f"work directory {stack.workdir}")
        log("using " + ", ".join(stack.versions.values()))
        bench = Bench(stack, args)
        bench.prepare()
        bench.run()
        versions = dict(stack.versions)
    versions["pgbench"] = version_of([PGBENCH, "--version"])
    elapsed = time.perf_counter() - started
    # Others' work on the machine competes for the same cores: record it.
    versions["load average (1 min) at start / end"] = f"{load_start:.2f} / {os.getloadavg()[0]:.2f}"
    machine = describe(**versions)
    metric_list = report.metrics(
        copy_mb=round(bench.copy_bytes / 1e6), idle=args.idle, connect_clients=args.connect_clients
    )
    checks = report.checks(bench.results)
    command = "python -m benchmarks.run " + shlex.join(argv if argv is not None else sys.argv[1:])
    md = "\n".join(
        [
            f"# lakeproxy benchmark, {stamp:%Y-%m-%d %H:%M} UTC",
            "",
            f"`{command.strip()}`: {args.rounds} round(s), pgbench runs of {args.duration} s,"
            f" scale {args.scale}, COPY of {bench.copy_bytes / 1e6:.0f} MB,"
            f" {args.idle:,} idle sessions; {elapsed / 60:.1f} minutes in all.",
            "Cells: median [min, max] over rounds. Proxy CPU is the proxy process's"
            " user+system time from /proc; direct TLS has no proxy.",
            "",
            report.table(bench.results, metric_list),
            "",
            *_rounds_section(report.rounds_table(bench.results, metric_list)),
            "## Targets (issue #5)",
            "",
            report.checks_table(checks),
            "",
            "## Machine",
            "",
            markdown(machine),
            "",
        ]
    )
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{stamp:%Y%m%d-%H%M}" + ("-quick" if args.quick else "")
    (args.out / f"{stem}.md").write_text(md)
    doc = {
        "benchmark": "run",
        "date": stamp.isoformat(timespec="seconds"),
        "command": command.strip(),
        "seconds": elapsed,
        "params": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("out", "name")
        },
        "copy_bytes": bench.copy_bytes,
        "machine": machine,
        "results": report.summary(bench.results),
        "ratios": report.ratios(bench.results, metric_list),
        "targets": [
            {"what": c.what, "goal": c.goal, "reached": c.reached, "met": c.met} for c in checks
        ],
    }
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    log(f"wrote {args.out / stem}.md and .json ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
