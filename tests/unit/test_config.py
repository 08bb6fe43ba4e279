"""load_config: precedence, validation, databrickscfg profiles, listeners, secrets."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from lakeproxy.config import (
    ENV_VARS,
    FILE_KEYS,
    Config,
    DatabricksConfig,
    EndpointConfig,
    Listener,
    load_config,
    name_sources,
    parse_duration,
    parse_listener,
    parse_listeners,
    reload_config,
)
from lakeproxy.config.load import ENDPOINT_ENV
from lakeproxy.errors import ConfigError

DATA = Path(__file__).resolve().parent.parent / "data" / "config"
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config.example.toml"

SECRET = "s3cr3t-client-secret"
TOKEN = "dapi-t0ken-value"
PASSWORD = "cl13nt-password"

#: Enough for a valid config with no file.
ENV: Mapping[str, str] = {
    "DATABRICKS_HOST": "https://env.cloud.databricks.com",
    "DATABRICKS_CLIENT_ID": "env-client",
    "DATABRICKS_CLIENT_SECRET": SECRET,
    "ENDPOINT_NAME": "projects/p/branches/b/endpoints/env",
}


def load(
    env: Mapping[str, str] | None = None,
    file: str | Path | None = None,
    **flags: str | bool | None,
) -> Config:
    """load_config with ENV (plus ``env``), an optional data file and flags."""
    full = dict(ENV if env is None else env)
    full.setdefault("HOME", str(DATA / "no-home"))  # never the real ~/.databrickscfg
    path = None if file is None else (file if isinstance(file, Path) else DATA / file)
    return load_config(env=full, argv=flags, config_file=path)


def problems(
    env: Mapping[str, str] | None = None, file: str | Path | None = None,
    **flags: str | bool | None,
) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(env, file, **flags)
    return info.value.problems


# --------------------------------------------------------------------------
# Defaults


def test_defaults_from_env_only() -> None:
    config = load()
    assert config == Config(
        databricks=DatabricksConfig(
            "https://env.cloud.databricks.com", "env-client", SECRET, None
        ),
        endpoints=(
            EndpointConfig(
                name="projects/p/branches/b/endpoints/env",
                user="env-client",
                listen=(Listener("tcp", "127.0.0.1", 6432),),
            ),
        ),
    )
    ep = config.endpoints[0]
    assert (ep.host, ep.hostaddr, ep.port, ep.database) == (None, None, 5432, "databricks_postgres")
    assert (ep.sslmode, ep.sslrootcert) == ("verify-full", "system")
    assert config.admin_listen is None
    assert config.client_password is None
    assert config.client_tls == "off"
    assert (config.connect_deadline, config.max_clients, config.shutdown_grace) == (60, 1000, 30)
    assert (config.log_format, config.log_level) == ("text", "info")
    assert config.allow_remote_trust is False
    assert config.config_file is None
    assert config.databricks.auth_method == "oauth-m2m"


def test_databricks_docs_env_works_as_is() -> None:
    """The variables Databricks' own guide tells users to export."""
    config = load({
        "DATABRICKS_HOST": "https://your-workspace.databricks.com",
        "DATABRICKS_CLIENT_ID": "c00f575e-d706-4f6b-b62c-e7a14850571b",
        "DATABRICKS_CLIENT_SECRET": SECRET,
        "ENDPOINT_NAME": "projects/proj-1/branches/br-1/endpoints/ep-1",
        "PGHOST": "ep-1.database.us-east-1.databricks.com",
        "PGDATABASE": "databricks_postgres",
        "PGUSER": "c00f575e-d706-4f6b-b62c-e7a14850571b",
        "PGPORT": "5432",
    })
    ep = config.endpoints[0]
    assert ep.host == "ep-1.database.us-east-1.databricks.com"
    assert ep.user == "c00f575e-d706-4f6b-b62c-e7a14850571b"
    assert ep.port == 5432


# --------------------------------------------------------------------------
# Precedence: flags > env > file > defaults, table-driven


@dataclass(frozen=True)
class Setting:
    get: Callable[[Config], object]
    env_var: str
    env_value: str
    env_expected: object
    file_expected: object  # as in precedence.toml
    default: object  # with minimal.toml
    flag: str | None = None
    flag_value: str | bool | None = None
    flag_expected: object = None


def ep0(config: Config) -> EndpointConfig:
    return config.endpoints[0]


SETTINGS: dict[str, Setting] = {
    "listen": Setting(
        lambda c: ep0(c).listen, "LAKEPROXY_LISTEN", "127.0.0.4:7003",
        (Listener("tcp", "127.0.0.4", 7003),), (Listener("tcp", "127.0.0.2", 7000),),
        (Listener("tcp", "127.0.0.1", 6432),),
        "listen", "127.0.0.3:7002", (Listener("tcp", "127.0.0.3", 7002),),
    ),
    "admin_listen": Setting(
        lambda c: c.admin_listen, "LAKEPROXY_ADMIN_LISTEN", "127.0.0.1:9002",
        ("127.0.0.1", 9002), ("127.0.0.1", 9001), None,
        "admin_listen", "[::1]:9003", ("::1", 9003),
    ),
    "log_level": Setting(
        lambda c: c.log_level, "LAKEPROXY_LOG_LEVEL", "DEBUG", "debug", "warning", "info",
        "log_level", "error", "error",
    ),
    "log_format": Setting(
        lambda c: c.log_format, "LAKEPROXY_LOG_FORMAT", "text", "text", "json", "text",
        "log_format", "json", "json",
    ),
    "allow_remote_trust": Setting(
        lambda c: c.allow_remote_trust, "LAKEPROXY_ALLOW_REMOTE_TRUST", "false", False, True,
        False, "allow_remote_trust", True, True,
    ),
    "connect_deadline": Setting(
        lambda c: c.connect_deadline, "LAKEPROXY_CONNECT_DEADLINE", "200ms", 0.2, 90.0, 60.0,
    ),
    "login_timeout": Setting(
        lambda c: c.login_timeout, "LAKEPROXY_LOGIN_TIMEOUT", "3s", 3.0, 20.0, 15.0,
    ),
    "max_clients": Setting(lambda c: c.max_clients, "LAKEPROXY_MAX_CLIENTS", "7", 7, 50, 1000),
    "shutdown_grace": Setting(
        lambda c: c.shutdown_grace, "LAKEPROXY_SHUTDOWN_GRACE", "2m", 120.0, 5.0, 30.0,
    ),
    "client_password": Setting(
        lambda c: c.client_password, "LAKEPROXY_CLIENT_PASSWORD", PASSWORD, PASSWORD,
        "file-password-123", None,
    ),
    "host": Setting(
        lambda c: ep0(c).host, "LAKEBASE_HOST", "env-host.example.com", "env-host.example.com",
        "file-host.example.com", None,
    ),
    "hostaddr": Setting(
        lambda c: ep0(c).hostaddr, "LAKEBASE_HOSTADDR", "::1", "::1", "10.0.0.1", None,
    ),
    "port": Setting(lambda c: ep0(c).port, "LAKEBASE_PORT", "6001", 6001, 6000, 5432),
    "database": Setting(
        lambda c: ep0(c).database, "LAKEBASE_DATABASE", "envdb", "envdb", "filedb",
        "databricks_postgres",
    ),
    "user": Setting(lambda c: ep0(c).user, "LAKEBASE_USER", "env-user", "env-user", "file-user",
                    "min-client"),
    "sslmode": Setting(
        lambda c: ep0(c).sslmode, "LAKEBASE_SSLMODE", "require", "require", "verify-ca",
        "verify-full",
    ),
    "sslrootcert": Setting(
        lambda c: ep0(c).sslrootcert, "LAKEBASE_SSLROOTCERT", "system", "system",
        str(DATA / "ca.pem"), "system",
    ),
}

