"""The ``lakeproxy`` command line: parse arguments, load the config, run a command.

Exit status: the command's own (0 success), 2 for a configuration problem
(one line per problem, ``lakeproxy: <problem>``, the most specific first, never a
traceback) or a usage error, 1 for another lakeproxy error, 130 after Ctrl-C.

The commands live in their own modules, imported only when the command runs:
``lakeproxy.app.serve(config)``, ``lakeproxy.check.run_check(config, out)``,
``lakeproxy.demo.run_demo()``, ``lakeproxy.emulator.Emulator`` and
``lakeproxy.auth``. The coroutines run under uvloop when it is importable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import logging
import os
import shlex
import signal
import sys
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Protocol, TextIO, TypeVar, cast

from lakeproxy import __version__
from lakeproxy.config import (
    DEFAULT_LISTEN,
    FLAG_KEYS,
    Config,
    load_config,
    name_sources,
    parse_duration,
    parse_host_port,
)
from lakeproxy.errors import ConfigError, LakeproxyError
from lakeproxy.log import add_secret, setup_logging

PROG: Final = "lakeproxy"
COMMANDS: Final = ("run", "check", "token", "demo", "emulator", "wait")
DEFAULT_WAIT_TIMEOUT: Final = "60"
#: What ``lakeproxy demo`` / ``emulator`` need beyond a plain ``pip install lakeproxy``.
EMULATOR_EXTRA_HINT: Final = (
    "the emulator needs the optional extra: pip install 'lakeproxy[emulator]'"
)
EXIT_CONFIG: Final = 2
EXIT_INTERRUPTED: Final = 130

_T = TypeVar("_T")


class _Emulator(Protocol):
    """What ``lakeproxy emulator`` needs from ``lakeproxy.emulator.Emulator``."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def env(self) -> Mapping[str, str]: ...


# --------------------------------------------------------------------------
# Parser


def _add_log_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"),
        help="log level (env LAKEPROXY_LOG_LEVEL; default info)",
    )
    p.add_argument(
        "--log-format", choices=("text", "json"),
        help="log format on stderr (env LAKEPROXY_LOG_FORMAT; default text)",
    )


def _add_config_flags(p: argparse.ArgumentParser, *, proxy: bool) -> None:
    p.add_argument(
        "--config", metavar="FILE", type=Path,
        help="TOML config file (env LAKEPROXY_CONFIG); see config.example.toml",
    )
    if proxy:
        p.add_argument(
            "--listen", metavar="ADDR", action="append",
            help="client listener(s): HOST:PORT, [V6]:PORT or unix:/DIR[:PORT]; repeat or "
            "comma-separate (env LAKEPROXY_LISTEN; default 127.0.0.1:6432)",
        )
        p.add_argument(
            "--admin-listen", metavar="HOST:PORT",
            help="HTTP admin server for /healthz, /readyz, /metrics "
            "(env LAKEPROXY_ADMIN_LISTEN; default off)",
        )
        p.add_argument(
            "--allow-remote-trust", action="store_true", default=None,
            help="allow a non-loopback listener without LAKEPROXY_CLIENT_PASSWORD "
            "(only on a private network)",
        )
    _add_log_flags(p)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A local Postgres endpoint for Databricks Lakebase: mints OAuth database "
        "credentials, logs in over TLS and splices bytes. With no command, runs the proxy.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "run", help="serve until SIGTERM/SIGINT (the default)",
        description="Serve local Postgres clients until SIGTERM/SIGINT.",
    )
    _add_config_flags(p, proxy=True)

    p = sub.add_parser(
        "check", help="diagnose the configuration step by step",
        description="Mint a token and a database credential, connect to the endpoint, log in "
        "and run SELECT current_user, current_database(); each step on its own line. "
        "Exits 0 only if all pass.",
    )
    _add_config_flags(p, proxy=True)
    p.add_argument(
        "--verbose", "-v", action="store_true",
        help="show log lines on stderr as well (by default only the report is printed)",
    )

    p = sub.add_parser(
        "token", help="print one fresh database credential",
        description="Print one fresh database credential on stdout and nothing else, e.g. "
        "PGPASSWORD=$(lakeproxy token) psql ...",
    )
    _add_config_flags(p, proxy=False)

    p = sub.add_parser(
        "demo", help="run the local Lakebase emulator with a proxy in front of it",
        description="Start the local Lakebase emulator and a proxy in front of it, print the "
        "psql line that connects, and serve until Ctrl-C. Needs no account and no network.",
    )
    p.add_argument(
        "--listen", metavar="HOST:PORT",
        help="the proxy's client listener (env LAKEPROXY_LISTEN; default 127.0.0.1:6432, "
        "which PgBouncer uses too)",
    )
    _add_log_flags(p)

    p = sub.add_parser(
        "emulator", help="run only the emulator and print its environment",
        description="Start the local Lakebase emulator and print the export lines that point "
        "a proxy (or any Databricks API client) at it; serve until Ctrl-C.",
    )
    _add_log_flags(p)

    p = sub.add_parser(
        "wait", help="exit 0 once a running proxy reports ready",
        description="Poll GET /readyz on a proxy's admin server until it answers 200 "
        "(exit 0) or the timeout passes (exit 1).",
    )
    p.add_argument(
        "--admin", metavar="HOST:PORT",
        help="the proxy's admin address, HOST:PORT or a URL such as http://127.0.0.1:9090 "
        "(default: LAKEPROXY_ADMIN_LISTEN)",
    )
    p.add_argument(
        "--timeout", metavar="S", default=DEFAULT_WAIT_TIMEOUT,
        help='how long to wait, e.g. "30", "30s", "2m" (default 60s)',
    )
    _add_log_flags(p)
    return parser


