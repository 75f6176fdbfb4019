#!/usr/bin/env bash
# The adoption comparison of RULE.txt, from the repo root, after both runs were trained:
#   SEEDS=42 bash scripts/train_default_rm.sh runs/gpair-s42 --gate-pair-consistency-weight 10 --frozen-cache-dir runs/frozen-store
#   SEEDS=43 bash scripts/train_default_rm.sh runs/gpair-s43 --gate-pair-consistency-weight 10 --frozen-cache-dir runs/frozen-store
# About 25 minutes on 2 cores.
set -euo pipefail
export OMP_WAIT_POLICY=PASSIVE PATH=.venv/bin:$PATH
DATA=${DATA:-../shared/data}
REPORT=reports/default-rm-gate-pair
wait_ready() { for _ in $(seq 120); do curl -sf "$1/readyz" >/dev/null && return; sleep 2; done; exit 1; }

# the average, as scripts/train_default_rm.sh makes it
reward export-warm --model runs/gpair-s42 --model runs/gpair-s43 --out runs/gpair-warm --overwrite --gate-temperature 0.5 \
  --stats-data "$DATA/alpacaeval/train.jsonl.gz:0.6" --stats-data "$DATA/hh-harmless/train.jsonl.gz:4" \
  --stats-data "$DATA/truthfulqa/train.jsonl.gz:4"
# held out: 1,000 AlpacaEval training pairs neither seed drew (both recipes draw the same 60% per seed)
python - <<'PY'
import sys
from pathlib import Path
sys.path[:0] = [".", "scripts", "reports/default-rm-gate", "reports/default-rm-sharper"]
from sharper_shipped import unused_alpaca
from trainer.data import write_rankings_jsonl
write_rankings_jsonl(unused_alpaca(Path("../shared/data"), 1000, 0), "runs/alpacaeval-unused-1000.jsonl")
PY

reward serve --port 8124 --model shipped=models/default-rm --model gpair=runs/gpair-warm > runs/gpair-warm.serve.log 2>&1 &
server=$!
wait_ready http://127.0.0.1:8124
python scripts/compare_recipes.py --url http://127.0.0.1:8124 --recipe shipped=shipped --recipe gpair=gpair \
  --out $REPORT/warm-compare.json > /dev/null
python scripts/compare_recipes.py --url http://127.0.0.1:8124 --recipe shipped=shipped --recipe gpair=gpair \
  --data alpacaeval-unused=runs/alpacaeval-unused-1000.jsonl --data "sharegpt-en=$DATA/sharegpt/dpo_en_demo.json" \
  --out $REPORT/warm-compare-held-out.json > /dev/null
python scripts/non_answer_probe.py --url http://127.0.0.1:8124 > $REPORT/warm-non-answers.jsonl  # the default: shipped
kill $server; wait $server || true

reward serve --port 8125 --model gpair=runs/gpair-warm > runs/gpair-na-serve.log 2>&1 &
server=$!
wait_ready http://127.0.0.1:8125
python scripts/non_answer_probe.py --url http://127.0.0.1:8125 >> $REPORT/warm-non-answers.jsonl
kill $server; wait $server || true

# the two recipes over their two seeds each
reward serve --port 8126 --model s42=runs/default-rm.runs/seed-42 --model s43=runs/default-rm.runs/seed-43 \
  --model gp42=runs/gpair-s42 --model gp43=runs/gpair-s43 > runs/gpair-4.serve.log 2>&1 &
server=$!
wait_ready http://127.0.0.1:8126
python scripts/compare_recipes.py --url http://127.0.0.1:8126 --recipe shipped=s42,s43 --recipe gpair=gp42,gp43 \
  --out $REPORT/two-seeds-compare.json > /dev/null
kill $server; wait $server || true

python scripts/gate_probe.py runs/gpair-warm > $REPORT/warm-probe.json
python scripts/gate_probe.py models/default-rm > $REPORT/shipped-probe.json  # as served, gate at temperature 0.5
