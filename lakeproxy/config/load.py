"""Loading: flags over environment over TOML file over defaults.

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

Adding a key: a field in :mod:`~lakeproxy.config.model`, its name in
:data:`FILE_KEYS` / :data:`ENV_VARS`, and one ``self.parse(...)`` line here.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar, cast

from lakeproxy.config.model import (
    DEFAULT_CONNECT_DEADLINE,
    DEFAULT_DATABASE,
    DEFAULT_LISTEN,
    DEFAULT_LOGIN_TIMEOUT,
    DEFAULT_MAX_CLIENTS,
    DEFAULT_PGPORT,
    DEFAULT_SHUTDOWN_GRACE,
    DEFAULT_SSLMODE,
    PROVISIONED_KINDS,
    ClientTls,
    Config,
    DatabricksConfig,
    EndpointConfig,
    Listener,
    LogFormat,
    LogLevel,
)
from lakeproxy.config.profiles import ProfileError, read_profile
from lakeproxy.config.values import (
    Bad,
    Raw,
    as_admin_listen,
    as_bool,
    as_client_tls,
    as_databricks_host,
    as_duration,
    as_endpoint_name,
    as_host_kind,
    as_ip_address,
    as_listeners,
    as_log_format,
    as_log_level,
    as_pg_host,
    as_pg_port,
    as_positive_int,
    as_secret,
    as_sslmode,
    as_text,
    did_you_mean,
    parse_listener,
    show,
)
from lakeproxy.errors import ConfigError

#: Keys the TOML file may hold, per table. A test checks that
#: ``config.example.toml`` documents each of them.
FILE_KEYS: Final[Mapping[str, tuple[str, ...]]] = {
    "databricks": ("host", "client_id", "client_secret", "token", "profile", "config_file"),
    "proxy": (
        "listen", "admin_listen", "client_password", "tls_cert", "tls_key", "client_tls",
        "connect_deadline", "max_clients", "shutdown_grace", "log_format", "log_level",
        "allow_remote_trust", "login_timeout",
    ),
    "endpoints": (
        "name", "instance", "host", "hostaddr", "port", "database", "user", "sslmode",
        "sslrootcert", "listen",
        "host_kind",
    ),
}

#: Environment variables :func:`load_config` reads.
ENV_VARS: Final[tuple[str, ...]] = (
    "DATABRICKS_HOST", "DATABRICKS_CLIENT_ID", "DATABRICKS_CLIENT_SECRET", "DATABRICKS_TOKEN",
    "DATABRICKS_CONFIG_PROFILE", "DATABRICKS_CONFIG_FILE",
    "ENDPOINT_NAME", "LAKEBASE_INSTANCE",
    "LAKEBASE_HOST_KIND",
    "PGHOST", "PGPORT", "PGHOSTADDR", "PGDATABASE", "PGUSER", "PGSSLMODE", "PGSSLROOTCERT",
    "LAKEPROXY_CONFIG", "LAKEPROXY_LISTEN", "LAKEPROXY_ADMIN_LISTEN", "LAKEPROXY_CLIENT_PASSWORD",
    "LAKEPROXY_TLS_CERT", "LAKEPROXY_TLS_KEY", "LAKEPROXY_CLIENT_TLS",
    "LAKEPROXY_CONNECT_DEADLINE", "LAKEPROXY_MAX_CLIENTS", "LAKEPROXY_SHUTDOWN_GRACE",
    "LAKEPROXY_LOG_FORMAT", "LAKEPROXY_LOG_LEVEL", "LAKEPROXY_ALLOW_REMOTE_TRUST",
    "LAKEPROXY_LOGIN_TIMEOUT",
)

#: Keys of the ``argv`` mapping :func:`load_config` accepts (argparse ``dest`` names).
FLAG_KEYS: Final[tuple[str, ...]] = (
    "listen", "admin_listen", "allow_remote_trust", "log_level", "log_format",
)

_SECRET_KEYS: Final = frozenset({"client_secret", "token", "client_password"})
_T = TypeVar("_T")


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

    def bad(self, raw: Raw, reason: str) -> None:
        got = f" (got {raw.shown})" if raw.shown is not None else ""
        self.problems.append(f"{raw.origin}: {reason}{got}")

    def missing(self, text: str) -> None:
        if self.complete:
            self.problems.append(text)

    # -- sources ---------------------------------------------------------

    def flag(self, name: str) -> Raw | None:
        value = self.flags.get(name)
        if value is None or value is False or value == "":
            return None
        opt = "--" + name.replace("_", "-")
        shown = "" if value is True else f"={show(value)}"
        return Raw(value, f"{opt}{shown} (command line)")

    def envvar(self, name: str, *, secret: bool = False) -> Raw | None:
        value = self.env.get(name)
        if not value:
            return None
        origin = f"{name} (environment)" if secret else f"{name}={show(value)} (environment)"
        return Raw(value, origin)

    def fileval(self, table: Mapping[str, object], where: str, key: str) -> Raw | None:
        if key not in table:
            return None
        value = table[key]
        secret = key in _SECRET_KEYS
        return Raw(
            value,
            f"{where} {key} ({self.file_label})",
            shown=None if secret else show(value),
            base=self.file_path.parent if self.file_path is not None else None,
        )

    @staticmethod
    def pick(*candidates: Raw | None) -> Raw | None:
        for c in candidates:
            if c is not None:
                return c
        return None

    def parse(self, raw: Raw | None, conv: Callable[[Raw], _T], default: _T) -> _T:
        if raw is None:
            return default
        try:
            return conv(raw)
        except Bad as exc:
            self.bad(raw, str(exc))
            return default

    def parse_opt(self, raw: Raw | None, conv: Callable[[Raw], _T]) -> _T | None:
        return self.parse(raw, conv, None)

    # -- converters (need self for HOME) ---------------------------------

    def path(self, raw: Raw) -> str:
        text = as_text(raw)
        if text == "~" or text.startswith("~/"):
            if self.home is None:
                raise Bad("starts with ~ but HOME is not set")
            text = self.home + text[1:]
        p = Path(text)
        if not p.is_absolute() and raw.base is not None:
            p = raw.base / p
        return str(p)

    def existing_file(self, raw: Raw) -> str:
        p = self.path(raw)
        if not Path(p).exists():
            raise Bad(f"file {p} does not exist")
        if not Path(p).is_file():
            raise Bad(f"{p} is not a file")
        return p

    def sslrootcert(self, raw: Raw) -> str:
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
            login_timeout=proxy.login_timeout,
            log_format=proxy.log_format,
            log_level=proxy.log_level,
            allow_remote_trust=proxy.allow_remote_trust,
            config_file=self.file_path,
            flags=tuple(flags),
        )

    # -- the TOML file ---------------------------------------------------

    def read_file(self) -> None:
        raw: Raw | None
        if self.config_flag is not None:
            shown = show(str(self.config_flag))
            raw = Raw(str(self.config_flag), f"--config={shown} (command line)")
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
                    f"{key} ({self.file_label}): unknown table{did_you_mean(key, FILE_KEYS)}; "
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
                    f"{where} {key} ({self.file_label}): unknown key{did_you_mean(key, known)}"
                )

    # -- [databricks] ----------------------------------------------------

    def databricks(
        self, table: Mapping[str, object]
    ) -> tuple[DatabricksConfig | None, Raw | None]:
        """The identity (None if unusable), and the client id's source (PGUSER's default)."""
        where = "[databricks]"
        vals: dict[str, Raw | None] = {
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

        host = self.parse_opt(vals["host"], as_databricks_host)
        client_id = self.parse_opt(vals["client_id"], as_text)
        secret = self.parse_opt(vals["client_secret"], as_secret)
        token = self.parse_opt(vals["token"], as_secret)

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
        self, table: Mapping[str, object], vals: Mapping[str, Raw | None]
    ) -> dict[str, Raw]:
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
        profile = self.parse_opt(profile_raw, as_text)
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

        try:
            found = read_profile(path, profile)
        except ProfileError as exc:
            if exc.missing:
                origin = profile_raw.origin if profile_raw is not None else (
                    f"{path} [__settings__]"
                )
                self.problems.append(f"{origin}: {exc}")
            else:
                self.problems.append(str(exc))
            return {}
        if found is None:
            return {}
        name, values = found
        return {
            key: Raw(
                value,
                f"{key} in profile [{name}] ({path})",
                shown=None if key in _SECRET_KEYS else show(value),
            )
            for key, value in values.items()
        }

    # -- [proxy] ---------------------------------------------------------

    def proxy(self, table: Mapping[str, object]) -> _Proxy:
        where = "[proxy]"

        def src(key: str, env: str, *, flag: bool = False, secret: bool = False) -> Raw | None:
            return self.pick(
                self.flag(key) if flag else None,
                self.envvar(env, secret=secret),
                self.fileval(table, where, key),
            )

        admin_raw = src("admin_listen", "LAKEPROXY_ADMIN_LISTEN", flag=True)
        admin = self.parse_opt(admin_raw, as_admin_listen)

        password = self.parse_opt(
            src("client_password", "LAKEPROXY_CLIENT_PASSWORD", secret=True), as_secret
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
        client_tls: ClientTls = self.parse(tls_raw, as_client_tls, "allow" if have_tls else "off")
        if tls_raw is not None and client_tls != "off" and not have_tls:
            self.bad(tls_raw, "needs LAKEPROXY_TLS_CERT and LAKEPROXY_TLS_KEY")

        deadline = self.parse(
            src("connect_deadline", "LAKEPROXY_CONNECT_DEADLINE"),
            as_duration(positive=True), DEFAULT_CONNECT_DEADLINE,
        )
        max_clients = self.parse(
            src("max_clients", "LAKEPROXY_MAX_CLIENTS"), as_positive_int, DEFAULT_MAX_CLIENTS
        )
        grace = self.parse(
            src("shutdown_grace", "LAKEPROXY_SHUTDOWN_GRACE"),
            as_duration(positive=False), DEFAULT_SHUTDOWN_GRACE,
        )
        login_timeout = self.parse(
            src("login_timeout", "LAKEPROXY_LOGIN_TIMEOUT"),
            as_duration(positive=True), DEFAULT_LOGIN_TIMEOUT,
        )
        log_format: LogFormat = self.parse(
            src("log_format", "LAKEPROXY_LOG_FORMAT", flag=True), as_log_format, "text"
        )
        log_level: LogLevel = self.parse(
            src("log_level", "LAKEPROXY_LOG_LEVEL", flag=True), as_log_level, "info"
        )
        allow_remote = self.parse(
            src("allow_remote_trust", "LAKEPROXY_ALLOW_REMOTE_TRUST", flag=True), as_bool, False
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
            login_timeout=login_timeout,
            log_format=log_format,
            log_level=log_level,
            allow_remote_trust=allow_remote,
            admin_raw=admin_raw,
        )

    # -- [[endpoints]] ---------------------------------------------------

    def endpoints(
        self,
        tables: list[Mapping[str, object]],
        proxy_table: Mapping[str, object],
        default_user: Raw | None,
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
        for index, table in enumerate(tables or [{}], 1):
            where = self.endpoint_where(index, len(tables))
            use_env = len(tables) <= 1
            listen_raw = self.pick(
                listen_override, self.fileval(table, where, "listen"), proxy_listen
            )
            default_listen: tuple[Listener, ...] = (parse_listener(DEFAULT_LISTEN),)
            listen = self.parse(listen_raw, as_listeners, default_listen)
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
            if ep is not None:
                out.append(ep)
        return tuple(out)

    def endpoint(
        self,
        table: Mapping[str, object],
        where: str,
        in_file: bool,
        use_env: bool,
        listen: tuple[Listener, ...],
        default_user: Raw | None,
    ) -> EndpointConfig | None:
        """One endpoint from its file table (maybe empty) and, if ``use_env``, PG* vars."""
        def env(name: str) -> Raw | None:
            return self.envvar(name) if use_env else None

        def src(key: str, envname: str) -> Raw | None:
            return self.pick(env(envname), self.fileval(table, where, key))

        # Identity: the environment's pair replaces the file's as a whole.
        name_raw, inst_raw = env("ENDPOINT_NAME"), env("LAKEBASE_INSTANCE")
        if name_raw is None and inst_raw is None:
            name_raw = self.fileval(table, where, "name")
            inst_raw = self.fileval(table, where, "instance")
        name = self.parse_opt(name_raw, as_endpoint_name)
        instance = self.parse_opt(inst_raw, as_text)
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

        host = self.parse_opt(src("host", "PGHOST"), as_pg_host)
        kind_raw = src("host_kind", "LAKEBASE_HOST_KIND")
        host_kind = self.parse_opt(kind_raw, as_host_kind)
        if kind_raw is not None and host_kind is not None and inst_raw is not None and (
                host_kind not in PROVISIONED_KINDS):
            self.bad(kind_raw, "a provisioned instance has no pooled hosts (Lakebase pools "
                     "only autoscaling endpoints); use read_write or read_only")
        hostaddr = self.parse_opt(src("hostaddr", "PGHOSTADDR"), as_ip_address)
        port = self.parse(src("port", "PGPORT"), as_pg_port, DEFAULT_PGPORT)
        database = self.parse(src("database", "PGDATABASE"), as_text, DEFAULT_DATABASE)
        user_raw = self.pick(src("user", "PGUSER"), default_user)
        user = self.parse_opt(user_raw, as_text)
        if user_raw is None and self.any_auth:
            self.missing(
                (f"{where} user ({self.file_label})" if not use_env else "PGUSER")
                + ": required when DATABRICKS_CLIENT_ID is unset (the Postgres role to log in as)"
            )
        sslmode = self.parse(src("sslmode", "PGSSLMODE"), as_sslmode, DEFAULT_SSLMODE)
        rootcert = self.parse(src("sslrootcert", "PGSSLROOTCERT"), self.sslrootcert, "system")
        if user is None:
            return None
        return EndpointConfig(
            name=name, instance=instance, host=host, host_kind=host_kind, hostaddr=hostaddr,
            port=port,
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
    login_timeout: float
    log_format: LogFormat
    log_level: LogLevel
    allow_remote_trust: bool
    admin_raw: Raw | None

    @property
    def trusted(self) -> bool:
        """A client password is set, or remote trust was allowed."""
        return self.client_password is not None or self.allow_remote_trust


# --------------------------------------------------------------------------
