"""``pat``: a personal access (or workspace) token, used as the Bearer as it is."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Final

from lakeproxy.auth.provider import Credential
from lakeproxy.auth.signin.base import Http

HINT_PAT: Final = "check DATABRICKS_TOKEN (it may be expired or revoked)"


@dataclass(frozen=True, slots=True)
class PatSignIn:
    """A static token: never expires here, never refreshed."""

    token_value: str = field(repr=False)
    method: str = "pat"
    static: bool = True

    async def token(self, http: Http, *, deadline: float) -> Credential:
        """The token itself, without a request."""
        now = asyncio.get_running_loop().time()
        return Credential(
            token=self.token_value, issued_at=now, expires_at=math.inf, expires_wall=math.inf
        )

    def refused_hint(self, status: int, error_code: str | None, message: str | None) -> str:
        return HINT_PAT
