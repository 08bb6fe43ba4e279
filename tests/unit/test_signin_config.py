"""Choosing the workspace sign-in method (SPEC "Workspace sign-in"): DATABRICKS_AUTH_TYPE,
the order when unset, conflicts, and the identity-provider URL rule."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

import pytest

from lakeproxy.auth.signin import (
    AzureClientSecretSignIn,
    AzureCliSignIn,
    AzureMsiSignIn,
    DatabricksCliSignIn,
    OidcSignIn,
    make_signin,
)
from lakeproxy.config import Config, load_config
from lakeproxy.errors import ConfigError

HOST = "https://ws.cloud.databricks.com"
BASE: Mapping[str, str] = {
    "DATABRICKS_HOST": HOST,
    "ENDPOINT_NAME": "projects/p/branches/b/endpoints/e",
    "HOME": "/nonexistent-home",  # never the real ~/.databrickscfg
}
OIDC = "eyJhbGciOiJSUzI1NiJ9.e30.c2ln"
ARM = {"ARM_CLIENT_ID": "app-id", "ARM_CLIENT_SECRET": "arm-s3cret", "ARM_TENANT_ID": "tenant"}


def load(**env: str) -> Config:
    return load_config(env={**BASE, **env})


def problems(**env: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(**env)
    return info.value.problems


def fake_bin(tmp_path: Path, *names: str) -> str:
    """A PATH directory holding executables called ``names``."""
    for name in names:
        exe = tmp_path / name
        exe.write_text("#!/bin/sh\nexit 1\n")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return str(tmp_path)


@pytest.mark.parametrize(
    ("env", "method"),
    [
        ({"DATABRICKS_TOKEN": "dapi-x"}, "pat"),
        ({"DATABRICKS_CLIENT_ID": "c", "DATABRICKS_CLIENT_SECRET": "s"}, "oauth-m2m"),
        ({"DATABRICKS_OIDC_TOKEN": OIDC}, "env-oidc"),
        ({"DATABRICKS_OIDC_TOKEN": OIDC, "DATABRICKS_CLIENT_ID": "sp"}, "env-oidc"),
        ({"DATABRICKS_OIDC_TOKEN_FILE": "/var/run/token"}, "file-oidc"),
        (ARM, "azure-client-secret"),
    ],
)
def test_the_configured_method_is_chosen(env: dict[str, str], method: str) -> None:
    config = load(**env)
    assert config.databricks.auth_type == method


def test_only_a_host_picks_the_databricks_cli_when_installed(tmp_path: Path) -> None:
    config = load(PATH=fake_bin(tmp_path, "databricks", "az"))
    assert config.databricks.auth_type == "databricks-cli"
    assert config.databricks.cli_path == str(tmp_path / "databricks")
    signin = make_signin(config.databricks)
    assert isinstance(signin, DatabricksCliSignIn)
    assert signin.argv() == [str(tmp_path / "databricks"), "auth", "token", "--host", HOST]
    assert config.endpoints[0].user is None  # the signed-in identity, asked at run time


def test_then_the_azure_cli(tmp_path: Path) -> None:
    config = load(PATH=fake_bin(tmp_path, "az"))
    assert config.databricks.auth_type == "azure-cli"
    assert isinstance(make_signin(config.databricks), AzureCliSignIn)


def test_nothing_configured_and_no_cli_is_one_problem(tmp_path: Path) -> None:
    found = problems(PATH=str(tmp_path))
    assert len(found) == 1
    assert found[0].startswith("DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET, or "
                               "DATABRICKS_TOKEN: one auth method is required")
    assert "databricks auth login" in found[0]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DATABRICKS_TOKEN": "dapi-x", "DATABRICKS_OIDC_TOKEN": OIDC},
         "DATABRICKS_TOKEN (environment) and DATABRICKS_OIDC_TOKEN (environment): two sign-in "
         "methods are configured (pat and env-oidc); set DATABRICKS_AUTH_TYPE to the one to use"),
        ({"DATABRICKS_CLIENT_ID": "c", "DATABRICKS_CLIENT_SECRET": "s", **ARM},
         "DATABRICKS_CLIENT_SECRET (environment) and ARM_CLIENT_SECRET (environment): two "
         "sign-in methods are configured (oauth-m2m and azure-client-secret); set "
         "DATABRICKS_AUTH_TYPE to the one to use"),
    ],
)
def test_two_methods_without_auth_type_is_one_line(env: dict[str, str], expected: str) -> None:
    found = problems(**env)
    assert found == [expected]
    assert "arm-s3cret" not in expected
    assert OIDC not in expected


def test_auth_type_chooses_among_several() -> None:
    config = load(DATABRICKS_AUTH_TYPE="env-oidc", DATABRICKS_TOKEN="dapi-x",
                  DATABRICKS_OIDC_TOKEN=OIDC, DATABRICKS_CLIENT_ID="sp")
    signin = make_signin(config.databricks)
    assert isinstance(signin, OidcSignIn)
    assert signin.client_id == "sp"
    assert config.endpoints[0].user is None  # only oauth-m2m/pat take the client id as role


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DATABRICKS_AUTH_TYPE": "azure-clii"},
         "DATABRICKS_AUTH_TYPE=azure-clii (environment): must be one of pat, oauth-m2m, "
         "env-oidc, file-oidc, azure-client-secret, databricks-cli, azure-cli, azure-msi "
         "(did you mean azure-cli?)"),
        ({"DATABRICKS_AUTH_TYPE": "azure-client-secret", "ARM_CLIENT_ID": "a"},
         "DATABRICKS_AUTH_TYPE=azure-client-secret (environment): azure-client-secret needs "
         "ARM_CLIENT_SECRET and ARM_TENANT_ID (in the environment, [databricks], or a "
         "~/.databrickscfg profile)"),
        ({"DATABRICKS_AUTH_TYPE": "file-oidc"},
         "DATABRICKS_AUTH_TYPE=file-oidc (environment): file-oidc needs "
         "DATABRICKS_OIDC_TOKEN_FILE (in the environment, [databricks], or a ~/.databrickscfg "
         "profile)"),
        ({"DATABRICKS_AUTH_TYPE": "azure-msi",
          "AZURE_POD_IDENTITY_AUTHORITY_HOST": "http://10.0.0.1:2579"},
         "AZURE_POD_IDENTITY_AUTHORITY_HOST=http://10.0.0.1:2579 (environment): must use "
         "https:// (http:// is allowed only to a loopback address)"),
        ({**ARM, "AZURE_AUTHORITY_HOST": "http://login.example.com"},
         "AZURE_AUTHORITY_HOST=http://login.example.com (environment): must use https:// "
         "(http:// is allowed only to a loopback address)"),
        ({"DATABRICKS_AUTH_TYPE": "azure-msi", "IDENTITY_ENDPOINT": "ftp://x"},
         "IDENTITY_ENDPOINT=ftp://x (environment): must start with https://"),
    ],
)
def test_bad_sign_in_settings(env: dict[str, str], expected: str) -> None:
    assert problems(**env) == [expected]


def test_azure_settings_reach_the_methods() -> None:
    config = load(**ARM, AZURE_AUTHORITY_HOST="https://login.microsoftonline.us/")
    signin = make_signin(config.databricks)
    assert isinstance(signin, AzureClientSecretSignIn)
    assert signin.authority == "https://login.microsoftonline.us"
    assert "arm-s3cret" not in repr(config) + repr(signin)

    msi = make_signin(load(DATABRICKS_AUTH_TYPE="azure-msi", ARM_CLIENT_ID="uami",
                           IDENTITY_ENDPOINT="http://127.0.0.1:41741/MSI/token/",
                           IDENTITY_HEADER="hdr-secret").databricks)
    assert isinstance(msi, AzureMsiSignIn)
    assert (msi.client_id, msi.identity_endpoint) == ("uami", "http://127.0.0.1:41741/MSI/token")
    assert msi.imds_host == "http://169.254.169.254"
    assert "hdr-secret" not in repr(msi)


def test_azure_keys_and_auth_type_from_a_profile(tmp_path: Path) -> None:
    cfg = tmp_path / "databrickscfg"
    cfg.write_text(f"[az]\nhost = {HOST}\nauth_type = azure-client-secret\n"
                   "azure_client_id = app\nazure_client_secret = prof-s3cret\n"
                   "azure_tenant_id = ten\n")
    config = load_config(env={k: v for k, v in BASE.items() if k != "DATABRICKS_HOST"}
                         | {"DATABRICKS_CONFIG_FILE": str(cfg), "DATABRICKS_CONFIG_PROFILE": "az"})
    d = config.databricks
    assert (d.auth_type, d.azure_client_id, d.azure_tenant_id, d.profile) == (
        "azure-client-secret", "app", "ten", "az")
    assert d.azure_client_secret == "prof-s3cret"


def test_cli_profile_passes_profile(tmp_path: Path) -> None:
    cfg = tmp_path / "databrickscfg"
    cfg.write_text(f"[dev]\nhost = {HOST}\nauth_type = databricks-cli\n")
    env = {"ENDPOINT_NAME": BASE["ENDPOINT_NAME"], "HOME": "/nonexistent-home",
           "DATABRICKS_CONFIG_FILE": str(cfg), "DATABRICKS_CONFIG_PROFILE": "dev",
           "DATABRICKS_CLI_PATH": "/opt/databricks/bin/databricks"}
    signin = make_signin(load_config(env=env).databricks)
    assert isinstance(signin, DatabricksCliSignIn)
    assert signin.argv() == ["/opt/databricks/bin/databricks", "auth", "token", "--profile",
                             "dev"]
    assert signin.login_command() == "databricks auth login --profile dev"


def test_no_path_in_the_environment_finds_no_cli() -> None:
    assert "PATH" not in BASE
    assert os.environ.get("PATH")  # the process has one; the given environment decides
    assert problems()[0].startswith("DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET")
