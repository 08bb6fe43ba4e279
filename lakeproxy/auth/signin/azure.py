"""Azure sign-in: a Microsoft Entra service principal, the Azure CLI, a managed identity.

Each gets a Microsoft Entra ID token for the Azure Databricks resource
(:data:`AZURE_DATABRICKS_RESOURCE`, the programmatic id Azure Databricks'
"Get Microsoft Entra ID tokens" pages use) and uses it as the workspace Bearer.

* ``azure-client-secret``: ``POST {authority}/{tenant}/oauth2/v2.0/token`` with
  ``grant_type=client_credentials``, the client id and secret and
  ``scope=<resource>/.default`` -> ``access_token``, ``expires_in``.
* ``azure-cli``: ``az account get-access-token --resource <resource> --output json``
  -> ``accessToken`` and ``expires_on`` (Unix time, az 2.54 and later) or
  ``expiresOn`` (local time without a zone, older az).
* ``azure-msi``: the App Service style endpoint (``IDENTITY_ENDPOINT`` with the
  ``X-IDENTITY-HEADER: $IDENTITY_HEADER`` header, api-version 2019-08-01) when
  both variables are set, else the instance metadata service
  (``/metadata/identity/oauth2/token?api-version=2018-02-01`` with
  ``Metadata: true``); ``resource=<resource>`` and ``client_id`` for a
  user-assigned identity -> ``access_token`` and ``expires_on`` (Unix time, as a
  string) or ``expires_in``.

Not done (the SDKs do it for service principals that are not yet workspace
users): the ``X-Databricks-Azure-SP-Management-Token`` and workspace resource id
headers. The principal must have been added to the workspace.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Final

from lakeproxy.auth.provider import Credential
from lakeproxy.auth.signin.base import (
    AZURE_DATABRICKS_RESOURCE,
    Http,
    credential_at,
    malformed,
    number_field,
    oauth_credential,
    run_cli_json,
    str_field,
)

IMDS_PATH: Final = "/metadata/identity/oauth2/token"
IMDS_API_VERSION: Final = "2018-02-01"
APP_SERVICE_API_VERSION: Final = "2019-08-01"
_WORKSPACE_ACCESS: Final = "and that it has been added to the Azure Databricks workspace"


@dataclass(frozen=True, slots=True)
class AzureClientSecretSignIn:
    client_id: str
    client_secret: str = field(repr=False)
    tenant_id: str
    authority: str
    method: str = "azure-client-secret"
    static: bool = False

    async def token(self, http: Http, *, deadline: float) -> Credential:
        url = f"{self.authority}/{self.tenant_id}/oauth2/v2.0/token"
        what = "Microsoft Entra ID token (POST {authority}/{tenant}/oauth2/v2.0/token)"
        body = await http.request_json(
            what, "POST", url, step="oauth", deadline=deadline,
            data={
                "grant_type": "client_credentials",
                "client_id": self.client_id,
                "client_secret": self.client_secret,
                "scope": f"{AZURE_DATABRICKS_RESOURCE}/.default",
            },
            hint=lambda status, code, message: self.refused_hint(status, code, message),
        )
        return oauth_credential(body, what)

    def refused_hint(self, status: int, error_code: str | None, message: str | None) -> str:
        return ("check ARM_CLIENT_ID, ARM_CLIENT_SECRET and ARM_TENANT_ID (the Entra "
                "application id, a current client secret and its tenant) "
                + _WORKSPACE_ACCESS)


@dataclass(frozen=True, slots=True)
class AzureCliSignIn:
    az_path: str
    method: str = "azure-cli"
    static: bool = False

    async def token(self, http: Http, *, deadline: float) -> Credential:
        what = "Microsoft Entra ID token from the Azure CLI (az account get-access-token)"
        body = await run_cli_json(
            [self.az_path, "account", "get-access-token", "--resource",
             AZURE_DATABRICKS_RESOURCE, "--output", "json"],
            what=what, deadline=deadline, fix="run `az login`, then try again",
            missing_fix="install the Azure CLI and run `az login`",
        )
        token = str_field(body, "accessToken", what)
        expires_on = number_field(body, "expires_on", what)
        if expires_on is not None:
            return credential_at(token, expires_on, what)
        local = body.get("expiresOn")
        if not isinstance(local, str):
            raise malformed(what, "no 'expires_on' or 'expiresOn'")
        try:
            # Local time without a zone ("2026-12-04 19:30:00.000000"), as az prints it.
            stamp = datetime.datetime.fromisoformat(local.strip())
        except ValueError:
            raise malformed(what, "'expiresOn' is not a date and time") from None
        return credential_at(token, stamp.timestamp(), what)

    def refused_hint(self, status: int, error_code: str | None, message: str | None) -> str:
        return ("the workspace refused the Azure CLI's token: check that the account "
                "`az login` signed in to is a user of this workspace (or run `az login` again)")


@dataclass(frozen=True, slots=True)
class AzureMsiSignIn:
    imds_host: str
    identity_endpoint: str | None = None
    identity_header: str | None = field(default=None, repr=False)
    client_id: str | None = None
    method: str = "azure-msi"
    static: bool = False

    async def token(self, http: Http, *, deadline: float) -> Credential:
        params = {"resource": AZURE_DATABRICKS_RESOURCE}
        if self.client_id:
            params["client_id"] = self.client_id
        if self.identity_endpoint and self.identity_header:
            url = self.identity_endpoint
            params["api-version"] = APP_SERVICE_API_VERSION
            headers = {"X-IDENTITY-HEADER": self.identity_header}
            what = "managed identity token (IDENTITY_ENDPOINT)"
        else:
            url = self.imds_host + IMDS_PATH
            params["api-version"] = IMDS_API_VERSION
            headers = {"Metadata": "true"}
            what = "managed identity token (instance metadata service)"
        body = await http.request_json(
            what, "GET", url, step="oauth", deadline=deadline, params=params,
            headers=headers, direct=True,
            hint=lambda status, code, message: self.refused_hint(status, code, message),
        )
        return oauth_credential(body, what)

    def refused_hint(self, status: int, error_code: str | None, message: str | None) -> str:
        which = (f"the user-assigned identity ARM_CLIENT_ID={self.client_id}" if self.client_id
                 else "a system-assigned identity")
        return f"check that {which} is assigned to this resource " + _WORKSPACE_ACCESS
