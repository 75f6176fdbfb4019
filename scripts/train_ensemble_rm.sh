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
#   three sources the default model learns from (AlpacaEval 15%, HH harmless and TruthfulQA twice),
#   sized so that the run takes about 20 minutes on 2 cores: the experiments measure the members'
#   disagreement, not the best accuracy.
# * a member's last block computes the [CLS] row only, so five members cost less per step than
#   training one full top block.
set -euo pipefail
DATA=${DATA:-../shared/data}
OUT_DIR=${1:-runs/ensemble-rm}
exec "${REWARD:-reward}" train-rm \
  --train-mode top --top-layers 1 --cache-frozen --max-length 512 \
  --ensemble 5 --ensemble-sample bootstrap \
  --data "$DATA/alpacaeval/train.jsonl.gz:0.15" \
  --data "$DATA/hh-harmless/train.jsonl.gz:2" \
  --data "$DATA/truthfulqa/train.jsonl.gz:2" \
  --length-balance 0.25 \
  --eval-data "alpacaeval/dev=$DATA/alpacaeval/dev.jsonl.gz::600" \
  --eval-data "alpacaeval/dev-balanced=$DATA/alpacaeval/dev-balanced.jsonl.gz::400" \
  --eval-data "hh-harmless/dev=$DATA/hh-harmless/dev.jsonl.gz" \
  --eval-data "truthfulqa/dev=$DATA/truthfulqa/dev.jsonl.gz" \
  --num-epochs 1 --per-device-batch-size 32 --learning-rate 1e-4 --lr-scheduler cosine --warmup-ratio 0.05 \
  --eval-steps 0 --save-steps 200 --seed 42 \
  --output-dir "$OUT_DIR" "${@:2}"
