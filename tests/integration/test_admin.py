"""The admin HTTP server, served for real on 127.0.0.1 and probed with aiohttp."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lakeproxy.admin import (
    REASON_AT_LIMIT,
    REASON_DRAINING,
    REASON_INTERNAL,
    REASON_NO_CREDENTIAL,
    REASON_NO_FDS,
    REASON_NOT_LISTENING,
    AdminServer,
)
from lakeproxy.metrics import Metrics

SPEC_TYPES = {
    "lakeproxy_client_connections_active": "gauge",
    "lakeproxy_client_connections_total": "counter",
    "lakeproxy_bytes_total": "counter",
    "lakeproxy_upstream_connect_seconds": "histogram",
    "lakeproxy_upstream_connect_retries_total": "counter",
    "lakeproxy_credential_requests_total": "counter",
    "lakeproxy_credential_expiry_timestamp_seconds": "gauge",
}


@dataclass
class FakeProxy:
    """A ReadinessSource, plus the two things a probe must never touch."""

    listening: bool = True
    draining: bool = False
    active_clients: int = 0
    max_clients: int = 10
    has_credential: bool = True
    fds_left: bool = True
    broken: bool = False
    ready_checks: int = 0
    credential_api_calls: int = 0
    endpoint_dials: int = 0

    def can_accept(self) -> bool:
        return self.fds_left

    def credentials_ready(self) -> bool:
        self.ready_checks += 1
        if self.broken:
            raise RuntimeError("state unavailable")
        return self.has_credential

    async def mint_credential(self) -> str:  # what a probe must never cause
        self.credential_api_calls += 1
        return "never"

    async def dial_endpoint(self) -> None:  # idem
        self.endpoint_dials += 1


@dataclass
class Admin:
    proxy: FakeProxy
    metrics: Metrics
    server: AdminServer
    http: aiohttp.ClientSession

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.port}{path}"


@pytest.fixture
async def admin() -> AsyncIterator[Admin]:
    proxy = FakeProxy()
    metrics = Metrics()
    server = AdminServer(proxy, metrics)
    async with asyncio.timeout(10):
        await server.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            yield Admin(proxy, metrics, server, http)
    finally:
        await server.stop()


async def get(admin: Admin, path: str) -> tuple[int, str, str]:
    async with admin.http.get(admin.url(path)) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def test_port_is_the_bound_one(admin: Admin) -> None:
    assert admin.server.port > 0
    with socket.create_connection(("127.0.0.1", admin.server.port), timeout=5):
        pass


async def test_healthz(admin: Admin) -> None:
    async with asyncio.timeout(10):
        status, ctype, body = await get(admin, "/healthz")
        assert (status, body.strip()) == (200, "ok")
        assert ctype.startswith("text/plain")
        async with admin.http.head(admin.url("/healthz")) as resp:
            assert resp.status == 200
        # Health is about the process, not readiness.
        admin.proxy.draining = True
        admin.proxy.has_credential = False
        assert (await get(admin, "/healthz"))[0] == 200


async def test_readyz_ready(admin: Admin) -> None:
    async with asyncio.timeout(10), admin.http.get(admin.url("/readyz")) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert await resp.json() == {"status": "ready"}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"listening": False}, REASON_NOT_LISTENING),
        ({"has_credential": False}, REASON_NO_CREDENTIAL),
        ({"draining": True}, REASON_DRAINING),
        ({"active_clients": 10}, REASON_AT_LIMIT),
        ({"fds_left": False}, REASON_NO_FDS),
        ({"active_clients": 11}, REASON_AT_LIMIT),
        ({"broken": True}, REASON_INTERNAL),
        # Draining wins over every other reason.
        ({"draining": True, "listening": False, "has_credential": False}, REASON_DRAINING),
    ],
)
async def test_readyz_not_ready(admin: Admin, change: dict[str, object], reason: str) -> None:
    for key, val in change.items():
        setattr(admin.proxy, key, val)
    async with asyncio.timeout(10), admin.http.get(admin.url("/readyz")) as resp:
        assert resp.status == 503
        assert resp.content_type == "application/json"
        assert await resp.json() == {"status": "not ready", "reason": reason}
        assert resp.headers["Cache-Control"] == "no-store"


async def test_readyz_follows_state_changes(admin: Admin) -> None:
    async with asyncio.timeout(10):
        admin.proxy.listening = False
        admin.proxy.has_credential = False
        assert (await get(admin, "/readyz"))[0] == 503
        admin.proxy.listening = True
        assert (await get(admin, "/readyz"))[0] == 503
        admin.proxy.has_credential = True
        assert (await get(admin, "/readyz"))[0] == 200
        admin.proxy.max_clients = 0  # no limit
        admin.proxy.active_clients = 5000
        assert (await get(admin, "/readyz"))[0] == 200


async def test_metrics_exposes_every_spec_series_and_reflects_calls(admin: Admin) -> None:
    async with asyncio.timeout(10):
        status, ctype, body = await get(admin, "/metrics")
        assert status == 200
        assert ctype.startswith("text/plain; version=0.0.4")
        type_lines = {
            line.split(" ")[2]: line.split(" ")[3]
            for line in body.splitlines()
            if line.startswith("# TYPE ")
        }
        for name, kind in SPEC_TYPES.items():
            assert type_lines.get(name) == kind, name

        m = admin.metrics
        m.session_started()
        m.session_finished("ok", 1234, 56789)
        m.upstream_connected(0.02)
        m.upstream_retry()
        m.credential_request("database", "ok")
        m.credential_expiry("database", 2_000_000_000.0)
        _, _, body = await get(admin, "/metrics")
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
    }
    assert values["lakeproxy_bytes_total", (("direction", "client_to_upstream"),)] == 1234
    assert values["lakeproxy_bytes_total", (("direction", "upstream_to_client"),)] == 56789
    assert values["lakeproxy_client_connections_total", (("outcome", "ok"),)] == 1
    assert values["lakeproxy_client_connections_active", ()] == 0
    assert values["lakeproxy_upstream_connect_seconds_count", ()] == 1
    assert values["lakeproxy_upstream_connect_retries_total", ()] == 1
    key = (("kind", "database"), ("result", "ok"))
    assert values["lakeproxy_credential_requests_total", key] == 1
    exp = ("lakeproxy_credential_expiry_timestamp_seconds", (("kind", "database"),))
    assert values[exp] == 2_000_000_000.0


async def test_probe_storm_touches_neither_endpoint_nor_credential_api(
    admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    """500 probes only read state, and leave nothing in the info log."""
    # A real listener standing in for the endpoint: any dial would show up here.
    dials = 0

    def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal dials
        dials += 1
        writer.close()

    endpoint = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    caplog.set_level(logging.INFO)
    paths = ["/healthz", "/readyz", "/metrics", "/readyz", "/healthz"]
    try:
        async with asyncio.timeout(60):
            for batch in range(10):
                results = await asyncio.gather(
                    *(get(admin, paths[(batch + i) % len(paths)]) for i in range(50))
                )
                assert all(status == 200 for status, _, _ in results)
    finally:
        endpoint.close()
        await endpoint.wait_closed()
    assert admin.proxy.credential_api_calls == 0
    assert admin.proxy.endpoint_dials == 0
    assert dials == 0
    assert admin.proxy.ready_checks >= 150  # readyz did consult the state
    noisy = [r for r in caplog.records if r.name.startswith(("aiohttp", "lakeproxy.admin"))]
    assert noisy == []


async def test_access_log_at_debug(admin: Admin, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="lakeproxy.admin.access")
    # The logger's level is read when a connection is made: use a fresh one.
    async with (
        asyncio.timeout(10),
        aiohttp.ClientSession() as http,
        http.get(admin.url("/healthz")) as resp,
    ):
        assert resp.status == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "lakeproxy.admin.access"]
    assert any("GET /healthz -> 200" in line for line in lines)


async def test_start_stop_lifecycle() -> None:
    server = AdminServer(FakeProxy(), Metrics(process_metrics=False))
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.port
    await server.stop()  # before start: no-op
    async with asyncio.timeout(10):
        await server.start("127.0.0.1", 0)
        port = server.port
        with pytest.raises(RuntimeError, match="already started"):
            await server.start("127.0.0.1", 0)
        # The port is taken while we serve.
        other = AdminServer(FakeProxy(), Metrics(process_metrics=False))
        with pytest.raises(OSError, match=r"(?i)address already in use"):
            await other.start("127.0.0.1", port)
        await other.stop()
        await server.stop()
        await server.stop()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        # Restartable on the same port.
        await server.start("127.0.0.1", port)
        assert server.port == port
        await server.stop()
