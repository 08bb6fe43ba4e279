"""lakeproxy's configuration, loaded once at start-up and again on SIGHUP.

- :mod:`~lakeproxy.config.model`: the frozen dataclasses (:class:`Config`,
  :class:`EndpointConfig`, ...) and their defaults;
- :mod:`~lakeproxy.config.load`: :func:`load_config`, the precedence of flags,
  environment, TOML file and defaults, and the problems it reports;
- :mod:`~lakeproxy.config.values`: one parser per kind of value;
- :mod:`~lakeproxy.config.profiles`: ``~/.databrickscfg`` profiles.

``config.example.toml`` documents every key. Everything a caller needs is
importable from this package.
"""

from lakeproxy.config.load import ENV_VARS, FILE_KEYS, FLAG_KEYS, load_config, reload_config
from lakeproxy.config.model import (
    AUTH_TYPES,
    DEFAULT_CONNECT_DEADLINE,
    DEFAULT_DATABASE,
    DEFAULT_LISTEN,
    DEFAULT_LOGIN_TIMEOUT,
    DEFAULT_MAX_CLIENTS,
    DEFAULT_PGPORT,
    DEFAULT_SHUTDOWN_GRACE,
    DEFAULT_SSLMODE,
    DEFAULT_SSLROOTCERT,
    DEFAULT_UNIX_PORT,
    HOST_KINDS,
    PROVISIONED_KINDS,
    AuthType,
    ClientTls,
    Config,
    DatabricksConfig,
    EndpointConfig,
    HostKind,
    Listener,
    LogFormat,
    LogLevel,
    PoolMode,
    SslMode,
    is_loopback_host,
    name_sources,
)
from lakeproxy.config.values import (
    parse_duration,
    parse_host_port,
    parse_listener,
    parse_listeners,
)

__all__ = [
    "AUTH_TYPES",
    "DEFAULT_CONNECT_DEADLINE",
    "DEFAULT_DATABASE",
    "DEFAULT_LISTEN",
    "DEFAULT_LOGIN_TIMEOUT",
    "DEFAULT_MAX_CLIENTS",
    "DEFAULT_PGPORT",
    "DEFAULT_SHUTDOWN_GRACE",
    "DEFAULT_SSLMODE",
    "DEFAULT_SSLROOTCERT",
    "DEFAULT_UNIX_PORT",
    "ENV_VARS",
    "FILE_KEYS",
    "FLAG_KEYS",
    "HOST_KINDS",
    "PROVISIONED_KINDS",
    "AuthType",
    "ClientTls",
    "Config",
    "DatabricksConfig",
    "EndpointConfig",
    "HostKind",
    "Listener",
    "LogFormat",
    "LogLevel",
    "PoolMode",
    "SslMode",
    "is_loopback_host",
    "load_config",
    "name_sources",
    "parse_duration",
    "parse_host_port",
    "parse_listener",
    "parse_listeners",
    "reload_config",
]
