"""``lakeproxy check`` as a user runs it: a subprocess against the emulator."""

from __future__ import annotations

import asyncio
import os
import sys

from lakeproxy.emulator import Emulator


async def _check(env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lakeproxy", "check",
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_check_passes_with_one_line_per_step(emulator: Emulator) -> None:
    env = dict(emulator.env())
    del env["LAKEBASE_HOST"]  # exercise the host lookup step too
    code, out, err = await _check(env)
    assert code == 0, out + err
    lines = [ln for ln in out.splitlines() if ln.startswith("[")]
    steps = [ln[7:30].strip() for ln in lines]
    assert steps == ["workspace token", "identity", "database credential", "endpoint host lookup",
                     "TCP+TLS", "login", "query"]
    assert all(ln.startswith("[  ok]") and " ms " in ln for ln in lines)
    assert f"current_user={emulator.role}" in lines[-1]
    assert "current_database=databricks_postgres" in lines[-1]
    assert emulator.client_secret not in out + err


async def test_check_failure_names_step_cause_and_fix(emulator: Emulator) -> None:
    env = dict(emulator.env())
    env["DATABRICKS_CLIENT_SECRET"] = "definitely-wrong-secret"
    code, out, _ = await _check(env)
    assert code == 1
    assert "[FAIL] workspace token" in out
    assert "invalid_client" in out
    assert "fix: check DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET" in out
    assert "definitely-wrong-secret" not in out


async def test_check_tls_verification_failure_is_reported(emulator: Emulator) -> None:
    env = dict(emulator.env())
    env["LAKEBASE_HOST"] = "wrong-name.example.com"
    code, out, _ = await _check(env)
    assert code == 1
    assert "[FAIL] TCP+TLS" in out
    assert "fix:" in out
    assert "LAKEBASE_SSLROOTCERT" in out


async def test_check_prints_the_sign_in_method_and_identity(emulator: Emulator) -> None:
    code, out, err = await _check(emulator.signin_env("databricks-cli"))
    assert code == 0, out + err
    assert "signing in with databricks-cli" in out.splitlines()[0]
    identity = next(ln for ln in out.splitlines() if ln.startswith("[  ok] identity"))
    assert f"{emulator.identity.user} (logging in as this role)" in identity
    assert f"current_user={emulator.identity.user}" in out


async def test_check_names_the_fix_when_the_cli_is_not_logged_in(emulator: Emulator) -> None:
    emulator.identity.databricks_cli = "logged-out"
    code, out, _ = await _check(emulator.signin_env("databricks-cli"))
    assert code == 1
    assert "[FAIL] workspace token" in out
    assert f"fix: run `databricks auth login --host {emulator.workspace.url}`" in out
