#!/usr/bin/env bash
# The README's main job, end to end on the built-in data; installs the project into .venv first.
#   1. build the bundled `default` corpus into TFDS ArrayRecord records,
#   2. train the `tiny` model on CPU for a few minutes,
#   3. report validation bits/token next to a unigram baseline on the same data.
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

echo "== 1/3 build the default dataset"
musenet-build-data --config default --data_dir "$OUT/data"

echo "== 2/3 train configs/tiny.py"
musenet-train --config=configs/tiny.py --workdir="$OUT/tiny" --data_dir="$OUT/data" "$@"

echo "== 3/3 result"
python - "$OUT/tiny/final_metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
model, unigram = m["eval/bits_per_token"], m["eval/unigram_bits_per_token"]
print(f"validation: {model:.3f} bits/token; unigram baseline on the same data: {unigram:.3f} bits/token")
if not model < unigram:
    sys.exit("the model did not beat the unigram baseline")
PY
echo "checkpoints, TensorBoard logs and metrics.jsonl: $OUT/tiny"
