"""Forwarding a CancelRequest to the endpoint, over TLS as every connection to it."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Final

from lakeproxy.errors import UpstreamConnectError, UpstreamRejected
from lakeproxy.retry import describe
from lakeproxy.upstream.login import SSLAnswer, check_ssl_answer, silence
from lakeproxy.upstream.target import UpstreamTarget
from lakeproxy.wire.codec import CancelRequest, SSLRequest, encode

log = logging.getLogger("lakeproxy.upstream")

CANCEL_TIMEOUT: Final = 5.0


class _UntilClosed(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.closed: asyncio.Future[None] = loop.create_future()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def send_cancel(
    target: UpstreamTarget,
    ssl_context: ssl.SSLContext,
    process_id: int,
    secret: bytes,
) -> None:
    """Send a CancelRequest for ``process_id``/``secret`` over TLS (SSLRequest
    first, SNI as for :func:`connect`) and wait until the endpoint closes the
    connection, at most :data:`CANCEL_TIMEOUT` seconds. Best effort: failures
    are logged at debug, never raised."""
    loop = asyncio.get_running_loop()
    raw: asyncio.Transport | None = None
    tls: asyncio.Transport | None = None
    answer: SSLAnswer | None = None
    until_closed = _UntilClosed(loop)
    try:
        async with asyncio.timeout(CANCEL_TIMEOUT):
            raw, answer = await loop.create_connection(
                lambda: SSLAnswer(loop), target.dial_host, target.port
            )
            raw.write(encode(SSLRequest()))
            check_ssl_answer(target, await answer.answer)
            tls = await loop.start_tls(raw, until_closed, ssl_context,
                                       server_hostname=target.host)
            if tls is None:
                return
            tls.write(encode(CancelRequest(process_id, secret)))
            await until_closed.closed
    except (OSError, ssl.SSLError, TimeoutError, UpstreamConnectError, UpstreamRejected,
            ValueError) as exc:
        log.debug("cancel request to %s failed: %s", target, describe(exc))
    finally:
        if answer is not None:
            silence(answer.answer)
        closed = until_closed.closed.done() and not until_closed.closed.cancelled()
        silence(until_closed.closed)
        if tls is not None:
            # A graceful TLS close could wait out the SSL shutdown timeout on an
            # endpoint that stopped answering: only after the endpoint closed.
            if closed:
                tls.close()
            else:
                tls.abort()
        elif raw is not None:
            raw.abort()
