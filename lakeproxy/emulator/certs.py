"""A throwaway CA and a server certificate, as PEM files (uses ``trustme``)."""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trustme

__all__ = ["TlsFiles", "make_certs"]


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """``ca_file``: the CA certificate clients trust; ``cert_file``: the server
    certificate chain (leaf first); ``key_file``: its private key (mode 0600)."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        """An ``ssl.SSLContext`` for a TLS server presenting this certificate."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A verifying client ``ssl.SSLContext`` trusting only this CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def make_certs(dir: Path, hosts: Sequence[str]) -> TlsFiles:
    """Create a new CA and a server certificate whose SANs are ``hosts`` (DNS
    names and/or IP addresses); write ``ca.pem``, ``server.pem`` and
    ``server.key`` into ``dir`` (created if needed).

    The key file is mode 0600 and owned by the caller; a PostgreSQL server run
    as another user should get a copy it owns (``PgCluster`` makes one).
    Raises ValueError when ``hosts`` is empty.
    """
    if not hosts:
        raise ValueError("make_certs needs at least one host name or IP address")
    dir.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="lakeproxy emulator")
    common_name = next((h for h in hosts if not _is_ip(h)), hosts[0])
    leaf = ca.issue_cert(*hosts, common_name=common_name)
    files = TlsFiles(dir / "ca.pem", dir / "server.pem", dir / "server.key")
    files.ca_file.write_bytes(ca.cert_pem.bytes())
    files.cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    files.key_file.touch(mode=0o600)
    files.key_file.chmod(0o600)
    files.key_file.write_bytes(leaf.private_key_pem.bytes())
    return files
