#!/usr/bin/env bash
# Trains the ensemble reward model the uncertainty and over-optimisation experiments use
# (issue 20), with one command:
#   bash scripts/train_ensemble_rm.sh [OUTPUT_DIR] [extra train-rm flags]   (DATA=../shared/data by default)
#
# Choices, and why:
# * K = 5 members over the pip MiniLM base: the embeddings and the five lower blocks are frozen and
#   shared (computed once per distinct input by --cache-frozen); each member owns a copy of the top
#   block, the pooler and a head seeded apart, and learns from its own Poisson bootstrap of the
#   records, so members differ by data and head, not only by seed.
# * one reward (no objectives): the ensemble measures how sure the reward is, across the same
#   three sources the default model learns from (AlpacaEval 30%, HH harmless and TruthfulQA twice).
# * a member's last block computes the [CLS] row only, so a step costs a fraction of the single
#   model's; two epochs fit in minutes once the shared blocks are cached.
set -euo pipefail
DATA=${DATA:-../shared/data}
OUT_DIR=${1:-runs/ensemble-rm}
exec "${REWARD:-reward}" train-rm \
  --train-mode top --top-layers 1 --cache-frozen --max-length 512 \
  --ensemble 5 --ensemble-sample bootstrap \
  --data "$DATA/alpacaeval/train.jsonl.gz:0.3" \
  --data "$DATA/hh-harmless/train.jsonl.gz:2" \
  --data "$DATA/truthfulqa/train.jsonl.gz:2" \
  --length-balance 0.25 \
  --eval-data "alpacaeval/dev=$DATA/alpacaeval/dev.jsonl.gz::600" \
  --eval-data "alpacaeval/dev-balanced=$DATA/alpacaeval/dev-balanced.jsonl.gz::400" \
  --eval-data "hh-harmless/dev=$DATA/hh-harmless/dev.jsonl.gz" \
  --eval-data "truthfulqa/dev=$DATA/truthfulqa/dev.jsonl.gz" \
  --num-epochs 2 --per-device-batch-size 32 --learning-rate 1e-4 --lr-scheduler cosine --warmup-ratio 0.05 \
  --eval-steps 0 --save-steps 200 --seed 42 \
  --output-dir "$OUT_DIR" "${@:2}"