LAYERS = ["default", "file", "env", "env-without-file", "flag", "flag-over-all"]


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        (name, layer)
        for name, s in SETTINGS.items()
        for layer in LAYERS
        if s.flag is not None or not layer.startswith("flag")
    ],
)
def test_precedence(name: str, layer: str) -> None:
    s = SETTINGS[name]
    env = {"DATABRICKS_CLIENT_SECRET": SECRET}
    file = "precedence.toml"
    flags: dict[str, str | bool | None] = {}
    expected = s.file_expected
    if layer == "default":
        file, expected = "minimal.toml", s.default
    if layer in ("env", "env-without-file", "flag-over-all"):
        env[s.env_var] = s.env_value
        expected = s.env_expected
    if layer == "env-without-file":
        env.update(ENV)
        file = "minimal.toml"
    if layer in ("flag", "flag-over-all"):
        assert s.flag is not None
        flags[s.flag] = s.flag_value
        expected = s.flag_expected
    assert s.get(load(env, file, **flags)) == expected


def test_file_values_all_apply() -> None:
    config = load({"DATABRICKS_CLIENT_SECRET": SECRET}, "precedence.toml")
    assert config.databricks.host == "https://file.cloud.databricks.com"
    assert config.databricks.client_id == "file-client"
    assert ep0(config).name == "projects/file/branches/b/endpoints/e"
    assert config.config_file == DATA / "precedence.toml"


def test_env_beats_file_for_the_identity() -> None:
    env = {
        "DATABRICKS_CLIENT_SECRET": SECRET,
        "DATABRICKS_HOST": "https://env.cloud.databricks.com/",
        "DATABRICKS_CLIENT_ID": "env-client",
        "LAKEBASE_INSTANCE": "env-instance",
    }
    config = load(env, "precedence.toml")
    assert config.databricks.host == "https://env.cloud.databricks.com"
    assert config.databricks.client_id == "env-client"
    # The environment's endpoint identity replaces the file's as a whole.
    assert (ep0(config).name, ep0(config).instance) == (None, "env-instance")
    assert ep0(config).user == "file-user"  # the file's other fields stay


def test_lakeproxy_config_env_names_the_file_and_flag_beats_it() -> None:
    env = {"DATABRICKS_CLIENT_SECRET": SECRET, "LAKEPROXY_CONFIG": str(DATA / "precedence.toml")}
    assert load(env).max_clients == 50
    assert load(env, "minimal.toml").max_clients == 1000


def test_reload_config_keeps_flags_and_file() -> None:
    env = {"DATABRICKS_CLIENT_SECRET": SECRET}
    first = load(env, "precedence.toml", log_level="debug", listen="127.0.0.9:1234")
    again = reload_config(first, env={**env, "HOME": "/nonexistent", "LAKEPROXY_MAX_CLIENTS": "3"})
    assert again.log_level == "debug"
    assert ep0(again).listen == (Listener("tcp", "127.0.0.9", 1234),)
    assert again.config_file == DATA / "precedence.toml"
    assert again.max_clients == 3


def test_empty_env_var_counts_as_unset() -> None:
    assert load({**ENV, "PGPORT": "", "LAKEPROXY_LISTEN": ""}).endpoints[0].port == 5432


def test_unknown_flag_key_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown flag keys: listn"):
        load_config(env=ENV, argv={"listn": "x"})


# --------------------------------------------------------------------------
# Invalid values: one problem each, naming the key, the source, and never a secret

