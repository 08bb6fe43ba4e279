"""Prometheus metrics for one proxy.

Each :class:`Metrics` owns its own ``CollectorRegistry``, so several proxies
(or several tests) in one process never share or collide on series. The rest
of the code calls a handful of small methods; :meth:`Metrics.render` produces
the text exposition format for ``GET /metrics``.

Nothing here runs per chunk of spliced data. Bytes are counted once per
finished session; for long sessions the server may additionally register a
*live bytes* source (:meth:`Metrics.set_live_bytes`) that is read only when
``/metrics`` is scraped, so the counter moves while a session is still open
without any cost on the hot path.

Every label combination the code uses is created at construction, so each
series exists (at 0) from the first scrape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Final, Literal, get_args

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

#: ``Content-Type`` of :meth:`Metrics.render`'s output (Prometheus text 0.0.4).
CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4

#: Values of ``lakeproxy_client_connections_total{outcome}`` (and of ``outcome``
#: in the ``session end`` log line: the same words):
#:
#: - ``ok``: the session ran and ended normally (either side closed);
#: - ``cancel``: a CancelRequest, forwarded to the endpoint or dropped;
#: - ``probe``: a ``pg_isready`` ping the proxy answered itself;
#: - ``client_error``: the client broke the protocol, timed out, hung up before its
#:   session started or gave a wrong password;
#: - ``credential_error``: the credential API refused, or failed until the deadline;
#: - ``upstream_error``: endpoint unreachable, rejected the login, or reset mid-session;
#: - ``rejected``: refused by policy before a session started;
#: - ``too_many``: ``LAKEPROXY_MAX_CLIENTS`` reached (SQLSTATE 53300);
#: - ``shutdown``: refused while draining, or closed at the drain deadline;
#: - ``internal``: an unexpected exception in lakeproxy (a bug).
Outcome = Literal[
    "ok", "cancel", "probe", "client_error", "credential_error", "upstream_error",
    "rejected", "too_many", "shutdown", "internal",
]  # fmt: skip
OUTCOMES: Final[tuple[str, ...]] = get_args(Outcome)

#: Values of ``lakeproxy_bytes_total{direction}``.
DIRECTIONS: Final = ("client_to_upstream", "upstream_to_client")

#: ``kind`` label of the credential metrics: the workspace OAuth token (step 1)
#: or the database credential (step 2).
CredentialKind = Literal["oauth", "database"]
CREDENTIAL_KINDS: Final[tuple[str, ...]] = get_args(CredentialKind)

#: ``result`` label of ``lakeproxy_credential_requests_total``.
CredentialResult = Literal["ok", "error"]
CREDENTIAL_RESULTS: Final[tuple[str, ...]] = get_args(CredentialResult)

#: ``result`` label of ``lakeproxy_pool_requests_total``.
PoolResult = Literal["hit", "miss"]
POOL_RESULTS: Final[tuple[str, ...]] = get_args(PoolResult)

#: ``reason`` label of ``lakeproxy_pool_discards_total`` (SPEC "Session reuse").
PoolDiscardReason = Literal[
    "unclean", "reset_failed", "dead", "idle_timeout", "lifetime", "max_idle", "shutdown",
    "reload",
]
POOL_DISCARD_REASONS: Final[tuple[str, ...]] = get_args(PoolDiscardReason)

#: Buckets of ``lakeproxy_upstream_connect_seconds``: a warm endpoint answers in
#: milliseconds, a cold start (scale-to-zero wake-up) takes seconds, and the
#: default connect deadline is 60 s.
CONNECT_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0,
)  # fmt: skip

#: Returns ``(bytes_up, bytes_down)`` moved so far by sessions still open.
LiveBytesSource = Callable[[], tuple[int, int]]


class _BytesCollector(Collector):
    """``lakeproxy_bytes_total``: finished sessions plus, optionally, open ones.

    The exposed value never decreases, even if a live source briefly
    double-counts or under-counts a session while it moves from open to
    finished: each scrape reports at least what the previous one did.
    """

    def __init__(self) -> None:
        self.finished_up = 0
        self.finished_down = 0
        self.live: LiveBytesSource | None = None
        self._last_up = 0
        self._last_down = 0

    def collect(self) -> Iterable[Metric]:
        up, down = self.finished_up, self.finished_down
        if self.live is not None:
            live_up, live_down = self.live()
            up += live_up
            down += live_down
        self._last_up = up = max(up, self._last_up)
        self._last_down = down = max(down, self._last_down)
        family = CounterMetricFamily(
            "lakeproxy_bytes_total",
            "Bytes spliced between clients and the endpoint, by direction.",
            labels=("direction",),
        )
        family.add_metric(("client_to_upstream",), up)
        family.add_metric(("upstream_to_client",), down)
        yield family

    def describe(self) -> Iterable[Metric]:
        # Lets the registry check for name clashes without calling ``live``.
        yield CounterMetricFamily(
            "lakeproxy_bytes_total",
            "Bytes spliced between clients and the endpoint, by direction.",
            labels=("direction",),
        )


class _WithoutCreated(Collector):
    """The registry's metrics minus the legacy ``*_created`` samples."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for metric in self._registry.collect():
            if metric.type in ("counter", "histogram", "summary"):
                metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class Metrics:
    """The proxy's metrics, in a registry of their own.

    Args:
        process_metrics: also export the standard ``process_*`` series
            (CPU, memory, open file descriptors) of this process.
    """

    def __init__(self, *, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self._active = Gauge(
            "lakeproxy_client_connections_active",
            "Client connections open right now (handshake or spliced).",
            registry=reg,
        )
        self._connections = Counter(
            "lakeproxy_client_connections_total",
            "Client connections finished, by outcome.",
            ("outcome",),
            registry=reg,
        )
        self._bytes = _BytesCollector()
        reg.register(self._bytes)
        self._connect_seconds = Histogram(
            "lakeproxy_upstream_connect_seconds",
            "Time from the first dial to a logged-in endpoint session, retries included.",
            buckets=CONNECT_BUCKETS,
            registry=reg,
        )
        self._fd_exhausted = Counter(
            "lakeproxy_accept_fd_exhausted_total",
            "Client connections refused (53300) because accept failed for lack of file "
            "descriptors (each also counted as outcome too_many).",
            registry=reg,
        )
        self._retries = Counter(
            "lakeproxy_upstream_connect_retries_total",
            "Endpoint connection attempts that failed and were retried.",
            registry=reg,
        )
        self._credential_requests = Counter(
            "lakeproxy_credential_requests_total",
            "Requests to the Databricks API for credentials, by kind and result.",
            ("kind", "result"),
            registry=reg,
        )
        self._credential_expiry = Gauge(
            "lakeproxy_credential_expiry_timestamp_seconds",
            "Unix time the credential currently held expires (0: none held yet).",
            ("kind",),
            registry=reg,
        )
        self._remints_limited = Counter(
            "lakeproxy_credential_remints_limited_total",
            "Re-mints of a database credential the endpoint refused that waited for the "
            "minimum interval between mints.",
            registry=reg,
        )
        self._pool_idle = Gauge(
            "lakeproxy_pool_idle_sessions",
            "Endpoint sessions parked for reuse right now (session reuse).",
            registry=reg,
        )
        self._pool_requests = Counter(
            "lakeproxy_pool_requests_total",
            "Clients that looked for a parked endpoint session: hit (reused) or miss (dialed).",
            ("result",),
            registry=reg,
        )
        self._pool_discards = Counter(
            "lakeproxy_pool_discards_total",
            "Endpoint sessions closed instead of parked, or closed while parked, by reason.",
            ("reason",),
            registry=reg,
        )
        for result in POOL_RESULTS:
            self._pool_requests.labels(result)
        for reason in POOL_DISCARD_REASONS:
            self._pool_discards.labels(reason)
        for outcome in OUTCOMES:
            self._connections.labels(outcome)
        for kind in CREDENTIAL_KINDS:
            self._credential_expiry.labels(kind)
            for result in CREDENTIAL_RESULTS:
                self._credential_requests.labels(kind, result)
        if process_metrics:
            ProcessCollector(registry=reg)
        self._exposition = _WithoutCreated(reg)

    # -- sessions ---------------------------------------------------------

    def session_started(self) -> None:
        """A client connection was accepted. Pair with one :meth:`session_finished`."""
        self._active.inc()

    def session_finished(self, outcome: Outcome, bytes_up: int, bytes_down: int) -> None:
        """A connection counted by :meth:`session_started` has closed.

        Args:
            outcome: one of :data:`OUTCOMES`.
            bytes_up: total bytes the session moved client -> endpoint.
            bytes_down: total bytes the session moved endpoint -> client.

        Raises:
            ValueError: ``outcome`` is not one of :data:`OUTCOMES` (keeps the
                label set bounded) or a byte count is negative. The active
                gauge is decremented even then.
        """
        self._active.dec()
        if bytes_up < 0 or bytes_down < 0:
            raise ValueError("byte counts must not be negative")
        self._connections.labels(_check(outcome, OUTCOMES, "outcome")).inc()
        self._bytes.finished_up += bytes_up
        self._bytes.finished_down += bytes_down

    def connection_refused(self, outcome: Outcome) -> None:
        """Count a connection turned away without :meth:`session_started`.

        For a server that refuses (e.g. ``too_many`` or ``shutdown``) before
        it treats the connection as a session; the active gauge is untouched.

        Raises:
            ValueError: ``outcome`` is not one of :data:`OUTCOMES`.
        """
        self._connections.labels(_check(outcome, OUTCOMES, "outcome")).inc()

    def accept_fd_exhausted(self) -> None:
        """An accept failed for lack of file descriptors (the client was refused)."""
        self._fd_exhausted.inc()

    def set_live_bytes(self, source: LiveBytesSource | None) -> None:
        """Register (or with None remove) a source of open sessions' byte counts.

        ``source()`` is called on each scrape, in the event loop thread, and
        must return the bytes moved *so far* by sessions that have not yet
        been passed to :meth:`session_finished`. A session's bytes should
        leave the source in the same step as they are passed to
        :meth:`session_finished`; if they do not, the counter still never
        goes backwards.
        """
        self._bytes.live = source

    # -- endpoint ---------------------------------------------------------

    def upstream_connected(self, seconds: float) -> None:
        """Observe the time a session took to log in to the endpoint (retries included)."""
        self._connect_seconds.observe(max(0.0, seconds))

    def upstream_retry(self) -> None:
        """Count one failed endpoint attempt that is being retried."""
        self._retries.inc()

    # -- session reuse ----------------------------------------------------

    def pool_idle(self, count: int) -> None:
        """Set the number of parked endpoint sessions."""
        self._pool_idle.set(count)

    def pool_request(self, result: PoolResult) -> None:
        """Count a client that looked for a parked session (``hit`` or ``miss``).

        Raises:
            ValueError: an unknown ``result``.
        """
        self._pool_requests.labels(_check(result, POOL_RESULTS, "result")).inc()

    def pool_discard(self, reason: PoolDiscardReason) -> None:
        """Count an endpoint session closed by the pool (not parked, or while parked).

        Raises:
            ValueError: ``reason`` is not one of :data:`POOL_DISCARD_REASONS`.
        """
        self._pool_discards.labels(_check(reason, POOL_DISCARD_REASONS, "reason")).inc()

    # -- credentials ------------------------------------------------------

    def credential_request(self, kind: CredentialKind, result: CredentialResult) -> None:
        """Count one credential API request.

        Args:
            kind: ``oauth`` (workspace token) or ``database`` (database credential).
            result: ``ok`` or ``error``.

        Raises:
            ValueError: an unknown ``kind`` or ``result``.
        """
        self._credential_requests.labels(
            _check(kind, CREDENTIAL_KINDS, "kind"),
            _check(result, CREDENTIAL_RESULTS, "result"),
        ).inc()

    def credential_remint_limited(self) -> None:
        """Count one re-mint held back by the minimum interval between mints."""
        self._remints_limited.inc()

    def credential_expiry(self, kind: CredentialKind, expires_wall: float) -> None:
        """Record when the credential of ``kind`` now held expires.

        Args:
            kind: ``oauth`` or ``database``.
            expires_wall: expiry as Unix time (``time.time()`` clock).

        Raises:
            ValueError: an unknown ``kind`` or a non-finite time.
        """
        if not math.isfinite(expires_wall):
            raise ValueError("expiry must be a finite Unix time")
        self._credential_expiry.labels(_check(kind, CREDENTIAL_KINDS, "kind")).set(expires_wall)

    # -- exposition -------------------------------------------------------

    def render(self) -> bytes:
        """Return every series in the Prometheus text format (see :data:`CONTENT_TYPE`).

        The ``*_created`` gauges prometheus-client adds to each counter and
        histogram in this format are left out: they double the series count
        and say only when the proxy started.
        """
        return generate_latest(self._exposition)


def _check(value: str, allowed: tuple[str, ...], label: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {label} {value!r}; expected one of {', '.join(allowed)}")
    return value
