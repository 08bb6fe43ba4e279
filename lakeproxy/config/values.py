"""Value parsers: text from a flag, a variable or a TOML key to a typed value.

The public ``parse_*`` helpers raise ``ValueError`` with a reason that fits
after ``KEY: ``. The ``as_*`` converters take a :class:`Raw` (a value and where
it came from) and raise :class:`Bad` with such a reason; the loader turns that
into one problem line naming the key and its source.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast, get_args

from lakeproxy.config.model import (
    AUTH_TYPES,
    DEFAULT_UNIX_PORT,
    HOST_KINDS,
    AuthType,
    ClientTls,
    HostKind,
    Listener,
    LogFormat,
    LogLevel,
    PoolMode,
    SslMode,
    is_loopback_host,
)

_ENDPOINT_NAME_RE: Final = re.compile(r"projects/[^/\s]+/branches/[^/\s]+/endpoints/[^/\s]+")
_HOSTNAME_RE: Final = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*\.?"
)
_DURATION_RE: Final = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?")
_DURATION_UNITS: Final = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def parse_duration(text: str) -> float:
    """Seconds from ``"30"``, ``"30s"``, ``"200ms"``, ``"2m"``, ``"1h"``.

    Raises:
        ValueError: not a non-negative number with an optional unit.
    """
    m = _DURATION_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError('must be a duration such as "30", "30s", "200ms" or "2m"')
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_host_port(text: str, *, allow_zero: bool = True) -> tuple[str, int]:
    """``(host, port)`` from ``HOST:PORT`` or ``[v6]:PORT``.

    Raises:
        ValueError: malformed, empty host, bare IPv6 address, or port out of range.
    """
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            raise ValueError("must be [IPV6]:PORT, e.g. [::1]:6432")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:6432")
        if ":" in host:
            raise ValueError("an IPv6 address needs brackets, e.g. [::1]:6432")
        if not host:
            raise ValueError("needs a host, e.g. 127.0.0.1:6432 (0.0.0.0 for all interfaces)")
        if not _is_host(host):
            raise ValueError(f"{host!r} is not a host name or IP address")
    return host, _port_number(port_text, allow_zero=allow_zero)


def parse_listener(text: str) -> Listener:
    """One listener from ``HOST:PORT``, ``[v6]:PORT`` or ``unix:/DIR[:PORT]``.

    Raises:
        ValueError: with the reason.
    """
    text = text.strip()
    if text.startswith("unix:"):
        rest = text[len("unix:") :]
        directory, port = rest, DEFAULT_UNIX_PORT
        head, sep, tail = rest.rpartition(":")
        if sep and tail.isdigit():
            directory, port = head, _port_number(tail, allow_zero=False)
        if not directory.startswith("/"):
            raise ValueError("a unix listener needs an absolute directory, e.g. unix:/tmp:6432")
        directory = directory.rstrip("/") or "/"
        path = f"{directory.rstrip('/')}/.s.PGSQL.{port}"
        return Listener("unix", directory, port, path)
    host, port = parse_host_port(text)
    return Listener("tcp", host, port)


def parse_listeners(text: str) -> tuple[Listener, ...]:
    """Comma-separated :func:`parse_listener` specs; at least one.

    Raises:
        ValueError: with the reason (naming the bad item).
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("needs at least one listener, e.g. 127.0.0.1:6432")
    out: list[Listener] = []
    for item in items:
        try:
            out.append(parse_listener(item))
        except ValueError as exc:
            raise ValueError(f"{item!r}: {exc}") from None
    return tuple(out)


def _port_number(text: str, *, allow_zero: bool) -> int:
    low = 0 if allow_zero else 1
    if not text.isdigit() or not low <= int(text) <= 65535:
        raise ValueError(f"port must be a number from {low} to 65535")
    return int(text)


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return _HOSTNAME_RE.fullmatch(host) is not None
    return True


# --------------------------------------------------------------------------


class Bad(Exception):
    """A value's problem; the text fits after ``KEY (source): ``."""


@dataclass(frozen=True, slots=True)
class Raw:
    """A value and where it came from."""

    value: object
    origin: str  # e.g. "PGPORT=x (environment)", "[proxy] max_clients (lakeproxy.toml)"
    shown: str | None = None  # the value, for file-sourced non-secrets
    base: Path | None = None  # directory relative paths are resolved against
    #: Where it came from, as a hint names it: a variable ("LAKEBASE_HOST"), a file
    #: key ("host in [[endpoints]] of /etc/lakeproxy.toml"), a profile key or a flag.
    source: str = ""