INVALID_ENV = [
    ("LAKEBASE_SSLMODE", "disable", "must be one of require, verify-ca, verify-full"),
    ("LAKEBASE_SSLMODE", "allow", "must be one of require, verify-ca, verify-full"),
    ("LAKEBASE_SSLMODE", "prefer", "must be one of require, verify-ca, verify-full"),
    ("LAKEBASE_PORT", "x", "must be a port number from 1 to 65535"),
    ("LAKEBASE_HOST", "/tmp", "must be one host name"),
    ("PGSSLMODE", "verify", "must be one of require, verify-ca, verify-full"),
    ("PGPORT", "0", "must be a port number from 1 to 65535"),
    ("PGPORT", "65536", "must be a port number from 1 to 65535"),
    ("PGPORT", "fivefour", "must be a port number from 1 to 65535"),
    ("PGHOST", "/var/run/postgresql", "must be one host name"),
    ("PGHOST", "a.example.com,b.example.com", "must be one host name"),
    ("PGHOST", "bad_host!", "must be a host name or IP address"),
    ("PGHOSTADDR", "example.com", "must be an IP address"),
    ("PGSSLROOTCERT", "/nonexistent/ca.pem", "file /nonexistent/ca.pem does not exist"),
    ("PGSSLROOTCERT", "/", "/ is not a file"),
    ("DATABRICKS_HOST", "http://example.com", "must use https://"),
    ("DATABRICKS_HOST", "http://10.0.0.1:8080", "must use https://"),
    ("DATABRICKS_HOST", "example.cloud.databricks.com", "must start with https://"),
    ("DATABRICKS_HOST", "ftp://example.com", "must start with https://"),
    ("DATABRICKS_HOST", "https://user:pw@example.com", "must not contain a user name"),
    ("DATABRICKS_HOST", "https://example.com:99999", "must be a URL"),
    ("ENDPOINT_NAME", "my-endpoint", "must look like projects/<project>/branches/"),
    ("LAKEPROXY_LISTEN", "6432", "must be HOST:PORT"),
    ("LAKEPROXY_LISTEN", ":6432", "needs a host"),
    ("LAKEPROXY_LISTEN", "::1:6432", "an IPv6 address needs brackets"),
    ("LAKEPROXY_LISTEN", "[::1]", "must be [IPV6]:PORT"),
    ("LAKEPROXY_LISTEN", "[nothex]:1", "is not an IPv6 address"),
    ("LAKEPROXY_LISTEN", "127.0.0.1:70000", "port must be a number from 0 to 65535"),
    ("LAKEPROXY_LISTEN", "unix:tmp", "needs an absolute directory"),
    ("LAKEPROXY_LISTEN", ",", "needs at least one listener"),
    ("LAKEPROXY_ADMIN_LISTEN", "9090", "must be HOST:PORT"),
    ("LAKEPROXY_CLIENT_TLS", "always", "must be one of off, allow, require"),
    ("LAKEPROXY_CLIENT_TLS", "require", "needs LAKEPROXY_TLS_CERT and LAKEPROXY_TLS_KEY"),
    ("LAKEPROXY_TLS_CERT", str(DATA / "ca.pem"), "needs LAKEPROXY_TLS_KEY too"),
    ("LAKEPROXY_TLS_KEY", str(DATA / "ca.pem"), "needs LAKEPROXY_TLS_CERT too"),
    ("LAKEPROXY_CONNECT_DEADLINE", "0", "must be more than 0 seconds"),
    ("LAKEPROXY_CONNECT_DEADLINE", "soon", 'must be a duration such as "30"'),
    ("LAKEPROXY_CONNECT_DEADLINE", "-5s", 'must be a duration such as "30"'),
    ("LAKEPROXY_MAX_CLIENTS", "0", "must be a positive integer"),
    ("LAKEPROXY_MAX_CLIENTS", "lots", "must be a positive integer"),
    ("LAKEPROXY_SHUTDOWN_GRACE", "1d", 'must be a duration such as "30"'),
    ("LAKEPROXY_LOG_FORMAT", "xml", "must be one of text, json"),
    ("LAKEPROXY_LOG_LEVEL", "trace", "must be one of debug, info, warning, error"),
    ("LAKEPROXY_ALLOW_REMOTE_TRUST", "maybe", "must be true or false"),
    ("DATABRICKS_CONFIG_PROFILE", "nope", "profile [nope] not found"),
]


@pytest.mark.parametrize(("var", "value", "reason"), INVALID_ENV)
def test_invalid_env_value(var: str, value: str, reason: str) -> None:
    env = {**ENV, var: value}
    if var == "DATABRICKS_CONFIG_PROFILE":
        env["DATABRICKS_CONFIG_FILE"] = str(DATA / "databrickscfg.ini")
    found = problems(env)
    assert len(found) == 1, found
    prefix = f"{var}={value} (environment): "
    assert found[0].startswith(prefix), found
    assert reason in found[0][len(prefix):]
    assert "\n" not in found[0]


def test_invalid_file_values_all_reported_at_once() -> None:
    found = problems({"HOME": "/nonexistent"}, "bad_values.toml")
    f = DATA / "bad_values.toml"
    expected = [
        f"[databricks] host ({f}): must use https://",
        f"[databricks] client_secret ({f}): must be a string",
        f"[proxy] admin_listen ({f}): must be HOST:PORT",
        f"[proxy] connect_deadline ({f}): must be a duration",
        f"[proxy] max_clients ({f}): must be a positive integer (got 0)",
        f"[proxy] shutdown_grace ({f}): must not be negative (got -1)",
        f"[proxy] log_format ({f}): must be one of text, json (got xml)",
        f"[proxy] log_level ({f}): must be one of debug, info, warning, error",
        f"[proxy] allow_remote_trust ({f}): must be true or false",
        f"[proxy] client_tls ({f}): must be one of off, allow, require",
        f"[[endpoints]] name ({f}): must look like projects/",
        f"[[endpoints]] port ({f}): must be a port number from 1 to 65535 (got 70000)",
        f"[[endpoints]] sslmode ({f}): must be one of require, verify-ca, verify-full",
        f"[[endpoints]] sslrootcert ({f}): file {DATA / 'missing-ca.pem'} does not exist",
        f"[[endpoints]] hostaddr ({f}): must be an IP address",
        f"[proxy] listen ({f}): '0.0.0.0': must be HOST:PORT",
    ]
    for prefix in expected:
        assert any(p.startswith(prefix) for p in found), (prefix, found)
    assert len(found) == len(expected), found
    assert all("12345" not in p for p in found)  # the (bad) secret is not echoed


def test_multiple_env_problems_at_once() -> None:
    found = problems({
        **ENV, "LAKEBASE_SSLMODE": "disable", "LAKEPROXY_MAX_CLIENTS": "-3", "PGPORT": "x",
        "DATABRICKS_HOST": "http://example.com",
    })
    assert [p.split(" ")[0] for p in found] == [
        "DATABRICKS_HOST=http://example.com", "LAKEPROXY_MAX_CLIENTS=-3", "PGPORT=x",
        "LAKEBASE_SSLMODE=disable",
    ]


def test_everything_missing() -> None:
    found = problems({})
    assert len(found) == 3
    assert found[0].startswith("DATABRICKS_HOST: required")
    assert found[1].startswith(
        "DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET, or DATABRICKS_TOKEN: one auth"
    )
    assert found[2].startswith("ENDPOINT_NAME or LAKEBASE_INSTANCE: one is required")


