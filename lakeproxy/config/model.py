"""The configuration's shape: frozen dataclasses, their defaults and literal types.

Nothing here reads a file or the environment; :mod:`lakeproxy.config.load`
builds these from the sources.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

SslMode = Literal["require", "verify-ca", "verify-full"]
ClientTls = Literal["off", "allow", "require"]
LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]
PoolMode = Literal["off", "session"]
#: Which of the endpoint's hosts to use (SPEC "Endpoint hosts").
HostKind = Literal["read_write", "read_only", "pooled", "read_only_pooled"]
HOST_KINDS: Final[tuple[HostKind, ...]] = ("read_write", "read_only", "pooled", "read_only_pooled")
#: The kinds a provisioned instance has (``read_write_dns``, ``read_only_dns``; no pooler).
PROVISIONED_KINDS: Final[tuple[HostKind, ...]] = ("read_write", "read_only")

DEFAULT_LISTEN: Final = "127.0.0.1:6432"
DEFAULT_PGPORT: Final = 5432
DEFAULT_DATABASE: Final = "databricks_postgres"
DEFAULT_SSLMODE: Final[SslMode] = "verify-full"
DEFAULT_SSLROOTCERT: Final = "system"
DEFAULT_CONNECT_DEADLINE: Final = 60.0
DEFAULT_MAX_CLIENTS: Final = 1000
DEFAULT_SHUTDOWN_GRACE: Final = 30.0
DEFAULT_LOGIN_TIMEOUT: Final = 15.0
DEFAULT_UNIX_PORT: Final = 6432
# Session reuse (SPEC "Session reuse").
DEFAULT_POOL_IDLE_TIMEOUT: Final = 60.0
DEFAULT_POOL_MAX_IDLE: Final = 10
DEFAULT_POOL_LIFETIME: Final = 3600.0


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
    Databricks API, picking the host of ``host_kind`` (None: not configured,
    which means ``read_write``; with ``host`` set it is ignored). ``hostaddr``
    is dialled instead of resolving ``host``. ``user`` None means: log in as
    the signed-in identity.
    """

    name: str | None = None
    instance: str | None = None
    host: str | None = None
    host_kind: HostKind | None = None
    hostaddr: str | None = None
    port: int = DEFAULT_PGPORT
    database: str = DEFAULT_DATABASE
    #: the Postgres role; None: the signed-in identity (SCIM ``Me``), asked once
    user: str | None = None
    sslmode: SslMode = DEFAULT_SSLMODE
    sslrootcert: str = DEFAULT_SSLROOTCERT
    listen: tuple[Listener, ...] = (Listener("tcp", "127.0.0.1", 6432),)
    #: Session reuse for this endpoint's clients (SPEC "Session reuse").
    pool_mode: PoolMode = "off"
    #: ``(variable, source)`` for the values that were set: where a hint naming the
    #: variable should point instead (see :func:`name_sources`).
    sources: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)

    @property
    def kind(self) -> HostKind:
        """The host kind in effect for a looked-up host (default ``read_write``)."""
        return self.host_kind or "read_write"

    @property
    def label(self) -> str:
        """The endpoint name or the instance name, for logs."""
        return self.name or self.instance or "?"


#: The workspace sign-in methods, named as the Databricks CLI and SDKs name them
#: (``DATABRICKS_AUTH_TYPE``); see SPEC.md "Workspace sign-in".
AuthType = Literal[
    "pat", "oauth-m2m", "env-oidc", "file-oidc", "azure-client-secret", "databricks-cli",
    "azure-cli", "azure-msi",
]
AUTH_TYPES: Final[tuple[AuthType, ...]] = (
    "pat", "oauth-m2m", "env-oidc", "file-oidc", "azure-client-secret", "databricks-cli",
    "azure-cli", "azure-msi",
)
DEFAULT_AZURE_AUTHORITY: Final = "https://login.microsoftonline.com"
#: The instance metadata service; ``AZURE_POD_IDENTITY_AUTHORITY_HOST`` replaces
#: its scheme and host, as the Azure SDKs do.
DEFAULT_IMDS_HOST: Final = "http://169.254.169.254"


@dataclass(frozen=True, slots=True)
class DatabricksConfig:
    """The workspace identity shared by every endpoint.

    ``auth_type`` is the sign-in method in use (chosen by ``DATABRICKS_AUTH_TYPE``
    or by what is configured); the other fields are what that method needs.
    With ``pat``, ``client_id`` (if set) only provides the default role.
    """

    host: str
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    auth_type: AuthType = "oauth-m2m"
    #: the ~/.databrickscfg profile the values came from (``databricks auth token --profile``)
    profile: str | None = None
    #: the Databricks CLI: an absolute path when found on PATH, else the name as given
    cli_path: str = "databricks"
    #: the Azure CLI, resolved the same way
    az_path: str = "az"
    oidc_token: str | None = field(default=None, repr=False)
    oidc_token_file: str | None = None
    azure_client_id: str | None = None
    azure_client_secret: str | None = field(default=None, repr=False)
    azure_tenant_id: str | None = None
    azure_authority: str = DEFAULT_AZURE_AUTHORITY
    #: App Service style managed identity endpoint (``IDENTITY_ENDPOINT``/``IDENTITY_HEADER``)
    identity_endpoint: str | None = None
    identity_header: str | None = field(default=None, repr=False)
    imds_host: str = DEFAULT_IMDS_HOST

    @property
    def auth_method(self) -> AuthType:
        """The sign-in method (same as ``auth_type``)."""
        return self.auth_type


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
    #: Seconds a client has for its whole pre-login phase (SSL/GSS negotiation,
    #: startup, password); also the size of the pre-login budget's window.
    login_timeout: float = DEFAULT_LOGIN_TIMEOUT
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
    #: One line each, logged at start-up (e.g. a client-only PGSSLMODE that was ignored).
    warnings: tuple[str, ...] = field(default=(), compare=False)
    #: ``(variable, source)`` for the workspace and proxy settings, as
    #: :attr:`EndpointConfig.sources`.
    sources: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)

    def secrets(self) -> tuple[str, ...]:
        """Every secret value this configuration holds (for log redaction)."""
        dbx = self.databricks
        values = (dbx.client_secret, dbx.token, self.client_password, dbx.oidc_token,
                  dbx.azure_client_secret, dbx.identity_header)
        return tuple(v for v in values if v)


def name_sources(hint: str | None, *sources: tuple[tuple[str, str], ...]) -> str | None:
    """``hint`` with each variable it names replaced by where that value came from.

    Hints are written with the variable names ("raise LAKEPROXY_MAX_CLIENTS"); a
    value set as ``[proxy] max_clients`` in a file or in a ``~/.databrickscfg``
    profile is named as such ("raise max_clients in [proxy] of /etc/lp.toml").
    """
    if not hint:
        return hint
    for pairs in sources:
        for var, source in pairs:
            if source and source != var:
                hint = re.sub(rf"(?<![A-Z_]){re.escape(var)}(?![A-Z_])", source, hint)
    return hint


# --------------------------------------------------------------------------


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
