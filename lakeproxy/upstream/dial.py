"""Dialing with retries: :func:`connect_with_retry` until the connect deadline.

What is retried and how long to wait is :mod:`lakeproxy.retry`'s call; a
password failure gets one fresh credential.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from lakeproxy.errors import UpstreamConnectError, UpstreamRejected
from lakeproxy.retry import DEFAULT_POLICY, RetryPolicy, describe, is_auth_failure, is_retryable
from lakeproxy.upstream import login
from lakeproxy.upstream.login import UpstreamConnection
from lakeproxy.upstream.target import UpstreamTarget
from lakeproxy.wire import sqlstate

log = logging.getLogger("lakeproxy.upstream")

#: Upper bound for one connect attempt (TCP + TLS + login).
ATTEMPT_TIMEOUT: Final = 10.0
#: Below this many seconds before the deadline no new attempt is started.
_MIN_ATTEMPT: Final = 0.01
#: Upper bound for sending one CancelRequest.

_DEADLINE_HINT: Final = (
    "the endpoint may still be waking from scale-to-zero, or be unreachable from here: "
    "check LAKEBASE_HOST/LAKEBASE_PORT and the network, or raise LAKEPROXY_CONNECT_DEADLINE"
)


async def connect_with_retry(
    endpoint: UpstreamTarget,
    credential_token: str,
    params: Mapping[str, str],
    *,
    deadline: float,
    ssl_context: ssl.SSLContext,
    refresh_credential: Callable[[], Awaitable[str]] | None = None,
    on_retry: Callable[[BaseException], None] | None = None,
    before_retry: Callable[[BaseException], Awaitable[None]] | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
    attempt_timeout: float = ATTEMPT_TIMEOUT,
    protocol: tuple[int, int] = (3, 0),
) -> UpstreamConnection:
    """:func:`connect`, retried per :mod:`lakeproxy.retry` with backoff until ``deadline``.

    Each attempt gets ``min(attempt_timeout, time left)``. ``on_retry(exc)`` is
    called once per retry (for the retries metric); ``before_retry(exc)`` is
    awaited before each retry's pause and may raise to stop retrying (the
    endpoint's state says no retry can help). An auth failure (28P01 /
    28000) calls ``refresh_credential()`` once and retries at once with the
    token it returns.

    Returns:
        The logged-in connection.
    Raises:
        UpstreamRejected: the endpoint's own final login error (database does
            not exist, ...), or an auth failure when ``refresh_credential`` is
            None: forward ``raw`` to the client unchanged.
        UpstreamConnectError: 08006 when the deadline passed (the last error in
            the message) or a failure that no retry can fix (certificate,
            protocol, TLS refused); 28P01 when the fresh credential was refused too.
        Exception: whatever ``refresh_credential`` or ``before_retry`` raises.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    token = credential_token
    refreshed = False
    retries = 0
    last: BaseException | None = None
    while True:
        now = loop.time()
        if now >= deadline:
            raise _gave_up(endpoint, last, retries, now - started)
        try:
            return await login.connect(
                endpoint, token, params,
                deadline=min(deadline, now + attempt_timeout),
                ssl_context=ssl_context, protocol=protocol,
            )
        except UpstreamRejected as exc:
            if is_auth_failure(exc):
                if refresh_credential is None:
                    raise
                if refreshed:
                    raise UpstreamConnectError(
                        f"endpoint rejected the fresh credential twice: {describe(exc)}",
                        retryable=False, sqlstate=sqlstate.INVALID_PASSWORD,
                        hint="check that the role (LAKEBASE_USER) exists on the endpoint and "
                             "that the service principal may log in as it",
                    ) from exc
                log.info("endpoint %s refused the credential (%s); retrying once with a "
                         "fresh one", endpoint, exc.sqlstate)
                try:
                    async with asyncio.timeout_at(deadline):
                        token = await refresh_credential()
                except TimeoutError:
                    raise _gave_up(endpoint, exc, retries, loop.time() - started) from None
                refreshed = True
                last = exc
                continue
            if not is_retryable(exc):
                raise
            last = exc
        except UpstreamConnectError as exc:
            if not exc.retryable:
                raise
            last = exc
        except (OSError, ssl.SSLError, EOFError) as exc:
            if not is_retryable(exc):
                raise UpstreamConnectError(
                    f"cannot connect to endpoint {endpoint}: {describe(exc)}",
                    retryable=False, hint="check LAKEBASE_HOST/LAKEBASE_PORT/LAKEBASE_HOSTADDR",
                ) from exc
            last = exc
        if before_retry is not None and last is not None:
            await before_retry(last)
        remaining = deadline - loop.time()
        if remaining <= _MIN_ATTEMPT:
            raise _gave_up(endpoint, last, retries, loop.time() - started)
        # Never sleep away the time the next attempt needs: a compute that
        # wakes in the last seconds before the deadline still gets a try.
        delay = min(policy.delay(retries + 1), remaining / 2)
        retries += 1
        if on_retry is not None:
            on_retry(last)
        log.debug("endpoint %s not ready (%s); retry %d in %.2f s",
                  endpoint, describe(last), retries, delay)
        await asyncio.sleep(delay)


def _gave_up(endpoint: UpstreamTarget, last: BaseException | None, retries: int,
             elapsed: float) -> UpstreamConnectError:
    cause = describe(last) if last is not None else "no attempt was made in time"
    exc = UpstreamConnectError(
        f"could not connect to endpoint {endpoint} within {elapsed:.1f} s ({retries} "
        f"retr{'y' if retries == 1 else 'ies'}); last error: {cause}",
        retryable=False, hint=_DEADLINE_HINT, sqlstate=sqlstate.CONNECTION_FAILURE,
    )
    exc.__cause__ = last
    return exc