def test_without_pguser_or_client_id_the_role_is_the_signed_in_identity() -> None:
    env = {k: v for k, v in ENV.items() if not k.startswith("DATABRICKS_CLIENT")}
    assert ep0(load({**env, "DATABRICKS_TOKEN": TOKEN})).user is None  # asked from SCIM Me
    config = load({**env, "DATABRICKS_TOKEN": TOKEN, "PGUSER": "role"})
    assert config.databricks.auth_method == "pat"
    assert config.databricks.token == TOKEN
    assert ep0(config).user == "role"


def test_token_with_client_id_only_sets_the_default_role() -> None:
    env = {k: v for k, v in ENV.items() if k != "DATABRICKS_CLIENT_SECRET"}
    config = load({**env, "DATABRICKS_TOKEN": TOKEN})
    assert config.databricks.auth_method == "pat"
    assert ep0(config).user == "env-client"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"DATABRICKS_TOKEN": TOKEN},
         "DATABRICKS_TOKEN (environment) and DATABRICKS_CLIENT_SECRET (environment): both a token "
         "and a client secret are set; use one auth method"),
        ({"DATABRICKS_CLIENT_ID": ""},
         "DATABRICKS_CLIENT_SECRET (environment): needs DATABRICKS_CLIENT_ID"),
        ({"DATABRICKS_CLIENT_SECRET": ""},
         "DATABRICKS_CLIENT_ID=env-client (environment): needs DATABRICKS_CLIENT_SECRET as well"),
        ({"LAKEBASE_INSTANCE": "inst"},
         "ENDPOINT_NAME=projects/p/branches/b/endpoints/env (environment) and "
         "LAKEBASE_INSTANCE=inst (environment): set only one"),
    ],
)
def test_conflicting_or_incomplete(change: dict[str, str], expected: str) -> None:
    found = problems({**ENV, **change, "PGUSER": "u"})
    assert len(found) == 1, found
    assert found[0].startswith(expected), found


def test_unknown_keys_are_errors() -> None:
    f = DATA / "unknown_keys.toml"
    found = problems({"HOME": "/nonexistent"}, "unknown_keys.toml")
    assert f"extra ({f}): unknown table" in found[0]
    assert f"[databricks] cilent_secret ({f}): unknown key (did you mean client_secret?)" in found
    assert f"[proxy] max_client ({f}): unknown key (did you mean max_clients?)" in found
    assert f"[[endpoints]] ssl_mode ({f}): unknown key (did you mean sslmode?)" in found


def test_invalid_toml_is_one_problem() -> None:
    found = problems({"HOME": "/nonexistent"}, "invalid.toml")
    assert len(found) == 1, found  # no "required" noise for what the file may have held
    assert found[0].startswith(f"{DATA / 'invalid.toml'}: not valid TOML: ")


def test_missing_config_file() -> None:
    found = problems(ENV, "nonexistent.toml")
    assert found == [f"--config={DATA / 'nonexistent.toml'} (command line): file not found"]
    found = problems({**ENV, "LAKEPROXY_CONFIG": "/nonexistent/lakeproxy.toml"})
    assert found == [
        "LAKEPROXY_CONFIG=/nonexistent/lakeproxy.toml (environment): file not found"
    ]


def test_table_of_wrong_type(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('proxy = 1\nendpoints = ["a"]\n')
    found = problems(ENV, f)
    assert f"proxy ({f}): must be a table [proxy]" in found
    assert f"endpoints ({f}): must be [[endpoints]] tables" in found


def test_relative_paths_in_file_are_relative_to_it_and_tilde_uses_home(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / "certs" / name).write_text("x")
    f = tmp_path / "c.toml"
    f.write_text(
        '[proxy]\ntls_cert = "certs/cert.pem"\ntls_key = "~/certs/key.pem"\n'
        'client_tls = "require"\n'
        '[[endpoints]]\nsslrootcert = "certs/ca.pem"\n'
    )
    config = load({**ENV, "HOME": str(tmp_path)}, f)
    assert config.tls_cert == str(tmp_path / "certs" / "cert.pem")
    assert config.tls_key == str(tmp_path / "certs" / "key.pem")
    assert config.client_tls == "require"
    assert ep0(config).sslrootcert == str(tmp_path / "certs" / "ca.pem")


def test_client_tls_defaults_to_allow_with_a_certificate() -> None:
    pem = str(DATA / "ca.pem")
    config = load({**ENV, "LAKEPROXY_TLS_CERT": pem, "LAKEPROXY_TLS_KEY": pem})
    assert (config.client_tls, config.tls_cert, config.tls_key) == ("allow", pem, pem)
    config = load({**ENV, "LAKEPROXY_TLS_CERT": pem, "LAKEPROXY_TLS_KEY": pem,
                   "LAKEPROXY_CLIENT_TLS": "off"})
    assert config.client_tls == "off"


# --------------------------------------------------------------------------
# DATABRICKS_HOST


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://x.cloud.databricks.com", "https://x.cloud.databricks.com"),
        ("https://x.cloud.databricks.com/", "https://x.cloud.databricks.com"),
        ("https://adb-1.azuredatabricks.net/?o=123#x", "https://adb-1.azuredatabricks.net"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://127.3.2.1:8080/", "http://127.3.2.1:8080"),
        ("http://localhost:8080", "http://localhost:8080"),
        ("http://[::1]:8080", "http://[::1]:8080"),
    ],
)
def test_databricks_host(value: str, expected: str) -> None:
    assert load({**ENV, "DATABRICKS_HOST": value}).databricks.host == expected


# --------------------------------------------------------------------------
# ~/.databrickscfg profiles


def cfg_env(**extra: str) -> dict[str, str]:
    env = {"ENDPOINT_NAME": ENV["ENDPOINT_NAME"],
           "DATABRICKS_CONFIG_FILE": str(DATA / "databrickscfg.ini")}
    env.update(extra)
    return env


def test_default_profile_when_no_env_credentials() -> None:
    config = load(cfg_env())
    assert config.databricks == DatabricksConfig(
        "https://default.cloud.databricks.com", "default-client", "default-secret-value"
    )
    assert ep0(config).user == "default-client"


