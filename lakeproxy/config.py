"""lakeproxy's configuration: frozen dataclasses and :func:`load_config`.

Sources, highest first: command-line flags, environment variables, the TOML
file (``--config FILE`` or ``LAKEPROXY_CONFIG``), a ``~/.databrickscfg``
profile (for the ``[databricks]`` identity only), defaults.
``config.example.toml`` documents every key.

:func:`load_config` is pure apart from reading the files it is pointed at: the
environment is passed in, ``os.environ`` is never read here. It collects every
problem it finds and raises one :class:`~lakeproxy.errors.ConfigError`; each
problem names the key and where the value came from, e.g.
``PGSSLMODE=disable (environment): must be one of require, verify-ca,
verify-full``. A secret's value never appears in a message or a ``repr``.

Rules worth knowing:

* an empty environment variable counts as unset (as libpq does);
* relative paths in the TOML file are relative to the file's directory, and
  ``~`` expands with ``HOME`` from the given environment;
* with several ``[[endpoints]]`` in the file, the per-endpoint environment
  variables (``ENDPOINT_NAME``, ``LAKEBASE_INSTANCE``, ``PG*``) are ignored and
  ``LAKEPROXY_LISTEN`` / ``--listen`` are refused: each endpoint says it all;
  with one ``[[endpoints]]`` table, they override its fields.
"""

from __future__ import annotations

import configparser
import dataclasses
import difflib
import ipaddress
import math
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, TypeVar, cast, get_args

from lakeproxy.errors import ConfigError

SslMode = Literal["require", "verify-ca", "verify-full"]
ClientTls = Literal["off", "allow", "require"]
LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]
PoolMode = Literal["off", "session"]

DEFAULT_LISTEN: Final = "127.0.0.1:6432"
DEFAULT_PGPORT: Final = 5432
DEFAULT_DATABASE: Final = "databricks_postgres"
DEFAULT_SSLMODE: Final[SslMode] = "verify-full"
DEFAULT_SSLROOTCERT: Final = "system"
DEFAULT_CONNECT_DEADLINE: Final = 60.0
DEFAULT_MAX_CLIENTS: Final = 1000
DEFAULT_SHUTDOWN_GRACE: Final = 30.0
DEFAULT_UNIX_PORT: Final = 6432
DEFAULT_DATABRICKSCFG_PROFILE: Final = "DEFAULT"
# Session reuse (SPEC "Session reuse").
DEFAULT_POOL_IDLE_TIMEOUT: Final = 60.0
DEFAULT_POOL_MAX_IDLE: Final = 10
DEFAULT_POOL_LIFETIME: Final = 3600.0

#: Keys the TOML file may hold, per table. A test checks that
#: ``config.example.toml`` documents each of them.
FILE_KEYS: Final[Mapping[str, tuple[str, ...]]] = {
    "databricks": ("host", "client_id", "client_secret", "token", "profile", "config_file"),
    "proxy": (
        "listen", "admin_listen", "client_password", "tls_cert", "tls_key", "client_tls",
        "connect_deadline", "max_clients", "shutdown_grace", "log_format", "log_level",
        "allow_remote_trust", "pool_mode", "pool_idle_timeout", "pool_max_idle", "pool_lifetime",
    ),
    "endpoints": (
        "name", "instance", "host", "hostaddr", "port", "database", "user", "sslmode",
        "sslrootcert", "listen", "pool_mode",
    ),
}

#: Environment variables :func:`load_config` reads.
ENV_VARS: Final[tuple[str, ...]] = (
    "DATABRICKS_HOST", "DATABRICKS_CLIENT_ID", "DATABRICKS_CLIENT_SECRET", "DATABRICKS_TOKEN",
    "DATABRICKS_CONFIG_PROFILE", "DATABRICKS_CONFIG_FILE",
    "ENDPOINT_NAME", "LAKEBASE_INSTANCE",
    "PGHOST", "PGPORT", "PGHOSTADDR", "PGDATABASE", "PGUSER", "PGSSLMODE", "PGSSLROOTCERT",
    "LAKEPROXY_CONFIG", "LAKEPROXY_LISTEN", "LAKEPROXY_ADMIN_LISTEN", "LAKEPROXY_CLIENT_PASSWORD",
    "LAKEPROXY_TLS_CERT", "LAKEPROXY_TLS_KEY", "LAKEPROXY_CLIENT_TLS",
    "LAKEPROXY_CONNECT_DEADLINE", "LAKEPROXY_MAX_CLIENTS", "LAKEPROXY_SHUTDOWN_GRACE",
    "LAKEPROXY_LOG_FORMAT", "LAKEPROXY_LOG_LEVEL", "LAKEPROXY_ALLOW_REMOTE_TRUST",
    "LAKEPROXY_POOL_MODE", "LAKEPROXY_POOL_IDLE_TIMEOUT", "LAKEPROXY_POOL_MAX_IDLE",
    "LAKEPROXY_POOL_LIFETIME",
)

#: Keys of the ``argv`` mapping :func:`load_config` accepts (argparse ``dest`` names).
FLAG_KEYS: Final[tuple[str, ...]] = (
    "listen", "admin_listen", "allow_remote_trust", "log_level", "log_format",
)

