"""``lakeproxy demo``: the built-in Lakebase emulator with a proxy in front of it.

Needs no account and no network: the emulator's workspace API mints the
credentials, its TLS front door stands in for the Lakebase endpoint, and a real
local PostgreSQL answers the queries. The proxy is the real one (``serve``).
"""

from __future__ import annotations

import os
import sys

from lakeproxy.app import serve
from lakeproxy.config import load_config
from lakeproxy.server import ProxyServer

DEFAULT_DEMO_LISTEN = "127.0.0.1:6432"


async def run_demo() -> int:
    """Start the emulator, serve a proxy in front of it until Ctrl-C. Returns 0."""
    from lakeproxy.emulator import Emulator

    emulator = Emulator()
    print("lakeproxy demo: starting the Lakebase emulator (PostgreSQL, workspace API, "
          "TLS front door)...", flush=True)
    await emulator.start()
    try:
        env = dict(emulator.env())
        env["LAKEPROXY_LISTEN"] = os.environ.get("LAKEPROXY_LISTEN", DEFAULT_DEMO_LISTEN)
        for key in ("LAKEPROXY_ADMIN_LISTEN", "LAKEPROXY_LOG_LEVEL", "LAKEPROXY_LOG_FORMAT"):
            if key in os.environ:
                env[key] = os.environ[key]
        config = load_config(env=env)

        def ready(server: ProxyServer) -> None:
            listen = server.bound[0]
            host, _, port = listen.rpartition(":")
            print(
                "\nlakeproxy demo is ready. In another terminal:\n\n"
                f'    psql "host={host.strip("[]")} port={port} dbname=databricks_postgres" '
                "-c 'SELECT current_user, current_database()'\n\n"
                f"The proxy logs in to the emulated endpoint {emulator.host} as role "
                f"{emulator.role}\nwith a freshly minted OAuth database credential. "
                "Ctrl-C stops everything.\n",
                flush=True,
            )

        return await serve(config, ready=ready)
    finally:
        await emulator.stop()
        print("lakeproxy demo: stopped.", file=sys.stderr, flush=True)