def test_default_profile_from_home(tmp_path: Path) -> None:
    (tmp_path / ".databrickscfg").write_text((DATA / "databrickscfg.ini").read_text())
    env = {"ENDPOINT_NAME": ENV["ENDPOINT_NAME"], "HOME": str(tmp_path)}
    assert load(env).databricks.client_id == "default-client"
    env["DATABRICKS_CONFIG_PROFILE"] = "sp"
    assert load(env).databricks.client_id == "sp-client"


def test_named_profile() -> None:
    config = load(cfg_env(DATABRICKS_CONFIG_PROFILE="staging", PGUSER="r"))
    assert config.databricks == DatabricksConfig(
        "https://staging.cloud.databricks.com", None, None, "dapi-staging-token-value",
        auth_type="pat", profile="staging",
    )


def test_env_beats_profile() -> None:
    config = load(cfg_env(DATABRICKS_CONFIG_PROFILE="sp", DATABRICKS_CLIENT_ID="env-client"))
    assert config.databricks.client_id == "env-client"
    assert config.databricks.host == "https://sp.cloud.databricks.com"
    assert config.databricks.client_secret == "sp-secret-value"


def test_profile_skipped_when_env_configures_auth_without_a_profile() -> None:
    # As the SDKs do: no explicit profile + credentials in env -> the file is not read.
    found = problems(cfg_env(DATABRICKS_TOKEN=TOKEN, PGUSER="u"))
    assert found == [
        "DATABRICKS_HOST: required (the workspace URL, https://...; set it in the environment, "
        "in [databricks] host, or in a ~/.databrickscfg profile)"
    ]


def test_default_profile_with_host_from_env() -> None:
    config = load(cfg_env(DATABRICKS_HOST="https://env.cloud.databricks.com"))
    assert config.databricks == DatabricksConfig(
        "https://env.cloud.databricks.com", "default-client", "default-secret-value"
    )


def test_settings_default_profile() -> None:
    env = cfg_env(DATABRICKS_CONFIG_FILE=str(DATA / "databrickscfg_settings.ini"), PGUSER="u")
    assert load(env).databricks.token == "dapi-staging-token-value"


def test_profile_named_in_toml() -> None:
    config = load({"HOME": "/nonexistent"}, "profile_in_file.toml")
    assert config.databricks.client_id == "sp-client"
    assert ep0(config).instance == "inst"


def test_explicit_profile_with_missing_file() -> None:
    found = problems(cfg_env(
        DATABRICKS_CONFIG_PROFILE="sp", DATABRICKS_CONFIG_FILE="/nonexistent/cfg",
    ))
    assert found[0] == (
        "DATABRICKS_CONFIG_FILE=/nonexistent/cfg (environment): file /nonexistent/cfg does not "
        "exist"
    )


def test_broken_databrickscfg_does_not_echo_its_lines() -> None:
    path = DATA / "databrickscfg_broken.ini"
    found = problems(cfg_env(DATABRICKS_CONFIG_FILE=str(path)))
    assert found[0] == f"{path}: cannot read it as a .databrickscfg INI file (line 1)"
    assert not any("leaked" in p for p in found)


# --------------------------------------------------------------------------
# Listeners


@pytest.mark.parametrize(
    ("text", "expected", "described", "loopback"),
    [
        ("127.0.0.1:6432", Listener("tcp", "127.0.0.1", 6432), "127.0.0.1:6432", True),
        ("127.9.9.9:0", Listener("tcp", "127.9.9.9", 0), "127.9.9.9:0", True),
        ("localhost:5432", Listener("tcp", "localhost", 5432), "localhost:5432", True),
        ("[::1]:6432", Listener("tcp", "::1", 6432), "[::1]:6432", True),
        ("[::]:6432", Listener("tcp", "::", 6432), "[::]:6432", False),
        ("[::ffff:127.0.0.1]:1", Listener("tcp", "::ffff:127.0.0.1", 1), "[::ffff:127.0.0.1]:1",
         True),
        ("0.0.0.0:6432", Listener("tcp", "0.0.0.0", 6432), "0.0.0.0:6432", False),
        ("10.1.2.3:6432", Listener("tcp", "10.1.2.3", 6432), "10.1.2.3:6432", False),
        ("proxy.internal:6432", Listener("tcp", "proxy.internal", 6432), "proxy.internal:6432",
         False),
        ("unix:/tmp", Listener("unix", "/tmp", 6432, "/tmp/.s.PGSQL.6432"),
         "unix:/tmp/.s.PGSQL.6432", True),
        ("unix:/run/lp/:5433", Listener("unix", "/run/lp", 5433, "/run/lp/.s.PGSQL.5433"),
         "unix:/run/lp/.s.PGSQL.5433", True),
        (" unix:/var/run:7 ", Listener("unix", "/var/run", 7, "/var/run/.s.PGSQL.7"),
         "unix:/var/run/.s.PGSQL.7", True),
    ],
)
def test_parse_listener(text: str, expected: Listener, described: str, loopback: bool) -> None:
    listener = parse_listener(text)
    assert listener == expected
    assert listener.describe() == described
    assert listener.is_loopback is loopback


def test_parse_listeners_comma_separated() -> None:
    assert parse_listeners("127.0.0.1:1, [::1]:2,unix:/tmp:3") == (
        Listener("tcp", "127.0.0.1", 1),
        Listener("tcp", "::1", 2),
        Listener("unix", "/tmp", 3, "/tmp/.s.PGSQL.3"),
    )
    with pytest.raises(ValueError, match="'nope': must be HOST:PORT"):
        parse_listeners("127.0.0.1:1,nope")


def test_listen_flag_and_file_list() -> None:
    config = load(ENV, listen="127.0.0.1:1,unix:/tmp:2")
    assert [lst.describe() for lst in ep0(config).listen] == [
        "127.0.0.1:1", "unix:/tmp/.s.PGSQL.2"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("30", 30.0), ("30s", 30.0), ("200ms", 0.2), ("2m", 120.0), ("1h", 3600.0),
     ("1.5s", 1.5), (" 0 ", 0.0), ("5 s", 5.0)],
)
def test_parse_duration(text: str, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "s", "1d", "-1", "1e3", "thirty", "1.s"])
def test_parse_duration_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="must be a duration"):
        parse_duration(text)


