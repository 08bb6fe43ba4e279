"""Turn the side-by-side runs into a markdown table, target checks and JSON."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

#: results[target][metric] -> one value per round
Results = Mapping[str, Mapping[str, Sequence[float]]]

TARGETS: Final = ("direct", "pgbouncer", "lakeproxy")


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    label: str
    better: Literal["higher", "lower"]
    digits: int = 1


def metrics(*, copy_mb: int, idle: int, connect_clients: int) -> list[Metric]:
    """Every metric the harness records, in table order."""
    return [
        Metric("s1_tps", "pgbench -S, 1 client: TPS", "higher", 0),
        Metric("s1_latency_ms", "pgbench -S, 1 client: latency (ms)", "lower", 3),
        Metric("s1_cpu_s_per_10k", "pgbench -S, 1 client: proxy CPU s / 10k txn", "lower", 3),
        Metric("s8_tps", "pgbench -S, 8 clients: TPS", "higher", 0),
        Metric("s8_latency_ms", "pgbench -S, 8 clients: latency (ms)", "lower", 3),
        Metric("s8_cpu_s_per_10k", "pgbench -S, 8 clients: proxy CPU s / 10k txn", "lower", 3),
        Metric(
            "connect_per_s",
            f"pgbench -S -C, {connect_clients} clients: connections/s",
            "higher",
            0,
        ),
        Metric("connect_cpu_ms", "pgbench -S -C: proxy CPU ms / new connection", "lower", 2),
        Metric("copy_out_mb_s", f"COPY TO STDOUT, {copy_mb} MB: MB/s", "higher", 0),
        Metric("copy_out_cpu_s_per_gb", "COPY TO STDOUT: proxy CPU s / GB (= ms/MB)", "lower", 2),
        Metric("copy_in_mb_s", f"COPY FROM STDIN, {copy_mb} MB: MB/s", "higher", 0),
        Metric("copy_in_cpu_s_per_gb", "COPY FROM STDIN: proxy CPU s / GB (= ms/MB)", "lower", 2),
        Metric("idle_kib_per_session", f"{idle:,} idle sessions: proxy RSS KiB / session", "lower"),
        Metric("idle_base_mib", "fresh proxy after one session: RSS (MiB)", "lower"),
        Metric("idle_rss_mib", f"... with {idle:,} idle sessions: RSS (MiB)", "lower"),
        Metric("idle_hwm_mib", f"... with {idle:,} idle sessions: peak RSS, VmHWM (MiB)", "lower"),
        Metric("idle_open_s", f"{idle:,} idle sessions: seconds to open", "lower", 2),
    ]


def median(results: Results, target: str, key: str) -> float | None:
    """The median of ``results[target][key]``, or None when not measured."""
    runs = results.get(target, {}).get(key)
    return statistics.median(runs) if runs else None


def ratio(results: Results, key: str, over: str) -> float | None:
    """lakeproxy's median ÷ ``over``'s median for ``key`` (None when missing)."""
    a, b = median(results, "lakeproxy", key), median(results, over, key)
    if a is None or b is None or b == 0:
        return None
    return a / b


def _cell(runs: Sequence[float] | None, digits: int) -> str:
    if not runs:
        return "-"
    med = statistics.median(runs)
    if len(runs) == 1:
        return f"{med:,.{digits}f}"
    return f"{med:,.{digits}f} [{min(runs):,.{digits}f}, {max(runs):,.{digits}f}]"


def _ratio_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(results: Results, metric_list: Sequence[Metric]) -> str:
    """Markdown: one row per metric, medians [min, max] per path, then the ratios."""
    rows = [
        "| metric | direct TLS | PgBouncer | lakeproxy | lakeproxy ÷ direct "
        "| lakeproxy ÷ PgBouncer |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in metric_list:
        if not any(results.get(t, {}).get(m.key) for t in TARGETS):
            continue
        cells = [_cell(results.get(t, {}).get(m.key), m.digits) for t in TARGETS]
        rows.append(
            f"| {m.label} | {' | '.join(cells)} | {_ratio_cell(ratio(results, m.key, 'direct'))}"
            f" | {_ratio_cell(ratio(results, m.key, 'pgbouncer'))} |"
        )
    return "\n".join(rows)


#: Ratios worth a row round by round: (metric, lakeproxy ÷ this path).
PAIRED: Final = (
    ("s1_tps", "direct"),
    ("s1_tps", "pgbouncer"),
    ("s8_tps", "pgbouncer"),
    ("s8_cpu_s_per_10k", "pgbouncer"),
    ("connect_per_s", "direct"),
    ("copy_out_mb_s", "direct"),
    ("copy_in_mb_s", "direct"),
)
_PATH_NAMES: Final = {"direct": "direct TLS", "pgbouncer": "PgBouncer"}


def paired(results: Results, key: str, over: str) -> list[float] | None:
    """lakeproxy ÷ ``over`` for ``key``, round by round (a round runs the paths
    back to back); None unless both have one nonzero value per round."""
    a, b = results.get("lakeproxy", {}).get(key), results.get(over, {}).get(key)
    if not a or not b or len(a) != len(b) or not all(b):
        return None
    return [x / y for x, y in zip(a, b, strict=True)]


def rounds_table(results: Results, metric_list: Sequence[Metric]) -> str:
    """Markdown: the :data:`PAIRED` ratios per round and their median ("" with
    fewer than two rounds)."""
    labels = {m.key: m.label for m in metric_list}
    rows = [(f"{labels[k]} ÷ {_PATH_NAMES[o]}", r) for k, o in PAIRED
            if (r := paired(results, k, o)) is not None and len(r) > 1]
    if not rows:
        return ""
    n = max(len(r) for _, r in rows)
    out = [
        "| lakeproxy ÷ | " + " | ".join(f"round {i + 1}" for i in range(n)) + " | median |",
        "| --- |" + " ---: |" * (n + 1),
    ]
    for label, r in rows:
        cells = [f"{v:.2f}x" for v in r] + ["-"] * (n - len(r))
        out.append(f"| {label} | {' | '.join(cells)} | {statistics.median(r):.2f}x |")
    return "\n".join(out)


@dataclass(frozen=True, slots=True)
class Check:
    """One of issue #5's targets: what, the goal, what was reached, met or not
    (None when a path needed for it was not measured)."""

    what: str
    goal: str
    reached: str
    met: bool | None


def _ge(value: float | None, goal: float) -> bool | None:
    return None if value is None else value >= goal


def _le(value: float | None, goal: float) -> bool | None:
    return None if value is None else value <= goal


def _fx(value: float | None, fmt: Callable[[float], str]) -> str:
    return "not measured" if value is None else fmt(value)


def checks(results: Results) -> list[Check]:
    """Evaluate issue #5's targets against the medians."""

    def x(v: float) -> str:
        return f"{v:.2f}x"

    out: list[Check] = []
    r = ratio(results, "s8_tps", "pgbouncer")
    out.append(Check("8-client `pgbench -S` TPS vs PgBouncer", ">= 1.00x", _fx(r, x), _ge(r, 1.0)))
    r = ratio(results, "s1_tps", "pgbouncer")
    out.append(Check("1-client `pgbench -S` TPS vs PgBouncer", ">= 1.00x", _fx(r, x), _ge(r, 1.0)))
    r = ratio(results, "s1_tps", "direct")
    out.append(Check("1-client `pgbench -S` TPS vs direct TLS", ">= 0.80x", _fx(r, x), _ge(r, 0.8)))
    lp = median(results, "lakeproxy", "s8_cpu_s_per_10k")
    pb = median(results, "pgbouncer", "s8_cpu_s_per_10k")
    reached = (
        "not measured"
        if lp is None or pb is None
        else f"{lp * 100:.1f} µs/txn vs PgBouncer's {pb * 100:.1f} µs/txn"
    )
    out.append(
        Check(
            "proxy CPU per transaction at 8 clients",
            "<= PgBouncer's",
            reached,
            None if lp is None or pb is None else lp <= pb,
        )
    )
    r = ratio(results, "copy_out_mb_s", "direct")
    out.append(Check("COPY out MB/s vs direct TLS", ">= 1.10x", _fx(r, x), _ge(r, 1.10)))
    r = ratio(results, "copy_in_mb_s", "direct")
    out.append(Check("COPY in MB/s vs direct TLS", ">= 0.95x", _fx(r, x), _ge(r, 0.95)))
    for key, what in (("copy_out_cpu_s_per_gb", "COPY out"), ("copy_in_cpu_s_per_gb", "COPY in")):
        v = median(results, "lakeproxy", key)
        out.append(
            Check(
                f"{what}: proxy CPU per MB",
                "<= 2.5 ms",
                _fx(v, lambda v: f"{v:.2f} ms"),
                _le(v, 2.5),
            )
        )
    r = ratio(results, "connect_per_s", "direct")
    out.append(Check("`-C` connections/s vs direct TLS", ">= 0.90x", _fx(r, x), _ge(r, 0.90)))
    v = median(results, "lakeproxy", "connect_cpu_ms")
    out.append(
        Check(
            "proxy CPU per new connection",
            "<= 3.5 ms",
            _fx(v, lambda v: f"{v:.2f} ms"),
            _le(v, 3.5),
        )
    )
    v = median(results, "lakeproxy", "idle_kib_per_session")
    out.append(
        Check(
            "RSS per idle session (1,000 sessions)",
            "<= 64 KiB",
            _fx(v, lambda v: f"{v:.1f} KiB"),
            _le(v, 64),
        )
    )
    return out