def show(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    if isinstance(value, str) and (not text.isprintable() or not text or " " in text):
        text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


# Converters: Raw -> value, raising Bad(reason)


def did_you_mean(key: str, known: tuple[str, ...] | Mapping[str, object]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def as_text(raw: Raw) -> str:
    if not isinstance(raw.value, str):
        raise Bad("must be a string")
    text = raw.value.strip()
    if not text:
        raise Bad("must not be empty")
    return text


def as_secret(raw: Raw) -> str:
    if not isinstance(raw.value, str):
        raise Bad("must be a string")
    if not raw.value:
        raise Bad("must not be empty")
    return raw.value


def as_int(raw: Raw) -> int:
    value = raw.value
    if isinstance(value, bool):
        raise Bad("must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise Bad("must be an integer")


def as_positive_int(raw: Raw) -> int:
    try:
        n = as_int(raw)
    except Bad:
        n = 0
    if n <= 0:
        raise Bad("must be a positive integer")
    return n


def as_pg_port(raw: Raw) -> int:
    try:
        n = as_int(raw)
    except Bad:
        n = 0
    if not 1 <= n <= 65535:
        raise Bad("must be a port number from 1 to 65535")
    return n


def as_duration(*, positive: bool) -> Callable[[Raw], float]:
    def conv(raw: Raw) -> float:
        value = raw.value
        if isinstance(value, bool):
            raise Bad('must be a duration such as "30", "30s", "200ms" or "2m"')
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str):
            try:
                seconds = parse_duration(value)
            except ValueError as exc:
                raise Bad(str(exc)) from None
        else:
            raise Bad('must be a duration such as "30", "30s", "200ms" or "2m"')
        if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
            raise Bad("must be more than 0 seconds" if positive else "must not be negative")
        return seconds

    return conv


def as_bool(raw: Raw) -> bool:
    if isinstance(raw.value, bool):
        return raw.value
    if isinstance(raw.value, str):
        text = raw.value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise Bad("must be true or false")


def as_choice(options: tuple[str, ...]) -> Callable[[Raw], str]:
    def conv(raw: Raw) -> str:
        if isinstance(raw.value, str) and raw.value.strip().lower() in options:
            return raw.value.strip().lower()
        raise Bad(f"must be one of {', '.join(options)}")

    return conv


def as_sslmode(raw: Raw) -> SslMode:
    if isinstance(raw.value, str) and raw.value.strip().lower() in ("disable", "allow", "prefer"):
        raise Bad(
            "must be one of require, verify-ca, verify-full (lakeproxy always uses TLS "
            "to the endpoint)"
        )
    return cast(SslMode, as_choice(get_args(SslMode))(raw))


def as_host_kind(raw: Raw) -> HostKind:
    return cast(HostKind, as_choice(HOST_KINDS)(raw))


def as_client_tls(raw: Raw) -> ClientTls:
    return cast(ClientTls, as_choice(get_args(ClientTls))(raw))


def as_pool_mode(raw: Raw) -> PoolMode:
    return cast(PoolMode, as_choice(get_args(PoolMode))(raw))


def as_log_format(raw: Raw) -> LogFormat:
    return cast(LogFormat, as_choice(get_args(LogFormat))(raw))


def as_log_level(raw: Raw) -> LogLevel:
    if isinstance(raw.value, str) and raw.value.strip().lower() == "warn":
        return "warning"
    return cast(LogLevel, as_choice(get_args(LogLevel))(raw))


def as_listeners(raw: Raw) -> tuple[Listener, ...]:
    value = raw.value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(cast(list[str], value))
    if not isinstance(value, str):
        raise Bad('must be a string such as "127.0.0.1:6432" (or a list of them)')
    try:
        return parse_listeners(value)
    except ValueError as exc:
        raise Bad(str(exc)) from None


def as_admin_listen(raw: Raw) -> tuple[str, int] | None:
    text = as_text(raw)
    if text.lower() == "off":
        return None
    if "://" in text:
        raise Bad("must be HOST:PORT, the address to listen on (e.g. 127.0.0.1:9090), not a URL")
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise Bad(str(exc)) from None


def as_databricks_host(raw: Raw) -> str:
    text = as_text(raw)
    example = "https://<workspace>.cloud.databricks.com"
    try:
        url = urllib.parse.urlsplit(text)
        url.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        raise Bad(f"must be a URL such as {example}") from None
    if url.scheme not in ("https", "http") or not url.hostname:
        raise Bad(f"must start with https://, e.g. {example}")
    if url.username is not None or url.password is not None:
        raise Bad("must not contain a user name or password")
    if url.scheme == "http" and not is_loopback_host(url.hostname):
        raise Bad("must use https:// (http:// is allowed only to a loopback address)")
    return f"{url.scheme}://{url.netloc}"


def as_endpoint_name(raw: Raw) -> str:
    text = as_text(raw)
    if _ENDPOINT_NAME_RE.fullmatch(text) is None:
        raise Bad("must look like projects/<project>/branches/<branch>/endpoints/<endpoint>")
    return text


def as_pg_host(raw: Raw) -> str:
    text = as_text(raw)
    if text.startswith("/") or "," in text:
        raise Bad("must be one host name (unix sockets and host lists are not supported)")
    if not _is_host(text):
        raise Bad("must be a host name or IP address")
    return text


def as_ip_address(raw: Raw) -> str:
    text = as_text(raw)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise Bad("must be an IP address") from None


# -- workspace sign-in -------------------------------------------------------


def as_auth_type(raw: Raw) -> AuthType:
    text = as_text(raw).lower()
    if text not in AUTH_TYPES:
        raise Bad(f"must be one of {', '.join(AUTH_TYPES)}{did_you_mean(text, AUTH_TYPES)}")
    return text  # checked against AUTH_TYPES above


def as_identity_url(raw: Raw) -> str:
    """An identity provider's URL: ``https://``, or ``http://`` to a loopback address
    (the rule ``DATABRICKS_HOST`` follows). Returned without a trailing slash."""
    text = as_text(raw)
    try:
        url = urllib.parse.urlsplit(text)
        url.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        raise Bad("must be a URL") from None
    if url.scheme not in ("https", "http") or not url.hostname:
        raise Bad("must start with https://")
    if url.username is not None or url.password is not None:
        raise Bad("must not contain a user name or password")
    if url.scheme == "http" and not is_loopback_host(url.hostname):
        raise Bad("must use https:// (http:// is allowed only to a loopback address)")
    return text.rstrip("/")