# --------------------------------------------------------------------------
# The loopback rule


@pytest.mark.parametrize(
    "listen",
    ["0.0.0.0:6432", "[::]:6432", "10.0.0.1:6432", "proxy.internal:6432",
     "127.0.0.1:6432,0.0.0.0:6433"],
)
def test_non_loopback_listener_needs_password_or_flag(listen: str) -> None:
    found = problems({**ENV, "LAKEPROXY_LISTEN": listen})
    assert len(found) == 1, found
    assert found[0].startswith(f"LAKEPROXY_LISTEN={listen} (environment): ")
    assert "is not a loopback address" in found[0]
    assert "LAKEPROXY_CLIENT_PASSWORD" in found[0]
    assert "--allow-remote-trust" in found[0]
    load({**ENV, "LAKEPROXY_LISTEN": listen, "LAKEPROXY_CLIENT_PASSWORD": PASSWORD})
    load({**ENV, "LAKEPROXY_LISTEN": listen}, allow_remote_trust=True)
    load({**ENV, "LAKEPROXY_LISTEN": listen, "LAKEPROXY_ALLOW_REMOTE_TRUST": "1"})


def test_non_loopback_flag_names_the_flag() -> None:
    found = problems(ENV, listen="0.0.0.0:6432")
    assert found[0].startswith("--listen=0.0.0.0:6432 (command line): 0.0.0.0:6432 is not a")


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:6432", "127.1.2.3:1", "localhost:6432", "[::1]:6432", "unix:/tmp"]
)
def test_local_listeners_need_nothing(listen: str) -> None:
    load({**ENV, "LAKEPROXY_LISTEN": listen})


# --------------------------------------------------------------------------
# Several endpoints


def test_two_endpoints_each_with_its_listener() -> None:
    env = {"DATABRICKS_CLIENT_SECRET": SECRET, "PGHOST": "ignored.example.com",
           "ENDPOINT_NAME": "projects/x/branches/y/endpoints/ignored", "PGUSER": "ignored"}
    config = load(env, "two_endpoints.toml")
    a, b = config.endpoints
    assert a.name == "projects/p/branches/main/endpoints/primary"
    assert (a.host, a.user, a.database) == (None, "two-client", "databricks_postgres")
    assert a.listen == (Listener("tcp", "127.0.0.1", 6432),)
    assert (b.instance, b.user, b.database) == ("reporting", "reporter", "reports")
    assert b.listen == (
        Listener("tcp", "127.0.0.1", 6433),
        Listener("unix", "/tmp/lakeproxy-test", 6433, "/tmp/lakeproxy-test/.s.PGSQL.6433"),
    )


def test_two_endpoints_refuse_a_global_listen() -> None:
    found = problems(
        {"DATABRICKS_CLIENT_SECRET": SECRET, "LAKEPROXY_LISTEN": "127.0.0.1:1"},
        "two_endpoints.toml",
    )
    assert found == [
        f"LAKEPROXY_LISTEN=127.0.0.1:1 (environment): the file {DATA / 'two_endpoints.toml'} has "
        "several [[endpoints]]; set listen in each instead"
    ]


def test_two_endpoints_on_one_listener() -> None:
    found = problems({"DATABRICKS_CLIENT_SECRET": SECRET}, "duplicate_listen.toml")
    assert found == [
        "default listener: 127.0.0.1:6432 is already used by [[endpoints]] #1; give each "
        "endpoint its own listen"
    ]


def test_admin_listen_clashing_with_a_client_listener() -> None:
    found = problems({**ENV, "LAKEPROXY_ADMIN_LISTEN": "127.0.0.1:6432"})
    assert found == [
        "LAKEPROXY_ADMIN_LISTEN=127.0.0.1:6432 (environment): 127.0.0.1:6432 is also a client "
        "listener"
    ]


# --------------------------------------------------------------------------
# Secrets


def test_secrets_not_in_repr() -> None:
    config = load({**ENV, "LAKEPROXY_CLIENT_PASSWORD": PASSWORD})
    token_config = load({**ENV, "DATABRICKS_CLIENT_SECRET": "", "DATABRICKS_TOKEN": TOKEN})
    for text in (repr(config), str(config), repr(token_config), repr(token_config.databricks)):
        assert SECRET not in text
        assert PASSWORD not in text
        assert TOKEN not in text
    assert config.client_password == PASSWORD
    assert token_config.databricks.token == TOKEN


def test_secrets_not_in_error_messages() -> None:
    with pytest.raises(ConfigError) as info:
        load({
            **ENV,
            "DATABRICKS_TOKEN": TOKEN,
            "LAKEPROXY_CLIENT_PASSWORD": PASSWORD,
            "LAKEPROXY_MAX_CLIENTS": "0",
            "DATABRICKS_HOST": "http://example.com",
        })
    text = str(info.value) + repr(info.value) + " ".join(info.value.problems)
    for secret in (SECRET, TOKEN, PASSWORD):
        assert secret not in text
    assert "DATABRICKS_TOKEN (environment)" in text


def test_file_secrets_not_in_error_messages(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f'[databricks]\ntoken = "{TOKEN}"\n[proxy]\nclient_password = ""\n')
    found = problems(ENV, f)
    assert f"[proxy] client_password ({f}): must not be empty" in found
    assert (
        f"[databricks] token ({f}) and DATABRICKS_CLIENT_SECRET (environment): both a token and "
        "a client secret are set; use one auth method"
    ) in found
    assert all(TOKEN not in p for p in found)


# --------------------------------------------------------------------------
# config.example.toml


def example_tables() -> dict[str, str]:
    """The example's text under each table header ([databricks], [proxy], [[endpoints]])."""
    text = EXAMPLE.read_text()
    sections: dict[str, str] = {}
    current = ""
    for line in text.splitlines():
        m = re.match(r"^#?\s*\[\[?(\w+)\]\]?\s*$", line)
        if m:
            current = m.group(1)
        sections[current] = sections.get(current, "") + line + "\n"
    return sections


def test_example_parses() -> None:
    tomllib.loads(EXAMPLE.read_text())
    config = load(ENV, EXAMPLE)
    assert config.max_clients == 1000
    assert ep0(config).listen == (Listener("tcp", "127.0.0.1", 6432),)


