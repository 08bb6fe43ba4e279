"""Dockerfile, .dockerignore and compose.yaml, without a Docker engine.

There is no Docker engine on our machines, so the image is never built here.
Instead these tests read the Dockerfile, check what an image must have (slim
Python base, no build tools in the final stage, a non-root user, EXPOSE 6432,
a HEALTHCHECK on /readyz, ca-certificates), and run the build stage's own
COPY/RUN steps in a fresh virtualenv; the console script installed that way
then serves a client in front of the emulator, with the image's environment,
and the HEALTHCHECK command reports it healthy. compose.yaml is read with a
small parser for the YAML it uses (and PyYAML too, when installed).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lakeproxy import __version__
from lakeproxy.config import load_config
from lakeproxy.emulator import Emulator
from lakeproxy.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "compose.yaml"
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "clang", "python3-dev", "libpq-dev",
               "git", "curl", "wget")


# --------------------------------------------------------------------------- Dockerfile


@dataclass
class Stage:
    base: str
    name: str | None
    steps: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.steps if i == instruction]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions (comments dropped, continuations joined)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "a continued line at the end of the file"
    stages: list[Stage] = []
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        rest = " ".join(rest.split())
        if instruction == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        else:
            assert stages, f"{instruction} before FROM"
            stages[-1].steps.append((instruction, rest))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def final_env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.args("ENV"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def test_every_stage_is_python_311_slim(stages: list[Stage]) -> None:
    assert len(stages) >= 1
    assert all(s.base == "python:3.11-slim" for s in stages), [s.base for s in stages]


def test_final_stage_has_no_build_tools(stages: list[Stage]) -> None:
    final = stages[-1]
    installed: list[str] = []
    for run in final.args("RUN"):
        for command in re.split(r"&&|;", run):
            words = command.split()
            if words[:2] == ["apt-get", "install"]:
                installed += [w for w in words[2:] if not w.startswith("-")]
        assert "pip install" not in run, "install in the build stage, copy the venv"
    assert installed == ["ca-certificates"]
    text = " ".join(a for s in stages for _, a in s.steps).split()
    for tool in BUILD_TOOLS:
        assert tool not in text, tool
    if len(stages) > 1:  # the final stage takes only the virtualenv from the build
        assert final.args("COPY") == [f"--from={stages[0].name} /opt/lakeproxy /opt/lakeproxy"]


def test_final_stage_runs_as_a_non_root_user(stages: list[Stage]) -> None:
    users = stages[-1].args("USER")
    assert users, "no USER in the final stage"
    assert users[-1] not in ("root", "0", "0:0")


def test_ports_healthcheck_and_entrypoint(stages: list[Stage]) -> None:
    final = stages[-1]
    exposed = " ".join(final.args("EXPOSE")).split()
    assert "6432" in exposed
    env = final_env(final)
    assert env["LAKEPROXY_LISTEN"] == "0.0.0.0:6432"
    admin = env["LAKEPROXY_ADMIN_LISTEN"]
    assert admin.endswith(":9090")
    (healthcheck,) = final.args("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    assert "--timeout=" in options
    assert json.loads(command) == ["lakeproxy", "wait", "--admin", "127.0.0.1:9090",
                                   "--timeout", "3"]
    assert json.loads(final.args("ENTRYPOINT")[-1]) == ["lakeproxy"]
    assert json.loads(final.args("CMD")[-1]) == ["run"]
    assert "/opt/lakeproxy/bin" in env["PATH"]


def test_image_environment_refuses_to_start_without_a_client_password(
    stages: list[Stage],
) -> None:
    """As documented: 0.0.0.0 needs LAKEPROXY_CLIENT_PASSWORD or --allow-remote-trust."""
    env = {**final_env(stages[-1]), "DATABRICKS_HOST": "https://x.cloud.databricks.com",
           "DATABRICKS_TOKEN": "dapi-test", "PGUSER": "role",
           "ENDPOINT_NAME": "projects/p/branches/b/endpoints/e"}
    with pytest.raises(ConfigError, match="--allow-remote-trust"):
        load_config(env=env)
    assert load_config(env={**env, "LAKEPROXY_CLIENT_PASSWORD": "a-long-password"})
    assert load_config(env=env, argv={"allow_remote_trust": True})
    assert "--allow-remote-trust" in DOCKERFILE.read_text()


def test_dockerignore_sends_only_the_package() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!LICENSE", "!lakeproxy/"} <= set(lines)


def _copy_sources(stage: Stage, src_root: Path) -> dict[str, Path]:
    """Perform the stage's COPY steps into ``src_root``; returns image path -> local path."""
    mapping: dict[str, Path] = {}
    for args in stage.args("COPY"):
        *sources, dest = args.split()
        local_dest = src_root / dest.strip("/")
        mapping[dest.rstrip("/")] = local_dest
        for source in sources:
            origin = REPO / source
            if origin.is_dir():
                shutil.copytree(origin, local_dest,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                local_dest.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, local_dest / origin.name)
    return mapping


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_build_steps_in_a_fresh_virtualenv(
    stages: list[Stage], tmp_path: Path, emulator: Emulator
) -> None:
    build = stages[0]
    root = tmp_path / "image"
    _copy_sources(build, root)
    # The build stage's RUN steps, with the image's paths under ``root``. pip's cache
    # is allowed here (the Dockerfile's --no-cache-dir only keeps the image small).
    for run in build.args("RUN"):
        command = run.replace("--no-cache-dir", "")
        command = re.sub(r"(?<![\w/])/(opt|src)\b", lambda m: f"{root}/{m.group(1)}", command)
        command = re.sub(r"^python\b", shlex.quote(sys.executable), command)
        env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
        proc = await asyncio.create_subprocess_shell(
            command, env=env, cwd=root, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 240)
        assert proc.returncode == 0, f"{command}\n{out.decode()[-3000:]}"

    venv_bin = root / "opt" / "lakeproxy" / "bin"
    lakeproxy = venv_bin / "lakeproxy"
    # A fresh virtualenv: not ours, and lakeproxy comes from the copied sources.
    version = subprocess.run([str(lakeproxy), "--version"], capture_output=True, text=True,
                             timeout=60, check=True, cwd=tmp_path)
    assert version.stdout.strip() == f"lakeproxy {__version__}"
    where = subprocess.run(
        [str(venv_bin / "python"), "-c", "import lakeproxy, sys; print(lakeproxy.__file__); "
         "print(sys.prefix)"], capture_output=True, text=True, timeout=60, check=True,
        cwd=tmp_path)
    module, prefix = where.stdout.split()
    assert Path(prefix) == root / "opt" / "lakeproxy"
    assert module.startswith(prefix)

    # The image's environment, on free ports, in front of the emulator; the
    # HEALTHCHECK command (at that admin address) reports healthy once it is ready.
    final = stages[-1]
    (healthcheck,) = final.args("HEALTHCHECK")
    health = json.loads(healthcheck.partition(" CMD ")[2])
    admin = f"127.0.0.1:{_free_port()}"
    health[health.index("--admin") + 1] = admin
    health[0] = str(venv_bin / health[0])
    image_env = final_env(final)
    image_env["PATH"] = f"{venv_bin}:/usr/bin:/bin"
    image_env.update(emulator.env())
    image_env.update({"HOME": str(tmp_path), "LAKEPROXY_LISTEN": "0.0.0.0:0",
                      "LAKEPROXY_ADMIN_LISTEN": admin,
                      "LAKEPROXY_CLIENT_PASSWORD": "compose-password-123"})
    proxy = await asyncio.create_subprocess_exec(
        str(lakeproxy), "run", env=image_env, cwd=tmp_path, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        nobody = [*health]
        nobody[nobody.index("--admin") + 1] = f"127.0.0.1:{_free_port()}"
        nobody[nobody.index("--timeout") + 1] = "0.5"
        unhealthy = await asyncio.create_subprocess_exec(
            *nobody, env=image_env, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        assert await asyncio.wait_for(unhealthy.wait(), 30) == 1  # nothing answers there
        for _ in range(20):
            check = await asyncio.create_subprocess_exec(*health, env=image_env)
            if await asyncio.wait_for(check.wait(), 30) == 0:
                break
        else:
            pytest.fail("the HEALTHCHECK never passed")
        assert proxy.stderr is not None
        startup = b""
        while b"lakeproxy listening on" not in startup:
            startup = await asyncio.wait_for(proxy.stderr.readline(), 30)
        port = int(startup.split(b"listening on 0.0.0.0:")[1].split()[0])
        psql = await asyncio.create_subprocess_exec(
            "/usr/bin/psql", "-X", "-A", "-t", "-c", "SELECT current_user",
            f"host=127.0.0.1 port={port} dbname=databricks_postgres user=app",
            env={"PATH": "/usr/bin:/bin", "PGPASSWORD": "compose-password-123"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(psql.communicate(), 30)
        assert (psql.returncode, out.decode()) == (0, f"{emulator.role}\n"), err.decode()
    finally:
        if proxy.returncode is None:
            proxy.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proxy.wait(), 30) == 0


# --------------------------------------------------------------------------- compose.yaml

Yaml = dict[str, "Yaml"] | list[object] | str


def parse_simple_yaml(text: str) -> dict[str, Yaml]:
    """The YAML subset compose.yaml uses: nested block mappings (2-space indents),
    plain or double-quoted scalars, flow sequences written as JSON arrays, and
    full-line comments. Anything else is an error (keeps the file simple)."""
    root: dict[str, Yaml] = {}
    stack: list[tuple[int, dict[str, Yaml]]] = [(-1, root)]
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        assert "\t" not in raw, f"line {number}: tab"
        indent = len(raw) - len(raw.lstrip(" "))
        key, sep, value = raw.strip().partition(":")
        assert sep, f"line {number}: not 'key: value'"
        assert re.fullmatch(r"[A-Za-z_][\w.-]*", key), f"line {number}: key {key!r}"
        while indent <= stack[-1][0]:
            stack.pop()
        parent = stack[-1][1]
        assert key not in parent, f"line {number}: duplicate key {key}"
        value = value.strip()
        if not value:
            child: dict[str, Yaml] = {}
            parent[key] = child
            stack.append((indent, child))
        elif value.startswith(("[", '"')):  # JSON arrays and strings are YAML too
            parent[key] = json.loads(value)
        else:
            assert " #" not in value, f"line {number}: trailing comment"
            parent[key] = value
    return root


@pytest.fixture(scope="module")
def compose() -> dict[str, Yaml]:
    return parse_simple_yaml(COMPOSE.read_text())


def _mapping(node: Yaml) -> dict[str, Yaml]:
    assert isinstance(node, dict)
    return node


def test_compose_matches_pyyaml_when_available(compose: dict[str, Yaml]) -> None:
    yaml = pytest.importorskip("yaml")
    assert yaml.safe_load(COMPOSE.read_text()) == compose


def test_compose_app_reaches_lakeproxy_by_service_name_with_a_password(
    compose: dict[str, Yaml],
) -> None:
    services = _mapping(compose["services"])
    proxy = _mapping(services["lakeproxy"])
    app = _mapping(services["app"])
    assert proxy["build"] == "."
    proxy_env = _mapping(proxy["environment"])
    app_env = _mapping(app["environment"])
    # Secrets come from the environment / .env file, never from this file.
    for env in (proxy_env, app_env):
        for key, value in env.items():
            assert isinstance(value, str)
            if "SECRET" in key or "PASSWORD" in key:
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", value), key
    for required in ("DATABRICKS_HOST", "DATABRICKS_CLIENT_ID", "DATABRICKS_CLIENT_SECRET",
                     "ENDPOINT_NAME", "LAKEPROXY_CLIENT_PASSWORD"):
        assert required in proxy_env
    assert str(proxy_env["LAKEPROXY_CLIENT_PASSWORD"]).startswith("${LAKEPROXY_CLIENT_PASSWORD")
    assert str(app_env["PGPASSWORD"]).startswith("${LAKEPROXY_CLIENT_PASSWORD")
    assert app_env["PGHOST"] == "lakeproxy"  # the service name
    assert app_env["PGPORT"] == "6432"
    assert _mapping(_mapping(app["depends_on"])["lakeproxy"])["condition"] == "service_healthy"
    assert "allow-remote-trust" not in COMPOSE.read_text()
    assert "ports" not in proxy  # not published on the host


def test_simple_yaml_parser() -> None:
    doc = parse_simple_yaml('a:\n  b: x y\n  c:\n    d: "q: r"\n  e: ["1", "2"]\nf: g\n')
    assert doc == {"a": {"b": "x y", "c": {"d": "q: r"}, "e": ["1", "2"]}, "f": "g"}
    with pytest.raises(AssertionError):
        parse_simple_yaml("a:\n\tb: c\n")


# --------------------------------------------------------------------------
# A newcomer's first commands (issue #11)


def _make_dry_run(target: str, venv: Path) -> list[str]:
    """The commands ``make -n TARGET`` would run for a fresh ``VENV``."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")
    result = subprocess.run(
        [make, "-n", target, f"VENV={venv}"], cwd=REPO, capture_output=True, text=True,
        check=True,
    )
    return result.stdout.splitlines()


def test_make_demo_installs_only_the_emulator_extra(tmp_path: Path) -> None:
    demo = _make_dry_run("demo", tmp_path / "venv")
    installs = [line for line in demo if "pip install" in line and " -e " in line]
    assert installs, demo
    assert all("'.[emulator]'" in line for line in installs), installs
    assert not [line for line in demo if "[test]" in line], demo
    test = _make_dry_run("test", tmp_path / "venv")
    assert any("pip install -q -e '.[test]'" in line for line in test), test


def test_make_demo_listen_is_passed_on(tmp_path: Path) -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")
    out = subprocess.run(
        [make, "--no-print-directory", "-n", "demo", f"VENV={tmp_path / 'venv'}",
         "LISTEN=127.0.0.1:6433"], cwd=REPO,
        capture_output=True, text=True, check=True,
    ).stdout
    assert out.splitlines()[-1].endswith("/bin/lakeproxy demo --listen 127.0.0.1:6433")


def test_license_is_the_apache_2_text_pyproject_declares() -> None:
    text = (REPO / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text
    assert 'license = "Apache-2.0"' in (REPO / "pyproject.toml").read_text()
