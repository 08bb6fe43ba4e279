"""Workspace sign-in methods end to end: psql through the proxy, the emulator
playing each identity provider (SPEC "Workspace sign-in").

Every method: it signs in and logs in as the signed-in identity (SCIM Me, asked
once); its token is refreshed under an open session; each documented failure
reaches a waiting client as 28000 with the provider's own text and the fix.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import asyncpg
import pytest

from lakeproxy.emulator import Emulator

from .conftest import ProxyFactory
from .proxy_rig import Proxy, eventually

SCIM_ME = "/api/2.0/preview/scim/v2/Me"
#: method -> the emulator's provider counter that method's tokens come from
PROVIDER = {
    "databricks-cli": "databricks-cli", "env-oidc": "exchange", "file-oidc": "exchange",
    "azure-client-secret": "entra", "azure-cli": "az", "azure-msi": "msi",
}
METHODS = sorted(PROVIDER)


def identity_of(emulator: Emulator, method: str) -> str:
    """The name SCIM Me gives for whoever ``method`` signs in as."""
    ident = emulator.identity
    return {
        "databricks-cli": ident.user, "azure-cli": ident.user,
        "env-oidc": emulator.client_id, "file-oidc": emulator.client_id,
        "azure-client-secret": ident.entra_client_id, "azure-msi": ident.msi_system_id,
    }[method]


async def current_user(p: Proxy) -> str:
    return (await p.psql("SELECT current_user")).strip()


async def refused(p: Proxy) -> asyncpg.PostgresError:
    """The error a client waiting for a login gets."""
    with pytest.raises(asyncpg.PostgresError) as info:
        await p.asyncpg()
    return info.value


# --------------------------------------------------------------------------- success


@pytest.mark.parametrize("method", METHODS)
async def test_signs_in_and_logs_in_as_the_signed_in_identity(
    emulator: Emulator, proxy: ProxyFactory, method: str
) -> None:
    async with asyncio.timeout(60):
        p = await proxy(emulator.signin_env(method))
        users = [await current_user(p) for _ in range(3)]
    assert users == [identity_of(emulator, method)] * 3
    assert emulator.identity.issued.get(PROVIDER[method], 0) >= 1
    assert emulator.workspace.calls[SCIM_ME] == 1  # asked once, then remembered


async def test_oauth_m2m_logs_in_as_the_client_id_without_asking(
    emulator: Emulator, proxy: ProxyFactory
) -> None:
    async with asyncio.timeout(30):
        p = await proxy(emulator.signin_env("oauth-m2m"))
        assert await current_user(p) == emulator.client_id
    assert emulator.workspace.calls[SCIM_ME] == 0


async def test_databricks_cli_with_a_profile_passes_profile(
    emulator: Emulator, proxy: ProxyFactory, tmp_path: Path
) -> None:
    cfg = tmp_path / "databrickscfg"
    cfg.write_text(f"[emulator]\nhost = {emulator.workspace.url}\nauth_type = databricks-cli\n")
    env = emulator.signin_env("databricks-cli")
    del env["DATABRICKS_HOST"], env["DATABRICKS_AUTH_TYPE"]  # both from the profile
    env.update(DATABRICKS_CONFIG_FILE=str(cfg), DATABRICKS_CONFIG_PROFILE="emulator")
    async with asyncio.timeout(30):
        p = await proxy(env)
        assert await current_user(p) == emulator.identity.user
    assert ("databricks", ["auth", "token", "--profile", "emulator"]) in (
        emulator.identity.cli_calls)


async def test_databricks_cli_is_chosen_when_only_a_host_is_configured(
    emulator: Emulator, proxy: ProxyFactory
) -> None:
    env = emulator.signin_env("databricks-cli")
    del env["DATABRICKS_AUTH_TYPE"]
    async with asyncio.timeout(30):
        p = await proxy(env)
        assert await current_user(p) == emulator.identity.user
    assert emulator.identity.cli_calls[0] == (
        "databricks", ["auth", "token", "--host", emulator.workspace.url])


async def test_azure_cli_before_2_54_gives_only_expires_on_in_local_time(
    emulator: Emulator, proxy: ProxyFactory
) -> None:
    emulator.identity.az_legacy_output = True
    async with asyncio.timeout(30):
        p = await proxy(emulator.signin_env("azure-cli"))
        assert await current_user(p) == emulator.identity.user


async def test_azure_msi_user_assigned_identity(emulator: Emulator, proxy: ProxyFactory) -> None:
    env = {**emulator.signin_env("azure-msi"), "ARM_CLIENT_ID": emulator.identity.msi_client_id}
    async with asyncio.timeout(30):
        p = await proxy(env)
        assert await current_user(p) == emulator.identity.msi_client_id
    assert emulator.workspace.calls["/metadata/identity/oauth2/token"] >= 1


async def test_azure_msi_app_service_endpoint(emulator: Emulator, proxy: ProxyFactory) -> None:
    env = {**emulator.signin_env("azure-msi"),
           "IDENTITY_ENDPOINT": emulator.workspace.url + "/msi/token",
           "IDENTITY_HEADER": emulator.identity.identity_header}
    async with asyncio.timeout(30):
        p = await proxy(env)
        assert await current_user(p) == emulator.identity.msi_system_id
    assert emulator.workspace.calls["/msi/token"] >= 1
    assert emulator.workspace.calls["/metadata/identity/oauth2/token"] == 0


async def test_a_configured_role_wins_over_the_identity(
    emulator: Emulator, proxy: ProxyFactory
) -> None:
    env = {**emulator.signin_env("azure-cli"), "LAKEBASE_USER": emulator.identity.user}
    async with asyncio.timeout(30):
        p = await proxy(env)
        assert await current_user(p) == emulator.identity.user
    assert emulator.workspace.calls[SCIM_ME] == 0


# --------------------------------------------------------------------------- refresh


@pytest.mark.parametrize("method", METHODS)
async def test_token_is_refreshed_under_an_open_session(
    emulator: Emulator, proxy: ProxyFactory, method: str
) -> None:
    ws, ident = emulator.workspace, emulator.identity
    ws.oauth_lifetime = 3.0
    ws.credential_lifetime = 3.0
    provider = PROVIDER[method]
    async with asyncio.timeout(60):
        p = await proxy(emulator.signin_env(method))
        conn = await p.asyncpg()
        try:
            assert await conn.fetchval("SELECT current_user") == identity_of(emulator, method)

            async def refreshed() -> bool:
                return ident.issued.get(provider, 0) >= 3

            # Three tokens, 1.5 s apart (half their lifetime): the first has expired.
            await eventually(refreshed, timeout=30)
            # A new login needs a database credential minted with a fresh token.
            assert await current_user(p) == identity_of(emulator, method)
            assert await conn.fetchval("SELECT 41 + 1") == 42  # the open session never noticed
        finally:
            await conn.close()


async def test_file_oidc_reads_the_file_at_every_exchange(
    emulator: Emulator, proxy: ProxyFactory
) -> None:
    env = emulator.signin_env("file-oidc")
    token_file = Path(env["DATABRICKS_OIDC_TOKEN_FILE"])
    token_file.write_text(emulator.identity.workload_jwt(lifetime=-60))  # expired
    async with asyncio.timeout(30):
        p = await proxy(env, warm=False)
        exc = await refused(p)
        assert "The subject token has expired" in exc.message
        token_file.write_text(emulator.identity.workload_jwt())  # the kubelet rotated it
        assert await current_user(p) == emulator.client_id


# --------------------------------------------------------------------------- failures


async def assert_refused(p: Proxy, *texts: str, fix: str) -> None:
    exc = await refused(p)
    assert exc.sqlstate == "28000", exc
    assert exc.message.startswith("lakeproxy:"), exc.message
    for text in texts:
        assert text in exc.message, exc.message
    assert exc.hint is not None
    assert fix in exc.hint, exc.hint


async def test_databricks_cli_not_logged_in(emulator: Emulator, proxy: ProxyFactory) -> None:
    emulator.identity.databricks_cli = "logged-out"
    async with asyncio.timeout(30):
        p = await proxy(emulator.signin_env("databricks-cli"), warm=False)
        await assert_refused(
            p, "databricks OAuth is not configured for this host",
            fix=f"run `databricks auth login --host {emulator.workspace.url}`",
        )


async def test_databricks_cli_refresh_token_expired(
    emulator: Emulator, proxy: ProxyFactory
) -> None:
    emulator.identity.databricks_cli = "refresh-expired"
    async with asyncio.timeout(30):
        p = await proxy(emulator.signin_env("databricks-cli"), warm=False)
        await assert_refused(p, "the refresh token is invalid",
                             fix="run `databricks auth login --host")


async def test_databricks_cli_missing(
    emulator: Emulator, proxy: ProxyFactory, tmp_path: Path
) -> None:
    env = {**emulator.signin_env("databricks-cli"),
           "DATABRICKS_CLI_PATH": str(tmp_path / "no-such-databricks")}
    async with asyncio.timeout(30):
        p = await proxy(env, warm=False)
        await assert_refused(
            p, "not found",
            fix=f"install the Databricks CLI (or set DATABRICKS_CLI_PATH) and run "
                f"`databricks auth login --host {emulator.workspace.url}`",
        )


@pytest.mark.parametrize(
    ("jwt_args", "text"),
    [
        ({"foreign_key": True}, "Signature verification failed"),
        ({"issuer": "https://evil.example.com"}, "No federation policy trusts the token's issuer"),
        ({"audience": "someone-else"}, "is not one the federation policy allows"),
        ({"lifetime": -60}, "The subject token has expired"),
        ({"subject": "system:serviceaccount:other:app"}, "does not match the federation policy"),
    ],
)
async def test_env_oidc_refusals(
    emulator: Emulator, proxy: ProxyFactory, jwt_args: dict[str, object], text: str
) -> None:
    env = {**emulator.signin_env("env-oidc"),
           "DATABRICKS_OIDC_TOKEN": emulator.identity.workload_jwt(**jwt_args)}  # type: ignore[arg-type]
    async with asyncio.timeout(30):
        p = await proxy(env, warm=False)
        await assert_refused(p, text, fix="match the federation policy of service principal")


async def test_env_oidc_without_client_id_uses_the_account_policy(
    emulator: Emulator, proxy: ProxyFactory
) -> None:
    env = emulator.signin_env("env-oidc")
    del env["DATABRICKS_CLIENT_ID"]
    env["DATABRICKS_OIDC_TOKEN"] = emulator.identity.workload_jwt(subject=emulator.identity.user)
    async with asyncio.timeout(30):
        p = await proxy(env)
        assert await current_user(p) == emulator.identity.user
    exchange = [r for r in emulator.workspace.requests if r.path == "/oidc/v1/token"]
    assert exchange
    assert all(b"client_id" not in r.body for r in exchange)


async def test_file_oidc_file_missing(
    emulator: Emulator, proxy: ProxyFactory, tmp_path: Path
) -> None:
    env = {**emulator.signin_env("file-oidc"),
           "DATABRICKS_OIDC_TOKEN_FILE": str(tmp_path / "not-mounted")}
    async with asyncio.timeout(30):
        p = await proxy(env, warm=False)
        await assert_refused(p, "cannot read DATABRICKS_OIDC_TOKEN_FILE",
                             fix="mount the workload's identity token at that path")


@pytest.mark.parametrize(
    ("change", "text"),
    [
        ({"ARM_CLIENT_SECRET": "wrong-secret"}, "AADSTS7000215: Invalid client secret provided"),
        ({"ARM_TENANT_ID": "00000000-0000-0000-0000-000000000000"}, "AADSTS90002: Tenant"),
        ({"ARM_CLIENT_ID": "11111111-1111-1111-1111-111111111111"}, "AADSTS700016"),
    ],
)
async def test_azure_client_secret_refusals(
    emulator: Emulator, proxy: ProxyFactory, change: dict[str, str], text: str
) -> None:
    async with asyncio.timeout(30):
        p = await proxy({**emulator.signin_env("azure-client-secret"), **change}, warm=False)
        exc = await refused(p)
    assert exc.sqlstate == "28000"
    assert text in exc.message, exc.message
    assert exc.hint is not None
    assert "check ARM_CLIENT_ID, ARM_CLIENT_SECRET and ARM_TENANT_ID" in exc.hint
    assert "wrong-secret" not in exc.message + exc.hint


@pytest.mark.parametrize(
    ("state", "text"),
    [("logged-out", "Please run 'az login' to setup account"),
     ("refresh-expired", "AADSTS700082: The refresh token has expired")],
)
async def test_azure_cli_refusals(
    emulator: Emulator, proxy: ProxyFactory, state: str, text: str
) -> None:
    emulator.identity.az_cli = state  # type: ignore[assignment]
    async with asyncio.timeout(30):
        p = await proxy(emulator.signin_env("azure-cli"), warm=False)
        await assert_refused(p, text, fix="run `az login`")


async def test_azure_cli_missing(emulator: Emulator, proxy: ProxyFactory, tmp_path: Path) -> None:
    env = {**emulator.signin_env("azure-cli"), "PATH": str(tmp_path)}  # no az on PATH
    async with asyncio.timeout(30):
        p = await proxy(env, warm=False)
        await assert_refused(p, "az not found", fix="install the Azure CLI and run `az login`")


async def test_azure_msi_unknown_identity(emulator: Emulator, proxy: ProxyFactory) -> None:
    env = {**emulator.signin_env("azure-msi"),
           "ARM_CLIENT_ID": "22222222-2222-2222-2222-222222222222"}
    async with asyncio.timeout(30):
        p = await proxy(env, warm=False)
        await assert_refused(
            p, "Identity not found",
            fix="check that the user-assigned identity ARM_CLIENT_ID=22222222-2222-2222-2222-"
                "222222222222 is assigned",
        )


async def test_azure_msi_app_service_wrong_header(
    emulator: Emulator, proxy: ProxyFactory
) -> None:
    env = {**emulator.signin_env("azure-msi"),
           "IDENTITY_ENDPOINT": emulator.workspace.url + "/msi/token",
           "IDENTITY_HEADER": "not-the-header"}
    async with asyncio.timeout(30):
        p = await proxy(env, warm=False)
        exc = await refused(p)
    assert exc.sqlstate == "28000"
    assert "HTTP 401" in exc.message
    assert "not-the-header" not in exc.message + (exc.hint or "")


async def test_workspace_refusing_the_identity_lookup_is_28000(
    emulator: Emulator, proxy: ProxyFactory
) -> None:
    emulator.workspace.inject(SCIM_ME, status=403)
    async with asyncio.timeout(30):
        p = await proxy(emulator.signin_env("azure-cli"), warm=False)
        exc = await refused(p)
    assert exc.sqlstate == "28000"
    assert "signed-in identity" in exc.message


@pytest.mark.parametrize("method", ["databricks-cli", "env-oidc", "azure-client-secret"])
async def test_no_token_or_secret_is_logged(
    emulator: Emulator, proxy: ProxyFactory, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    env = emulator.signin_env(method)
    async with asyncio.timeout(30):
        p = await proxy(env)
        assert await current_user(p) == identity_of(emulator, method)
    ws = emulator.workspace
    secrets = [*ws._oauth_tokens, *ws._credentials, emulator.identity.entra_client_secret]
    if "DATABRICKS_OIDC_TOKEN" in env:
        secrets.append(env["DATABRICKS_OIDC_TOKEN"])
    assert len(secrets) >= 3
    logged = caplog.text
    assert "GET /api/2.0/preview/scim/v2/Me" in logged  # debug logging was on
    assert not [s for s in secrets if s in logged]


async def test_databricks_cli_is_asked_again_until_it_refreshes_its_cached_token(
    emulator: Emulator, proxy: ProxyFactory
) -> None:
    """The CLI hands back its cached token until shortly before expiry; lakeproxy
    keeps asking ahead of expiry and moves to the new token once the CLI has one."""
    ws, ident = emulator.workspace, emulator.identity
    ws.oauth_lifetime = 4.0
    ws.credential_lifetime = 4.0
    ident.cli_refresh_window = 1.0
    async with asyncio.timeout(60):
        p = await proxy(emulator.signin_env("databricks-cli"))
        conn = await p.asyncpg()
        try:

            async def rotated_twice() -> bool:
                return ident.issued.get("databricks-cli", 0) >= 3

            await eventually(rotated_twice, timeout=30)
            runs = sum(1 for tool, _ in ident.cli_calls if tool == "databricks")
            assert runs > ident.issued["databricks-cli"]  # some runs gave back the cached one
            assert await current_user(p) == ident.user
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