def test_example_uncommented_endpoints_parse(tmp_path: Path) -> None:
    """The commented [[endpoints]] examples are valid once uncommented."""
    text = EXAMPLE.read_text()
    head, _, tail = text.partition("# [[endpoints]]")
    lines = []
    for line in ("# [[endpoints]]" + tail).splitlines():
        stripped = line[2:] if line.startswith("# ") else line.lstrip("#")
        lines.append(stripped)
    f = tmp_path / "example.toml"
    f.write_text(head + "\n".join(lines) + "\n")
    config = load({"DATABRICKS_HOST": ENV["DATABRICKS_HOST"],
                   "DATABRICKS_CLIENT_ID": "c", "DATABRICKS_CLIENT_SECRET": SECRET}, f)
    assert len(config.endpoints) == 3
    assert [ep.kind for ep in config.endpoints] == ["read_write", "read_write", "read_only"]


@pytest.mark.parametrize(
    ("table", "key"), [(t, k) for t, keys in FILE_KEYS.items() for k in keys]
)
def test_example_documents_every_key(table: str, key: str) -> None:
    section = example_tables()[table]
    assert re.search(rf"^[#\s]*{key} = ", section, re.MULTILINE), f"[{table}] {key} undocumented"


@pytest.mark.parametrize("var", [v for v in ENV_VARS if v != "LAKEPROXY_CONFIG"])
def test_example_names_every_env_var(var: str) -> None:
    assert var in EXAMPLE.read_text()


# --------------------------------------------------------------------------
# Session reuse


def test_pool_defaults_off() -> None:
    config = load()
    assert [ep.pool_mode for ep in config.endpoints] == ["off"]
    assert (config.pool_idle_timeout, config.pool_max_idle, config.pool_lifetime) == (
        60.0, 10, 3600.0)


def test_pool_settings_from_env() -> None:
    config = load({**ENV, "LAKEPROXY_POOL_MODE": "session", "LAKEPROXY_POOL_IDLE_TIMEOUT": "5s",
                   "LAKEPROXY_POOL_MAX_IDLE": "3", "LAKEPROXY_POOL_LIFETIME": "10m"})
    assert [ep.pool_mode for ep in config.endpoints] == ["session"]
    assert (config.pool_idle_timeout, config.pool_max_idle, config.pool_lifetime) == (
        5.0, 3, 600.0)


def test_pool_mode_per_endpoint_and_from_proxy_table(tmp_path: Path) -> None:
    path = tmp_path / "pool.toml"
    path.write_text(
        '[proxy]\npool_mode = "session"\npool_max_idle = 4\n'
        '[[endpoints]]\nname = "projects/p/branches/b/endpoints/a"\nlisten = "127.0.0.1:7001"\n'
        '[[endpoints]]\nname = "projects/p/branches/b/endpoints/b"\nlisten = "127.0.0.1:7002"\n'
        'pool_mode = "off"\n'
    )
    config = load({"DATABRICKS_HOST": ENV["DATABRICKS_HOST"],
                   "DATABRICKS_CLIENT_ID": "c", "DATABRICKS_CLIENT_SECRET": SECRET}, path)
    assert [ep.pool_mode for ep in config.endpoints] == ["session", "off"]
    assert config.pool_max_idle == 4
    env_wins = load({"DATABRICKS_HOST": ENV["DATABRICKS_HOST"], "DATABRICKS_CLIENT_ID": "c",
                     "DATABRICKS_CLIENT_SECRET": SECRET, "LAKEPROXY_POOL_MODE": "off"}, path)
    assert [ep.pool_mode for ep in env_wins.endpoints] == ["off", "off"]


def test_pool_bad_values_are_named() -> None:
    found = problems({**ENV, "LAKEPROXY_POOL_MODE": "transaction",
                      "LAKEPROXY_POOL_MAX_IDLE": "0", "LAKEPROXY_POOL_IDLE_TIMEOUT": "soon"})
    assert len(found) == 3
    assert any(p.startswith("LAKEPROXY_POOL_MODE=transaction (environment):") for p in found)
    assert any(p.startswith("LAKEPROXY_POOL_MAX_IDLE=0 (environment):") for p in found)
    assert any(p.startswith("LAKEPROXY_POOL_IDLE_TIMEOUT=soon (environment):") for p in found)


def test_pool_bad_mode_in_a_file_is_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "pool.toml"
    path.write_text(
        '[proxy]\npool_mode = "statement"\n'
        '[[endpoints]]\nname = "projects/p/branches/b/endpoints/a"\nlisten = "127.0.0.1:7001"\n'
        '[[endpoints]]\nname = "projects/p/branches/b/endpoints/b"\nlisten = "127.0.0.1:7002"\n'
    )
    found = problems({"DATABRICKS_HOST": ENV["DATABRICKS_HOST"], "DATABRICKS_CLIENT_ID": "c",
                      "DATABRICKS_CLIENT_SECRET": SECRET}, path)
    assert len(found) == 1
    assert "[proxy] pool_mode" in found[0]


# --------------------------------------------------------------------------
# The proxy's own LAKEBASE_* names win over the PG* names its clients read (#11.1)

#: key -> (LAKEBASE_* value, PG* value, what the LAKEBASE_* one gives, what PG* alone gives)
ENDPOINT_VARS: dict[str, tuple[str, str, object, object]] = {
    "host": ("own.example.com", "127.0.0.1", "own.example.com", "127.0.0.1"),
    "port": ("5433", "6432", 5433, 6432),
    "hostaddr": ("10.0.0.7", "127.0.0.1", "10.0.0.7", "127.0.0.1"),
    "database": ("owndb", "appdb", "owndb", "appdb"),
    "user": ("own-role", "app-user", "own-role", "app-user"),
    "sslmode": ("verify-ca", "require", "verify-ca", "require"),
    "sslrootcert": ("system", str(DATA / "ca.pem"), "system", str(DATA / "ca.pem")),
}


