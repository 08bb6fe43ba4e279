"""Loading: flags over environment over TOML file over defaults.

:func:`load_config` is pure apart from reading the files it is pointed at: the
environment is passed in, ``os.environ`` is never read here. It collects every
problem it finds and raises one :class:`~lakeproxy.errors.ConfigError`; each
problem names the key and where the value came from, e.g.
``LAKEBASE_SSLMODE=disable (environment): must be one of require, verify-ca,
verify-full``; "required" problems come after the others (a typo in the file
often explains them). A secret's value never appears in a message or a ``repr``.
Warnings (a client-only ``PGSSLMODE`` that was ignored) go to ``Config.warnings``,
and ``Config.sources`` / ``EndpointConfig.sources`` say where each value came
from, so hints can name that place (:func:`~lakeproxy.config.model.name_sources`).

Rules worth knowing:

* an empty environment variable counts as unset (as libpq does);
* relative paths in the TOML file are relative to the file's directory, and
  ``~`` expands with ``HOME`` from the given environment;
* an endpoint key comes from its ``LAKEBASE_*`` variable, else the file, else
  the ``PG*`` variable libpq reads (:data:`ENDPOINT_ENV`): a shell's ``PG*`` are
  usually meant for the proxy's clients;
* with several ``[[endpoints]]`` in the file, the per-endpoint environment
  variables (``ENDPOINT_NAME``, ``LAKEBASE_INSTANCE``, ``LAKEBASE_*``, ``PG*``) are
  ignored and ``LAKEPROXY_LISTEN`` / ``--listen`` are refused: each endpoint says it all;
  with one ``[[endpoints]]`` table, they override its fields.

Adding a key: a field in :mod:`~lakeproxy.config.model`, its name in
:data:`FILE_KEYS` / :data:`ENV_VARS`, and one ``self.parse(...)`` line here.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar, cast

from lakeproxy.config.model import (
    DEFAULT_AZURE_AUTHORITY,
    DEFAULT_CONNECT_DEADLINE,
    DEFAULT_DATABASE,
    DEFAULT_IMDS_HOST,
    DEFAULT_LISTEN,
    DEFAULT_LOGIN_TIMEOUT,
    DEFAULT_MAX_CLIENTS,
    DEFAULT_PGPORT,
    DEFAULT_POOL_IDLE_TIMEOUT,
    DEFAULT_POOL_LIFETIME,
    DEFAULT_POOL_MAX_IDLE,
    DEFAULT_SHUTDOWN_GRACE,
    DEFAULT_SSLMODE,
    PROVISIONED_KINDS,
    AuthType,
    ClientTls,
    Config,
    DatabricksConfig,
    EndpointConfig,
    Listener,
    LogFormat,
    LogLevel,
    PoolMode,
)
from lakeproxy.config.profiles import ProfileError, read_profile
from lakeproxy.config.values import (
    Bad,
    Raw,
    as_admin_listen,
    as_auth_type,
    as_bool,
    as_client_tls,
    as_databricks_host,
    as_duration,
    as_endpoint_name,
    as_host_kind,
    as_identity_url,
    as_ip_address,
    as_listeners,
    as_log_format,
    as_log_level,
    as_pg_host,
    as_pg_port,
    as_pool_mode,
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
    "databricks": (
        "host", "client_id", "client_secret", "token", "profile", "config_file", "auth_type",
        "cli_path", "oidc_token_file", "azure_client_id", "azure_client_secret",
        "azure_tenant_id",
    ),
    "proxy": (
        "listen", "admin_listen", "client_password", "tls_cert", "tls_key", "client_tls",
        "connect_deadline", "max_clients", "shutdown_grace", "log_format", "log_level",
        "allow_remote_trust", "login_timeout",
        "pool_mode", "pool_idle_timeout", "pool_max_idle", "pool_lifetime",
    ),
    "endpoints": (
        "name", "instance", "host", "hostaddr", "port", "database", "user", "sslmode",
        "sslrootcert", "listen",
        "host_kind",
        "pool_mode",
    ),
}

#: Environment variables :func:`load_config` reads.
ENV_VARS: Final[tuple[str, ...]] = (
    "DATABRICKS_HOST", "DATABRICKS_CLIENT_ID", "DATABRICKS_CLIENT_SECRET", "DATABRICKS_TOKEN",
    "DATABRICKS_CONFIG_PROFILE", "DATABRICKS_CONFIG_FILE",
    "DATABRICKS_AUTH_TYPE", "DATABRICKS_CLI_PATH", "DATABRICKS_OIDC_TOKEN",
    "DATABRICKS_OIDC_TOKEN_FILE", "ARM_CLIENT_ID", "ARM_CLIENT_SECRET", "ARM_TENANT_ID",
    "AZURE_AUTHORITY_HOST", "IDENTITY_ENDPOINT", "IDENTITY_HEADER",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    "ENDPOINT_NAME", "LAKEBASE_INSTANCE",
    "LAKEBASE_HOST_KIND",
    "LAKEBASE_HOST", "LAKEBASE_PORT", "LAKEBASE_HOSTADDR", "LAKEBASE_DATABASE", "LAKEBASE_USER",
    "LAKEBASE_SSLMODE", "LAKEBASE_SSLROOTCERT",
    "PGHOST", "PGPORT", "PGHOSTADDR", "PGDATABASE", "PGUSER", "PGSSLMODE", "PGSSLROOTCERT",
    "LAKEPROXY_CONFIG", "LAKEPROXY_LISTEN", "LAKEPROXY_ADMIN_LISTEN", "LAKEPROXY_CLIENT_PASSWORD",
    "LAKEPROXY_TLS_CERT", "LAKEPROXY_TLS_KEY", "LAKEPROXY_CLIENT_TLS",
    "LAKEPROXY_CONNECT_DEADLINE", "LAKEPROXY_MAX_CLIENTS", "LAKEPROXY_SHUTDOWN_GRACE",
    "LAKEPROXY_LOG_FORMAT", "LAKEPROXY_LOG_LEVEL", "LAKEPROXY_ALLOW_REMOTE_TRUST",
    "LAKEPROXY_LOGIN_TIMEOUT",
    "LAKEPROXY_POOL_MODE", "LAKEPROXY_POOL_IDLE_TIMEOUT", "LAKEPROXY_POOL_MAX_IDLE",
    "LAKEPROXY_POOL_LIFETIME",
)

#: Keys of the ``argv`` mapping :func:`load_config` accepts (argparse ``dest`` names).
FLAG_KEYS: Final[tuple[str, ...]] = (
    "listen", "admin_listen", "allow_remote_trust", "log_level", "log_format",
)

_SECRET_KEYS: Final = frozenset({
    "client_secret", "token", "client_password", "azure_client_secret", "oidc_token",
})
#: Keys that configure a sign-in method; set without a named profile, the
#: ~/.databrickscfg file is not read (as the SDKs do).
_DIRECT_AUTH_KEYS: Final = (
    "client_id", "client_secret", "token", "oidc_token", "oidc_token_file",
    "azure_client_secret", "azure_tenant_id",
)
#: ~/.databrickscfg key -> our name, where they differ (the SDKs' profile keys).
_PROFILE_RENAME: Final = {
    "databricks_cli_path": "cli_path", "oidc_token_filepath": "oidc_token_file",
}
#: An endpoint key's own variable and the libpq variable it falls back to. The
#: proxy's own name (and the TOML key) wins: the PG* names in a shell or a shared
#: .env file are usually meant for the clients of the proxy (SPEC "Configuration").
ENDPOINT_ENV: Final[Mapping[str, tuple[str, str]]] = {
    "host": ("LAKEBASE_HOST", "PGHOST"),
    "port": ("LAKEBASE_PORT", "PGPORT"),
    "hostaddr": ("LAKEBASE_HOSTADDR", "PGHOSTADDR"),
    "database": ("LAKEBASE_DATABASE", "PGDATABASE"),
    "user": ("LAKEBASE_USER", "PGUSER"),
    "sslmode": ("LAKEBASE_SSLMODE", "PGSSLMODE"),
    "sslrootcert": ("LAKEBASE_SSLROOTCERT", "PGSSLROOTCERT"),
}
#: PGSSLMODE values that only make sense for a client: ignored (with a warning)
#: as a fallback, refused as LAKEBASE_SSLMODE or a TOML sslmode.
_CLIENT_ONLY_SSLMODES: Final = frozenset({"disable", "allow", "prefer"})
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
        self.missing_problems: list[str] = []  # "required" ones: printed after the specific ones
        self.warnings: list[str] = []
        self.sources: dict[str, str] = {}  # variable -> where its value came from, for hints
        self.complete = True  # False when the file could not be read: skip "required" checks
        self.profile_failed = False  # the ~/.databrickscfg profile could not be read
        self.file_path: Path | None = None
        self.file_label = ""
        self.doc: dict[str, object] = {}

    # -- problems --------------------------------------------------------

    def bad(self, raw: Raw, reason: str) -> None:
        got = f" (got {raw.shown})" if raw.shown is not None else ""
        self.problems.append(f"{raw.origin}: {reason}{got}")

    def missing(self, text: str) -> None:
        if self.complete:
            self.missing_problems.append(text)

    def missing_auth(self, text: str) -> None:
        """A required sign-in value is missing, unless a broken profile explains it."""
        if not self.profile_failed:
            self.missing(text)

    def note(self, name: str, raw: Raw | None) -> Raw | None:
        """Remember where ``name``'s value came from (for hints); returns ``raw``."""
        if raw is not None:
            self.sources[name] = raw.source
        return raw

    # -- sources ---------------------------------------------------------

    def flag(self, name: str) -> Raw | None:
        value = self.flags.get(name)
        if value is None or value is False or value == "":
            return None
        opt = "--" + name.replace("_", "-")
        shown = "" if value is True else f"={show(value)}"
        return Raw(value, f"{opt}{shown} (command line)", source=opt)

    def envvar(self, name: str, *, secret: bool = False) -> Raw | None:
        value = self.env.get(name)
        if not value:
            return None
        origin = f"{name} (environment)" if secret else f"{name}={show(value)} (environment)"
        return Raw(value, origin, source=name)

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
            source=f"{key} in {where} of {self.file_label}",
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

        # Most specific first: a typo in the file or a bad value often explains a
        # "required" problem that follows it.
        problems = self.problems + self.missing_problems
        if problems or databricks is None:
            raise ConfigError(problems or ["DATABRICKS_HOST: required"])
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
            pool_idle_timeout=proxy.pool_idle_timeout,
            pool_max_idle=proxy.pool_max_idle,
            pool_lifetime=proxy.pool_lifetime,
            config_file=self.file_path,
            flags=tuple(flags),
            warnings=tuple(self.warnings),
            sources=tuple(self.sources.items()),
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
        """The identity (None if unusable), and the source of the default role.

        The default role is the client id for ``oauth-m2m`` (and for ``pat`` when
        DATABRICKS_CLIENT_ID is set too); for the other methods it is None: the
        signed-in identity is asked for (SCIM ``Me``).
        """
        where = "[databricks]"

        def src(key: str, env: str, *, secret: bool = False) -> Raw | None:
            return self.pick(self.envvar(env, secret=secret), self.fileval(table, where, key))

        vals: dict[str, Raw | None] = {
            "host": src("host", "DATABRICKS_HOST"),
            "client_id": src("client_id", "DATABRICKS_CLIENT_ID"),
            "client_secret": src("client_secret", "DATABRICKS_CLIENT_SECRET", secret=True),
            "token": src("token", "DATABRICKS_TOKEN", secret=True),
            "auth_type": src("auth_type", "DATABRICKS_AUTH_TYPE"),
            "cli_path": src("cli_path", "DATABRICKS_CLI_PATH"),
            "oidc_token": self.envvar("DATABRICKS_OIDC_TOKEN", secret=True),
            "oidc_token_file": src("oidc_token_file", "DATABRICKS_OIDC_TOKEN_FILE"),
            "azure_client_id": src("azure_client_id", "ARM_CLIENT_ID"),
            "azure_client_secret": src("azure_client_secret", "ARM_CLIENT_SECRET", secret=True),
            "azure_tenant_id": src("azure_tenant_id", "ARM_TENANT_ID"),
        }
        before = len(self.problems)
        profile_name, profile = self.profile_values(table, vals)
        # A profile that could not be read explains any missing host or credentials:
        # say only that (one line), not "required" for each value it would have held.
        self.profile_failed = len(self.problems) > before
        for key, raw in profile.items():
            if vals.get(key) is None:
                vals[key] = raw

        for key, var in (("host", "DATABRICKS_HOST"), ("client_id", "DATABRICKS_CLIENT_ID"),
                         ("client_secret", "DATABRICKS_CLIENT_SECRET"),
                         ("token", "DATABRICKS_TOKEN")):
            self.note(var, vals[key])
        host = self.parse_opt(vals["host"], as_databricks_host)
        if vals["host"] is None:
            self.missing_auth(
                "DATABRICKS_HOST: required (the workspace URL, https://...; set it in the "
                "environment, in [databricks] host, or in a ~/.databrickscfg profile)"
            )
        text = {
            key: self.parse_opt(vals[key], as_secret if key in _SECRET_KEYS else as_text)
            for key in ("client_id", "client_secret", "token", "oidc_token",
                        "azure_client_id", "azure_client_secret", "azure_tenant_id")
        }
        oidc_file = self.parse_opt(vals["oidc_token_file"], self.path)
        chosen = self.parse_opt(vals["auth_type"], as_auth_type)
        cli_given = self.parse_opt(vals["cli_path"], self.path_or_name)
        cli_path = self.which(cli_given or "databricks")
        az_path = self.which("az")
        method = self.auth_type(vals, chosen, cli_path is not None or cli_given is not None,
                                az_path is not None)
        authority = self.parse(self.envvar("AZURE_AUTHORITY_HOST"), as_identity_url,
                               DEFAULT_AZURE_AUTHORITY)
        identity_endpoint = self.parse_opt(self.envvar("IDENTITY_ENDPOINT"), as_identity_url)
        identity_header = self.parse_opt(self.envvar("IDENTITY_HEADER", secret=True), as_secret)
        imds = self.parse(self.envvar("AZURE_POD_IDENTITY_AUTHORITY_HOST"), as_identity_url,
                          DEFAULT_IMDS_HOST)

        default_user: Raw | None = None
        if method == "oauth-m2m" or (method == "pat" and text["client_id"] is not None):
            default_user = vals["client_id"]
        if host is None or method is None:
            return None, default_user
        return DatabricksConfig(
            host, text["client_id"], text["client_secret"], text["token"],
            auth_type=method, profile=profile_name,
            cli_path=cli_path or cli_given or "databricks", az_path=az_path or "az",
            oidc_token=text["oidc_token"], oidc_token_file=oidc_file,
            azure_client_id=text["azure_client_id"],
            azure_client_secret=text["azure_client_secret"],
            azure_tenant_id=text["azure_tenant_id"], azure_authority=authority,
            identity_endpoint=identity_endpoint, identity_header=identity_header,
            imds_host=imds,
        ), default_user

    def auth_type(
        self, vals: Mapping[str, Raw | None], chosen: AuthType | None, have_cli: bool,
        have_az: bool,
    ) -> AuthType | None:
        """The sign-in method: ``chosen`` (DATABRICKS_AUTH_TYPE), else the one configured.

        Order when unset (SPEC "Workspace sign-in"): pat, oauth-m2m, env-oidc,
        file-oidc, azure-client-secret, then databricks-cli when only a host or a CLI
        profile is configured (and the CLI is installed), then azure-cli; azure-msi
        only when asked for. Two configured at once is a problem.
        """
        id_raw, secret_raw, token_raw = vals["client_id"], vals["client_secret"], vals["token"]
        az = [vals[k] for k in ("azure_client_id", "azure_client_secret", "azure_tenant_id")]
        configured: list[tuple[AuthType, Raw]] = []
        if token_raw is not None:
            configured.append(("pat", token_raw))
        if secret_raw is not None:
            configured.append(("oauth-m2m", secret_raw))
        oidc: tuple[tuple[AuthType, str], ...] = (
            ("env-oidc", "oidc_token"), ("file-oidc", "oidc_token_file"))
        for kind, key in oidc:
            raw = vals[key]
            if raw is not None:
                configured.append((kind, raw))
        if az[1] is not None:
            configured.append(("azure-client-secret", az[1]))

        auth_raw = vals["auth_type"]
        hint = "set DATABRICKS_AUTH_TYPE to the one to use"
        if chosen is None and auth_raw is not None:
            return None  # a bad DATABRICKS_AUTH_TYPE was reported already
        if chosen is None and len(configured) > 1:
            (m1, r1), (m2, r2) = configured[:2]
            if {m1, m2} == {"pat", "oauth-m2m"}:
                self.problems.append(
                    f"{r1.origin} and {r2.origin}: both a token and a client secret are set; "
                    "use one auth method"
                )
            else:
                self.problems.append(
                    f"{r1.origin} and {r2.origin}: two sign-in methods are configured "
                    f"({m1} and {m2}); {hint}"
                )
            return None
        method: AuthType | None = chosen
        if method is None and configured:
            method = configured[0][0]
        if method is None:
            if id_raw is not None:
                self.missing_auth(
                    f"{id_raw.origin}: needs DATABRICKS_CLIENT_SECRET as well (OAuth M2M), "
                    "or set DATABRICKS_TOKEN"
                )
                return None
            if any(r is not None for r in az):
                method = "azure-client-secret"  # reported as incomplete below
            elif have_cli and vals["host"] is not None:
                return "databricks-cli"
            elif have_az and vals["host"] is not None:
                return "azure-cli"
            else:
                self.missing_auth(
                    "DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET, or DATABRICKS_TOKEN: one "
                    "auth method is required (in the environment, [databricks], or a "
                    "~/.databrickscfg profile), or sign in with the Databricks CLI "
                    "(databricks auth login) and set DATABRICKS_AUTH_TYPE=databricks-cli"
                )
                return None
        origin = auth_raw.origin if auth_raw is not None else "sign-in"
        need: list[str] = []
        if method == "pat" and token_raw is None:
            need = ["DATABRICKS_TOKEN"]
        elif method == "oauth-m2m":
            if secret_raw is not None and id_raw is None:
                self.problems.append(
                    f"{secret_raw.origin}: needs DATABRICKS_CLIENT_ID (the service principal's "
                    "client id) as well"
                )
                return None
            need = [n for n, r in (("DATABRICKS_CLIENT_ID", id_raw),
                                   ("DATABRICKS_CLIENT_SECRET", secret_raw)) if r is None]
        elif method == "env-oidc" and vals["oidc_token"] is None:
            need = ["DATABRICKS_OIDC_TOKEN"]
        elif method == "file-oidc" and vals["oidc_token_file"] is None:
            need = ["DATABRICKS_OIDC_TOKEN_FILE"]
        elif method == "azure-client-secret":
            need = [n for n, r in zip(("ARM_CLIENT_ID", "ARM_CLIENT_SECRET", "ARM_TENANT_ID"),
                                      az, strict=True) if r is None]
        if need:
            self.problems.append(
                f"{origin}: {method} needs {' and '.join(need)} (in the environment, "
                "[databricks], or a ~/.databrickscfg profile)"
            )
            return None
        return method

    def path_or_name(self, raw: Raw) -> str:
        """A command: a bare name (looked up on PATH) or a path."""
        text = as_text(raw)
        return text if "/" not in text and not text.startswith("~") else self.path(raw)

    def which(self, command: str) -> str | None:
        """``command``'s absolute path on the given environment's PATH, or None."""
        if "/" in command:
            return command if os.access(command, os.X_OK) and Path(command).is_file() else None
        search = self.env.get("PATH")
        if not search:
            return None
        return shutil.which(command, path=search)

    def profile_values(
        self, table: Mapping[str, object], vals: Mapping[str, Raw | None]
    ) -> tuple[str | None, dict[str, Raw]]:
        """The profile named explicitly (for ``databricks auth token --profile``), and
        the values from the ~/.databrickscfg profile, as the Databricks SDKs read it."""
        values = self._profile_values(table, vals)
        named = self.pick(
            self.envvar("DATABRICKS_CONFIG_PROFILE"), self.fileval(table, "[databricks]", "profile")
        )
        name = named.value if named is not None and isinstance(named.value, str) else None
        renamed = {_PROFILE_RENAME.get(key, key): raw for key, raw in values.items()}
        return (name.strip() or None) if name else None, renamed

    def _profile_values(
        self, table: Mapping[str, object], vals: Mapping[str, Raw | None]
    ) -> dict[str, Raw]:
        where = "[databricks]"
        profile_raw = self.pick(
            self.envvar("DATABRICKS_CONFIG_PROFILE"), self.fileval(table, where, "profile")
        )
        file_raw = self.pick(
            self.envvar("DATABRICKS_CONFIG_FILE"), self.fileval(table, where, "config_file")
        )
        explicit = profile_raw is not None
        direct_auth = any(vals[k] is not None for k in _DIRECT_AUTH_KEYS)
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
                source=f"{key} in profile [{name}] of {path}",
            )
            for key, value in values.items()
        }

    # -- [proxy] ---------------------------------------------------------

    def proxy(self, table: Mapping[str, object]) -> _Proxy:
        where = "[proxy]"

        def src(key: str, env: str, *, flag: bool = False, secret: bool = False) -> Raw | None:
            return self.note(env, self.pick(
                self.flag(key) if flag else None,
                self.envvar(env, secret=secret),
                self.fileval(table, where, key),
            ))

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
        pool_idle = self.parse(
            src("pool_idle_timeout", "LAKEPROXY_POOL_IDLE_TIMEOUT"),
            as_duration(positive=True), DEFAULT_POOL_IDLE_TIMEOUT,
        )
        pool_max_idle = self.parse(
            src("pool_max_idle", "LAKEPROXY_POOL_MAX_IDLE"), as_positive_int, DEFAULT_POOL_MAX_IDLE
        )
        pool_lifetime = self.parse(
            src("pool_lifetime", "LAKEPROXY_POOL_LIFETIME"),
            as_duration(positive=True), DEFAULT_POOL_LIFETIME,
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
            pool_idle_timeout=pool_idle,
            pool_max_idle=pool_max_idle,
            pool_lifetime=pool_lifetime,
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
        # pool_mode: the environment, else the endpoint's table, else [proxy] (each
        # parsed once, so a bad value is one problem however many endpoints).
        pool_env = self.envvar("LAKEPROXY_POOL_MODE")
        pool_default: PoolMode = self.parse(
            self.pick(pool_env, self.fileval(proxy_table, "[proxy]", "pool_mode")),
            as_pool_mode, "off",
        )
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
            pool_mode = pool_default
            if pool_env is None:
                pool_mode = self.parse(
                    self.fileval(table, where, "pool_mode"), as_pool_mode, pool_default
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
        default_user: Raw | None,
    ) -> EndpointConfig | None:
        """One endpoint from its file table (maybe empty) and, if ``use_env``, PG* vars."""
        def env(name: str) -> Raw | None:
            return self.envvar(name) if use_env else None

        def src(key: str) -> Raw | None:
            own, libpq = ENDPOINT_ENV[key]
            raw = self.pick(env(own), self.fileval(table, where, key), env(libpq))
            if raw is not None:
                sources[own] = raw.source
            return raw

        sources: dict[str, str] = {}
        # Identity: the environment's pair replaces the file's as a whole.
        name_raw, inst_raw = env("ENDPOINT_NAME"), env("LAKEBASE_INSTANCE")
        if name_raw is None and inst_raw is None:
            name_raw = self.fileval(table, where, "name")
            inst_raw = self.fileval(table, where, "instance")
        for var, raw in (("ENDPOINT_NAME", name_raw), ("LAKEBASE_INSTANCE", inst_raw)):
            if raw is not None:
                sources[var] = raw.source
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

        host = self.parse_opt(src("host"), as_pg_host)
        kind_raw = self.pick(env("LAKEBASE_HOST_KIND"), self.fileval(table, where, "host_kind"))
        host_kind = self.parse_opt(kind_raw, as_host_kind)
        if kind_raw is not None and host_kind is not None and inst_raw is not None and (
                host_kind not in PROVISIONED_KINDS):
            self.bad(kind_raw, "a provisioned instance has no pooled hosts (Lakebase pools "
                     "only autoscaling endpoints); use read_write or read_only")
        hostaddr = self.parse_opt(src("hostaddr"), as_ip_address)
        port = self.parse(src("port"), as_pg_port, DEFAULT_PGPORT)
        database = self.parse(src("database"), as_text, DEFAULT_DATABASE)
        user_raw = self.pick(src("user"), default_user)
        if user_raw is not None:
            sources["LAKEBASE_USER"] = user_raw.source
        user = self.parse_opt(user_raw, as_text)
        # No role configured: the signed-in identity's (SCIM Me), asked at run time.
        sslmode = self.parse(self.sslmode_raw(table, where, use_env, sources), as_sslmode,
                             DEFAULT_SSLMODE)
        rootcert = self.parse(src("sslrootcert"), self.sslrootcert, "system")
        if user_raw is not None and user is None:
            return None
        return EndpointConfig(
            name=name, instance=instance, host=host, host_kind=host_kind, hostaddr=hostaddr,
            port=port,
            database=database, user=user, sslmode=sslmode, sslrootcert=rootcert, listen=listen,
            sources=tuple(sources.items()),
        )

    def sslmode_raw(
        self, table: Mapping[str, object], where: str, use_env: bool, sources: dict[str, str]
    ) -> Raw | None:
        """The sslmode's source. A PGSSLMODE that only a client can use (``disable``,
        ``allow``, ``prefer``: psql's settings in the same shell) is ignored with one
        warning; the same value as LAKEBASE_SSLMODE or in the file is an error."""
        own = self.envvar("LAKEBASE_SSLMODE") if use_env else None
        raw = self.pick(own, self.fileval(table, where, "sslmode"))
        if raw is None and use_env:
            fallback = self.envvar("PGSSLMODE")
            value = fallback.value if fallback is not None else None
            if isinstance(value, str) and value.strip().lower() in _CLIENT_ONLY_SSLMODES:
                self.warnings.append(
                    f"{fallback.origin if fallback else 'PGSSLMODE'}: ignored, "
                    f"{value.strip().lower()} is a client setting (lakeproxy always uses TLS "
                    f"to the endpoint); using sslmode={DEFAULT_SSLMODE}. Set LAKEBASE_SSLMODE "
                    "to choose require, verify-ca or verify-full"
                )
            else:
                raw = fallback
        if raw is not None:
            sources["LAKEBASE_SSLMODE"] = raw.source
        return raw


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
    pool_idle_timeout: float = DEFAULT_POOL_IDLE_TIMEOUT
    pool_max_idle: int = DEFAULT_POOL_MAX_IDLE
    pool_lifetime: float = DEFAULT_POOL_LIFETIME

    @property
    def trusted(self) -> bool:
        """A client password is set, or remote trust was allowed."""
        return self.client_password is not None or self.allow_remote_trust


# --------------------------------------------------------------------------