def checks_table(items: Sequence[Check]) -> str:
    """Markdown table of :func:`checks`."""
    rows = ["| target (issue #5) | goal | reached | met |", "| --- | --- | --- | --- |"]
    for c in items:
        met = "n/a" if c.met is None else ("yes" if c.met else "**no**")
        rows.append(f"| {c.what} | {c.goal} | {c.reached} | {met} |")
    return "\n".join(rows)


def summary(results: Results) -> dict[str, dict[str, dict[str, object]]]:
    """JSON-ready ``{target: {metric: {runs, median, min, max}}}``."""
    return {
        t: {
            k: {"runs": list(v), "median": statistics.median(v), "min": min(v), "max": max(v)}
            for k, v in per.items()
            if v
        }
        for t, per in results.items()
    }


def ratios(results: Results, metric_list: Sequence[Metric]) -> dict[str, dict[str, float]]:
    """JSON-ready ``{metric: {"lakeproxy/direct": x, "lakeproxy/pgbouncer": y}}``."""
    out: dict[str, dict[str, float]] = {}
    for m in metric_list:
        pair = {
            f"lakeproxy/{over}": v
            for over in ("direct", "pgbouncer")
            if (v := ratio(results, m.key, over)) is not None
        }
        if pair:
            out[m.key] = pair
    return out
