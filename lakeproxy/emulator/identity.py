"""The identity providers the emulator plays, for every workspace sign-in method.

* **Workload identity federation**: the token-exchange grant on the workspace's
  ``/oidc/v1/token`` (RFC 8693). The subject token must be an RS256 JWT signed
  by the emulator's own issuer key (:meth:`IdentityProviders.workload_jwt` mints
  them), from the policy's issuer, for its audience, unexpired, and (for a
  service principal policy, ``client_id`` given) with the policy's subject.
  Without ``client_id`` the account-wide policy maps ``sub`` to a user.
* **Microsoft Entra ID**: ``POST /{tenant}/oauth2/v2.0/token``, client
  credentials for the Entra service principal, scope
  ``2ff814a6-3304-4ab8-85cb-cd0e6f879c1d/.default`` (point
  ``AZURE_AUTHORITY_HOST`` at the workspace URL).
* **Managed identity**: the App Service style endpoint ``GET /msi/token``
  (``X-IDENTITY-HEADER``) and the instance metadata service
  ``GET /metadata/identity/oauth2/token`` (``Metadata: true``; point
  ``AZURE_POD_IDENTITY_AUTHORITY_HOST`` at the workspace URL).
* **The Databricks and Azure CLIs**: :meth:`IdentityProviders.write_fake_clis`
  writes ``databricks`` and ``az`` executables that forward their argv to
  ``POST /_emulator/cli/{databricks,az}``; the answer (stdout, stderr, exit
  status) comes from here, so a test can log the user out or expire the
  refresh token (:attr:`IdentityProviders.databricks_cli`, ``az_cli``).

Error texts follow the shape of the real ones (OAuth ``error`` /
``error_description``; Entra's ``AADSTS`` codes; the CLIs' ``Error:`` lines).
Databricks does not document the token exchange's error descriptions, so those
are ours. Every token issued is a workspace Bearer for its principal.
"""

from __future__ import annotations

import base64
import json
import secrets
import sys
import time
import uuid
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

if TYPE_CHECKING:
    from lakeproxy.emulator.api import FakeWorkspace

AZURE_DATABRICKS_RESOURCE: Final = "2ff814a6-3304-4ab8-85cb-cd0e6f879c1d"
ISSUER: Final = "https://oidc.emulator.lakebase.local"
AUDIENCE: Final = "lakeproxy-emulator"
SUBJECT: Final = "system:serviceaccount:apps:lakeproxy"
CLI_PATH: Final = "/_emulator/cli/{tool}"

CliState = Literal["logged-in", "logged-out", "refresh-expired"]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


