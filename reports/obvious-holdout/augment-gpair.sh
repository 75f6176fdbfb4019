#!/usr/bin/env bash
# The exploratory run of QUESTION-augment-gpair.txt and its comparison, from the repo root.
# Training (25 minutes on 2 cores with the store holding the recipe's inputs):
#   reward augment --data ../shared/data/alpacaeval/train.jsonl.gz --kinds dismissive,off_topic --n 3000 --seed 42 --out runs/augp/augment-help.jsonl
#   reward augment --data ../shared/data/truthfulqa/train.jsonl.gz --kinds non_answer,hedged_false --n 1200 --seed 42 --out runs/augp/augment-truth.jsonl
#   SEEDS=42 bash scripts/train_default_rm.sh runs/augp/model \
#       --data runs/augp/augment-help.jsonl:1:objective=helpfulness --data runs/augp/augment-truth.jsonl:2:objective=truthfulness \
#       --gate-pair-consistency-weight 10 --frozen-cache-dir runs/frozen-store
# The comparison below: about 15 minutes.
set -euo pipefail
export OMP_WAIT_POLICY=PASSIVE PATH=.venv/bin:$PATH
DATA=${DATA:-../shared/data}
REPORT=reports/obvious-holdout
PORT=${PORT:-8741}
URL=http://127.0.0.1:$PORT

# the 57 pairs whose worse answer is not one of reward augment's reply strings
python - <<'PY'
import json
from trainer.augment import DISMISSIVE_REPLIES, NON_ANSWERS
templates = set(DISMISSIVE_REPLIES) | set(NON_ANSWERS)
rows = [json.loads(line) for line in open("reports/obvious-holdout/pairs.jsonl")]
kept = [r for r in rows if r["rejected"] not in templates]
open("runs/augp/obvious-57.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in kept))
print(f"{len(kept)} of {len(rows)} pairs kept")
PY

reward serve --port "$PORT" --model s42=runs/default-rm.runs/seed-42 --model gp42=runs/gpair-s42 \
  --model augp=runs/augp/model > runs/augp/serve.log 2>&1 &
SERVER=$!
trap 'kill $SERVER' EXIT
for _ in $(seq 120); do curl -sf "$URL/readyz" >/dev/null && break; sleep 2; done

sets=(--data "obvious=$REPORT/pairs.jsonl" --data obvious57=runs/augp/obvious-57.jsonl
      --data "sanity=$DATA/sanity/dev.jsonl.gz" --data "alpacaeval/dev=$DATA/alpacaeval/dev.jsonl.gz"
      --data "alpacaeval/dev-balanced=$DATA/alpacaeval/dev-balanced.jsonl.gz"
      --data "hh-harmless/dev=$DATA/hh-harmless/dev.jsonl.gz" --data "truthfulqa/dev=$DATA/truthfulqa/dev.jsonl.gz")
python scripts/compare_recipes.py --url "$URL" --recipe shipped42=s42 --recipe augp=augp "${sets[@]}" \
  --out "$REPORT/augment-gpair-compare.json" > /dev/null
python scripts/compare_recipes.py --url "$URL" --recipe gpair42=gp42 --recipe augp=augp \
  --data "obvious=$REPORT/pairs.jsonl" --data obvious57=runs/augp/obvious-57.jsonl \
  --out "$REPORT/augment-vs-gpair-compare.json" > /dev/null
python scripts/gate_probe.py runs/augp/model > "$REPORT/augment-gpair-probe.json"