_DATABRICKSCFG_KEYS: Final = ("host", "client_id", "client_secret", "token")
_SECRET_KEYS: Final = frozenset({"client_secret", "token", "client_password"})
_ENDPOINT_NAME_RE: Final = re.compile(r"projects/[^/\s]+/branches/[^/\s]+/endpoints/[^/\s]+")
_HOSTNAME_RE: Final = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*\.?"
)
_DURATION_RE: Final = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?")
_DURATION_UNITS: Final = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})

# --------------------------------------------------------------------------
# The configuration


@dataclass(frozen=True, slots=True)
class Listener:
    """One address lakeproxy accepts clients on.

    ``tcp``: ``host`` is the address or name to bind, ``path`` is None; port 0
    lets the kernel pick one. ``unix``: ``host`` is the socket directory and
    ``path`` the socket file ``DIR/.s.PGSQL.PORT`` (the name libpq looks for).
    """

    kind: Literal["tcp", "unix"]
    host: str
    port: int
    path: str | None = None

    @property
    def is_loopback(self) -> bool:
        """True when only this machine can reach the listener (unix sockets included)."""
        return self.kind == "unix" or is_loopback_host(self.host)

    def describe(self) -> str:
        """``127.0.0.1:6432``, ``[::1]:6432`` or ``unix:/tmp/.s.PGSQL.6432``."""
        if self.kind == "unix":
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointConfig:
    """One Lakebase endpoint and the listeners that lead to it.

    Exactly one of ``name`` (autoscaling, ``projects/<p>/branches/<b>/endpoints/<e>``)
    and ``instance`` (provisioned) is set. ``host`` None means: look it up with the
    Databricks API. ``hostaddr`` is dialled instead of resolving ``host``.
    """

    name: str | None = None
    instance: str | None = None
    host: str | None = None
    hostaddr: str | None = None
    port: int = DEFAULT_PGPORT
    database: str = DEFAULT_DATABASE
    user: str
    sslmode: SslMode = DEFAULT_SSLMODE
    sslrootcert: str = DEFAULT_SSLROOTCERT
    listen: tuple[Listener, ...] = (Listener("tcp", "127.0.0.1", 6432),)
    #: Session reuse for this endpoint's clients (SPEC "Session reuse").
    pool_mode: PoolMode = "off"

    @property
    def label(self) -> str:
        """The endpoint name or the instance name, for logs."""
        return self.name or self.instance or "?"


@dataclass(frozen=True, slots=True)
class DatabricksConfig:
    """The workspace identity shared by every endpoint.

    Exactly one auth method is usable: ``client_id`` + ``client_secret`` (OAuth
    M2M), or ``token`` (then ``client_id``, if set, only provides the default role).
    """

    host: str
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @property
    def auth_method(self) -> Literal["oauth-m2m", "token"]:
        """``oauth-m2m`` when a client secret is set, else ``token``."""
        return "oauth-m2m" if self.client_secret is not None else "token"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Everything lakeproxy needs to run. Build it with :func:`load_config`."""

    databricks: DatabricksConfig
    endpoints: tuple[EndpointConfig, ...]
    admin_listen: tuple[str, int] | None = None
    client_password: str | None = field(default=None, repr=False)
    tls_cert: str | None = None
    tls_key: str | None = None
    client_tls: ClientTls = "off"
    connect_deadline: float = DEFAULT_CONNECT_DEADLINE
    max_clients: int = DEFAULT_MAX_CLIENTS
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    log_format: LogFormat = "text"
    log_level: LogLevel = "info"
    allow_remote_trust: bool = False
    #: Bounds of parked sessions (session reuse): seconds, count per key, seconds.
    pool_idle_timeout: float = DEFAULT_POOL_IDLE_TIMEOUT
    pool_max_idle: int = DEFAULT_POOL_MAX_IDLE
    pool_lifetime: float = DEFAULT_POOL_LIFETIME
    config_file: Path | None = None
    #: The command-line flags this config was loaded with (``argv`` items, plus
    #: ``config`` when a file was given explicitly), for :func:`reload_config`.
    flags: tuple[tuple[str, str | bool], ...] = field(default=(), repr=False)


# --------------------------------------------------------------------------
# Public parsing helpers (raise ValueError with a reason that fits after "KEY: ")


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8, ``::1`` (and IPv4-mapped 127/8)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


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
# Loading


def load_config(
    *,
    env: Mapping[str, str],
    argv: Mapping[str, str | bool | None] | None = None,
    config_file: Path | None = None,
) -> Config:
    """Build the configuration from flags, environment, TOML file and defaults.

    Args:
        env: the environment (pass ``os.environ``); also supplies ``HOME``.
        argv: command-line flags by argparse ``dest`` (see :data:`FLAG_KEYS`);
            None values mean "not given", ``allow_remote_trust`` counts only when True.
        config_file: the ``--config`` file; when None, ``LAKEPROXY_CONFIG`` names it.

    Returns:
        The validated :class:`Config`.

    Raises:
        ConfigError: listing every problem found.
        ValueError: ``argv`` has a key not in :data:`FLAG_KEYS` (a programming error).
    """
    flags = dict(argv or {})
    unknown = sorted(set(flags) - set(FLAG_KEYS))
    if unknown:
        raise ValueError(f"unknown flag keys: {', '.join(unknown)}")
    return _Loader(env, flags, config_file).load()


def reload_config(config: Config, *, env: Mapping[str, str]) -> Config:
    """Load again with the same flags and file (for SIGHUP).

    Raises:
        ConfigError: as :func:`load_config`.
    """
    flags = dict(config.flags)
    file_flag = flags.pop("config", None)
    return load_config(
        env=env,
        argv=flags,
        config_file=Path(file_flag) if isinstance(file_flag, str) else None,
    )


class _Bad(Exception):
    """A value's problem; the text fits after ``KEY (source): ``."""


