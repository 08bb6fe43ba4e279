"""The wire fuzzer in CI: seeds, regression inputs, a hypothesis pass over the
same oracles, and a short coverage-guided run of the atheris harness.

The oracles live in ``wire_checks.py`` (no atheris needed); the harness is
``fuzz_wire.py`` (``make fuzz`` runs it longer; see RELIABILITY.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import wire_checks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire_checks import check_any, check_codec, check_framing, check_handshake, handshake_input

from lakeproxy.wire.codec import PasswordKind

HERE = Path(__file__).resolve().parent
#: Seconds of coverage-guided fuzzing in CI (the long run is documented in RELIABILITY.md).
SMOKE_SECONDS = int(os.environ.get("LAKEPROXY_FUZZ_SECONDS", "20"))

SSL = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
GSS = b"\x00\x00\x00\x08\x04\xd2\x16\x30"


def startup(params: bytes, version: bytes = b"\x00\x03\x00\x00") -> bytes:
    body = version + params + b"\x00"
    return (len(body) + 4).to_bytes(4, "big") + body


USER = startup(b"user\x00alice\x00")


@pytest.mark.parametrize("name", sorted(wire_checks.seed_inputs()))
def test_seed(name: str) -> None:
    check_any(wire_checks.seed_inputs()[name])


def test_limit_case_is_exactly_the_limit() -> None:
    assert len(HANDSHAKE_CASES["startup at the 10000-byte limit"]) == 2 + 10_000


def test_seeds_cover_every_capture() -> None:
    captures = list(wire_checks.STARTUP_CAPTURES.glob("*.bin"))
    assert len(captures) >= 5
    assert sum(k.startswith("hs-") for k in wire_checks.seed_inputs()) >= 6 * (len(captures) // 2)


# Hand-made edge cases: each is a regression test of the oracles and of the code
# (limits, conservation of trailing bytes, the upgrade rules).
HANDSHAKE_CASES = {
    "startup at the 10000-byte limit": handshake_input(
        startup(b"user\x00alice\x00options\x00" + b"x" * 9_971 + b"\x00")),
    "startup one byte over": handshake_input(
        (10_001).to_bytes(4, "big") + b"\x00\x03\x00\x00" + bytes(9993)),
    "length below 8": handshake_input(b"\x00\x00\x00\x07\x00\x03\x00"),
    "length 0xffffffff": handshake_input(b"\xff\xff\xff\xff"),
    "protocol 2": handshake_input(startup(b"user\x00a\x00", b"\x00\x02\x00\x00")),
    "3.9999 with _pq_ options": handshake_input(
        startup(b"user\x00a\x00_pq_.x\x00y\x00", b"\x00\x03\x27\x0f")),
    "3.2": handshake_input(startup(b"user\x00a\x00", b"\x00\x03\x00\x02")),
    "no user": handshake_input(startup(b"database\x00d\x00")),
    "duplicate parameter": handshake_input(startup(b"user\x00a\x00user\x00b\x00")),
    "invalid utf-8": handshake_input(startup(b"user\x00\xc3\x28\x00")),
    "data after SSLRequest": handshake_input(SSL + USER),
    "data after SSLRequest, chunked": handshake_input(SSL + USER, chunk_seed=8),
    "SSL twice": handshake_input(SSL + SSL, chunk_seed=8),
    "GSS then SSL then startup": handshake_input(GSS + SSL + USER, chunk_seed=8,
                                                 accept_ssl=True),
    "cancel with a 256-byte key": handshake_input(
        (264).to_bytes(4, "big") + b"\x04\xd2\x16\x2e" + bytes(256)),
    "cancel with a 257-byte key": handshake_input(
        (265).to_bytes(4, "big") + b"\x04\xd2\x16\x2e" + bytes(257)),
    "cancel then more bytes": handshake_input(
        (16).to_bytes(4, "big") + b"\x04\xd2\x16\x2e" + bytes(8) + b"junk", chunk_seed=3),
    "startup then a pipelined query": handshake_input(
        USER + b"Q\x00\x00\x00\x0dSELECT 1\x00", chunk_seed=5),
    "password then trailing bytes": handshake_input(
        USER + b"p\x00\x00\x00\x06x\x00" + b"Q\x00\x00\x00\x05", chunk_seed=2,
        passwords=(PasswordKind.PASSWORD,)),
    "password frame over 8192": handshake_input(
        USER + b"p\x00\x00\x20\x01", passwords=(PasswordKind.PASSWORD,)),
    "query instead of password": handshake_input(
        USER + b"Q\x00\x00\x00\x05x", passwords=(PasswordKind.PASSWORD,)),
    "SASL initial with length -1": handshake_input(
        USER + b"p\x00\x00\x00\x16SCRAM-SHA-256\x00\xff\xff\xff\xff",
        passwords=(PasswordKind.SASL_INITIAL,)),
    "SASL initial with length -2": handshake_input(
        USER + b"p\x00\x00\x00\x16SCRAM-SHA-256\x00\xff\xff\xff\xfe",
        passwords=(PasswordKind.SASL_INITIAL,)),
    "SASL initial length past the frame": handshake_input(
        USER + b"p\x00\x00\x00\x16SCRAM-SHA-256\x00\x00\x00\x00\x09",
        passwords=(PasswordKind.SASL_INITIAL,)),
    "empty SASL response": handshake_input(
        USER + b"p\x00\x00\x00\x04", passwords=(PasswordKind.SASL_RESPONSE,)),
}


@pytest.mark.parametrize("name", sorted(HANDSHAKE_CASES))
def test_handshake_case(name: str) -> None:
    check_handshake(HANDSHAKE_CASES[name])


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 255])
def test_every_chunking_of_a_real_capture(seed: int) -> None:
    capture = (wire_checks.STARTUP_CAPTURES / "psycopg_3_2.bin").read_bytes()
    check_handshake(handshake_input(SSL + capture + b"Q\x00\x00\x00\x05x", chunk_seed=seed))


CODEC_CASES = {
    "backend: R with a short body": b"\x01R\x00\x00\x00\x06\x00\x00",
    "backend: K with a 257-byte key": b"\x01K" + (265).to_bytes(4, "big") + bytes(261),
    "backend: Z with status X": b"\x01Z\x00\x00\x00\x05X",
    "backend: E with a non-ASCII code": b"\x01E\x00\x00\x00\x08\x80x\x00\x00",
    "backend: v with a huge count": b"\x01v\x00\x00\x00\x0c\x00\x00\x00\x00\xff\xff\xff\xff",
    "backend: unknown auth code": b"\x01R\x00\x00\x00\x0c\x00\x00\x00\x07abcd",
    "backend: length disagrees": b"\x01Z\x00\x00\x00\x09I",
    "startup: SSLRequest with a body": b"\x00\x00\x00\x00\x0c\x04\xd2\x16\x2fxxxx",
    "password: NUL inside": b"\x02p\x00\x00\x00\x08a\x00b\x00",
    "password: no NUL": b"\x02p\x00\x00\x00\x05a",
}


@pytest.mark.parametrize("name", sorted(CODEC_CASES))
def test_codec_case(name: str) -> None:
    check_codec(CODEC_CASES[name])


FRAMING_CASES = {
    "tagged at the limit then over": bytes([0b00101, 3]) + b"p\x00\x00\x00\x08abcd"
    + b"p\x00\x00\x00\x09",
    "untagged switch to tagged": bytes([0b10110, 1]) + USER + b"Z\x00\x00\x00\x05I",
    "tagged length 3": bytes([0b11101, 0]) + b"Z\x00\x00\x00\x03",
}


@pytest.mark.parametrize("name", sorted(FRAMING_CASES))
def test_framing_case(name: str) -> None:
    check_framing(FRAMING_CASES[name])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(wire_checks.seed_inputs().values())), st.binary(max_size=64),
       st.integers(0, 400), st.integers(0, 255))
def test_mutated_seeds(seed: bytes, splice: bytes, at: int, flags: int) -> None:
    """A cheap, always-available cousin of the fuzzer: seeds with bytes spliced in."""
    data = bytearray(seed)
    at = min(at, len(data))
    data[at:at] = splice
    if len(data) > 1:
        data[1] = flags
    check_any(bytes(data))


def test_coverage_guided_smoke(tmp_path: Path) -> None:
    """atheris/libFuzzer for SMOKE_SECONDS from the seeds: exits 0 with no crash."""
    pytest.importorskip("atheris", reason="atheris (pip install atheris) runs the fuzzer")
    corpus, seeds = tmp_path / "corpus", tmp_path / "seeds"
    corpus.mkdir()
    wire_checks.write_seeds(seeds)
    cmd = [sys.executable, str(HERE / "fuzz_wire.py"), f"-max_total_time={SMOKE_SECONDS}",
           "-timeout=10", "-rss_limit_mb=1024", f"-artifact_prefix={tmp_path}/",
           str(corpus), str(seeds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SMOKE_SECONDS + 60,
                          check=False)
    tail = proc.stderr[-6000:]
    assert proc.returncode == 0, f"fuzzer failed (see crash-* in {tmp_path}):\n{tail}"
    assert "Done " in proc.stderr, tail
    assert not list(tmp_path.glob("crash-*")), tail
