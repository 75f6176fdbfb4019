#!/usr/bin/env bash
# The scorecard of a served reward model (reports/<name>/): `reward eval` on our dev sets,
# through a running service:
#   bash scripts/scorecard.sh REPORT_DIR [reward eval flags, e.g. --url URL --model NAME]
#   (DATA=../shared/data by default)
# Each set measures one objective (its folder's default, see docs/evaluation.md); sanity/dev is
# split by category into truthful, harmless and helpful sections. A model with several heads
# gets each head's accuracy beside the combination's, and the length baselines beside them.
# reports/default-rm/ was made with the first four sets, before sanity/dev existed.
set -euo pipefail
DATA=${DATA:-../shared/data}
OUT_DIR=${1:?usage: bash scripts/scorecard.sh REPORT_DIR [reward eval flags]}
exec "${REWARD:-reward}" eval \
  --data "alpacaeval/dev=$DATA/alpacaeval/dev.jsonl.gz" \
  --data "alpacaeval/dev-balanced=$DATA/alpacaeval/dev-balanced.jsonl.gz" \
  --data "hh-harmless/dev=$DATA/hh-harmless/dev.jsonl.gz" \
  --data "truthfulqa/dev=$DATA/truthfulqa/dev.jsonl.gz" \
  --data "sanity/dev=$DATA/sanity/dev.jsonl.gz" \
  --report "$OUT_DIR" "${@:2}"
