"""Capture the first packets real Postgres clients send, for the codec tests.

For each client preset this opens a one-shot TCP listener on 127.0.0.1 (an
ephemeral port), runs the client against it, answers every SSLRequest /
GSSENCRequest with 'N', saves the StartupMessage, replies with a FATAL
ErrorResponse so the client gives up, and writes:

* ``startup/<name>.bin``            the StartupMessage, exactly as received;
* ``startup/<name>.sslrequest.bin`` the SSLRequest sent first, if any
  (``.gssencrequest.bin`` likewise).

Usage (from the repository root): ``.venv/bin/python tests/data/capture_startup.py
[PRESET ...]``; with no argument every preset is captured. See README.md here.
This file deliberately uses only the standard library (no lakeproxy code), so
the captures do not depend on the codec they test.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "startup"

SSL_REQUEST_CODE = (1234 << 16) | 5679
GSSENC_REQUEST_CODE = (1234 << 16) | 5680

#: Connection parameters every client is given.
USER = "alice"
DATABASE = "shop"

_PY = sys.executable

#: name -> (argv with {port} placeholders, extra environment)
PRESETS: dict[str, tuple[list[str], dict[str, str]]] = {
    "psql": (
        ["psql", f"host=127.0.0.1 port={{port}} user={USER} dbname={DATABASE}", "-c", "select 1"],
        {"PGSSLMODE": "disable"},
    ),
    "psql_prefer": (
        ["psql", f"host=127.0.0.1 port={{port}} user={USER} dbname={DATABASE}", "-c", "select 1"],
        {"PGSSLMODE": "prefer"},
    ),
    "psql_options": (
        ["psql", f"host=127.0.0.1 port={{port}} user={USER} dbname={DATABASE}", "-c", "select 1"],
        {
            "PGSSLMODE": "disable",
            "PGAPPNAME": "nightly report \u00e9t\u00e9",
            "PGOPTIONS": "-c search_path=app,public -c statement_timeout=5s",
            "PGCLIENTENCODING": "UTF8",
        },
    ),
    "psycopg": (
        [
            _PY,
            "-c",
            "import psycopg, sys\n"
            "try:\n"
            f"    psycopg.connect('host=127.0.0.1 port={{port}} user={USER} dbname={DATABASE} "
            "application_name=psycopg-capture connect_timeout=5')\n"
            "except psycopg.OperationalError:\n"
            "    sys.exit(1)\n",
        ],
        {},
    ),
    "psycopg_3_2": (
        [
            _PY,
            "-c",
            "import psycopg, sys\n"
            "try:\n"
            f"    psycopg.connect('host=127.0.0.1 port={{port}} user={USER} dbname={DATABASE} "
            "sslmode=disable max_protocol_version=3.2 connect_timeout=5')\n"
            "except psycopg.OperationalError:\n"
            "    sys.exit(1)\n",
        ],
        {},
    ),
    "asyncpg": (
        [
            _PY,
            "-c",
            "import asyncio, asyncpg, sys\n"
            "async def main():\n"
            f"    await asyncpg.connect(host='127.0.0.1', port={{port}}, user='{USER}',\n"
            f"        database='{DATABASE}', timeout=5,\n"
            "        server_settings={'application_name': 'asyncpg-capture'})\n"
            "try:\n"
            "    asyncio.run(main())\n"
            "except Exception:\n"
            "    sys.exit(1)\n",
        ],
        {},
    ),
}


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError(f"client closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def _error_response() -> bytes:
    fields = b"SFATAL\x00VFATAL\x00C28000\x00Mcapture only, not a server\x00\x00"
    return b"E" + (len(fields) + 4).to_bytes(4, "big") + fields


def _serve_one(listener: socket.socket, packets: list[tuple[str, bytes]]) -> None:
    """Handle the first connection: record packets until the StartupMessage."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(10)
        while True:
            head = _recv_exact(conn, 4)
            length = int.from_bytes(head, "big")
            if not 8 <= length <= 10_000:
                raise ValueError(f"implausible startup packet length {length}")
            packet = head + _recv_exact(conn, length - 4)
            code = int.from_bytes(packet[4:8], "big")
            if code == SSL_REQUEST_CODE:
                packets.append(("sslrequest", packet))
                conn.sendall(b"N")
            elif code == GSSENC_REQUEST_CODE:
                packets.append(("gssencrequest", packet))
                conn.sendall(b"N")
            else:
                packets.append(("startup", packet))
                conn.sendall(_error_response())
                return


def capture(name: str) -> list[Path]:
    """Run preset ``name`` against a one-shot listener; return the files written."""
    argv, extra_env = PRESETS[name]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(15)
        port = listener.getsockname()[1]
        packets: list[tuple[str, bytes]] = []
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                _serve_one(listener, packets)
            except BaseException as exc:  # reported below, in the main thread
                errors.append(exc)

        server = threading.Thread(target=serve)
        server.start()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "PGCONNECT_TIMEOUT": "5",
            "PGPASSWORD": "",
            "PGPASSFILE": "/dev/null",
            **extra_env,
        }
        client = subprocess.run(
            [a.replace("{port}", str(port)) for a in argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        server.join(timeout=20)
    if errors:
        raise RuntimeError(f"{name}: capture failed: {errors[0]!r}; client said {client.stderr}")
    written: list[Path] = []
    OUT.mkdir(exist_ok=True)
    for kind, packet in packets:
        path = OUT / (f"{name}.bin" if kind == "startup" else f"{name}.{kind}.bin")
        path.write_bytes(packet)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("presets", nargs="*", metavar="PRESET", help=", ".join(PRESETS))
    args = parser.parse_args(argv)
    unknown = set(args.presets) - set(PRESETS)
    if unknown:
        parser.error(f"unknown preset(s): {', '.join(sorted(unknown))}")
    for name in args.presets or list(PRESETS):
        for path in capture(name):
            print(f"{name}: wrote {path.relative_to(HERE)} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
