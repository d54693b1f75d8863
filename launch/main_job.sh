#!/usr/bin/env bash
# The README's main job, end to end on the built-in data. Installs the project into .venv first.
# Today: tokenize a bundled MIDI file, decode it back to MIDI and check the round trip.
# (Later stages -- build dataset, train, evaluate, generate -- are added here as they land.)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/main_job}
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e .
mkdir -p "$OUT"
EXAMPLE=tests/fixtures/midi/freedoom1_D_E1M1.mid
musenet-tokenize "$EXAMPLE" --out "$OUT/example.tokens"
musenet-detokenize "$OUT/example.tokens" --out "$OUT/example_roundtrip.mid"
musenet-tokenize "$OUT/example_roundtrip.mid" --out "$OUT/example_roundtrip.tokens"
cmp -s "$OUT/example.tokens" "$OUT/example_roundtrip.tokens" || { echo "round trip changed the tokens" >&2; exit 1; }
echo "tokens: $OUT/example.tokens ($(wc -w < "$OUT/example.tokens") tokens); decoded MIDI: $OUT/example_roundtrip.mid"
echo "round trip OK: tokenize(detokenize(tokens)) == tokens"
