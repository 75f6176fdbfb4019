#!/usr/bin/env bash
# The run of QUESTION-length-balanced.txt and its comparison, from the repo root.
# Training (as augment-gpair.sh, with the helpfulness file made by the new kind):
#   reward augment --data ../shared/data/alpacaeval/train.jsonl.gz --kinds dismissive,longer_off_topic --n 3000 --seed 42 --out runs/auglb/augment-help.jsonl
#   SEEDS=42 bash scripts/train_default_rm.sh runs/auglb/model \
#       --data runs/auglb/augment-help.jsonl:1:objective=helpfulness --data runs/augp/augment-truth.jsonl:2:objective=truthfulness \
#       --gate-pair-consistency-weight 10 --frozen-cache-dir runs/frozen-store
# (runs/augp/ is written by augment-gpair.sh's commands.) The comparison below: about 10 minutes.
set -euo pipefail
export OMP_WAIT_POLICY=PASSIVE PATH=.venv/bin:$PATH
DATA=${DATA:-../shared/data}
REPORT=reports/obvious-holdout
PORT=${PORT:-8744}
URL=http://127.0.0.1:$PORT

reward serve --port "$PORT" --model s42=runs/default-rm.runs/seed-42 --model augp=runs/augp/model \
  --model auglb=runs/auglb/model > runs/auglb/serve.log 2>&1 &
SERVER=$!
trap 'kill $SERVER' EXIT
for _ in $(seq 120); do curl -sf "$URL/readyz" >/dev/null && break; sleep 2; done

sets=(--data "obvious=$REPORT/pairs.jsonl" --data obvious57=runs/augp/obvious-57.jsonl
      --data "sanity=$DATA/sanity/dev.jsonl.gz" --data "alpacaeval/dev=$DATA/alpacaeval/dev.jsonl.gz"
      --data "alpacaeval/dev-balanced=$DATA/alpacaeval/dev-balanced.jsonl.gz"
      --data "hh-harmless/dev=$DATA/hh-harmless/dev.jsonl.gz" --data "truthfulqa/dev=$DATA/truthfulqa/dev.jsonl.gz")
python scripts/compare_recipes.py --url "$URL" --recipe shipped42=s42 --recipe auglb=auglb "${sets[@]}" \
  --out "$REPORT/length-balanced-compare.json" > /dev/null
python scripts/compare_recipes.py --url "$URL" --recipe augp=augp --recipe auglb=auglb \
  --data "obvious=$REPORT/pairs.jsonl" --data obvious57=runs/augp/obvious-57.jsonl \
  --out "$REPORT/length-balanced-vs-augp-compare.json" > /dev/null
python "$REPORT/by_length.py" --url "$URL" auglb > "$REPORT/by-length-balanced.json"
python scripts/gate_probe.py runs/auglb/model > "$REPORT/length-balanced-probe.json"
