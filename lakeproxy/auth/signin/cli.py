"""``databricks-cli``: the user's own sign-in, through the Databricks CLI (U2M).

Runs ``databricks auth token --host H`` (``--profile P`` when a profile is named)
and reads ``access_token`` and ``expiry`` from the JSON it prints. The CLI
refreshes the token with its own stored refresh token, so calling it again
before expiry is all a refresh takes.

The output's shape is not on a documentation page we found: it is the CLI's
JSON encoding of an ``oauth2.Token`` (``access_token``, ``token_type``,
``expiry`` as RFC 3339 with the local offset), which the Databricks SDKs read
the same way. The CLI hands back its cached token until shortly before it
expires, so the refresh-ahead cache may call it a few times per token.
"""

from __future__ import annotations

from dataclasses import dataclass

from lakeproxy.auth.provider import Credential
from lakeproxy.auth.signin.base import (
    Http,
    credential_at,
    malformed,
    parse_rfc3339,
    run_cli_json,
    str_field,
)


@dataclass(frozen=True, slots=True)
class DatabricksCliSignIn:
    cli_path: str
    host: str
    profile: str | None = None
    method: str = "databricks-cli"
    static: bool = False

    def argv(self) -> list[str]:
        """The command line that prints the token."""
        if self.profile:
            return [self.cli_path, "auth", "token", "--profile", self.profile]
        return [self.cli_path, "auth", "token", "--host", self.host]

    def login_command(self) -> str:
        where = f"--profile {self.profile}" if self.profile else f"--host {self.host}"
        return f"databricks auth login {where}"

    async def token(self, http: Http, *, deadline: float) -> Credential:
        what = "workspace token from the Databricks CLI (databricks auth token)"
        body = await run_cli_json(
            self.argv(), what=what, deadline=deadline,
            fix=f"run `{self.login_command()}`, then try again",
            missing_fix=(f"install the Databricks CLI (or set DATABRICKS_CLI_PATH) and run "
                         f"`{self.login_command()}`"),
        )
        token = str_field(body, "access_token", what)
        expiry = body.get("expiry")
        if not isinstance(expiry, str):
            raise malformed(what, "no 'expiry' string")
        try:
            expires_wall = parse_rfc3339(expiry)
        except ValueError:
            raise malformed(what, "'expiry' is not an RFC 3339 time") from None
        return credential_at(token, expires_wall, what)

    def refused_hint(self, status: int, error_code: str | None, message: str | None) -> str:
        return (f"the workspace refused the Databricks CLI's token: run "
                f"`{self.login_command()}` for this workspace")
