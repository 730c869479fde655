#!/usr/bin/env bash
# The main job on the embedded default model and data: heatmaps of held-out digits for every
# method, a comparison montage and the faithfulness table, written to out/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh
"$PY" -m pip install -q .
OUT="${1:-out}"
"$PY" -m relprop explain --model default --method lrp.epsilon_plus_flat --input default --out "$OUT/explain"
"$PY" -m relprop compare --model default --input default --limit 10 --out "$OUT/compare.png"
"$PY" -m relprop evaluate --model default --num-samples 100 --out "$OUT/evaluate"
echo "wrote $OUT/"
