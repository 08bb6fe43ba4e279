"""Workspace sign-in methods, one module each, behind :class:`SignIn`.

:func:`make_signin` builds the method a :class:`~lakeproxy.config.DatabricksConfig`
chose. Caching, refresh ahead of expiry and single-flight are the cache's job
(:mod:`lakeproxy.auth.cache`) and the same for every method.
"""

from __future__ import annotations

from typing import assert_never

from lakeproxy.auth.signin.azure import AzureClientSecretSignIn, AzureCliSignIn, AzureMsiSignIn
from lakeproxy.auth.signin.base import AZURE_DATABRICKS_RESOURCE, Http, SignIn
from lakeproxy.auth.signin.cli import DatabricksCliSignIn
from lakeproxy.auth.signin.m2m import M2MSignIn
from lakeproxy.auth.signin.oidc import OidcSignIn
from lakeproxy.auth.signin.pat import PatSignIn
from lakeproxy.config import DatabricksConfig
from lakeproxy.errors import ConfigError

__all__ = [
    "AZURE_DATABRICKS_RESOURCE",
    "AzureCliSignIn",
    "AzureClientSecretSignIn",
    "AzureMsiSignIn",
    "DatabricksCliSignIn",
    "Http",
    "M2MSignIn",
    "OidcSignIn",
    "PatSignIn",
    "SignIn",
    "make_signin",
]


def make_signin(config: DatabricksConfig) -> SignIn:
    """The sign-in method ``config.auth_type`` names, with its settings.

    Raises ConfigError when a value the method needs is missing (the loader
    reports that first, so this only guards hand-built configs).
    """
    c = config
    method = c.auth_type

    def need(value: str | None, name: str) -> str:
        if not value:
            raise ConfigError([f"{name}: required for {method}"])
        return value

    if method == "pat":
        return PatSignIn(need(c.token, "DATABRICKS_TOKEN"))
    if method == "oauth-m2m":
        return M2MSignIn(need(c.client_id, "DATABRICKS_CLIENT_ID"),
                         need(c.client_secret, "DATABRICKS_CLIENT_SECRET"))
    if method == "env-oidc":
        return OidcSignIn(jwt=need(c.oidc_token, "DATABRICKS_OIDC_TOKEN"), client_id=c.client_id)
    if method == "file-oidc":
        return OidcSignIn(jwt_file=need(c.oidc_token_file, "DATABRICKS_OIDC_TOKEN_FILE"),
                          client_id=c.client_id)
    if method == "azure-client-secret":
        return AzureClientSecretSignIn(
            need(c.azure_client_id, "ARM_CLIENT_ID"),
            need(c.azure_client_secret, "ARM_CLIENT_SECRET"),
            need(c.azure_tenant_id, "ARM_TENANT_ID"), c.azure_authority,
        )
    if method == "databricks-cli":
        return DatabricksCliSignIn(c.cli_path, c.host, c.profile)
    if method == "azure-cli":
        return AzureCliSignIn(c.az_path)
    if method == "azure-msi":
        return AzureMsiSignIn(c.imds_host, c.identity_endpoint, c.identity_header,
                              c.azure_client_id)
    assert_never(method)