class IdentityProviders:
    """The principals besides the workspace's service principal, and their providers.

    ``user`` is a workspace user (the Databricks CLI and the Azure CLI sign in as
    them); ``entra_client_id``/``entra_client_secret``/``tenant_id`` an Entra
    service principal; ``msi_client_id`` a user-assigned and ``msi_system_id`` the
    system-assigned managed identity; the workspace's own service principal is
    the one workload identity federation signs in as.
    """

    def __init__(self, workspace: FakeWorkspace, *, suffix: str | None = None) -> None:
        tag = suffix or secrets.token_hex(4)
        self.workspace = workspace
        self.user = f"dev-{tag}@example.com"
        self.tenant_id = str(uuid.uuid4())
        self.entra_client_id = str(uuid.uuid4())
        self.entra_client_secret = "entra~" + secrets.token_urlsafe(24)
        self.msi_client_id = str(uuid.uuid4())
        self.msi_system_id = str(uuid.uuid4())
        self.identity_header = secrets.token_hex(16)
        self.databricks_cli: CliState = "logged-in"
        self.az_cli: CliState = "logged-in"
        #: omit ``expires_on`` from az's answer, as az before 2.54 does
        self.az_legacy_output = False
        #: the fake Databricks CLI hands back its cached token until it has less
        #: than this many seconds left, as the real one does (golang.org/x/oauth2
        #: refreshes 10 s before expiry)
        self.cli_refresh_window = 10.0
        self._cli_token: tuple[str, float] | None = None
        #: profiles the fake Databricks CLI knows (``--profile``)
        self.cli_profiles: set[str] = {"emulator"}
        #: every CLI run: (tool, argv)
        self.cli_calls: list[tuple[str, list[str]]] = []
        #: every token issued, by provider ("exchange", "entra", "msi", "databricks-cli", "az")
        self.issued: dict[str, int] = {}
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._kid = secrets.token_hex(8)

    @property
    def principals(self) -> tuple[str, ...]:
        """Every principal that may sign in here (each needs a Postgres role)."""
        return (self.user, self.entra_client_id, self.msi_client_id, self.msi_system_id)

    def reset(self) -> None:
        """Back to signed-in CLIs and no recorded calls."""
        self.databricks_cli = self.az_cli = "logged-in"
        self.az_legacy_output = False
        self.cli_refresh_window = 10.0
        self._cli_token = None
        self.cli_calls.clear()
        self.issued.clear()

    # ------------------------------------------------------------------ tokens

    def _issue(self, provider: str, principal: str, lifetime: float | None = None
               ) -> tuple[str, float]:
        self.issued[provider] = self.issued.get(provider, 0) + 1
        return self.workspace.issue_oauth_token(principal, lifetime)

    def workload_jwt(
        self,
        *,
        subject: str = SUBJECT,
        audience: str = AUDIENCE,
        issuer: str = ISSUER,
        lifetime: float = 600.0,
        foreign_key: bool = False,
    ) -> str:
        """A workload identity token (RS256) as the workload's IdP would issue it.

        ``foreign_key`` signs it with a key the emulator does not trust;
        a negative ``lifetime`` makes it already expired.
        """
        now = time.time()
        header = {"alg": "RS256", "typ": "JWT", "kid": self._kid}
        claims = {"iss": issuer, "aud": audience, "sub": subject, "iat": int(now),
                  "nbf": int(now) - 5, "exp": int(now + lifetime)}
        signing = ".".join((_b64url(json.dumps(header).encode()),
                            _b64url(json.dumps(claims).encode())))
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if (
            foreign_key) else self._key
        signature = key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing}.{_b64url(signature)}"

    def _verify(self, jwt: str) -> dict[str, object] | str:
        """The JWT's claims, or why it is refused."""
        parts = jwt.split(".")
        if len(parts) != 3:
            return "The subject token is not a JWT"
        try:
            header = json.loads(_unb64url(parts[0]))
            claims = json.loads(_unb64url(parts[1]))
            signature = _unb64url(parts[2])
        except (ValueError, UnicodeDecodeError):
            return "The subject token is not a JWT"
        if not isinstance(header, dict) or not isinstance(claims, dict):
            return "The subject token is not a JWT"
        if header.get("alg") not in ("RS256",):
            return "The subject token must be signed with RS256 or ES256"
        try:
            self._key.public_key().verify(signature, f"{parts[0]}.{parts[1]}".encode(),
                                          padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return "Signature verification failed for the subject token (no matching key " \
                   f"in the JWKS of issuer {claims.get('iss')!s})"
        return claims

    def token_exchange(self, form: Mapping[str, object]) -> web.Response:
        """The token-exchange grant of ``/oidc/v1/token``."""
        if form.get("subject_token_type") != "urn:ietf:params:oauth:token-type:jwt":
            return _oauth_error(400, "invalid_request",
                                "subject_token_type must be urn:ietf:params:oauth:token-type:jwt")
        if "all-apis" not in str(form.get("scope", "")).split():
            return _oauth_error(400, "invalid_scope",
                                "Requested scope is invalid (use scope=all-apis)")
        subject = form.get("subject_token")
        if not isinstance(subject, str) or not subject:
            return _oauth_error(400, "invalid_request", "subject_token is required")
        claims = self._verify(subject)
        if isinstance(claims, str):
            return _oauth_error(401, "invalid_grant", claims)
        if claims.get("iss") != ISSUER:
            return _oauth_error(
                401, "invalid_grant",
                f"No federation policy trusts the token's issuer {claims.get('iss')!s}")
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if AUDIENCE not in audiences:
            return _oauth_error(
                401, "invalid_grant",
                f"The token's audience {aud!s} is not one the federation policy allows")
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or exp <= time.time():
            return _oauth_error(401, "invalid_grant", "The subject token has expired")
        client_id = form.get("client_id")
        sub = claims.get("sub")
        if client_id:
            if client_id != self.workspace.client_id:
                return _oauth_error(401, "invalid_client",
                                    f"Service principal {client_id!s} has no federation policy")
            if sub != SUBJECT:
                return _oauth_error(
                    401, "invalid_grant",
                    f"The token's subject {sub!s} does not match the federation policy of "
                    f"service principal {client_id!s}")
            principal = self.workspace.client_id
        else:
            if sub != self.user:  # the account-wide policy maps sub to a user
                return _oauth_error(401, "invalid_grant",
                                    f"No user matches the token's subject {sub!s}")
            principal = self.user
        life = min(self.workspace.oauth_lifetime, float(exp) - time.time())
        token, _ = self._issue("exchange", principal, life)
        return web.json_response({"access_token": token, "token_type": "Bearer",
                                  "scope": "all-apis", "expires_in": int(life)})

    # ------------------------------------------------------------------ HTTP

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._entra_token)
        app.router.add_get("/msi/token", self._app_service_msi)
        app.router.add_get("/metadata/identity/oauth2/token", self._imds)
        app.router.add_post(CLI_PATH.format(tool="{tool}"), self._cli)

    async def _entra_token(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        form = await request.post()
        if tenant != self.tenant_id:
            return _oauth_error(
                400, "invalid_request",
                f"AADSTS90002: Tenant '{tenant}' not found. Check to make sure you have the "
                "correct tenant ID and are signing into the correct cloud.")
        if form.get("grant_type") != "client_credentials":
            return _oauth_error(400, "unsupported_grant_type",
                                "AADSTS70003: The app requested an unsupported grant type.")
        client_id = str(form.get("client_id", ""))
        if client_id != self.entra_client_id:
            return _oauth_error(
                400, "unauthorized_client",
                f"AADSTS700016: Application with identifier '{client_id}' was not found in "
                f"the directory '{tenant}'.")
        if not secrets.compare_digest(str(form.get("client_secret", "")),
                                      self.entra_client_secret):
            return _oauth_error(
                401, "invalid_client",
                "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent "
                "in the request is the client secret value, not the client secret ID, for a "
                f"secret added to app '{client_id}'.")
        if form.get("scope") != f"{AZURE_DATABRICKS_RESOURCE}/.default":
            return _oauth_error(
                400, "invalid_scope",
                f"AADSTS70011: The provided value for scope {form.get('scope')!s} is not valid.")
        token, expiry = self._issue("entra", self.entra_client_id)
        life = int(expiry - time.time())
        return web.json_response({"token_type": "Bearer", "expires_in": life,
                                  "ext_expires_in": life, "access_token": token})

    def _msi_principal(self, request: web.Request) -> str | web.Response:
        if request.query.get("resource") != AZURE_DATABRICKS_RESOURCE:
            return _oauth_error(400, "invalid_resource",
                                "AADSTS500011: The resource principal was not found.")
        client_id = request.query.get("client_id")
        if client_id is None:
            return self.msi_system_id
        if client_id != self.msi_client_id:
            return _oauth_error(400, "invalid_request", "Identity not found")
        return self.msi_client_id

    def _msi_answer(self, principal: str, *, imds: bool) -> web.Response:
        token, expiry = self._issue("msi", principal)
        body = {"access_token": token, "expires_on": str(int(expiry)),
                "resource": AZURE_DATABRICKS_RESOURCE, "token_type": "Bearer"}
        if imds:
            body.update(expires_in=str(int(expiry - time.time())), refresh_token="",
                        not_before=str(int(time.time())))
        else:
            body["client_id"] = principal
        return web.json_response(body)

    async def _app_service_msi(self, request: web.Request) -> web.Response:
        header = request.headers.get("X-IDENTITY-HEADER", "")
        if not secrets.compare_digest(header, self.identity_header):
            return web.json_response(
                {"statusCode": 401, "message": "Unauthorized: X-IDENTITY-HEADER is missing "
                 "or does not match"}, status=401)
        if request.query.get("api-version") != "2019-08-01":
            return _oauth_error(400, "invalid_request", "api-version must be 2019-08-01")
        principal = self._msi_principal(request)
        if isinstance(principal, web.Response):
            return principal
        return self._msi_answer(principal, imds=False)

    async def _imds(self, request: web.Request) -> web.Response:
        if request.headers.get("Metadata") != "true":
            return _oauth_error(400, "invalid_request", "Required metadata header not specified")
        if not request.query.get("api-version"):
            return _oauth_error(400, "invalid_request", "Required query variable "
                                "'api-version' is missing")
        principal = self._msi_principal(request)
        if isinstance(principal, web.Response):
            return principal
        return self._msi_answer(principal, imds=True)

    # ------------------------------------------------------------------ fake CLIs

    async def _cli(self, request: web.Request) -> web.Response:
        tool = request.match_info["tool"]
        data = await request.json()
        argv = [str(a) for a in data.get("argv", [])]
        self.cli_calls.append((tool, argv))
        if tool == "databricks":
            code, out, err = self._databricks(argv)
        elif tool == "az":
            code, out, err = self._az(argv)
        else:
            return web.json_response({"error": "unknown tool"}, status=404)
        return web.json_response({"code": code, "stdout": out, "stderr": err})

    def _databricks(self, argv: list[str]) -> tuple[int, str, str]:
        if argv[:2] != ["auth", "token"]:
            return 1, "", f"Error: unknown command {' '.join(argv[:2])!r} for \"databricks\"\n"
        opts = dict(zip(argv[2::2], argv[3::2], strict=False))
        host, profile = opts.get("--host"), opts.get("--profile")
        where = f"--profile {profile}" if profile else f"--host {host}"
        if profile is not None and profile not in self.cli_profiles:
            return 1, "", f"Error: profile {profile!r} not found in ~/.databrickscfg\n"
        if host is not None and host.rstrip("/") != self.workspace.url:
            return 1, "", (f"Error: cache: databricks OAuth is not configured for this host. "
                           f"Try logging in again with `databricks auth login {where}` before "
                           "retrying.\n")
        if self.databricks_cli == "logged-out":
            return 1, "", (f"Error: cache: databricks OAuth is not configured for this host. "
                           f"Try logging in again with `databricks auth login {where}` before "
                           "retrying.\n")
        if self.databricks_cli == "refresh-expired":
            return 1, "", ("Error: A new access token could not be retrieved because the "
                           "refresh token is invalid. If using the CLI, run the following "
                           f"command to reauthenticate:\n  $ databricks auth login {where}\n")
        cached = self._cli_token
        if cached is not None and cached[1] - time.time() > self.cli_refresh_window and (
                cached[0] in self.workspace._oauth_tokens):
            token, expiry = cached
        else:  # refresh with the stored refresh token
            token, expiry = self._issue("databricks-cli", self.user)
            self._cli_token = (token, expiry)
        # oauth2.Token as the CLI prints it: expiry in local time with its offset.
        local = datetime.fromtimestamp(expiry).astimezone().isoformat()
        out = json.dumps({"access_token": token, "token_type": "Bearer", "expiry": local},
                         indent=2)
        return 0, out + "\n", ""

    def _az(self, argv: list[str]) -> tuple[int, str, str]:
        if argv[:2] != ["account", "get-access-token"]:
            return 2, "", f"ERROR: '{' '.join(argv[:2])}' is misspelled or not recognized.\n"
        opts = dict(zip(argv[2::2], argv[3::2], strict=False))
        if self.az_cli == "logged-out":
            return 1, "", "ERROR: Please run 'az login' to setup account.\n"
        if self.az_cli == "refresh-expired":
            return 1, "", (
                "ERROR: AADSTS700082: The refresh token has expired due to inactivity. The "
                "token was issued on 2026-08-01T00:00:00Z and was inactive for 90.00:00:00.\n"
                "Interactive authentication is needed. Please run:\n"
                f"az login --scope {AZURE_DATABRICKS_RESOURCE}/.default\n")
        if opts.get("--resource") != AZURE_DATABRICKS_RESOURCE:
            return 1, "", "ERROR: AADSTS500011: The resource principal was not found.\n"
        token, expiry = self._issue("az", self.user)
        body: dict[str, object] = {
            "accessToken": token,
            "expiresOn": datetime.fromtimestamp(expiry).strftime("%Y-%m-%d %H:%M:%S.%f"),
            "subscription": str(uuid.uuid5(uuid.NAMESPACE_DNS, self.tenant_id)),
            "tenant": self.tenant_id,
            "tokenType": "Bearer",
        }
        if not self.az_legacy_output:
            body["expires_on"] = int(expiry)
        return 0, json.dumps(body, indent=2) + "\n", ""

    def write_fake_clis(self, directory: Path) -> Path:
        """Write ``databricks`` and ``az`` executables into ``directory`` (for PATH)."""
        directory.mkdir(parents=True, exist_ok=True)
        for tool in ("databricks", "az"):
            url = self.workspace.url + CLI_PATH.format(tool=tool)
            script = directory / tool
            script.write_text(_FAKE_CLI.format(python=sys.executable, url=url, tool=tool))
            script.chmod(0o755)
        return directory


_FAKE_CLI: Final = '''#!{python}
"""The emulator's fake `{tool}` CLI: the answer comes from the emulator."""
import json
import sys
import urllib.request

request = urllib.request.Request(
    "{url}", data=json.dumps({{"argv": sys.argv[1:]}}).encode(),
    headers={{"Content-Type": "application/json"}},
)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({{}}))
try:
    with opener.open(request, timeout=30) as response:
        answer = json.load(response)
except OSError as exc:
    sys.stderr.write(f"ERROR: cannot reach the emulator: {{exc}}\\n")
    sys.exit(1)
sys.stdout.write(answer["stdout"])
sys.stderr.write(answer["stderr"])
sys.exit(answer["code"])
'''
