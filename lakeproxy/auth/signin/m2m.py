"""``oauth-m2m``: a Databricks service principal's OAuth secret (client credentials).

``POST {host}/oidc/v1/token`` with Basic auth and
``grant_type=client_credentials&scope=all-apis`` -> ``access_token``, ``expires_in``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from lakeproxy.auth.provider import Credential
from lakeproxy.auth.signin.base import Http, oauth_credential

OIDC_TOKEN_PATH: Final = "/oidc/v1/token"  # noqa: S105 - a path, not a secret
# From the troubleshooting table of Databricks' "Connect external apps to
# Lakebase using the API" page.
HINT_CLIENT: Final = "check DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET"


@dataclass(frozen=True, slots=True)
class M2MSignIn:
    client_id: str
    client_secret: str = field(repr=False)
    method: str = "oauth-m2m"
    static: bool = False

    async def token(self, http: Http, *, deadline: float) -> Credential:
        what = f"workspace OAuth token (POST {OIDC_TOKEN_PATH})"
        body = await http.request_json(
            what, "POST", OIDC_TOKEN_PATH, step="oauth", deadline=deadline,
            data={"grant_type": "client_credentials", "scope": "all-apis"},
            basic=(self.client_id, self.client_secret),
        )
        return oauth_credential(body, what)

    def refused_hint(self, status: int, error_code: str | None, message: str | None) -> str:
        return HINT_CLIENT
