"""Shared test rig: real PostgreSQL, the Lakebase emulator, test CAs.

Fixtures
* ``pg_cluster`` (session): a plain :class:`PgCluster` (trust on socket and 127.0.0.1).
* ``emulator`` (session): an :class:`Emulator` on that cluster with default
  settings. Tests may change it: faults, lifetimes, counters and the compute
  state are reset around every test that uses it.
* ``make_emulator`` (function): ``await make_emulator(idle_suspend=..., ...)``
  builds an extra emulator on the session cluster, stopped after the test.
* ``tls_ca`` (session): a ``trustme.CA``; ``server_tls`` (session): CA + server
  certificate for ``localhost``/``127.0.0.1`` as PEM files.

When a test that used a cluster fails, its report gets a "PostgreSQL log"
section with what the server logged during that test.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Generator, Iterator
from pathlib import Path
from typing import Protocol

import pytest
import pytest_asyncio
import trustme

from lakeproxy.emulator import Emulator
from lakeproxy.emulator.certs import TlsFiles, make_certs
from lakeproxy.emulator.pgcluster import PgCluster

#: every cluster the rig started, for the failure log
_CLUSTERS: list[PgCluster] = []
_LOG_OFFSETS = pytest.StashKey[dict[Path, int]]()


class MakeEmulator(Protocol):
    def __call__(
        self,
        *,
        role: str | None = ...,
        oauth_lifetime: float = ...,
        credential_lifetime: float = ...,
        idle_suspend: float | None = ...,
        wake_time: float = ...,
        wake_error_time: float = ...,
    ) -> Awaitable[Emulator]: ...


# --------------------------------------------------------------------- PostgreSQL log on failure


def _log_size(pg: PgCluster) -> int:
    try:
        return os.stat(pg.logfile).st_size
    except OSError:
        return 0


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_LOG_OFFSETS] = {pg.logfile: _log_size(pg) for pg in _CLUSTERS}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and _CLUSTERS:
        offsets = item.stash.get(_LOG_OFFSETS, {})
        for pg in _CLUSTERS:
            start = offsets.get(pg.logfile, 0)
            try:
                with open(pg.logfile, "rb") as f:
                    f.seek(start)
                    text = f.read()[-20_000:].decode("utf-8", "replace")
            except OSError:
                continue
            if text.strip():
                report.sections.append((f"PostgreSQL log ({pg.logfile})", text))
    return report


# --------------------------------------------------------------------- clusters and emulators


def start_cluster(workdir: Path, **kwargs: object) -> PgCluster:
    """Start a PgCluster and register it for the failure log (for other
    fixtures; they call ``close()`` and remove it from ``_CLUSTERS``)."""
    pg = PgCluster(workdir, **kwargs)  # type: ignore[arg-type]
    pg.start()
    _CLUSTERS.append(pg)
    return pg


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgCluster]:
    pg = start_cluster(tmp_path_factory.mktemp("pg"))
    try:
        yield pg
    finally:
        pg.close()
        _CLUSTERS.remove(pg)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def emulator(
    pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Emulator]:
    async with Emulator(tmp_path_factory.mktemp("emulator"), pg=pg_cluster) as emu:
        yield emu


def _reset(emu: Emulator) -> None:
    emu.workspace.clear_faults()
    emu.workspace.oauth_lifetime = 3600.0
    emu.workspace.credential_lifetime = 3600.0
    emu.workspace.calls.clear()
    emu.workspace.requests.clear()
    emu.identity.reset()
    emu.workspace.set_disabled(False)
    emu.workspace.set_instance_state("AVAILABLE")
    emu.workspace.readable_secondaries = True
    if emu.frontdoor.state != "ACTIVE":
        emu.frontdoor.resume()
    emu.frontdoor.wakes = emu.frontdoor.connections = emu.frontdoor.logins = 0
    emu.frontdoor.passwords = 0


@pytest.fixture(autouse=True)
def _reset_session_emulator(request: pytest.FixtureRequest) -> Iterator[None]:
    """Give each test that uses ``emulator`` a clean one (without starting it
    for tests that do not)."""
    if "emulator" not in request.fixturenames:
        yield
        return
    emu = request.getfixturevalue("emulator")
    _reset(emu)
    yield
    _reset(emu)


@pytest_asyncio.fixture(loop_scope="session")
async def make_emulator(
    pg_cluster: PgCluster, tmp_path: Path
) -> AsyncIterator[MakeEmulator]:
    made: list[Emulator] = []

    async def make(
        *,
        role: str | None = None,
        oauth_lifetime: float = 3600.0,
        credential_lifetime: float = 3600.0,
        idle_suspend: float | None = None,
        wake_time: float = 0.0,
        wake_error_time: float = 0.0,
    ) -> Emulator:
        emu = Emulator(
            tmp_path / f"emulator{len(made)}", pg=pg_cluster, role=role,
            oauth_lifetime=oauth_lifetime, credential_lifetime=credential_lifetime,
            idle_suspend=idle_suspend, wake_time=wake_time, wake_error_time=wake_error_time,
        )
        made.append(emu)
        await emu.start()
        return emu

    try:
        yield make
    finally:
        for emu in made:
            await emu.stop()


# --------------------------------------------------------------------- TLS


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A fresh CA and a server certificate for localhost and 127.0.0.1."""
    return make_certs(tmp_path_factory.mktemp("tls"), ["localhost", "127.0.0.1"])

