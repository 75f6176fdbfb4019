#!/usr/bin/env bash
# SFT a tiny policy, serve a reward model, run PPO against it and plot reward and KL:
#   bash scripts/ppo_demo.sh RM_DIR [OUT_DIR]         (RM_DIR: e.g. models/default-rm)
# Sizes and paths from the environment; see scripts/ppo_demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" scripts/ppo_demo.py "$@"
