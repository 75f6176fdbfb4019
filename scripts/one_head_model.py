"""A model directory whose reward is one head of a model with objectives, for a caller that
cannot name the head per request (a gold RM for the over-optimisation experiment, a PPO
trainer's reward):

    python scripts/one_head_model.py SOURCE_DIR OBJECTIVE OUT_DIR

OUT_DIR is a copy of SOURCE_DIR (the same tensors; a model laid over a base keeps naming it)
whose ``reward_model.json`` combines the heads with fixed weights, 1 for OBJECTIVE and 0 for the
rest, so ``/v1/score`` with no ``objective`` gives what SOURCE_DIR gives with ``"objective":
OBJECTIVE``. The gate's file is left out (fixed weights need none), and so are the reward
statistics, which describe the source's combination, not the head: ``normalize`` is refused
for the copy. ``one_head_of`` records where it came from.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

SPEC = "reward_model.json"
GATE_FILE = "reward_gate.safetensors"


def one_head_model(source: Path, objective: str, out: Path) -> Path:
    spec = json.loads((source / SPEC).read_text())
    objectives = spec.get("objectives") or {}
    names = list(objectives.get("names") or [])
    if objective not in names:
        have = ", ".join(names) if names else "none (a single-head model is its own head already)"
        raise SystemExit(f"{source} has no objective {objective!r}; its objectives: {have}")
    if out.exists():
        raise SystemExit(f"{out} exists; remove it or choose another OUT_DIR")
    shutil.copytree(source, out, ignore=shutil.ignore_patterns(GATE_FILE, SPEC))
    spec["objectives"] = {"names": names, "combine": "weights", "weights": {objective: 1.0}}
    for key in ("reward_mean", "reward_std"):
        spec.pop(key, None)
    spec["one_head_of"] = {"source": str(source), "objective": objective}
    (out / SPEC).write_text(json.dumps(spec, indent=2) + "\n")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    out = one_head_model(Path(argv[0]).resolve(), argv[1], Path(argv[2]).resolve())
    print(f"{out}: the {argv[1]} head of {argv[0]} as the model's reward")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
