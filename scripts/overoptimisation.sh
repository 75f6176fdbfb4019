#!/usr/bin/env bash
# Ensembles against over-optimisation: best-of-N and PPO under each proxy rule, judged by a gold RM:
#   bash scripts/overoptimisation.sh PROXY_ENSEMBLE_DIR GOLD_DIR [OUT_DIR]
# Sizes and paths from the environment; see scripts/overoptimisation.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" scripts/overoptimisation.py "$@"
