"""What lakeproxy writes: JSON lines that parse, the session-end and start-up
lines, and no secret anywhere, at debug level, on every path we can drive.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path

import psycopg
import pytest

from lakeproxy.emulator import Emulator, api
from lakeproxy.emulator.api import OIDC_PATH, POSTGRES_CREDENTIALS_PATH
from lakeproxy.emulator.certs import make_certs

from .proxy_process import ProxyProcess, psql, run_cli, running

DB = "databricks_postgres"
T = 90
PASSWORD = "pw-for-clients-" + "c0ffee" * 4
SESSION_END_FIELDS = {"client", "database", "duration_s", "bytes_up", "bytes_down",
                      "closed_by", "outcome"}


def _env(emu: Emulator, **extra: str) -> dict[str, str]:
    return {**emu.env(), "LAKEPROXY_LISTEN": "127.0.0.1:0",
            "LAKEPROXY_ADMIN_LISTEN": "127.0.0.1:0", **extra}


def _conninfo(p: ProxyProcess, **extra: str) -> str:
    params = {"host": "127.0.0.1", "port": str(p.tcp_port()), "dbname": DB, "user": "app",
              "connect_timeout": "30", **extra}
    return " ".join(f"{k}={v}" for k, v in params.items())


async def test_json_lines(emulator: Emulator) -> None:
    env = _env(emulator, LAKEPROXY_LOG_FORMAT="json", LAKEPROXY_LOG_LEVEL="debug")
    async with asyncio.timeout(T), running(env) as p:
        code, out, err = await psql(_conninfo(p), "SELECT 1")
        assert (code, out) == (0, "1\n"), err
        code, _, _ = await psql(_conninfo(p, dbname="nope"), "SELECT 1")
        assert code == 2
        assert (await p.get("/readyz"))[0] == 200
        await p.wait_for_line("session end")
        p.signal(signal.SIGTERM)
        assert await p.wait() == 0

    assert len(p.stderr) >= 5
    records = []
    for line in p.stderr:
        obj = json.loads(line)  # every line, debug included, is one JSON object
        assert isinstance(obj, dict)
        assert {"ts", "level", "logger", "msg"} <= obj.keys(), obj
        assert obj["level"] in ("debug", "info", "warning", "error")
        records.append(obj)
    assert any(r["level"] == "debug" for r in records)

    startup = [r for r in records if r["msg"].startswith("lakeproxy listening on")]
    assert len(startup) == 1
    assert p.listen[0] in startup[0]["msg"]
    assert emulator.endpoint_name in startup[0]["msg"]
    assert f"as {emulator.role}" in startup[0]["msg"]
    assert f"admin on {p.admin}" in startup[0]["msg"]

    ends = [r for r in records if r["msg"] == "session end"]
    assert len(ends) == 2
    ok, rejected = sorted(ends, key=lambda r: r["outcome"])
    for r in ends:
        assert r.keys() >= SESSION_END_FIELDS, r
        assert r["client"].startswith("127.0.0.1:")
        assert isinstance(r["duration_s"], float | int)
        assert r["level"] == "info"
    assert ok["outcome"] == "ok"
    assert ok["database"] == DB
    assert ok["closed_by"] == "client"
    assert ok["bytes_up"] > 0
    assert ok["bytes_down"] > 0
    assert rejected["outcome"] == "rejected"
    assert rejected["database"] == "nope"
    assert rejected["sqlstate"] == "3D000"


def _text_fields(line: str) -> dict[str, str]:
    return dict(w.split("=", 1) for w in line.split() if "=" in w)


async def test_text_session_end_line(emulator: Emulator) -> None:
    async with asyncio.timeout(T), running(_env(emulator)) as p:
        code, _, err = await psql(_conninfo(p), "SELECT 1")
        assert code == 0, err
        line = await p.wait_for_line("session end")
    assert " INFO lakeproxy.server: session end " in line
    fields = _text_fields(line)
    assert fields.keys() >= SESSION_END_FIELDS
    assert fields["outcome"] == "ok"
    assert fields["database"] == DB


# --------------------------------------------------------------------------- no secrets


@pytest.fixture
def minted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every token the emulator mints from now on (OAuth tokens and database credentials)."""
    tokens: list[str] = []
    real = api._fake_jwt

    def recording(subject: str, lifetime: float, **claims: object) -> str:
        token = real(subject, lifetime, **claims)
        tokens.append(token)
        return token

    monkeypatch.setattr(api, "_fake_jwt", recording)
    return tokens


def _needles(secrets: list[str], tokens: list[str]) -> list[str]:
    """The secrets, each token, and each part of a token (a JWT cut at its dots)."""
    out = list(secrets)
    for token in tokens:
        out.append(token)
        out.extend(part for part in token.split(".") if len(part) >= 16)
    return out


