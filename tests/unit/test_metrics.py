"""lakeproxy.metrics: every SPEC series exists from the start and moves when told."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from lakeproxy.metrics import (
    CONNECT_BUCKETS,
    CONTENT_TYPE,
    CREDENTIAL_KINDS,
    CREDENTIAL_RESULTS,
    DIRECTIONS,
    OUTCOMES,
    Metrics,
)

#: The SPEC's "Operations" list: exposed name -> type.
SPEC_METRICS = {
    "lakeproxy_client_connections_active": "gauge",
    "lakeproxy_client_connections_total": "counter",
    "lakeproxy_bytes_total": "counter",
    "lakeproxy_upstream_connect_seconds": "histogram",
    "lakeproxy_upstream_connect_retries_total": "counter",
    "lakeproxy_credential_requests_total": "counter",
    "lakeproxy_credential_expiry_timestamp_seconds": "gauge",
}


def samples(m: Metrics) -> list[Sample]:
    text = m.render().decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def value(m: Metrics, name: str, **labels: str) -> float:
    found = [s.value for s in samples(m) if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def type_lines(m: Metrics) -> dict[str, str]:
    out = {}
    for line in m.render().decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            out[name] = kind
    return out


def test_every_spec_metric_has_its_type_line() -> None:
    types = type_lines(Metrics())
    for name, kind in SPEC_METRICS.items():
        assert types.get(name) == kind, name


def test_label_combinations_exist_at_zero_from_the_start() -> None:
    m = Metrics()
    assert value(m, "lakeproxy_client_connections_active") == 0
    for outcome in OUTCOMES:
        assert value(m, "lakeproxy_client_connections_total", outcome=outcome) == 0
    for direction in DIRECTIONS:
        assert value(m, "lakeproxy_bytes_total", direction=direction) == 0
    for kind in CREDENTIAL_KINDS:
        assert value(m, "lakeproxy_credential_expiry_timestamp_seconds", kind=kind) == 0
        for result in CREDENTIAL_RESULTS:
            assert value(m, "lakeproxy_credential_requests_total", kind=kind, result=result) == 0
    assert value(m, "lakeproxy_upstream_connect_retries_total") == 0
    assert value(m, "lakeproxy_upstream_connect_seconds_count") == 0


def test_outcomes_are_the_specs_words() -> None:
    """SPEC "Operations": the only outcomes, in /metrics and the session end line."""
    assert set(OUTCOMES) == {
        "ok", "cancel", "probe", "client_error", "credential_error", "upstream_error",
        "rejected", "too_many", "shutdown", "internal",
    }


def test_session_lifecycle_moves_gauge_counter_and_bytes() -> None:
    m = Metrics()
    m.session_started()
    m.session_started()
    assert value(m, "lakeproxy_client_connections_active") == 2
    m.session_finished("ok", 100, 2000)
    m.session_finished("upstream_error", 5, 0)
    assert value(m, "lakeproxy_client_connections_active") == 0
    assert value(m, "lakeproxy_client_connections_total", outcome="ok") == 1
    assert value(m, "lakeproxy_client_connections_total", outcome="upstream_error") == 1
    assert value(m, "lakeproxy_bytes_total", direction="client_to_upstream") == 105
    assert value(m, "lakeproxy_bytes_total", direction="upstream_to_client") == 2000


def test_connection_refused_counts_without_touching_active() -> None:
    m = Metrics()
    m.connection_refused("too_many")
    assert value(m, "lakeproxy_client_connections_total", outcome="too_many") == 1
    assert value(m, "lakeproxy_client_connections_active") == 0


def test_unknown_outcome_raises_but_active_still_drops() -> None:
    m = Metrics()
    m.session_started()
    with pytest.raises(ValueError, match="unknown outcome"):
        m.session_finished("bogus", 1, 1)  # type: ignore[arg-type]
    assert value(m, "lakeproxy_client_connections_active") == 0
    assert not any(s.labels.get("outcome") == "bogus" for s in samples(m))
    with pytest.raises(ValueError, match="negative"):
        m.session_finished("ok", -1, 0)


def test_live_bytes_move_the_counter_and_it_never_goes_back() -> None:
    m = Metrics()
    live = [(0, 0)]
    m.set_live_bytes(lambda: live[0])
    live[0] = (10, 20)
    assert value(m, "lakeproxy_bytes_total", direction="client_to_upstream") == 10
    assert value(m, "lakeproxy_bytes_total", direction="upstream_to_client") == 20
    # The session finishes: its bytes move from live to finished together.
    m.session_started()
    live[0] = (0, 0)
    m.session_finished("ok", 15, 25)
    assert value(m, "lakeproxy_bytes_total", direction="client_to_upstream") == 15
    assert value(m, "lakeproxy_bytes_total", direction="upstream_to_client") == 25
    # A source that briefly double-counts, then drops: never a decrease.
    live[0] = (15, 25)
    assert value(m, "lakeproxy_bytes_total", direction="client_to_upstream") == 30
    live[0] = (0, 0)
    assert value(m, "lakeproxy_bytes_total", direction="client_to_upstream") == 30
    m.set_live_bytes(None)
    assert value(m, "lakeproxy_bytes_total", direction="upstream_to_client") == 50


def test_connect_histogram_buckets_span_1ms_to_cold_starts() -> None:
    assert CONNECT_BUCKETS[0] == 0.001
    assert 60.0 in CONNECT_BUCKETS
    assert list(CONNECT_BUCKETS) == sorted(CONNECT_BUCKETS)
    m = Metrics()
    m.upstream_connected(0.0007)
    m.upstream_connected(0.3)
    m.upstream_connected(42.0)
    hist = "lakeproxy_upstream_connect_seconds"
    assert value(m, f"{hist}_count") == 3
    assert value(m, f"{hist}_sum") == pytest.approx(42.3007)
    assert value(m, f"{hist}_bucket", le="0.001") == 1
    assert value(m, f"{hist}_bucket", le="0.5") == 2
    assert value(m, f"{hist}_bucket", le="45.0") == 3
    assert value(m, f"{hist}_bucket", le="+Inf") == 3


def test_retries_and_credentials() -> None:
    m = Metrics()
    m.upstream_retry()
    m.upstream_retry()
    m.credential_request("oauth", "ok")
    m.credential_request("database", "error")
    m.credential_request("database", "ok")
    m.credential_expiry("database", 1_900_000_000.5)
    assert value(m, "lakeproxy_upstream_connect_retries_total") == 2
    req = "lakeproxy_credential_requests_total"
    assert value(m, req, kind="oauth", result="ok") == 1
    assert value(m, req, kind="oauth", result="error") == 0
    assert value(m, req, kind="database", result="error") == 1
    assert value(m, req, kind="database", result="ok") == 1
    exp = "lakeproxy_credential_expiry_timestamp_seconds"
    assert value(m, exp, kind="database") == 1_900_000_000.5
    assert value(m, exp, kind="oauth") == 0
    with pytest.raises(ValueError, match="unknown kind"):
        m.credential_request("pat", "ok")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown result"):
        m.credential_request("oauth", "maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        m.credential_expiry("oauth", float("nan"))


def test_instances_have_separate_registries() -> None:
    a, b = Metrics(), Metrics()
    a.upstream_retry()
    assert value(a, "lakeproxy_upstream_connect_retries_total") == 1
    assert value(b, "lakeproxy_upstream_connect_retries_total") == 0


def test_no_created_series_and_optional_process_metrics() -> None:
    with_proc = Metrics().render().decode()
    assert "_created" not in with_proc
    assert "process_cpu_seconds_total" in with_proc
    assert "process_" not in Metrics(process_metrics=False).render().decode()


def test_content_type_is_prometheus_text() -> None:
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")
