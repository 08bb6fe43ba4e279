"""The endpoint side: reaching Lakebase and logging in there.

- :mod:`~lakeproxy.upstream.target`: where the endpoint is and the TLS
  contexts that check it;
- :mod:`~lakeproxy.upstream.login`: one TCP + TLS connection and the login
  (:func:`connect`, :class:`UpstreamConnection`);
- :mod:`~lakeproxy.upstream.binding`: SCRAM channel binding from the certificate;
- :mod:`~lakeproxy.upstream.dial`: :func:`connect_with_retry`, until the deadline;
- :mod:`~lakeproxy.upstream.cancel`: forwarding a CancelRequest;
- :mod:`~lakeproxy.upstream.dialer`: :class:`EndpointDialer`, one configured
  endpoint with its credentials (what a session calls).

Imports run down only: ``dialer`` -> ``dial``/``cancel`` -> ``login`` ->
``target``/``binding`` -> :mod:`lakeproxy.wire`, :mod:`lakeproxy.tls`.
"""

from lakeproxy.upstream.binding import tls_server_end_point
from lakeproxy.upstream.cancel import CANCEL_TIMEOUT, send_cancel
from lakeproxy.upstream.dial import ATTEMPT_TIMEOUT, connect_with_retry
from lakeproxy.upstream.login import UpstreamConnection, connect
from lakeproxy.upstream.target import (
    SSL_MODES,
    UPSTREAM_TLS_GROUP,
    SslMode,
    TlsGroups,
    UpstreamTarget,
    clear_ssl_context_cache,
    handshake_refused,
    make_ssl_context,
)

__all__ = [
    "ATTEMPT_TIMEOUT",
    "CANCEL_TIMEOUT",
    "SSL_MODES",
    "UPSTREAM_TLS_GROUP",
    "SslMode",
    "TlsGroups",
    "UpstreamConnection",
    "UpstreamTarget",
    "clear_ssl_context_cache",
    "connect",
    "connect_with_retry",
    "handshake_refused",
    "make_ssl_context",
    "send_cancel",
    "tls_server_end_point",
]
