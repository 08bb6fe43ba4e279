"""SCRAM channel binding: ``tls-server-end-point`` from the endpoint's certificate.

RFC 5929: the hash of the DER certificate, with the hash named by its
signature algorithm (SHA-256 for MD5 and SHA-1). Parsed by hand: the ssl
module does not expose the signature algorithm.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Final


def _oid(dotted: str) -> bytes:
    """DER content bytes of an OBJECT IDENTIFIER."""
    parts = [int(p) for p in dotted.split(".")]
    out = bytearray([40 * parts[0] + parts[1]])
    for value in parts[2:]:
        chunk = [value & 0x7F]
        value >>= 7
        while value:
            chunk.append(0x80 | (value & 0x7F))
            value >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


#: Certificate signature algorithm -> its hash (RFC 3279, 4055, 5758).
_SIGNATURE_HASHES: Final[Mapping[bytes, str]] = {
    _oid("1.2.840.113549.1.1.4"): "md5",  # md5WithRSAEncryption
    _oid("1.2.840.113549.1.1.5"): "sha1",
    _oid("1.2.840.113549.1.1.14"): "sha224",
    _oid("1.2.840.113549.1.1.11"): "sha256",
    _oid("1.2.840.113549.1.1.12"): "sha384",
    _oid("1.2.840.113549.1.1.13"): "sha512",
    _oid("1.2.840.10045.4.1"): "sha1",  # ecdsa-with-SHA1
    _oid("1.2.840.10045.4.3.1"): "sha224",
    _oid("1.2.840.10045.4.3.2"): "sha256",
    _oid("1.2.840.10045.4.3.3"): "sha384",
    _oid("1.2.840.10045.4.3.4"): "sha512",
    _oid("1.2.840.10040.4.3"): "sha1",  # dsa-with-sha1
    _oid("2.16.840.1.101.3.4.3.1"): "sha224",  # dsa-with-sha224
    _oid("2.16.840.1.101.3.4.3.2"): "sha256",
}
#: Hash algorithm identifiers (inside RSASSA-PSS parameters).
_HASHES: Final[Mapping[bytes, str]] = {
    _oid("1.3.14.3.2.26"): "sha1",
    _oid("2.16.840.1.101.3.4.2.4"): "sha224",
    _oid("2.16.840.1.101.3.4.2.1"): "sha256",
    _oid("2.16.840.1.101.3.4.2.2"): "sha384",
    _oid("2.16.840.1.101.3.4.2.3"): "sha512",
}
_RSASSA_PSS: Final = _oid("1.2.840.113549.1.1.10")


def _der_item(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """Return ``(tag, content_start, content_end)`` of the DER item at ``pos``."""
    if pos + 2 > end:
        raise ValueError("truncated DER")
    tag, length = buf[pos], buf[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if not 1 <= n <= 4 or pos + n > end:
            raise ValueError("bad DER length")
        length = int.from_bytes(buf[pos : pos + n], "big")
        pos += n
    if pos + length > end:
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _signature_hash(der: bytes) -> str | None:
    """The hash of the certificate's signature algorithm, or None if unknown."""
    tag, start, end = _der_item(der, 0, len(der))  # Certificate ::= SEQUENCE
    if tag != 0x30:
        return None
    _, _, tbs_end = _der_item(der, start, end)  # tbsCertificate
    tag, alg_start, alg_end = _der_item(der, tbs_end, end)  # signatureAlgorithm
    if tag != 0x30:
        return None
    tag, oid_start, oid_end = _der_item(der, alg_start, alg_end)
    if tag != 0x06:
        return None
    oid = der[oid_start:oid_end]
    if oid != _RSASSA_PSS:
        return _SIGNATURE_HASHES.get(oid)
    # RSASSA-PSS-params ::= SEQUENCE { hashAlgorithm [0] AlgorithmIdentifier DEFAULT sha1, ...}
    if oid_end >= alg_end:
        return "sha1"
    tag, p_start, p_end = _der_item(der, oid_end, alg_end)
    if tag != 0x30 or p_start >= p_end:
        return "sha1"
    tag, h_start, h_end = _der_item(der, p_start, p_end)
    if tag != 0xA0:
        return "sha1"
    tag, a_start, a_end = _der_item(der, h_start, h_end)  # AlgorithmIdentifier
    if tag != 0x30:
        return None
    tag, o_start, o_end = _der_item(der, a_start, a_end)
    return _HASHES.get(der[o_start:o_end]) if tag == 0x06 else None


def tls_server_end_point(der: bytes) -> bytes | None:
    """The tls-server-end-point channel binding of a DER certificate (RFC 5929
    section 4.1): its hash with the certificate's signature hash, SHA-256 when
    that is MD5 or SHA-1. None when the algorithm defines no binding (Ed25519,
    ...) or the certificate cannot be parsed."""
    try:
        name = _signature_hash(der)
    except ValueError:
        return None
    if name is None:
        return None
    if name in ("md5", "sha1"):
        name = "sha256"
    return hashlib.new(name, der).digest()
