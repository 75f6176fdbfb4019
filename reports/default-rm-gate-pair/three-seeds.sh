#!/usr/bin/env bash
# The third-seed diagnostic of RULE.txt, after: SEEDS=44 bash scripts/train_default_rm.sh runs/gpair-s44 --gate-pair-consistency-weight 10 --frozen-cache-dir runs/frozen-store
set -euo pipefail
export OMP_WAIT_POLICY=PASSIVE PATH=.venv/bin:$PATH
DATA=../shared/data
reward export-warm --model runs/gpair-s42 --model runs/gpair-s43 --model runs/gpair-s44 --out runs/gpair-warm3 --overwrite --gate-temperature 1 \
  --stats-data "$DATA/alpacaeval/train.jsonl.gz:0.6" --stats-data "$DATA/hh-harmless/train.jsonl.gz:4" \
  --stats-data "$DATA/truthfulqa/train.jsonl.gz:4" > runs/gpair-warm3.export.json 2>&1
reward serve --port 8128 --model gp42=runs/gpair-s42 --model gp43=runs/gpair-s43 --model gp44=runs/gpair-s44 --model gw3=runs/gpair-warm3 > runs/gpair-three.serve.log 2>&1 &
server=$!
for _ in $(seq 120); do curl -sf http://127.0.0.1:8128/readyz >/dev/null && break; sleep 2; done
python scripts/compare_recipes.py --url http://127.0.0.1:8128 --recipe runs=gp42,gp43,gp44 --recipe average=gw3 \
  --out reports/default-rm-gate-pair/three-seeds-compare.json > /dev/null 2> runs/gpair-three.compare.log
kill $server
