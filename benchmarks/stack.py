"""The system under test: a TLS PostgreSQL, PgBouncer and lakeproxy in front of it.

:class:`Stack` starts, in a throwaway work directory:

- a CA and a server certificate for :data:`HOST_NAME` and 127.0.0.1;
- a real PostgreSQL (``PgCluster``) with ``ssl=on`` whose pg_hba admits TCP
  clients only over TLS, with a cleartext password (what Lakebase's front door
  asks for too), and the role ``ROLE`` (named like a service principal);
- the emulator's fake Databricks workspace API, whose database credential is
  minted once and made that role's password (so lakeproxy logs in to the
  PostgreSQL directly, with no emulator front door in the measured path);
- PgBouncer in session mode, plaintext to clients, ``verify-full`` TLS to the
  server;
- lakeproxy (``python -m lakeproxy run``) as its own process.

Each of the three measured :class:`Target` s carries the libpq conninfo a
client uses and the pid of the proxy process to watch (none for direct TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self

from lakeproxy.emulator.api import FakeWorkspace
from lakeproxy.emulator.certs import TlsFiles, make_certs
from lakeproxy.emulator.pgcluster import PgCluster, free_port

#: ``lakeproxy_session``: a second lakeproxy with ``LAKEPROXY_POOL_MODE=session``.
TargetName = Literal["direct", "pgbouncer", "lakeproxy", "lakeproxy_session"]

HOST_NAME: Final = "pg.lakeproxy-bench.test"  # the certificate's name; dialled at 127.0.0.1
DATABASE: Final = "databricks_postgres"
ENDPOINT_NAME: Final = "projects/bench/branches/main/endpoints/primary"
#: Long enough that no credential expires or refreshes during a run.
CREDENTIAL_LIFETIME: Final = 7 * 24 * 3600.0
#: PgBouncer closes pooled server connections idle this long (seconds), so the
#: 1,000 server connections of its idle-session test free up for the next path.
PGBOUNCER_SERVER_IDLE_TIMEOUT: Final = 5


class StackError(RuntimeError):
    """A component failed to start; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Target:
    """One measured path. ``conninfo`` is a libpq connection string; ``env``
    extra environment for the client (the password for direct TLS); ``pid``
    the proxy process (None for direct); ``host``/``port`` where a plaintext
    client connects (None for direct)."""

    name: TargetName
    conninfo: str
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    pid: int | None = None
    host: str | None = None
    port: int | None = None


class _FixedCredentialWorkspace(FakeWorkspace):
    """The fake workspace, except that every database credential it issues is
    the same one (minted on first use), so it can be the role's password."""

    def __init__(self, *, client_id: str, client_secret: str, role: str) -> None:
        super().__init__(
            client_id=client_id,
            client_secret=client_secret,
            endpoint_name=ENDPOINT_NAME,
            instance_name="bench",
            endpoint_host=HOST_NAME,
            oauth_lifetime=CREDENTIAL_LIFETIME,
            credential_lifetime=CREDENTIAL_LIFETIME,
            role=role,
        )
        self._fixed: tuple[str, float] | None = None

    def issue_credential(
        self, lifetime: float | None = None, *, principal: str | None = None
    ) -> tuple[str, float]:
        if self._fixed is None:
            self._fixed = super().issue_credential(lifetime, principal=principal)
        return self._fixed


class _WorkspaceThread:
    """Runs the (aiohttp) fake workspace on an event loop in a daemon thread."""

    def __init__(self, workspace: FakeWorkspace) -> None:
        self.workspace = workspace
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fake-workspace", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.workspace.start(), self._loop).result(30)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.workspace.stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()


def find_pgbouncer(*, install: bool = True) -> tuple[Path, str]:
    """Return the pgbouncer binary and its version line, installing the Debian
    package with apt-get when it is missing and ``install`` is true.

    Raises StackError when it is neither found nor installable.
    """
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if Path(p).is_file()), None
    )
    if found is None and install and shutil.which("apt-get") and os.geteuid() == 0:
        print("pgbouncer not found: apt-get install -y pgbouncer", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=False, env=env, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "pgbouncer"],
            check=True,
            env=env,
            timeout=600,
        )
        found = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if found is None or not Path(found).is_file():
        raise StackError("pgbouncer not found (install the Debian package `pgbouncer`)")
    out = subprocess.run([found, "--version"], capture_output=True, text=True, check=False)
    return Path(found), (out.stdout or out.stderr).splitlines()[0].strip()