@pytest.mark.parametrize("key", list(ENDPOINT_VARS))
def test_lakebase_name_wins_over_pg_name(key: str) -> None:
    own_var, pg_var = ENDPOINT_ENV[key]
    own, pg, own_expected, pg_expected = ENDPOINT_VARS[key]
    assert own_var == f"LAKEBASE_{pg_var[2:]}"
    assert getattr(ep0(load({**ENV, own_var: own, pg_var: pg})), key) == own_expected
    # The PG* name alone still works: Databricks' guide tells users to set it.
    assert getattr(ep0(load({**ENV, pg_var: pg})), key) == pg_expected


@pytest.mark.parametrize("key", ["host", "port", "database", "user", "sslmode"])
def test_toml_key_wins_over_pg_name(key: str) -> None:
    """A shell's PGHOST=127.0.0.1 PGPORT=6432 (for psql, to reach the proxy) must not
    point the proxy at itself when its file says where the endpoint is."""
    _, pg_var = ENDPOINT_ENV[key]
    _, pg, _, _ = ENDPOINT_VARS[key]
    from_file = getattr(ep0(load({"DATABRICKS_CLIENT_SECRET": SECRET}, "precedence.toml")), key)
    env = {"DATABRICKS_CLIENT_SECRET": SECRET, pg_var: pg}
    assert getattr(ep0(load(env, "precedence.toml")), key) == from_file != pg


@pytest.mark.parametrize("mode", ["disable", "allow", "prefer", "PREFER"])
def test_client_only_pgsslmode_is_ignored_with_one_warning(mode: str) -> None:
    config = load({**ENV, "PGSSLMODE": mode})
    assert ep0(config).sslmode == "verify-full"
    assert len(config.warnings) == 1
    warning = config.warnings[0]
    assert warning.startswith(f"PGSSLMODE={mode} (environment): ignored")
    assert "verify-full" in warning
    assert "LAKEBASE_SSLMODE" in warning
    # The same value as the proxy's own setting is refused.
    assert problems({**ENV, "LAKEBASE_SSLMODE": mode})[0].startswith(
        f"LAKEBASE_SSLMODE={mode} (environment): must be one of require, verify-ca, verify-full")
    # Next to LAKEBASE_SSLMODE, PGSSLMODE is not read at all: no warning.
    both = load({**ENV, "PGSSLMODE": mode, "LAKEBASE_SSLMODE": "require"})
    assert (ep0(both).sslmode, both.warnings) == ("require", ())


def test_usable_pgsslmode_is_a_fallback_without_warning() -> None:
    config = load({**ENV, "PGSSLMODE": "verify-ca"})
    assert (ep0(config).sslmode, config.warnings) == ("verify-ca", ())


def test_file_sslmode_disable_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "lp.toml"
    cfg.write_text('[[endpoints]]\nname = "projects/p/branches/b/endpoints/e"\n'
                   'sslmode = "prefer"\n')
    found = problems({**ENV, "ENDPOINT_NAME": ""}, cfg)
    assert found == [f'[[endpoints]] sslmode ({cfg}): must be one of require, verify-ca, '
                     'verify-full (lakeproxy always uses TLS to the endpoint) (got prefer)']


# --------------------------------------------------------------------------
# Problems: the most specific first (#11.5); hints name the value's source (#11.6)


def test_typo_in_a_table_comes_before_the_required_problems(tmp_path: Path) -> None:
    cfg = tmp_path / "lp.toml"
    cfg.write_text('[databricks]\nhots = "https://x.cloud.databricks.com"\n'
                   '[proxy]\nmax_client = 5\n')
    found = problems({}, cfg)
    assert found[0] == f"[databricks] hots ({cfg}): unknown key (did you mean host?)"
    assert found[1] == f"[proxy] max_client ({cfg}): unknown key (did you mean max_clients?)"
    assert found[2].startswith("DATABRICKS_HOST: required")
    assert len(found) == 5, found


def test_sources_name_file_key_profile_or_variable(tmp_path: Path) -> None:
    cfg = tmp_path / "lp.toml"
    cfg.write_text('[proxy]\nmax_clients = 5\n[[endpoints]]\n'
                   'name = "projects/p/branches/b/endpoints/e"\nhost = "h.example.com"\n')
    config = load({**ENV, "ENDPOINT_NAME": "", "PGPORT": "5433"}, cfg)
    assert name_sources("raise LAKEPROXY_MAX_CLIENTS", config.sources) == (
        f"raise max_clients in [proxy] of {cfg}")
    hint = name_sources("check LAKEBASE_HOST/LAKEBASE_PORT/LAKEBASE_HOSTADDR and ENDPOINT_NAME",
                        ep0(config).sources, config.sources)
    assert hint == (f"check host in [[endpoints]] of {cfg}/PGPORT/LAKEBASE_HOSTADDR and "
                    f"name in [[endpoints]] of {cfg}")
    # A variable's value keeps the variable's name.
    assert name_sources("check DATABRICKS_HOST", config.sources) == "check DATABRICKS_HOST"


def test_sources_name_the_profile(tmp_path: Path) -> None:
    cfg = tmp_path / ".databrickscfg"
    cfg.write_text("[dev]\nhost = https://dev.cloud.databricks.com\ntoken = dapi-123\n")
    config = load({"DATABRICKS_CONFIG_FILE": str(cfg), "DATABRICKS_CONFIG_PROFILE": "dev",
                   "ENDPOINT_NAME": "projects/p/branches/b/endpoints/e", "LAKEBASE_USER": "r"})
    assert name_sources("check DATABRICKS_TOKEN (it may be expired)", config.sources) == (
        f"check token in profile [dev] of {cfg} (it may be expired)")


def test_secrets_lists_every_field_kept_out_of_reprs() -> None:
    """Config.secrets() (what cli and a SIGHUP reload register for redaction)
    names every secret field: the ones declared repr=False, whatever their type."""
    import dataclasses

    from lakeproxy.config import DatabricksConfig

    secret_fields = [f.name for f in dataclasses.fields(DatabricksConfig)
                     if not f.repr and f.type in ("str | None", str | None)]
    dbx = dataclasses.replace(DatabricksConfig("https://w.example"),
                              **{name: f"s-{name}" for name in secret_fields})  # type: ignore[arg-type]
    cfg = dataclasses.replace(load(ENV), databricks=dbx, client_password="s-client-password")
    assert len(secret_fields) >= 5
    assert set(cfg.secrets()) == {f"s-{n}" for n in secret_fields} | {"s-client-password"}
