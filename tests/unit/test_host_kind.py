"""Host kinds and endpoint state: the configuration (LAKEBASE_HOST_KIND /
host_kind), and reading the API's endpoint and instance objects."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from lakeproxy.auth.status import StatusError, parse_endpoint, parse_instance
from lakeproxy.config import Config, load_config
from lakeproxy.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
ENDPOINT = "projects/p/branches/b/endpoints/e"
ENV: Mapping[str, str] = {
    "DATABRICKS_HOST": "https://x.cloud.databricks.com",
    "DATABRICKS_CLIENT_ID": "client",
    "DATABRICKS_CLIENT_SECRET": "not-a-real-secret-value",
    "ENDPOINT_NAME": ENDPOINT,
}


def _load(env: Mapping[str, str], tmp_path: Path, file: str | None = None) -> Config:
    path = None
    if file is not None:
        path = tmp_path / "lakeproxy.toml"
        path.write_text(file)
    return load_config(env={"HOME": str(tmp_path), **env}, config_file=path)


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("kind", ["read_write", "read_only", "pooled", "read_only_pooled"])
def test_each_kind_is_accepted(tmp_path: Path, kind: str) -> None:
    config = _load({**ENV, "LAKEBASE_HOST_KIND": kind}, tmp_path)
    assert config.endpoints[0].kind == kind


def test_default_kind_is_read_write(tmp_path: Path) -> None:
    ep = _load(ENV, tmp_path).endpoints[0]
    assert ep.host_kind is None
    assert ep.kind == "read_write"


def test_unknown_kind_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _load({**ENV, "LAKEBASE_HOST_KIND": "replica"}, tmp_path)
    assert info.value.problems == [
        "LAKEBASE_HOST_KIND=replica (environment): must be one of read_write, read_only, "
        "pooled, read_only_pooled"
    ]


@pytest.mark.parametrize("kind", ["pooled", "read_only_pooled"])
def test_pooled_kinds_for_a_provisioned_instance_are_a_config_error(
    tmp_path: Path, kind: str
) -> None:
    env = {k: v for k, v in ENV.items() if k != "ENDPOINT_NAME"}
    with pytest.raises(ConfigError) as info:
        _load({**env, "LAKEBASE_INSTANCE": "inst", "LAKEBASE_HOST_KIND": kind}, tmp_path)
    (problem,) = info.value.problems
    assert problem.startswith(f"LAKEBASE_HOST_KIND={kind} (environment): a provisioned instance")
    assert "no pooled hosts" in problem


def test_host_kind_per_endpoint_in_the_file(tmp_path: Path) -> None:
    env = {k: v for k, v in ENV.items() if k != "ENDPOINT_NAME"}
    ep = f'name = "{ENDPOINT}"\n'
    config = _load(
        env, tmp_path,
        "[[endpoints]]\n" + ep + 'listen = "127.0.0.1:6432"\n'
        "[[endpoints]]\n" + ep + 'host_kind = "read_only"\nlisten = "127.0.0.1:6433"\n',
    )
    assert [e.kind for e in config.endpoints] == ["read_write", "read_only"]
    assert [e.listen[0].port for e in config.endpoints] == [6432, 6433]
    with pytest.raises(ConfigError) as info:
        _load(env, tmp_path, '[[endpoints]]\ninstance = "inst"\nhost_kind = "pooled"\n')
    (problem,) = info.value.problems
    assert problem.startswith("[[endpoints]] host_kind (")
    assert problem.endswith("use read_write or read_only (got pooled)")
    assert "a provisioned instance" in problem


def test_pooled_instance_exits_2_with_one_line(tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           **{k: v for k, v in ENV.items() if k != "ENDPOINT_NAME"},
           "LAKEBASE_INSTANCE": "inst", "LAKEBASE_HOST_KIND": "pooled"}
    result = subprocess.run(
        [sys.executable, "-m", "lakeproxy", "run"], env=env, cwd=REPO, capture_output=True,
        text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("lakeproxy: LAKEBASE_HOST_KIND=pooled (environment): "
                                    "a provisioned instance")


# --------------------------------------------------------------------------- the API's objects


def _endpoint(status: dict[str, object], spec: dict[str, object] | None = None
              ) -> dict[str, object]:
    obj: dict[str, object] = {"name": ENDPOINT, "status": status}
    if spec is not None:
        obj["spec"] = spec
    return obj


HOSTS = {"host": "ep-a.db", "read_only_host": "ep-a-ro.db",
         "read_write_pooled_host": "ep-a-pooler.db", "read_only_pooled_host": "ep-a-ro-pooler.db"}


def test_endpoint_hosts_by_kind() -> None:
    st = parse_endpoint(_endpoint({"hosts": HOSTS, "current_state": "ACTIVE"}))
    assert [st.host(k) for k in ("read_write", "read_only", "pooled", "read_only_pooled")] == [
        "ep-a.db", "ep-a-ro.db", "ep-a-pooler.db", "ep-a-ro-pooler.db"]
    assert st.field("pooled") == "read_write_pooled_host"
    assert st.describe() == "ACTIVE"


def test_endpoint_missing_kind_has_a_hint() -> None:
    st = parse_endpoint(_endpoint({"hosts": {"host": "ep-a.db"}, "current_state": "IDLE"}))
    assert st.host("read_only") is None
    message, hint = st.missing("read_only")
    assert message == "the endpoint reports no read_only_host"
    assert "readable secondaries" in hint


@pytest.mark.parametrize(("state", "verdict"), [
    ("ACTIVE", "dial"), ("IDLE", "dial"), ("INIT", "dial"), ("DEGRADED", "dial"),
    (None, "dial"), ("SOMETHING_NEW", "dial"),
])
def test_endpoint_states_are_dialed(state: str | None, verdict: str) -> None:
    status: dict[str, object] = {"hosts": HOSTS}
    if state is not None:
        status["current_state"] = state
    assert parse_endpoint(_endpoint(status)).verdict() == verdict


@pytest.mark.parametrize(("status_disabled", "spec_disabled"), [(True, None), (None, True),
                                                                 (True, True)])
def test_disabled_in_spec_or_status_refuses(
    status_disabled: bool | None, spec_disabled: bool | None
) -> None:
    status: dict[str, object] = {"hosts": HOSTS, "current_state": "IDLE"}
    if status_disabled is not None:
        status["disabled"] = status_disabled
    spec: dict[str, object] | None = (
        {"disabled": spec_disabled} if spec_disabled is not None else None)
    st = parse_endpoint(_endpoint(status, spec))
    assert st.verdict() == "refuse"
    assert st.describe() == "IDLE (disabled)"
    assert "spec.disabled=false" in st.refusal()[1]


@pytest.mark.parametrize(("state", "verdict"), [
    ("AVAILABLE", "dial"), ("STARTING", "wait"), ("UPDATING", "wait"), ("UPGRADING", "wait"),
    ("FAILING_OVER", "wait"), ("STOPPED", "refuse"), ("DELETING", "refuse"),
])
def test_instance_states(state: str, verdict: str) -> None:
    st = parse_instance({"name": "inst", "state": state, "read_write_dns": "i.db"})
    assert st.verdict() == verdict
    assert st.host("read_write") == "i.db"
    assert st.host("read_only") is None


def test_instance_stopped_flag_without_state() -> None:
    st = parse_instance({"name": "inst", "effective_stopped": True, "read_write_dns": "i.db",
                         "read_only_dns": "ro.db"})
    assert st.state == "STOPPED"
    assert st.verdict() == "refuse"
    assert st.host("read_only") == "ro.db"


def test_malformed_objects_are_refused() -> None:
    with pytest.raises(StatusError):
        parse_endpoint({"name": ENDPOINT})
    with pytest.raises(StatusError):
        parse_endpoint({"status": {"current_state": "ACTIVE"}})
    with pytest.raises(StatusError):
        parse_instance({"state": "AVAILABLE"})
