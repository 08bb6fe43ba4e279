"""``lakeproxy demo``: the built-in Lakebase emulator with a proxy in front of it.

Needs no account and no network: the emulator's workspace API mints the
credentials, its TLS front door stands in for the Lakebase endpoint, and a real
local PostgreSQL answers the queries. The proxy is the real one (``serve``).
"""

from __future__ import annotations

import errno
import os
import shlex
import socket
import sys

from lakeproxy.app import serve
from lakeproxy.config import DEFAULT_LISTEN, load_config, parse_host_port
from lakeproxy.server import ProxyServer


def _address_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (None when it can). Checked before the
    emulator starts, so a taken port (PgBouncer's default is 6432 too) is one line."""
    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return "address already in use" if exc.errno == errno.EADDRINUSE else str(exc)
    return None


async def run_demo(listen: str = DEFAULT_LISTEN) -> int:
    """Start the emulator, serve a proxy on ``listen`` (``HOST:PORT``) in front of it
    until Ctrl-C. Returns 0, or 1 when ``listen`` is taken (one line, with the fix)."""
    from lakeproxy.emulator import Emulator

    host, port = parse_host_port(listen)
    busy = _address_in_use(host, port)
    if busy is not None:
        bracketed = f"[{host}]" if ":" in host else host
        print(f"lakeproxy: cannot listen on {bracketed}:{port}: {busy} (PgBouncer uses 6432 "
              f"too); pick another port: lakeproxy demo --listen {bracketed}:{port + 1} "
              f"(or make demo LISTEN={bracketed}:{port + 1})", file=sys.stderr, flush=True)
        return 1
    emulator = Emulator()
    print("lakeproxy demo: starting the Lakebase emulator (PostgreSQL, workspace API, "
          "TLS front door)...", flush=True)
    await emulator.start()
    try:
        env = dict(emulator.env())
        env["LAKEPROXY_LISTEN"] = listen
        for key in ("LAKEPROXY_ADMIN_LISTEN", "LAKEPROXY_LOG_LEVEL", "LAKEPROXY_LOG_FORMAT"):
            if key in os.environ:
                env[key] = os.environ[key]
        config = load_config(env=env)

        def ready(server: ProxyServer) -> None:
            listen = server.bound[0]
            host, _, port = listen.rpartition(":")
            exports = "".join(
                f"    export {key}={shlex.quote(value)}\n"
                for key, value in emulator.env().items() if key != "DATABRICKS_CLIENT_SECRET"
            )
            print(
                "\nlakeproxy demo is ready. In another terminal:\n\n"
                f'    psql "host={host.strip("[]")} port={port} dbname=databricks_postgres" '
                "-c 'SELECT current_user, current_database()'\n\n"
                f"The proxy logs in to the emulated endpoint {emulator.host} as role "
                f"{emulator.role}\nwith a freshly minted OAuth database credential. "
                "Ctrl-C stops everything.\n\n"
                "It was configured with these variables (the proxy's own LAKEBASE_* names, so\n"
                "they leave psql's PG* settings alone; `lakeproxy emulator` prints them all):\n\n"
                f"{exports}",
                flush=True,
            )

        return await serve(config, ready=ready)
    finally:
        await emulator.stop()
        print("lakeproxy demo: stopped.", file=sys.stderr, flush=True)
