#!/usr/bin/env bash
# The README's main job, end to end on the built-in data; installs the project into .venv first.
#   1. build the bundled `default` corpus into TFDS ArrayRecord records,
#   2. train the `tiny` model on CPU for a few minutes,
#   3. report validation bits/token next to unigram and n-gram baselines on the same tokens,
#   4. evaluate the trained model on the held-out `test` split (bits/token, /note, /second) beside the baselines,
#      and its infilling / accompaniment (spans of the test pieces) beside continuation on the same tokens,
#   5. export its weights and generate a piece: MIDI + piano roll, and WAV when fluidsynth is installed; then
#      rewrite 10-16 s of that piece (infilling, the rest kept),
#   6. print the piece's music statistics beside the test split's.
# Outputs go to $OUT (default runs/main_job). Extra arguments are passed to musenet-train
# (e.g. --config.train.total_steps=200 for a quicker run).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/main_job}
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e .
mkdir -p "$OUT"

echo "== 1/6 build the default dataset"
musenet-build-data --config default --data_dir "$OUT/data"

echo "== 2/6 train configs/tiny.py"
musenet-train --config=configs/tiny.py --workdir="$OUT/tiny" --data_dir="$OUT/data" "$@"

echo "== 3/6 result"
python - "$OUT/tiny/final_metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
model, unigram = m["eval/bits_per_token"], m["eval/unigram_bits_per_token"]
ngram, order = m.get("eval/ngram_bits_per_token"), m.get("eval/ngram_order")
line = f"validation: {model:.3f} bits/token; unigram baseline {unigram:.3f}"
if ngram is not None:
    line += f"; {order}-gram baseline {ngram:.3f} (model {100 * (model / ngram - 1):+.1f}%)"
print(line + " bits/token, on the same tokens")
if not model < unigram:
    sys.exit("the model did not beat the unigram baseline")
if ngram is not None and not model < ngram:
    print("note: the model does NOT beat the n-gram baseline: it has learned little more than local statistics")
PY

echo "== 4/6 evaluate on the held-out test split"
musenet-eval --workdir="$OUT/tiny" --split=test --data_dir="$OUT/data" --out="$OUT/eval_test.json"
for task in infill accompany; do
  musenet-eval --workdir="$OUT/tiny" --split=test --data_dir="$OUT/data" --task=$task --out="$OUT/eval_$task.json"
done

echo "== 5/6 export and generate"
rm -rf "$OUT/export"
musenet-export --workdir="$OUT/tiny" --out="$OUT/export"
mkdir -p "$OUT/generated"
AUDIO=()
if command -v fluidsynth >/dev/null; then
  AUDIO=(--wav="$OUT/generated/piece.wav")
else
  echo "(fluidsynth not installed: no WAV; on Debian/Ubuntu: apt-get install fluidsynth timgm6mb-soundfont)"
fi
# A condition the bundled corpus holds (its Bach chorales are on piano). Temperature 0.8 with nucleus 0.9: with
# this small model, plain sampling at 0.9 thickens the texture (benchmarks/quality.py measures the settings).
musenet-generate --model="$OUT/export" --genre=bach --instruments=piano --seconds=30 --seed=0 \
  --temperature=0.8 --top_p=0.9 --out="$OUT/generated/piece.mid" --pianoroll="$OUT/generated/piece.png" "${AUDIO[@]}"
# The same piece with 10-16 s rewritten: the music before and after the span is kept, note for note.
musenet-generate --model="$OUT/export" --genre=bach --primer="$OUT/generated/piece.mid" --infill_from=10 \
  --infill_to=16 --seed=1 --temperature=0.8 --top_p=0.9 --out="$OUT/generated/piece-infill.mid" \
  --pianoroll="$OUT/generated/piece-infill.png"

echo "== 6/6 music statistics of the piece beside the test split's (per-piece 10th..90th percentiles)"
musenet-stats "$OUT/generated/piece.mid" --vocab="$OUT/export/vocab.json" --reference_data_dir="$OUT/data" \
  --reference_split=test \
  --out="$OUT/generated/stats.json"

echo "checkpoints, TensorBoard logs and metrics.jsonl: $OUT/tiny"
echo "test-split evaluation: $OUT/eval_test.json (infilling: eval_infill.json, eval_accompany.json)"
echo "exported weights: $OUT/export"
echo "generated piece: $OUT/generated/ (piece.mid, piece.png$([ ${#AUDIO[@]} -gt 0 ] && echo ', piece.wav'); its 10-16 s rewritten: piece-infill.mid, .png)"
echo "compose with it in a browser (the co-composer page and its JSON API, on loopback):"
echo "  . .venv/bin/activate && musenet-serve --model=$OUT/export    # then open http://127.0.0.1:8000/"
