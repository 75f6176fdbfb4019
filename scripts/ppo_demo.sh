#!/usr/bin/env bash
# SFT a tiny policy, serve a proxy and a gold reward model, run PPO against the proxy, score both:
#   bash scripts/ppo_demo.sh RM_DIR GOLD_DIR [OUT_DIR]   (RM_DIR: e.g. models/default-rm)
# Sizes and paths from the environment; see scripts/ppo_demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" scripts/ppo_demo.py "$@"
