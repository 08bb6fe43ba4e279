"""A local Lakebase emulator: workspace API + TLS front door + real PostgreSQL.

Used by the tests and by ``lakeproxy demo`` / ``lakeproxy emulator``; it needs
no account and no network. See :class:`Emulator`; the parts live in
:mod:`.api` (the Databricks workspace API), :mod:`.frontdoor` (the TLS Postgres
front door with scale to zero), :mod:`.pgcluster` (the PostgreSQL server) and
:mod:`.certs` (the CA).
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import tempfile
import uuid
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from lakeproxy.emulator.api import FakeWorkspace
from lakeproxy.emulator.certs import TlsFiles, make_certs
from lakeproxy.emulator.frontdoor import FrontDoor, Route
from lakeproxy.emulator.identity import AUDIENCE, ISSUER, SUBJECT, IdentityProviders
from lakeproxy.emulator.pgcluster import PgCluster, PgClusterError

__all__ = ["AUDIENCE", "ISSUER", "SUBJECT", "Emulator", "FakeWorkspace", "FrontDoor",
           "IdentityProviders", "PgCluster", "PgClusterError", "Route", "TlsFiles",
           "make_certs"]

ENDPOINT_NAME: Final = "projects/emulated/branches/main/endpoints/ep-emulated-123"
ENDPOINT_HOST: Final = "ep-emulated-123.database.emulator.lakebase.local"
INSTANCE_NAME: Final = "emulated-instance"
DATABASE: Final = "databricks_postgres"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class Emulator:
    """Workspace API, front door and PostgreSQL for one service principal.

    ``role`` is the service principal's UUID: its client id and its Postgres
    role (default: a fresh UUID). With ``pg`` the given cluster is shared
    (started if needed, never stopped here); otherwise one is created in
    ``workdir`` (default: a temp dir removed by :meth:`stop`).

    Hosts: the endpoint's four (:attr:`hosts`, as ``status.hosts`` reports
    them) and the instance's two (:attr:`instance_hosts`), each its own SNI
    name on the one front door. The read-only ones are served by a real hot
    standby of the primary (``pg_basebackup -R``, streaming), started on the
    first read-only login, or by :meth:`start` when ``standby`` is true; it is
    this emulator's own and stopped by :meth:`stop`. The pooled hosts reach
    the same servers directly (no pooling is emulated).
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        role: str | None = None,
        oauth_lifetime: float = 3600.0,
        credential_lifetime: float = 3600.0,
        idle_suspend: float | None = None,
        wake_time: float = 0.0,
        wake_error_time: float = 0.0,
        pg: PgCluster | None = None,
        standby: bool = False,
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(
            tempfile.mkdtemp(prefix="lakeproxy-emulator-"))
        self.role = role if role is not None else str(uuid.uuid4())
        self.client_id = self.role
        self.client_secret = "dose" + secrets.token_hex(16)
        self.endpoint_name = ENDPOINT_NAME
        self.instance_name = INSTANCE_NAME
        self.host = ENDPOINT_HOST
        self.database = DATABASE
        self._own_pg = pg is None
        self.pg = pg if pg is not None else PgCluster(self.workdir / "pg")
        self.workspace = FakeWorkspace(
            client_id=self.client_id, client_secret=self.client_secret,
            endpoint_name=self.endpoint_name, instance_name=self.instance_name,
            endpoint_host=self.host, oauth_lifetime=oauth_lifetime,
            credential_lifetime=credential_lifetime, role=self.role,
        )
        #: the endpoint's hosts by ``status.hosts`` field; the instance's by field
        self.hosts: dict[str, str] = dict(self.workspace.hosts)
        self.instance_hosts: dict[str, str] = dict(self.workspace.instance_hosts)
        routes = {
            self.hosts["host"]: Route("endpoint", "primary"),
            self.hosts["read_write_pooled_host"]: Route("endpoint", "primary"),
            self.hosts["read_only_host"]: Route("endpoint", "standby"),
            self.hosts["read_only_pooled_host"]: Route("endpoint", "standby"),
            self.instance_hosts["read_write_dns"]: Route("instance", "primary"),
            self.instance_hosts["read_only_dns"]: Route("instance", "standby"),
        }
        self.tls: TlsFiles = make_certs(self.workdir / "tls", [*routes, "127.0.0.1"])
        self.ca_file = self.tls.ca_file
        self._want_standby = standby
        self.standby: PgCluster | None = None
        self._standby_lock = asyncio.Lock()
        self.frontdoor = FrontDoor(
            workspace=self.workspace, pg=self.pg, tls=self.tls, endpoint_host=self.host,
            idle_suspend=idle_suspend, wake_time=wake_time, wake_error_time=wake_error_time,
            routes=routes, standby=self.ensure_standby,
        )
        self.workspace.compute_state = lambda: self.frontdoor.state
        #: the other identities (a user, an Entra service principal, managed
        #: identities) and the providers they sign in with
        self.identity = IdentityProviders(self.workspace)
        self.workspace.identity = self.identity
        #: the fake ``databricks`` and ``az`` CLIs (written by :meth:`start`)
        self.bin_dir = self.workdir / "bin"
        self.workspace.on_disabled = self._suspend_soon
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False

    async def ensure_standby(self) -> PgCluster:
        """The read-only server: a hot standby of the primary, made and started
        on first use (``pg_basebackup -R``; ~1-2 s). Raises PgClusterError."""
        async with self._standby_lock:
            if self.standby is None:
                self.standby = PgCluster(self.workdir / "standby", primary=self.pg)
            if not self.standby.running:
                await asyncio.to_thread(self.standby.start)
            return self.standby

    def _suspend_soon(self) -> None:
        """Disabling the endpoint schedules a suspend of its compute (as Databricks does)."""
        task = asyncio.get_running_loop().create_task(self.frontdoor.suspend())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def port(self) -> int:
        """The front door's port (valid after :meth:`start`)."""
        return self.frontdoor.port

    async def start(self) -> None:
        """Start PostgreSQL (unless shared and running), create the role and
        database, then serve the API and the front door. Raises PgClusterError
        or OSError; on failure whatever started is stopped again."""
        if self._started:
            return
        try:
            if not self.pg.running:
                await asyncio.to_thread(self.pg.start)
            await asyncio.to_thread(self._provision)
            await self.workspace.start()
            self.identity.write_fake_clis(self.bin_dir)
            await self.frontdoor.start()
            if self._want_standby:
                await self.ensure_standby()
        except BaseException:
            await self.stop()
            raise
        self._started = True

    def _provision(self) -> None:
        """Create the LOGIN roles (the service principal's and every other
        identity's) and ``databricks_postgres`` (owned by the service principal,
        or, in a shared cluster where it exists already, with all rights on it)."""
        self.pg.psql("; ".join(
            f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {_literal(name)}) "
            f"THEN CREATE ROLE {_ident(name)} LOGIN; END IF; END$$"
            for name in (self.role, *self.identity.principals)))
        role = _ident(self.role)
        exists = self.pg.psql(
            f"SELECT 1 FROM pg_database WHERE datname = {_literal(DATABASE)}")  # noqa: S608
        created = False
        if not exists.strip():
            try:
                self.pg.psql(f"CREATE DATABASE {_ident(DATABASE)} OWNER {role}")
                created = True
            except PgClusterError as exc:
                if "already exists" not in str(exc):
                    raise
        grantees = list(self.identity.principals) if created else [
            self.role, *self.identity.principals]
        names = ", ".join(_ident(name) for name in grantees)
        self.pg.psql(f"GRANT ALL ON DATABASE {_ident(DATABASE)} TO {names}")
        self.pg.psql(f"GRANT ALL ON SCHEMA public TO {names}", database=DATABASE)

    async def stop(self) -> None:
        """Stop everything this emulator started (idempotent)."""
        self._started = False
        for task in list(self._tasks):
            task.cancel()
        await self.frontdoor.stop()
        await self.workspace.stop()
        if self.standby is not None:
            await asyncio.to_thread(self.standby.close)
            self.standby = None
        if self._own_pg:
            await asyncio.to_thread(self.pg.close)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def env(self) -> dict[str, str]:
        """The environment a proxy (or any Databricks API client) needs to reach
        this emulator, with the proxy's own ``LAKEBASE_*`` names so that sourcing
        it leaves a shell's ``PG*`` settings (meant for the proxy's clients)
        alone. Contains the client secret."""
        return {
            "DATABRICKS_HOST": self.workspace.url,
            "DATABRICKS_CLIENT_ID": self.client_id,
            "DATABRICKS_CLIENT_SECRET": self.client_secret,
            "ENDPOINT_NAME": self.endpoint_name,
            "LAKEBASE_HOST": self.host,
            "LAKEBASE_HOSTADDR": "127.0.0.1",
            "LAKEBASE_PORT": str(self.port),
            "LAKEBASE_DATABASE": DATABASE,
            "LAKEBASE_USER": self.role,
            "LAKEBASE_SSLMODE": "verify-full",
            "LAKEBASE_SSLROOTCERT": str(self.ca_file),
        }

    def libpq_env(self) -> dict[str, str]:
        """The ``PG*`` variables that point libpq (psql, ...) straight at the
        emulated endpoint, bypassing any proxy; add ``PGPASSWORD``."""
        return {
            "PGHOST": self.host,
            "PGHOSTADDR": "127.0.0.1",
            "PGPORT": str(self.port),
            "PGDATABASE": DATABASE,
            "PGUSER": self.role,
            "PGSSLMODE": "verify-full",
            "PGSSLROOTCERT": str(self.ca_file),
        }

    def signin_env(self, method: str) -> dict[str, str]:
        """:meth:`env` for signing in with ``method`` (a ``DATABRICKS_AUTH_TYPE``)
        instead of the service principal's secret, with no role set (the proxy
        logs in as the signed-in identity). The fake CLIs come first on PATH.
        Contains secrets."""
        env = {k: v for k, v in self.env().items()
               if k not in ("DATABRICKS_CLIENT_ID", "DATABRICKS_CLIENT_SECRET", "LAKEBASE_USER")}
        ident = self.identity
        env["DATABRICKS_AUTH_TYPE"] = method
        env["PATH"] = f"{self.bin_dir}:/usr/bin:/bin"
        if method == "oauth-m2m":
            env.update(DATABRICKS_CLIENT_ID=self.client_id,
                       DATABRICKS_CLIENT_SECRET=self.client_secret)
        elif method == "env-oidc":
            env.update(DATABRICKS_OIDC_TOKEN=ident.workload_jwt(),
                       DATABRICKS_CLIENT_ID=self.client_id)
        elif method == "file-oidc":
            path = self.workdir / "oidc-token"
            path.write_text(ident.workload_jwt())
            env.update(DATABRICKS_OIDC_TOKEN_FILE=str(path), DATABRICKS_CLIENT_ID=self.client_id)
        elif method == "azure-client-secret":
            env.update(ARM_CLIENT_ID=ident.entra_client_id,
                       ARM_CLIENT_SECRET=ident.entra_client_secret,
                       ARM_TENANT_ID=ident.tenant_id, AZURE_AUTHORITY_HOST=self.workspace.url)
        elif method == "azure-msi":
            env.update(AZURE_POD_IDENTITY_AUTHORITY_HOST=self.workspace.url)
        return env