@dataclass(frozen=True, slots=True)
class _Raw:
    """A value and where it came from."""

    value: object
    origin: str  # e.g. "PGPORT=x (environment)", "[proxy] max_clients (lakeproxy.toml)"
    shown: str | None = None  # the value, for file-sourced non-secrets
    base: Path | None = None  # directory relative paths are resolved against


_T = TypeVar("_T")


def _show(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    if isinstance(value, str) and (not text.isprintable() or not text or " " in text):
        text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _table_label(table: str) -> str:
    return f"[{table}]"


class _Loader:
    """One load: the sources, and the problems found so far."""

    def __init__(
        self,
        env: Mapping[str, str],
        flags: Mapping[str, str | bool | None],
        config_file: Path | None,
    ) -> None:
        self.env = env
        self.flags = flags
        self.config_flag = config_file
        self.home = env.get("HOME") or None
        self.problems: list[str] = []
        self.complete = True  # False when the file could not be read: skip "required" checks
        self.file_path: Path | None = None
        self.file_label = ""
        self.doc: dict[str, object] = {}
        self.any_auth = True  # set by databricks()

    # -- problems --------------------------------------------------------

    def bad(self, raw: _Raw, reason: str) -> None:
        got = f" (got {raw.shown})" if raw.shown is not None else ""
        self.problems.append(f"{raw.origin}: {reason}{got}")

    def missing(self, text: str) -> None:
        if self.complete:
            self.problems.append(text)

    # -- sources ---------------------------------------------------------

    def flag(self, name: str) -> _Raw | None:
        value = self.flags.get(name)
        if value is None or value is False or value == "":
            return None
        opt = "--" + name.replace("_", "-")
        shown = "" if value is True else f"={_show(value)}"
        return _Raw(value, f"{opt}{shown} (command line)")

    def envvar(self, name: str, *, secret: bool = False) -> _Raw | None:
        value = self.env.get(name)
        if not value:
            return None
        origin = f"{name} (environment)" if secret else f"{name}={_show(value)} (environment)"
        return _Raw(value, origin)

    def fileval(self, table: Mapping[str, object], where: str, key: str) -> _Raw | None:
        if key not in table:
            return None
        value = table[key]
        secret = key in _SECRET_KEYS
        return _Raw(
            value,
            f"{where} {key} ({self.file_label})",
            shown=None if secret else _show(value),
            base=self.file_path.parent if self.file_path is not None else None,
        )

    @staticmethod
    def pick(*candidates: _Raw | None) -> _Raw | None:
        for c in candidates:
            if c is not None:
                return c
        return None

    def parse(self, raw: _Raw | None, conv: Callable[[_Raw], _T], default: _T) -> _T:
        if raw is None:
            return default
        try:
            return conv(raw)
        except _Bad as exc:
            self.bad(raw, str(exc))
            return default

    def parse_opt(self, raw: _Raw | None, conv: Callable[[_Raw], _T]) -> _T | None:
        return self.parse(raw, conv, None)

    # -- converters (need self for HOME) ---------------------------------

    def path(self, raw: _Raw) -> str:
        text = _text(raw)
        if text == "~" or text.startswith("~/"):
            if self.home is None:
                raise _Bad("starts with ~ but HOME is not set")
            text = self.home + text[1:]
        p = Path(text)
        if not p.is_absolute() and raw.base is not None:
            p = raw.base / p
        return str(p)

    def existing_file(self, raw: _Raw) -> str:
        p = self.path(raw)
        if not Path(p).exists():
            raise _Bad(f"file {p} does not exist")
        if not Path(p).is_file():
            raise _Bad(f"{p} is not a file")
        return p

    def sslrootcert(self, raw: _Raw) -> str:
        if isinstance(raw.value, str) and raw.value.strip() == "system":
            return "system"
        return self.existing_file(raw)

    # -- the load --------------------------------------------------------

    def load(self) -> Config:
        self.read_file()
        dbx_table = self.table("databricks")
        proxy_table = self.table("proxy")
        file_endpoints = self.endpoint_tables()

        databricks, client_id_raw = self.databricks(dbx_table)
        proxy = self.proxy(proxy_table)
        endpoints = self.endpoints(file_endpoints, proxy_table, client_id_raw, proxy)

        if self.problems or databricks is None:
            raise ConfigError(self.problems or ["DATABRICKS_HOST: required"])
        flags: list[tuple[str, str | bool]] = [
            (k, v) for k, v in self.flags.items() if v is not None
        ]
        if self.config_flag is not None:
            flags.append(("config", str(self.config_flag)))
        return Config(
            databricks=databricks,
            endpoints=endpoints,
            admin_listen=proxy.admin_listen,
            client_password=proxy.client_password,
            tls_cert=proxy.tls_cert,
            tls_key=proxy.tls_key,
            client_tls=proxy.client_tls,
            connect_deadline=proxy.connect_deadline,
            max_clients=proxy.max_clients,
            shutdown_grace=proxy.shutdown_grace,
            log_format=proxy.log_format,
            log_level=proxy.log_level,
            allow_remote_trust=proxy.allow_remote_trust,
            pool_idle_timeout=proxy.pool_idle_timeout,
            pool_max_idle=proxy.pool_max_idle,
            pool_lifetime=proxy.pool_lifetime,
            config_file=self.file_path,
            flags=tuple(flags),
        )

    # -- the TOML file ---------------------------------------------------

    def read_file(self) -> None:
        raw: _Raw | None
        if self.config_flag is not None:
            shown = _show(str(self.config_flag))
            raw = _Raw(str(self.config_flag), f"--config={shown} (command line)")
        else:
            raw = self.envvar("LAKEPROXY_CONFIG")
        if raw is None:
            return
        path = Path(cast(str, raw.value))
        if str(path).startswith("~") and self.home is not None:
            path = Path(self.home + str(path)[1:])
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self.bad(raw, "file not found")
            self.complete = False
            return
        except OSError as exc:
            self.bad(raw, f"cannot read the file: {exc.strerror}")
            self.complete = False
            return
        self.file_path = path
        self.file_label = str(path)
        try:
            self.doc = tomllib.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            self.problems.append(f"{self.file_label}: not UTF-8 text")
            self.complete = False
            self.doc = {}
            return
        except tomllib.TOMLDecodeError as exc:
            self.problems.append(f"{self.file_label}: not valid TOML: {exc}")
            self.complete = False
            self.doc = {}
            return
        for key in self.doc:
            if key not in FILE_KEYS:
                self.problems.append(
                    f"{key} ({self.file_label}): unknown table{_did_you_mean(key, FILE_KEYS)}; "
                    f"the file has [databricks], [proxy] and [[endpoints]]"
                )

    def table(self, name: str) -> Mapping[str, object]:
        value = self.doc.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problems.append(f"{name} ({self.file_label}): must be a table [{name}]")
            return {}
        self.check_keys(value, _table_label(name), FILE_KEYS[name])
        return cast(Mapping[str, object], value)

    def endpoint_tables(self) -> list[Mapping[str, object]]:
        value = self.doc.get("endpoints")
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
            self.problems.append(
                f"endpoints ({self.file_label}): must be [[endpoints]] tables"
            )
            return []
        tables = cast(list[Mapping[str, object]], value)
        for i, t in enumerate(tables, 1):
            self.check_keys(t, self.endpoint_where(i, len(tables)), FILE_KEYS["endpoints"])
        return tables

    @staticmethod
    def endpoint_where(index: int, count: int) -> str:
        return "[[endpoints]]" if count == 1 else f"[[endpoints]] #{index}"

    def check_keys(self, table: Mapping[str, object], where: str, known: tuple[str, ...]) -> None:
        for key in table:
            if key not in known:
                self.problems.append(
                    f"{where} {key} ({self.file_label}): unknown key{_did_you_mean(key, known)}"
                )

    # -- [databricks] ----------------------------------------------------

    def databricks(
        self, table: Mapping[str, object]
    ) -> tuple[DatabricksConfig | None, _Raw | None]:
        """The identity (None if unusable), and the client id's source (PGUSER's default)."""
        where = "[databricks]"
        vals: dict[str, _Raw | None] = {
            "host": self.pick(self.envvar("DATABRICKS_HOST"), self.fileval(table, where, "host")),
            "client_id": self.pick(
                self.envvar("DATABRICKS_CLIENT_ID"), self.fileval(table, where, "client_id")
            ),
            "client_secret": self.pick(
                self.envvar("DATABRICKS_CLIENT_SECRET", secret=True),
                self.fileval(table, where, "client_secret"),
            ),
            "token": self.pick(
                self.envvar("DATABRICKS_TOKEN", secret=True), self.fileval(table, where, "token")
            ),
        }
        profile = self.profile_values(table, vals)
        for key, raw in profile.items():
            if vals[key] is None:
                vals[key] = raw

        host = self.parse_opt(vals["host"], _databricks_host)
        client_id = self.parse_opt(vals["client_id"], _text)
        secret = self.parse_opt(vals["client_secret"], _secret)
        token = self.parse_opt(vals["token"], _secret)

        if vals["host"] is None:
            self.missing(
                "DATABRICKS_HOST: required (the workspace URL, https://...; set it in the "
                "environment, in [databricks] host, or in a ~/.databrickscfg profile)"
            )
        id_raw, secret_raw, token_raw = vals["client_id"], vals["client_secret"], vals["token"]
        # With no auth at all, "PGUSER required" would only repeat the auth problem.
        self.any_auth = any(v is not None for v in (id_raw, secret_raw, token_raw))
        if secret_raw is not None and token_raw is not None:
            self.problems.append(
                f"{token_raw.origin} and {secret_raw.origin}: both a token and a client secret "
                "are set; use one auth method"
            )
        elif secret_raw is not None and id_raw is None:
            self.problems.append(
                f"{secret_raw.origin}: needs DATABRICKS_CLIENT_ID (the service principal's "
                "client id) as well"
            )
        elif id_raw is not None and secret_raw is None and token_raw is None:
            self.missing(
                f"{id_raw.origin}: needs DATABRICKS_CLIENT_SECRET as well (OAuth M2M), "
                "or set DATABRICKS_TOKEN"
            )
        elif id_raw is None and secret_raw is None and token_raw is None:
            self.missing(
                "DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET, or DATABRICKS_TOKEN: one auth "
                "method is required (in the environment, [databricks], or a ~/.databrickscfg "
                "profile)"
            )
        if host is None:
            return None, id_raw
        return DatabricksConfig(host, client_id, secret, token), id_raw

    def profile_values(
        self, table: Mapping[str, object], vals: Mapping[str, _Raw | None]
    ) -> dict[str, _Raw]:
        """Values from the ~/.databrickscfg profile, as the Databricks SDKs read it."""
        where = "[databricks]"
        profile_raw = self.pick(
            self.envvar("DATABRICKS_CONFIG_PROFILE"), self.fileval(table, where, "profile")
        )
        file_raw = self.pick(
            self.envvar("DATABRICKS_CONFIG_FILE"), self.fileval(table, where, "config_file")
        )
        explicit = profile_raw is not None
        direct_auth = any(vals[k] is not None for k in ("client_id", "client_secret", "token"))
        if not explicit and direct_auth:
            # No profile named and credentials set directly: the file is not read (as the
            # SDKs do). Unlike the SDKs, a host set alone does not skip it (SPEC: "DEFAULT
            # profile when no env credentials").
            return {}
        profile = self.parse_opt(profile_raw, _text)
        if explicit and profile is None:
            return {}
        if file_raw is not None:
            path_text = self.parse_opt(file_raw, self.path)
            if path_text is None:
                return {}
        elif self.home is not None:
            path_text = str(Path(self.home) / ".databrickscfg")
        else:
            if profile_raw is not None:
                self.bad(profile_raw, "HOME is not set, so ~/.databrickscfg cannot be found; "
                         "set DATABRICKS_CONFIG_FILE")
            return {}
        path = Path(path_text)
        if not path.is_file():
            if file_raw is not None:
                self.bad(file_raw, f"file {path} does not exist")
            elif profile_raw is not None:
                self.bad(profile_raw, f"file {path} does not exist")
            return {}

        parser = configparser.ConfigParser(interpolation=None, default_section="\x00none")
        try:
            with path.open(encoding="utf-8") as f:
                parser.read_file(f)
        except (configparser.Error, UnicodeDecodeError, OSError) as exc:
            # Never echo the exception: a parse error quotes the line, which may hold a secret.
            line = getattr(exc, "lineno", None)
            at = f" (line {line})" if line is not None else ""
            self.problems.append(f"{path}: cannot read it as a .databrickscfg INI file{at}")
            return {}

        if profile is None:
            default = ""
            if parser.has_section("__settings__"):
                default = parser.get("__settings__", "default_profile", fallback="").strip()
            if default:
                profile = default
            elif parser.has_section(DEFAULT_DATABRICKSCFG_PROFILE):
                profile = DEFAULT_DATABRICKSCFG_PROFILE
            else:
                return {}
        if not parser.has_section(profile) or profile == "__settings__":
            names = ", ".join(s for s in parser.sections() if s != "__settings__") or "none"
            origin = profile_raw.origin if profile_raw is not None else f"{path} [__settings__]"
            self.problems.append(
                f"{origin}: profile [{profile}] not found in {path} (profiles: {names})"
            )
            return {}
        out: dict[str, _Raw] = {}
        for key in _DATABRICKSCFG_KEYS:
            value = parser.get(profile, key, fallback="").strip()
            if value:
                secret = key in _SECRET_KEYS
                out[key] = _Raw(
                    value,
                    f"{key} in profile [{profile}] ({path})",
                    shown=None if secret else _show(value),
                )
        return out

    # -- [proxy] ---------------------------------------------------------

    def proxy(self, table: Mapping[str, object]) -> _Proxy:
        where = "[proxy]"

        def src(key: str, env: str, *, flag: bool = False, secret: bool = False) -> _Raw | None:
            return self.pick(
                self.flag(key) if flag else None,
                self.envvar(env, secret=secret),
                self.fileval(table, where, key),
            )

        admin_raw = src("admin_listen", "LAKEPROXY_ADMIN_LISTEN", flag=True)
        admin = self.parse_opt(admin_raw, _admin_listen)

        password = self.parse_opt(
            src("client_password", "LAKEPROXY_CLIENT_PASSWORD", secret=True), _secret
        )
        cert_raw = src("tls_cert", "LAKEPROXY_TLS_CERT")
        key_raw = src("tls_key", "LAKEPROXY_TLS_KEY")
        cert = self.parse_opt(cert_raw, self.existing_file)
        key = self.parse_opt(key_raw, self.existing_file)
        if cert_raw is not None and key_raw is None:
            self.bad(cert_raw, "needs LAKEPROXY_TLS_KEY too (set both or neither)")
        elif key_raw is not None and cert_raw is None:
            self.bad(key_raw, "needs LAKEPROXY_TLS_CERT too (set both or neither)")
        tls_raw = src("client_tls", "LAKEPROXY_CLIENT_TLS")
        have_tls = cert_raw is not None and key_raw is not None
        client_tls: ClientTls = self.parse(tls_raw, _client_tls, "allow" if have_tls else "off")
        if tls_raw is not None and client_tls != "off" and not have_tls:
            self.bad(tls_raw, "needs LAKEPROXY_TLS_CERT and LAKEPROXY_TLS_KEY")

        deadline = self.parse(
            src("connect_deadline", "LAKEPROXY_CONNECT_DEADLINE"),
            _duration(positive=True), DEFAULT_CONNECT_DEADLINE,
        )
        max_clients = self.parse(
            src("max_clients", "LAKEPROXY_MAX_CLIENTS"), _positive_int, DEFAULT_MAX_CLIENTS
        )
        grace = self.parse(
            src("shutdown_grace", "LAKEPROXY_SHUTDOWN_GRACE"),
            _duration(positive=False), DEFAULT_SHUTDOWN_GRACE,
        )
        log_format: LogFormat = self.parse(
            src("log_format", "LAKEPROXY_LOG_FORMAT", flag=True), _log_format, "text"
        )
        log_level: LogLevel = self.parse(
            src("log_level", "LAKEPROXY_LOG_LEVEL", flag=True), _log_level, "info"
        )
        allow_remote = self.parse(
            src("allow_remote_trust", "LAKEPROXY_ALLOW_REMOTE_TRUST", flag=True), _bool, False
        )
        pool_idle = self.parse(
            src("pool_idle_timeout", "LAKEPROXY_POOL_IDLE_TIMEOUT"),
            _duration(positive=True), DEFAULT_POOL_IDLE_TIMEOUT,
        )
        pool_max_idle = self.parse(
            src("pool_max_idle", "LAKEPROXY_POOL_MAX_IDLE"), _positive_int, DEFAULT_POOL_MAX_IDLE
        )
        pool_lifetime = self.parse(
            src("pool_lifetime", "LAKEPROXY_POOL_LIFETIME"),
            _duration(positive=True), DEFAULT_POOL_LIFETIME,
        )
        return _Proxy(
            admin_listen=admin,
            client_password=password,
            tls_cert=cert,
            tls_key=key,
            client_tls=client_tls,
            connect_deadline=deadline,
            max_clients=max_clients,
            shutdown_grace=grace,
            log_format=log_format,
            log_level=log_level,
            allow_remote_trust=allow_remote,
            admin_raw=admin_raw,
            pool_idle_timeout=pool_idle,
            pool_max_idle=pool_max_idle,
            pool_lifetime=pool_lifetime,
        )

    # -- [[endpoints]] ---------------------------------------------------

    def endpoints(
        self,
        tables: list[Mapping[str, object]],
        proxy_table: Mapping[str, object],
        default_user: _Raw | None,
        proxy: _Proxy,
    ) -> tuple[EndpointConfig, ...]:
        listen_override = self.pick(self.flag("listen"), self.envvar("LAKEPROXY_LISTEN"))
        proxy_listen = self.fileval(proxy_table, "[proxy]", "listen")
        if len(tables) > 1 and listen_override is not None:
            self.bad(
                listen_override,
                f"the file {self.file_label} has several [[endpoints]]; set listen in each instead",
            )
            listen_override = None

        out: list[EndpointConfig] = []
        seen: dict[tuple[str, str, int, str | None], int] = {}
        # pool_mode: the environment, else the endpoint's table, else [proxy] (each
        # parsed once, so a bad value is one problem however many endpoints).
        pool_default: PoolMode = self.parse(
            self.pick(self.envvar("LAKEPROXY_POOL_MODE"),
                      self.fileval(proxy_table, "[proxy]", "pool_mode")),
            _pool_mode, "off",
        )
        pool_env = self.envvar("LAKEPROXY_POOL_MODE") is not None
        for index, table in enumerate(tables or [{}], 1):
            where = self.endpoint_where(index, len(tables))
            use_env = len(tables) <= 1
            listen_raw = self.pick(
                listen_override, self.fileval(table, where, "listen"), proxy_listen
            )
            default_listen: tuple[Listener, ...] = (parse_listener(DEFAULT_LISTEN),)
            listen = self.parse(listen_raw, _listeners, default_listen)
            ep = self.endpoint(table, where, bool(tables), use_env, listen, default_user)
            for lst in listen:
                ident = (lst.kind, lst.host, lst.port, lst.path)
                if lst.port != 0 and ident in seen:
                    origin = listen_raw.origin if listen_raw is not None else "default listener"
                    self.problems.append(
                        f"{origin}: {lst.describe()} is already used by [[endpoints]] "
                        f"#{seen[ident]}; give each endpoint its own listen"
                    )
                seen.setdefault(ident, index)
                if not lst.is_loopback and not proxy.trusted:
                    origin = listen_raw.origin if listen_raw is not None else "listener"
                    self.problems.append(
                        f"{origin}: {lst.describe()} is not a loopback address, so anyone who "
                        "can reach it would connect without a password; set "
                        "LAKEPROXY_CLIENT_PASSWORD (and LAKEPROXY_TLS_CERT/LAKEPROXY_TLS_KEY) "
                        "or pass --allow-remote-trust"
                    )
                admin = proxy.admin_listen
                if (
                    proxy.admin_raw is not None and lst.kind == "tcp" and lst.port != 0
                    and (lst.host, lst.port) == admin
                ):
                    self.bad(proxy.admin_raw, f"{lst.describe()} is also a client listener")
            pool_mode = pool_default
            if not pool_env:
                pool_mode = self.parse(
                    self.fileval(table, where, "pool_mode"), _pool_mode, pool_default
                )
            if ep is not None:
                out.append(dataclasses.replace(ep, pool_mode=pool_mode))
        return tuple(out)

    def endpoint(
        self,
        table: Mapping[str, object],
        where: str,
        in_file: bool,
        use_env: bool,
        listen: tuple[Listener, ...],
        default_user: _Raw | None,
    ) -> EndpointConfig | None:
        """One endpoint from its file table (maybe empty) and, if ``use_env``, PG* vars."""
        def env(name: str) -> _Raw | None:
            return self.envvar(name) if use_env else None

        def src(key: str, envname: str) -> _Raw | None:
            return self.pick(env(envname), self.fileval(table, where, key))

        # Identity: the environment's pair replaces the file's as a whole.
        name_raw, inst_raw = env("ENDPOINT_NAME"), env("LAKEBASE_INSTANCE")
        if name_raw is None and inst_raw is None:
            name_raw = self.fileval(table, where, "name")
            inst_raw = self.fileval(table, where, "instance")
        name = self.parse_opt(name_raw, _endpoint_name)
        instance = self.parse_opt(inst_raw, _text)
        if name_raw is not None and inst_raw is not None:
            self.problems.append(
                f"{name_raw.origin} and {inst_raw.origin}: set only one (ENDPOINT_NAME for "
                "autoscaling, LAKEBASE_INSTANCE for a provisioned instance)"
            )
        elif name_raw is None and inst_raw is None:
            if in_file:
                self.missing(f"{where} ({self.file_label}): needs name or instance")
            else:
                self.missing(
                    "ENDPOINT_NAME or LAKEBASE_INSTANCE: one is required (ENDPOINT_NAME="
                    "projects/<p>/branches/<b>/endpoints/<e> for autoscaling)"
                )

        host = self.parse_opt(src("host", "PGHOST"), _pg_host)
        hostaddr = self.parse_opt(src("hostaddr", "PGHOSTADDR"), _ip_address)
        port = self.parse(src("port", "PGPORT"), _pg_port, DEFAULT_PGPORT)
        database = self.parse(src("database", "PGDATABASE"), _text, DEFAULT_DATABASE)
        user_raw = self.pick(src("user", "PGUSER"), default_user)
        user = self.parse_opt(user_raw, _text)
        if user_raw is None and self.any_auth:
            self.missing(
                (f"{where} user ({self.file_label})" if not use_env else "PGUSER")
                + ": required when DATABRICKS_CLIENT_ID is unset (the Postgres role to log in as)"
            )
        sslmode = self.parse(src("sslmode", "PGSSLMODE"), _sslmode, DEFAULT_SSLMODE)
        rootcert = self.parse(src("sslrootcert", "PGSSLROOTCERT"), self.sslrootcert, "system")
        if user is None:
            return None
        return EndpointConfig(
            name=name, instance=instance, host=host, hostaddr=hostaddr, port=port,
            database=database, user=user, sslmode=sslmode, sslrootcert=rootcert, listen=listen,
        )


@dataclass(frozen=True, slots=True)
class _Proxy:
    """The resolved [proxy] part, plus what the endpoint checks need."""

    admin_listen: tuple[str, int] | None
    client_password: str | None = field(repr=False)
    tls_cert: str | None
    tls_key: str | None
    client_tls: ClientTls
    connect_deadline: float
    max_clients: int
    shutdown_grace: float
    log_format: LogFormat
    log_level: LogLevel
    allow_remote_trust: bool
    admin_raw: _Raw | None
    pool_idle_timeout: float = DEFAULT_POOL_IDLE_TIMEOUT
    pool_max_idle: int = DEFAULT_POOL_MAX_IDLE
    pool_lifetime: float = DEFAULT_POOL_LIFETIME

    @property
    def trusted(self) -> bool:
        """A client password is set, or remote trust was allowed."""
        return self.client_password is not None or self.allow_remote_trust


# --------------------------------------------------------------------------
# Converters: _Raw -> value, raising _Bad(reason)


def _did_you_mean(key: str, known: tuple[str, ...] | Mapping[str, object]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _text(raw: _Raw) -> str:
    if not isinstance(raw.value, str):
        raise _Bad("must be a string")
    text = raw.value.strip()
    if not text:
        raise _Bad("must not be empty")
    return text


def _secret(raw: _Raw) -> str:
    if not isinstance(raw.value, str):
        raise _Bad("must be a string")
    if not raw.value:
        raise _Bad("must not be empty")
    return raw.value


def _int(raw: _Raw) -> int:
    value = raw.value
    if isinstance(value, bool):
        raise _Bad("must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise _Bad("must be an integer")


def _positive_int(raw: _Raw) -> int:
    try:
        n = _int(raw)
    except _Bad:
        n = 0
    if n <= 0:
        raise _Bad("must be a positive integer")
    return n


def _pg_port(raw: _Raw) -> int:
    try:
        n = _int(raw)
    except _Bad:
        n = 0
    if not 1 <= n <= 65535:
        raise _Bad("must be a port number from 1 to 65535")
    return n


def _duration(*, positive: bool) -> Callable[[_Raw], float]:
    def conv(raw: _Raw) -> float:
        value = raw.value
        if isinstance(value, bool):
            raise _Bad('must be a duration such as "30", "30s", "200ms" or "2m"')
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str):
            try:
                seconds = parse_duration(value)
            except ValueError as exc:
                raise _Bad(str(exc)) from None
        else:
            raise _Bad('must be a duration such as "30", "30s", "200ms" or "2m"')
        if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
            raise _Bad("must be more than 0 seconds" if positive else "must not be negative")
        return seconds

    return conv


def _bool(raw: _Raw) -> bool:
    if isinstance(raw.value, bool):
        return raw.value
    if isinstance(raw.value, str):
        text = raw.value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise _Bad("must be true or false")


def _choice(options: tuple[str, ...]) -> Callable[[_Raw], str]:
    def conv(raw: _Raw) -> str:
        if isinstance(raw.value, str) and raw.value.strip().lower() in options:
            return raw.value.strip().lower()
        raise _Bad(f"must be one of {', '.join(options)}")

    return conv


def _sslmode(raw: _Raw) -> SslMode:
    if isinstance(raw.value, str) and raw.value.strip().lower() in ("disable", "allow", "prefer"):
        raise _Bad(
            "must be one of require, verify-ca, verify-full (lakeproxy always uses TLS "
            "to the endpoint)"
        )
    return cast(SslMode, _choice(get_args(SslMode))(raw))


def _client_tls(raw: _Raw) -> ClientTls:
    return cast(ClientTls, _choice(get_args(ClientTls))(raw))


def _pool_mode(raw: _Raw) -> PoolMode:
    return cast(PoolMode, _choice(get_args(PoolMode))(raw))


def _log_format(raw: _Raw) -> LogFormat:
    return cast(LogFormat, _choice(get_args(LogFormat))(raw))


def _log_level(raw: _Raw) -> LogLevel:
    if isinstance(raw.value, str) and raw.value.strip().lower() == "warn":
        return "warning"
    return cast(LogLevel, _choice(get_args(LogLevel))(raw))


def _listeners(raw: _Raw) -> tuple[Listener, ...]:
    value = raw.value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(cast(list[str], value))
    if not isinstance(value, str):
        raise _Bad('must be a string such as "127.0.0.1:6432" (or a list of them)')
    try:
        return parse_listeners(value)
    except ValueError as exc:
        raise _Bad(str(exc)) from None


def _admin_listen(raw: _Raw) -> tuple[str, int] | None:
    text = _text(raw)
    if text.lower() == "off":
        return None
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise _Bad(str(exc)) from None


def _databricks_host(raw: _Raw) -> str:
    text = _text(raw)
    example = "https://<workspace>.cloud.databricks.com"
    try:
        url = urllib.parse.urlsplit(text)
        url.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        raise _Bad(f"must be a URL such as {example}") from None
    if url.scheme not in ("https", "http") or not url.hostname:
        raise _Bad(f"must start with https://, e.g. {example}")
    if url.username is not None or url.password is not None:
        raise _Bad("must not contain a user name or password")
    if url.scheme == "http" and not is_loopback_host(url.hostname):
        raise _Bad("must use https:// (http:// is allowed only to a loopback address)")
    return f"{url.scheme}://{url.netloc}"


def _endpoint_name(raw: _Raw) -> str:
    text = _text(raw)
    if _ENDPOINT_NAME_RE.fullmatch(text) is None:
        raise _Bad("must look like projects/<project>/branches/<branch>/endpoints/<endpoint>")
    return text


def _pg_host(raw: _Raw) -> str:
    text = _text(raw)
    if text.startswith("/") or "," in text:
        raise _Bad("must be one host name (unix sockets and host lists are not supported)")
    if not _is_host(text):
        raise _Bad("must be a host name or IP address")
    return text


def _ip_address(raw: _Raw) -> str:
    text = _text(raw)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise _Bad("must be an IP address") from None