def _with_default_command(argv: Sequence[str]) -> list[str]:
    """Insert ``run`` when no command is named (``lakeproxy --config f.toml``)."""
    args = list(argv)
    if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help", "--version")):
        return ["run", *args]
    return args


# --------------------------------------------------------------------------
# Entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(
        _with_default_command(sys.argv[1:] if argv is None else argv)
    )
    command: Callable[[argparse.Namespace], int] = _COMMANDS[args.command]
    try:
        return command(args)
    except ConfigError as exc:
        for problem in exc.problems or [str(exc)]:
            _fail(" ".join(problem.split("\n")))
        return EXIT_CONFIG
    except LakeproxyError as exc:
        _fail(str(exc) + (f" ({exc.hint})" if exc.hint else ""))
        return 1
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _fail(message: str) -> None:
    message = message if message.startswith(f"{PROG}:") else f"{PROG}: {message}"
    print(message, file=sys.stderr, flush=True)


def run_async(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to completion on a fresh event loop (uvloop when importable)."""
    try:
        import uvloop
    except ImportError:
        with asyncio.Runner() as runner:
            return runner.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _attr(module: str, name: str) -> object:
    """``module.name``, imported now; a missing one is a LakeproxyError."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise LakeproxyError(f"{module}.{name} is not available: {exc}") from exc


def _load(args: argparse.Namespace, *, log_warnings: bool = True) -> Config:
    """The config from flags, ``os.environ`` and the file; sets up logging and logs
    the configuration's warnings (one line each)."""
    flags: dict[str, str | bool | None] = {}
    for key in FLAG_KEYS:
        value = getattr(args, key, None)
        flags[key] = ",".join(value) if isinstance(value, list) else value
    config = load_config(env=os.environ, argv=flags, config_file=args.config)
    for secret in config.secrets():
        add_secret(secret)
    setup_logging(config.log_format, config.log_level)
    if log_warnings:
        for warning in config.warnings:
            logging.getLogger("lakeproxy.config").warning("%s", warning)
    return config


def _setup_logging_from(args: argparse.Namespace, env: Mapping[str, str]) -> None:
    """Logging for commands without a config: flag > environment > default.

    Raises:
        ConfigError: a bad LAKEPROXY_LOG_FORMAT / LAKEPROXY_LOG_LEVEL.
    """
    problems: list[str] = []
    chosen: dict[str, str] = {}
    for key, var, options, default in (
        ("log_format", "LAKEPROXY_LOG_FORMAT", ("text", "json"), "text"),
        ("log_level", "LAKEPROXY_LOG_LEVEL", ("debug", "info", "warning", "warn", "error"), "info"),
    ):
        flag = getattr(args, key, None)
        value = flag or env.get(var, "").strip().lower() or default
        if value not in options:
            problems.append(
                f"{var}={value} (environment): must be one of {', '.join(options)}"
            )
            value = default
        chosen[key] = value
    if problems:
        raise ConfigError(problems)
    setup_logging(chosen["log_format"], chosen["log_level"])


# --------------------------------------------------------------------------
# Commands


def _cmd_run(args: argparse.Namespace) -> int:
    config = _load(args)
    serve = cast(Callable[[Config], Awaitable[int]], _attr("lakeproxy.app", "serve"))

    async def go() -> int:
        return await serve(config)

    return run_async(go())


def _cmd_check(args: argparse.Namespace) -> int:
    # The output is the report (config warnings included); log lines only with --verbose.
    config = _load(args, log_warnings=False)
    run_check = cast(
        Callable[[Config, TextIO], Awaitable[int]], _attr("lakeproxy.check", "run_check")
    )

    async def go() -> int:
        return await run_check(config, sys.stdout)

    if args.verbose:
        return run_async(go())
    logging.disable(logging.CRITICAL)
    try:
        return run_async(go())
    finally:
        logging.disable(logging.NOTSET)


def _cmd_token(args: argparse.Namespace) -> int:
    config = _load(args)
    try:
        token = run_async(mint_token(config))
    except LakeproxyError as exc:
        exc.hint = name_sources(exc.hint, config.endpoints[0].sources, config.sources)
        raise
    sys.stdout.write(token + "\n")
    sys.stdout.flush()
    return 0


async def mint_token(config: Config) -> str:
    """One fresh database credential for the first endpoint (they are workspace-wide).

    Raises:
        CredentialError: the API refused, or did not answer within the connect deadline.
        ConfigError: the auth module found the settings unusable.
    """
    from lakeproxy.auth import CachedCredentials
    from lakeproxy.upstream.dialer import make_api

    creds = CachedCredentials(make_api(config.databricks, config.endpoints[0]))
    try:
        loop = asyncio.get_running_loop()
        cred = await creds.get(deadline=loop.time() + config.connect_deadline)
    finally:
        await creds.close()
    return cred.token


def _need_emulator_extra() -> None:
    """Raise LakeproxyError (one line naming the extra) when it is not installed."""
    if importlib.util.find_spec("trustme") is None:
        raise LakeproxyError(EMULATOR_EXTRA_HINT)


def _cmd_demo(args: argparse.Namespace) -> int:
    _setup_logging_from(args, os.environ)
    listen_text = args.listen or os.environ.get("LAKEPROXY_LISTEN") or DEFAULT_LISTEN
    origin = (f"--listen={listen_text} (command line)" if args.listen
              else f"LAKEPROXY_LISTEN={listen_text} (environment)")
    try:
        parse_host_port(listen_text)
    except ValueError as exc:
        raise ConfigError([f"{origin}: {exc}"]) from None
    _need_emulator_extra()
    run_demo = cast(Callable[[str], Awaitable[int]], _attr("lakeproxy.demo", "run_demo"))

    async def go() -> int:
        return await run_demo(listen_text)

    return run_async(go())


def _cmd_emulator(args: argparse.Namespace) -> int:
    _setup_logging_from(args, os.environ)
    _need_emulator_extra()
    factory = cast(Callable[[], _Emulator], _attr("lakeproxy.emulator", "Emulator"))
    return run_async(serve_emulator(factory(), sys.stdout))


async def serve_emulator(emulator: _Emulator, out: TextIO) -> int:
    """Start ``emulator``, print ``export K=V`` lines for its environment, serve until
    SIGINT/SIGTERM, then stop it. Returns 0.

    The signal handlers are installed first, so a signal during start-up stops the
    emulator as soon as it has started.
    """
    stop = asyncio.Event()
    with _on_signals(stop.set):
        await emulator.start()
        try:
            for key, value in emulator.env().items():
                out.write(f"export {key}={shlex.quote(value)}\n")
            out.flush()
            await stop.wait()
        finally:
            await emulator.stop()
    return 0


@contextlib.contextmanager
def _on_signals(callback: Callable[[], None]) -> Iterator[None]:
    """Call ``callback`` on SIGINT or SIGTERM while inside the block."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, callback)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _cmd_wait(args: argparse.Namespace) -> int:
    _setup_logging_from(args, os.environ)
    problems: list[str] = []
    admin_text: str | None = args.admin
    origin = f"--admin={admin_text} (command line)"
    if admin_text is None:
        admin_text = os.environ.get("LAKEPROXY_ADMIN_LISTEN") or None
        origin = f"LAKEPROXY_ADMIN_LISTEN={admin_text} (environment)"
    address: tuple[str, int] | None = None
    if admin_text is None:
        problems.append("--admin: required (the proxy's admin HOST:PORT), or set "
                        "LAKEPROXY_ADMIN_LISTEN")
    else:
        try:
            if args.admin is not None and "://" in admin_text:
                address = parse_admin_url(admin_text)
            else:
                address = parse_host_port(admin_text, allow_zero=False)
        except ValueError as exc:
            problems.append(f"{origin}: {exc}")
    try:
        timeout = parse_duration(args.timeout)
    except ValueError as exc:
        problems.append(f"--timeout={args.timeout} (command line): {exc}")
    if problems or address is None:
        raise ConfigError(problems)
    ready, last = run_async(wait_ready(address[0], address[1], timeout))
    if not ready:
        _fail(f"not ready after {timeout:g}s: {last}")
        return 1
    return 0


def parse_admin_url(text: str) -> tuple[str, int]:
    """``(host, port)`` from ``http://HOST:PORT`` (a trailing ``/`` or ``/readyz`` is
    fine), as ``lakeproxy wait --admin`` accepts besides ``HOST:PORT``.

    Raises:
        ValueError: with the reason.
    """
    form = "http://HOST:PORT or HOST:PORT, e.g. http://127.0.0.1:9090"
    try:
        url = urllib.parse.urlsplit(text.strip())
        port = url.port
    except ValueError:
        raise ValueError(f"must be {form}") from None
    if url.scheme.lower() != "http":
        raise ValueError(f"the admin server speaks plain HTTP: must be {form}")
    if not url.hostname or port is None or port == 0:
        raise ValueError(f"needs a host and a port: must be {form}")
    if url.path not in ("", "/", "/readyz") or url.query or url.fragment:
        raise ValueError(f"must be {form} (lakeproxy wait asks /readyz itself)")
    return url.hostname, port


async def wait_ready(
    host: str, port: int, within: float, *, interval: float = 0.2
) -> tuple[bool, str]:
    """Poll ``GET http://host:port/readyz`` until 200 or ``within`` seconds pass.

    A wildcard host (``0.0.0.0``, ``::``) means the same machine's loopback.
    Never raises for network errors; returns ``(True, "")`` or ``(False, last
    failure)``.
    """
    import aiohttp

    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    url = f"http://[{host}]:{port}/readyz" if ":" in host else f"http://{host}:{port}/readyz"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last = "no answer"
    async with aiohttp.ClientSession() as session:
        while True:
            remaining = deadline - loop.time()
            try:
                async with asyncio.timeout(max(min(2.0, remaining), 0.05)):
                    async with session.get(url, allow_redirects=False) as resp:
                        if resp.status == 200:
                            return True, ""
                        body = " ".join((await resp.text(errors="replace")).split())
                        last = f"HTTP {resp.status} {body[:200]}".rstrip()
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False, last
            await asyncio.sleep(min(interval, remaining))


_COMMANDS: Final[Mapping[str, Callable[[argparse.Namespace], int]]] = {
    "run": _cmd_run,
    "check": _cmd_check,
    "token": _cmd_token,
    "demo": _cmd_demo,
    "emulator": _cmd_emulator,
    "wait": _cmd_wait,
}
