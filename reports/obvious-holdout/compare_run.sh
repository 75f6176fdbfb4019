#!/usr/bin/env bash
# One exploratory run against the shipped recipe's seed 42, from the repo root (about 10 minutes):
#   bash reports/obvious-holdout/compare_run.sh augp    # QUESTION-augment-gpair.txt
#   bash reports/obvious-holdout/compare_run.sh auglb   # QUESTION-length-balanced.txt
#   bash reports/obvious-holdout/compare_run.sh relans  # QUESTION-related-answer.txt
# Training, on 2 cores with the store holding the recipe's inputs (36-37 minutes each):
#   reward augment --data ../shared/data/alpacaeval/train.jsonl.gz --kinds dismissive,off_topic --n 3000 --seed 42 --out runs/augp/augment-help.jsonl
#   reward augment --data ../shared/data/truthfulqa/train.jsonl.gz --kinds non_answer,hedged_false --n 1200 --seed 42 --out runs/augp/augment-truth.jsonl
#   reward augment --data ../shared/data/alpacaeval/train.jsonl.gz --kinds dismissive,longer_off_topic --n 3000 --seed 42 --out runs/auglb/augment-help.jsonl
#   for run in augp auglb; do
#     SEEDS=42 bash scripts/train_default_rm.sh runs/$run/model \
#       --data runs/$run/augment-help.jsonl:1:objective=helpfulness --data runs/augp/augment-truth.jsonl:2:objective=truthfulness \
#       --gate-pair-consistency-weight 10 --frozen-cache-dir runs/frozen-store
#   done
#   reward augment --data ../shared/data/alpacaeval/train.jsonl.gz --kinds related_answer --n 3000 --seed 42 --out runs/relans/augment-help.jsonl
#   SEEDS=42 bash scripts/train_default_rm.sh runs/relans/model \
#     --data runs/relans/augment-help.jsonl:1:objective=helpfulness --frozen-cache-dir runs/frozen-store
set -euo pipefail
export OMP_WAIT_POLICY=PASSIVE PATH=.venv/bin:$PATH
DATA=${DATA:-../shared/data}
REPORT=reports/obvious-holdout
PORT=${PORT:-8741}
URL=http://127.0.0.1:$PORT
case "${1:-}" in
  augp)  out=augment-gpair;   other=gpair42; other_dir=runs/gpair-s42; vs_out=augment-vs-gpair-compare.json ;;
  auglb) out=length-balanced; other=augp;    other_dir=runs/augp/model; vs_out=length-balanced-vs-augp-compare.json ;;
  relans) out=related-answer; other=auglb;   other_dir=runs/auglb/model; vs_out=related-answer-vs-auglb-compare.json ;;
  *) echo "usage: $0 augp|auglb|relans" >&2; exit 2 ;;
esac
run=$1

# the 57 pairs whose worse answer is not one of reward augment's reply strings
python - <<'PY'
import json
from trainer.augment import DISMISSIVE_REPLIES, NON_ANSWERS
templates = set(DISMISSIVE_REPLIES) | set(NON_ANSWERS)
rows = [json.loads(line) for line in open("reports/obvious-holdout/pairs.jsonl")]
kept = [r for r in rows if r["rejected"] not in templates]
open("runs/obvious-57.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in kept))
print(f"{len(kept)} of {len(rows)} pairs kept")
PY

reward serve --port "$PORT" --model s42=runs/default-rm.runs/seed-42 --model "$other=$other_dir" \
  --model "$run=runs/$run/model" > "runs/$run/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER' EXIT
for _ in $(seq 120); do curl -sf "$URL/readyz" >/dev/null && break; sleep 2; done

obvious=(--data "obvious=$REPORT/pairs.jsonl" --data obvious57=runs/obvious-57.jsonl)
python scripts/compare_recipes.py --url "$URL" --recipe shipped42=s42 --recipe "$run=$run" "${obvious[@]}" \
  --data "sanity=$DATA/sanity/dev.jsonl.gz" --data "alpacaeval/dev=$DATA/alpacaeval/dev.jsonl.gz" \
  --data "alpacaeval/dev-balanced=$DATA/alpacaeval/dev-balanced.jsonl.gz" \
  --data "hh-harmless/dev=$DATA/hh-harmless/dev.jsonl.gz" --data "truthfulqa/dev=$DATA/truthfulqa/dev.jsonl.gz" \
  --out "$REPORT/$out-compare.json" > /dev/null
python scripts/compare_recipes.py --url "$URL" --recipe "$other=$other" --recipe "$run=$run" "${obvious[@]}" \
  --out "$REPORT/$vs_out" > /dev/null
if [ "$run" != augp ]; then  # augp's split is in by-length.json, beside the other models'
  python "$REPORT/by_length.py" --url "$URL" "$run" > "$REPORT/by-length-$out.json"
fi
python scripts/gate_probe.py "runs/$run/model" > "$REPORT/$out-probe.json"