async def test_no_secret_in_any_output_at_debug(
    emulator: Emulator, minted: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # the emulator runs in this process: its logs too
    ws = emulator.workspace
    tls = make_certs(tmp_path / "tls", ["localhost", "127.0.0.1"])
    config = tmp_path / "lakeproxy.toml"
    config.write_text("[proxy]\nmax_clients = 50\n")
    env = _env(emulator, LAKEPROXY_LOG_LEVEL="debug", LAKEPROXY_CLIENT_PASSWORD=PASSWORD,
               LAKEPROXY_TLS_CERT=str(tls.cert_file), LAKEPROXY_TLS_KEY=str(tls.key_file),
               LAKEPROXY_CONFIG=str(config))
    outputs: list[str] = []
    secrets = [emulator.client_secret, PASSWORD]

    async with asyncio.timeout(T), running(env) as p:
        await p.wait_ready()
        verified = _conninfo(p, host="localhost", hostaddr="127.0.0.1",
                             sslmode="verify-full", sslrootcert=str(tls.ca_file))

        # Sessions that work: psql over TLS, psycopg with direct TLS.
        code, out, err = await psql(verified, "SELECT current_user", password=PASSWORD)
        assert (code, out) == (0, f"{emulator.role}\n"), err
        async with await psycopg.AsyncConnection.connect(
            verified, password=PASSWORD, sslnegotiation="direct"
        ) as conn:
            await conn.execute("SELECT 1")
        outputs.append(out + err)

        # A wrong client password.
        code, out, err = await psql(verified, "SELECT 1", password="wrong-" + PASSWORD)
        assert code == 2
        outputs.append(out + err)

        # The endpoint refuses the cached credential (revoked) and the credential API
        # fails twice with 500 before the re-mint works.
        ws.revoke_credentials()
        ws.inject(POSTGRES_CREDENTIALS_PATH, status=500, count=2)
        code, out, err = await psql(verified, "SELECT 2", password=PASSWORD)
        assert (code, out) == (0, "2\n"), err
        outputs.append(out + err)

        # Both tokens refused: step 2 gets a 401, step 1 is redone.
        ws.revoke_credentials()
        ws.revoke_oauth_tokens()
        code, out, err = await psql(verified, "SELECT 3", password=PASSWORD)
        assert (code, out) == (0, "3\n"), err
        outputs.append(out + err)

        # The credential API refuses outright (403): 28000 to the client.
        ws.revoke_credentials()
        ws.inject(POSTGRES_CREDENTIALS_PATH, status=403)
        code, out, err = await psql(verified, "SELECT 4", password=PASSWORD)
        assert code == 2
        assert "lakeproxy:" in err
        outputs.append(out + err)

        # The endpoint's own error (no such database).
        code, out, err = await psql(verified.replace(f"dbname={DB}", "dbname=missing"),
                                    "SELECT 5", password=PASSWORD)
        assert code == 2
        outputs.append(out + err)

        # Probes, a reload, a broken reload, shutdown.
        for path in ("/healthz", "/readyz", "/metrics"):
            outputs.append((await p.get(path))[1])
        p.signal(signal.SIGHUP)
        await p.wait_for_line("configuration reloaded")
        config.write_text("[proxy\n")
        p.signal(signal.SIGHUP)
        await p.wait_for_line("reload failed")
        config.write_text("[proxy]\nmax_clients = 50\n")
        p.signal(signal.SIGTERM)
        assert await p.wait() == 0
    outputs.append(p.output)
    assert ws.calls[OIDC_PATH] >= 2
    logged = "\n".join(p.stderr)
    # The paths above did happen (and debug was on).
    for seen in ("POST /oidc/v1/token -> 200", "/api/2.0/postgres/credentials -> 500",
                 "/api/2.0/postgres/credentials -> 403", "-> 401", "refused the credential",
                 "outcome=client_error", "outcome=credential_error", "outcome=rejected",
                 "GET /metrics -> 200"):
        assert seen in logged, "\n".join(ln for ln in p.stderr if "session end" in ln)

    # lakeproxy token: the token on stdout is its job; nowhere else.
    code, out, err = await run_cli({**env, "LAKEPROXY_LOG_LEVEL": "debug"}, ["token"])
    assert code == 0, err
    printed = out.strip()
    assert printed in minted
    assert any(n in out for n in _needles([], minted))  # the grep below would see one
    outputs.append(err)
    for secret in secrets:
        assert secret not in out

    # lakeproxy check, and a run refused for a bad setting, at debug.
    code, out, err = await run_cli({**env, "LAKEPROXY_LOG_LEVEL": "debug"}, ["check"])
    outputs.append(out + err)
    code, out, err = await run_cli({**env, "LAKEBASE_SSLMODE": "disable"}, ["run"])
    assert code == 2
    outputs.append(out + err)
    ws.inject(OIDC_PATH, status=401)
    code, out, err = await run_cli({**env, "LAKEPROXY_LOG_LEVEL": "debug"}, ["token"])
    assert code != 0
    outputs.append(out + err)

    outputs.append(caplog.text)
    haystack = "\n".join(outputs)
    assert len(minted) >= 8  # OAuth tokens and credentials from the paths above
    leaks = [n for n in _needles(secrets, minted) if n in haystack]
    assert not leaks, f"{len(leaks)} secret(s) found in the output"
