"""Retry classification and backoff."""

from __future__ import annotations

import errno
import socket
import ssl

import pytest

from lakeproxy.errors import UpstreamConnectError, UpstreamRejected
from lakeproxy.retry import LoginErrorKind as K
from lakeproxy.retry import (
    RetryPolicy,
    classify_login_error,
    describe,
    is_auth_failure,
    is_retryable,
)


@pytest.mark.parametrize(
    ("code", "message", "kind"),
    [
        ("57P03", "the database system is starting up", K.RETRY),
        ("57P03", "the database system is not yet accepting connections", K.RETRY),
        ("57P01", "terminating connection due to administrator command", K.RETRY),
        ("08006", "connection failure", K.RETRY),
        ("08001", "could not connect", K.RETRY),
        ("08P01", "invalid startup packet layout", K.FINAL),
        ("08P01", "no more connections allowed (max_client_conn)", K.RETRY),
        ("XX000", "Couldn't connect to compute node", K.RETRY),
        ("XX000", "Couldn't connect to compute node: connection refused", K.RETRY),
        ("XX000", "Failed to connect to the compute node", K.RETRY),
        ("XX000", "Control plane request failed", K.RETRY),
        ("XX000", "Console request failed", K.RETRY),
        ("XX000", "endpoint is idle, retry request", K.RETRY),
        ("XX000", "timed out while waiting for endpoint to become active", K.RETRY),
        ("XX000", "Too many connections to this endpoint. Please try again later.", K.RETRY),
        ("XX000", "Control plane request failed: endpoint cannot be found", K.FINAL),
        ("XX000", "Control plane request failed: endpoint is disabled", K.FINAL),
        ("XX000", "Control plane request failed: endpoint is temporarily unavailable. "
                  "Check your quotas and/or contact our support.", K.FINAL),
        ("XX000", "Couldn't connect to compute node: database \"x\" does not exist", K.FINAL),
        ("XX000", "internal error", K.FINAL),
        ("XX000", "password authentication failed for user 'x'", K.AUTH),
        ("28P01", 'password authentication failed for user "x"', K.AUTH),
        ("28000", 'no pg_hba.conf entry for host "1.2.3.4"', K.FINAL),
        ("28000", 'no pg_hba.conf entry for replication connection from host "127.0.0.1", '
                  'user "u", no encryption', K.FINAL),
        ("28000", 'role "token" is not permitted to log in', K.FINAL),
        ("28000", 'password authentication failed for user "x"', K.AUTH),
        ("28000", "invalid authorization: token is expired", K.AUTH),
        ("28000", 'role "x" does not exist', K.FINAL),
        ("3D000", 'database "x" does not exist', K.FINAL),
        ("53300", "sorry, too many clients already", K.FINAL),
    ],
)
def test_classify_login_error(code: str, message: str, kind: K) -> None:
    assert classify_login_error(code, message) is kind


def _rejected(code: str, message: str) -> UpstreamRejected:
    return UpstreamRejected(b"E...", code, message)


@pytest.mark.parametrize(
    ("exc", "retry"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (ConnectionAbortedError(), True),
        (TimeoutError(), True),
        (OSError(errno.EHOSTUNREACH, "no route"), True),
        (OSError(errno.ENETUNREACH, "network unreachable"), True),
        (OSError("Multiple exceptions: [Errno 111] a, [Errno 111] b"), True),
        (OSError(errno.EACCES, "permission denied"), False),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), True),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), False),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), True),
        (ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed"), True),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), False),
        (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), False),
        (_rejected("57P03", "the database system is starting up"), True),
        (_rejected("XX000", "Couldn't connect to compute node"), True),
        (_rejected("3D000", 'database "x" does not exist'), False),
        (_rejected("28P01", "password authentication failed"), False),
        (UpstreamConnectError("x", retryable=True), True),
        (UpstreamConnectError("x", retryable=False), False),
        (ValueError("nope"), False),
    ],
)
def test_is_retryable(exc: BaseException, retry: bool) -> None:
    assert is_retryable(exc) is retry


def test_is_auth_failure() -> None:
    assert is_auth_failure(_rejected("28P01", "password authentication failed"))
    assert is_auth_failure(_rejected("XX000", "password authentication failed for user 'a'"))
    assert not is_auth_failure(_rejected("57P03", "starting up"))
    assert not is_auth_failure(ConnectionRefusedError())


def test_describe() -> None:
    assert describe(TimeoutError()) == "timed out"
    assert describe(_rejected("57P03", "starting up")) == "starting up (SQLSTATE 57P03)"
    exc = ssl.SSLCertVerificationError(1, "x")
    exc.verify_message = "Hostname mismatch"
    assert "Hostname mismatch" in describe(exc)


def test_backoff_grows_to_the_cap_with_full_jitter() -> None:
    policy = RetryPolicy(base=0.1, cap=4.0, floor=0.0)
    assert [policy.delay(n, rand=lambda: 1.0) for n in range(1, 9)] == [
        0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 4.0, 4.0
    ]
    assert policy.delay(3, rand=lambda: 0.5) == pytest.approx(0.2)
    assert RetryPolicy().delay(1, rand=lambda: 0.0) == RetryPolicy().floor
    delays = [RetryPolicy().delay(5) for _ in range(200)]
    assert all(0.0 < d <= 1.6 for d in delays)
    assert len(set(delays)) > 100
