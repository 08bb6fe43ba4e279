"""Coverage-guided fuzzer (atheris/libFuzzer) over the client-facing wire layer.

Targets, picked by the input's first byte (see :mod:`wire_checks`): the client
handshake state machine (:class:`ClientHandshake`, bytes in -> events and
replies out, SSL/GSSENC answers and password exchanges included), the
:class:`FrameReader` on its own, and the codec's decoders with a byte-exact
re-encode check. Only ``ProtocolError`` may escape; anything else, or a broken
invariant, is a crash that libFuzzer saves as ``crash-<sha1>``.

Run (any libFuzzer flag works; with no corpus directory given, new inputs go to
``build/fuzz/corpus`` and the seeds are rebuilt in ``build/fuzz/seeds`` from the
real client captures in ``tests/data/startup``)::

    .venv/bin/python tests/fuzz/fuzz_wire.py -max_total_time=60     # or: make fuzz
    .venv/bin/python tests/fuzz/fuzz_wire.py crash-1234...           # replay one input

The long run documented in RELIABILITY.md is ``-max_total_time=3600``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Final

import atheris

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parents[1]
DEFAULT_DIR: Final = ROOT / "build" / "fuzz"

sys.path.insert(0, str(HERE))
with atheris.instrument_imports(include=["lakeproxy", "construct", "wire_checks"]):
    import wire_checks


def main(argv: list[str]) -> None:
    """Run libFuzzer with ``argv``; adds the default corpus and seed dirs when none is given."""
    args = list(argv)
    if not any(a.startswith("-max_len=") for a in args):
        args.append("-max_len=10240")  # room for a 10000-byte startup packet and its header
    if not any(a.startswith("-artifact_prefix=") for a in args):
        DEFAULT_DIR.mkdir(parents=True, exist_ok=True)
        args.append(f"-artifact_prefix={DEFAULT_DIR}/")  # crash-<sha1> files land here
    if not any(a.startswith("-dict=") for a in args):
        args.append(f"-dict={HERE / 'wire.dict'}")
    if not any(not a.startswith("-") for a in args[1:]):
        corpus = DEFAULT_DIR / "corpus"
        corpus.mkdir(parents=True, exist_ok=True)
        seeds = DEFAULT_DIR / "seeds"
        wire_checks.write_seeds(seeds)
        # The first directory receives new inputs; the second only seeds it.
        args += [str(corpus), str(seeds)]
    atheris.Setup(args, wire_checks.check_any)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