def postgres_version(cluster: PgCluster) -> str:
    """The server's ``SELECT version()`` up to the build details."""
    full = cluster.psql("SELECT version()").strip()
    return full.split(" on ", 1)[0]


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{what} exited {proc.returncode}:\n{_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise StackError(f"{what} did not listen on 127.0.0.1:{port} within 60 s:\n{_tail(log)}")


def _tail(path: Path, nbytes: int = 4000) -> str:
    try:
        return path.read_bytes()[-nbytes:].decode("utf-8", "replace")
    except OSError:
        return ""


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(15)


def _client_env(extra: Mapping[str, str]) -> dict[str, str]:
    """os.environ without the PG*, DATABRICKS_* and LAKEPROXY_* settings that
    could change what a client or the proxy does, plus ``extra``."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PG", "DATABRICKS_", "LAKEPROXY_"))
    }
    env.update(extra)
    return env


class Stack:
    """Start with ``with Stack(...) as s:``; ``s.targets`` lists what runs.

    ``targets`` chooses which proxies to start (direct TLS needs only the
    server). ``max_connections`` sizes the server (and PgBouncer) for the
    idle-session test. Raises StackError when a component fails to start.
    """

    def __init__(
        self,
        targets: tuple[TargetName, ...] = ("direct", "pgbouncer", "lakeproxy"),
        *,
        max_connections: int = 1100,
        workdir: Path | None = None,
        keep: bool = False,
    ) -> None:
        self.names = targets
        self.max_connections = max_connections
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="lakeproxy-bench-"))
        self.keep = keep
        self.role = str(uuid.uuid4())  # service principals' roles are their UUIDs
        self._secret = "bench-" + uuid.uuid4().hex
        self._token = ""  # the database credential, once minted
        self.tls: TlsFiles | None = None
        self.cluster: PgCluster | None = None
        self.workspace: _FixedCredentialWorkspace | None = None
        self._ws_thread: _WorkspaceThread | None = None
        self._pgbouncer: subprocess.Popen[bytes] | None = None
        self._lakeproxy: subprocess.Popen[bytes] | None = None
        self._lakeproxy_session: subprocess.Popen[bytes] | None = None
        #: The port lakeproxy dials (None: the server's); e.g. a delaying relay's.
        self.upstream_port: int | None = None
        self.targets: dict[TargetName, Target] = {}
        self.versions: dict[str, str] = {}

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start every component; fills :attr:`targets` and :attr:`versions`."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o711)  # PostgreSQL and PgBouncer run as `postgres`
        self.tls = make_certs(self.workdir / "tls", [HOST_NAME, "127.0.0.1"])
        self.tls.ca_file.chmod(0o644)
        self.cluster = PgCluster(
            self.workdir / "pg",
            ssl_cert=self.tls.cert_file,
            ssl_key=self.tls.key_file,
            hba=[
                "local all all trust",
                "hostssl all all 127.0.0.1/32 password",
            ],
            settings={
                "max_connections": str(self.max_connections),
                "shared_buffers": "256MB",
                "log_connections": "off",
                "log_disconnections": "off",
            },
        )
        self.cluster.start()
        self.versions["postgresql"] = postgres_version(self.cluster)

        self.workspace = _FixedCredentialWorkspace(
            client_id=self.role, client_secret=self._secret, role=self.role
        )
        self._ws_thread = _WorkspaceThread(self.workspace)
        self._ws_thread.start()
        token, _ = self.workspace.issue_credential()
        self._token = token
        quoted_token = token.replace("'", "''")
        self.cluster.psql(f"CREATE ROLE \"{self.role}\" LOGIN PASSWORD '{quoted_token}'")
        self.cluster.psql(f'CREATE DATABASE {DATABASE} OWNER "{self.role}"')

        self.targets["direct"] = Target(
            "direct",
            f"host={HOST_NAME} hostaddr=127.0.0.1 port={self.cluster.port} dbname={DATABASE} "
            f"user={self.role} sslmode=verify-full sslrootcert={self.tls.ca_file}",
            env={"PGPASSWORD": token},
        )
        if "pgbouncer" in self.names:
            self._start_pgbouncer()
        if "lakeproxy" in self.names:
            self._start_lakeproxy()
        if "lakeproxy_session" in self.names:
            self._start_lakeproxy("lakeproxy_session")

    def stop(self) -> None:
        """Stop everything that was started (idempotent); removes the work
        directory unless ``keep``."""
        _stop(self._lakeproxy)
        _stop(self._lakeproxy_session)
        _stop(self._pgbouncer)
        if self._ws_thread is not None:
            self._ws_thread.stop()
        if self.cluster is not None:
            self.cluster.stop()
        if self._own_workdir and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ proxies

    def restart(self, name: TargetName) -> Target:
        """Stop and start a proxy (a fresh process, nothing pooled or cached);
        return its new :class:`Target`, also in :attr:`targets`."""
        if name == "pgbouncer":
            _stop(self._pgbouncer)
            self._start_pgbouncer()
        elif name == "lakeproxy":
            _stop(self._lakeproxy)
            self._start_lakeproxy()
        elif name == "lakeproxy_session":
            _stop(self._lakeproxy_session)
            self._start_lakeproxy(name)
        return self.targets[name]

    def _start_pgbouncer(self) -> None:
        assert self.cluster is not None
        assert self.tls is not None
        token = self._token
        binary, version = find_pgbouncer()
        self.versions["pgbouncer"] = version
        home = self.workdir / "pgbouncer"
        home.mkdir(exist_ok=True)
        port = free_port()
        ini = home / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"{DATABASE} = host=127.0.0.1 port={self.cluster.port} dbname={DATABASE} "
            f"user={self.role} password={token}\n"
            "\n[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {port}\n"
            "unix_socket_dir =\n"
            # clients log in with any user name and no password (as lakeproxy's
            # default); the server login uses the database line's user.
            "auth_type = any\n"
            "pool_mode = session\n"
            f"max_client_conn = {self.max_connections + 100}\n"
            f"default_pool_size = {self.max_connections}\n"
            f"max_db_connections = {self.max_connections - 50}\n"
            f"server_idle_timeout = {PGBOUNCER_SERVER_IDLE_TIMEOUT}\n"
            "server_tls_sslmode = verify-full\n"
            f"server_tls_ca_file = {self.tls.ca_file}\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"logfile = {home / 'pgbouncer.log'}\n"
            f"pidfile = {home / 'pgbouncer.pid'}\n"
        )
        run_as: dict[str, object] = {}
        if os.geteuid() == 0:  # pgbouncer refuses to run as root
            pw = pwd.getpwnam("postgres")
            for p in (home, ini):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        log = home / "pgbouncer.stderr"
        with log.open("ab") as err:
            self._pgbouncer = subprocess.Popen(  # type: ignore[call-overload]
                [str(binary), str(ini)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=home,
                **run_as,
            )
        assert self._pgbouncer is not None
        _wait_port(port, self._pgbouncer, log, "pgbouncer")
        self.targets["pgbouncer"] = self._proxy_target("pgbouncer", port, self._pgbouncer.pid)

    def _start_lakeproxy(self, name: TargetName = "lakeproxy") -> None:
        """Start lakeproxy as ``name``: ``lakeproxy_session`` has session reuse on."""
        assert self.cluster is not None
        assert self.tls is not None
        assert self.workspace is not None
        port = free_port()
        env = _client_env(
            {
                "LAKEPROXY_LOG_LEVEL": "info",
                "DATABRICKS_HOST": self.workspace.url,
                "DATABRICKS_CLIENT_ID": self.role,
                "DATABRICKS_CLIENT_SECRET": self._secret,
                "ENDPOINT_NAME": ENDPOINT_NAME,
                "PGHOST": HOST_NAME,
                "PGHOSTADDR": "127.0.0.1",
                "PGPORT": str(self.upstream_port or self.cluster.port),
                "PGUSER": self.role,
                "PGDATABASE": DATABASE,
                "PGSSLMODE": "verify-full",
                "PGSSLROOTCERT": str(self.tls.ca_file),
                "LAKEPROXY_LISTEN": f"127.0.0.1:{port}",
                "LAKEPROXY_MAX_CLIENTS": str(self.max_connections + 100),
                "LAKEPROXY_POOL_MODE": "session" if name == "lakeproxy_session" else "off",
            }
        )
        log = self.workdir / f"{name}.log"
        with log.open("ab") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lakeproxy", "run"],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=env,
                cwd=self.workdir,
            )
        if name == "lakeproxy_session":
            self._lakeproxy_session = proc
        else:
            self._lakeproxy = proc
        _wait_port(port, proc, log, name)
        self.targets[name] = self._proxy_target(name, port, proc.pid)

    # ------------------------------------------------------------------ helpers

    def _proxy_target(self, name: TargetName, port: int, pid: int) -> Target:
        """A proxy on 127.0.0.1:``port``, reached in plaintext as the role."""
        return Target(
            name,
            f"host=127.0.0.1 port={port} dbname={DATABASE} user={self.role} sslmode=disable",
            pid=pid,
            host="127.0.0.1",
            port=port,
        )


    def client_env(self, target: Target) -> dict[str, str]:
        """The environment for a libpq client (pgbench, psql) of ``target``."""
        return _client_env(target.env)

    def backends(self) -> int:
        """How many server sessions the role has open now."""
        assert self.cluster is not None
        out = self.cluster.psql(
            f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{self.role}'"  # noqa: S608
        )
        return int(out.strip() or 0)

    def wait_backends(self, at_most: int, timeout: float = 60.0) -> int:
        """Wait until the role has at most ``at_most`` sessions; return the count."""
        deadline = time.monotonic() + timeout
        n = self.backends()
        while n > at_most and time.monotonic() < deadline:
            time.sleep(0.5)
            n = self.backends()
        return n

    def proxy_log_tail(self, name: TargetName) -> str:
        """The end of a proxy's log, for error messages."""
        if name in ("lakeproxy", "lakeproxy_session"):
            return _tail(self.workdir / f"{name}.log")
        if name == "pgbouncer":
            return _tail(self.workdir / "pgbouncer" / "pgbouncer.log")
        return ""


def version_of(cmd: list[str]) -> str:
    """First line of ``cmd``'s output (e.g. ``["pgbench", "--version"]``), or ''."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        return (out.stdout or out.stderr).splitlines()[0].strip()
    return ""
