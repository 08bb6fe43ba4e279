"""``env-oidc`` / ``file-oidc``: workload identity federation (OAuth token exchange).

A JWT from the workload's identity provider (``DATABRICKS_OIDC_TOKEN``, or the
file ``DATABRICKS_OIDC_TOKEN_FILE``, read afresh at every exchange because
Kubernetes projected tokens rotate) is exchanged at ``POST {host}/oidc/v1/token``
(RFC 8693), as Databricks' "Authenticate with an identity provider token" page
shows::

    grant_type=urn:ietf:params:oauth:grant-type:token-exchange
    subject_token=<jwt>
    subject_token_type=urn:ietf:params:oauth:token-type:jwt
    scope=all-apis
    client_id=<service principal>   # only with a service principal federation policy

The answer is an OAuth token response (``access_token``, ``expires_in``); the
docs say its lifetime derives from the federated token's.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from lakeproxy.auth.provider import Credential
from lakeproxy.auth.signin.base import Http, oauth_credential, refused

OIDC_TOKEN_PATH: Final = "/oidc/v1/token"  # noqa: S105 - a path, not a secret
GRANT_TOKEN_EXCHANGE: Final = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105
TOKEN_TYPE_JWT: Final = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105 - a URN


@dataclass(frozen=True, slots=True)
class OidcSignIn:
    """Exchanges a federated JWT; exactly one of ``jwt`` and ``jwt_file`` is set."""

    jwt: str | None = field(default=None, repr=False)
    jwt_file: str | None = None
    client_id: str | None = None

    @property
    def method(self) -> str:
        return "file-oidc" if self.jwt_file is not None else "env-oidc"

    @property
    def static(self) -> bool:
        return False

    async def token(self, http: Http, *, deadline: float) -> Credential:
        subject = self.jwt if self.jwt_file is None else await self._read_file(self.jwt_file)
        if not subject:
            raise refused("workload identity token: DATABRICKS_OIDC_TOKEN is empty",
                          hint="set DATABRICKS_OIDC_TOKEN to the workload's JWT")
        form = {
            "grant_type": GRANT_TOKEN_EXCHANGE,
            "subject_token": subject,
            "subject_token_type": TOKEN_TYPE_JWT,
            "scope": "all-apis",
        }
        if self.client_id:
            form["client_id"] = self.client_id
        what = f"workspace OAuth token by token exchange (POST {OIDC_TOKEN_PATH})"
        body = await http.request_json(
            what, "POST", OIDC_TOKEN_PATH, step="oauth", deadline=deadline, data=form,
            hint=lambda status, code, message: self.refused_hint(status, code, message),
        )
        return oauth_credential(body, what)

    async def _read_file(self, path: str) -> str:
        try:
            text = await asyncio.to_thread(Path(path).read_text, encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(
                exc).__name__
            raise refused(
                f"workload identity token: cannot read DATABRICKS_OIDC_TOKEN_FILE {path}: "
                f"{reason}",
                hint="mount the workload's identity token at that path (e.g. a Kubernetes "
                     "projected service account token) or fix DATABRICKS_OIDC_TOKEN_FILE",
            ) from None
        text = text.strip()
        if not text:
            raise refused(f"workload identity token: {path} is empty",
                          hint="check that the identity token is written to that file")
        return text

    def refused_hint(self, status: int, error_code: str | None, message: str | None) -> str:
        policy = (f"the federation policy of service principal {self.client_id}"
                  if self.client_id else "the account's federation policy")
        source = "DATABRICKS_OIDC_TOKEN_FILE" if self.jwt_file else "DATABRICKS_OIDC_TOKEN"
        return (f"check that the JWT in {source} is current and that its issuer, audience "
                f"and subject match {policy}")
