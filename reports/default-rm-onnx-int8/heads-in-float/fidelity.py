"""How closely two int8 exports of a model follow its float32 rewards (QUESTION.txt): every dev
pair's two answers through TorchBackend (float32) and each export's OnnxBackend, in-process; per
set, the share of pairs whose winner matches float32's and the mean absolute reward difference.

    python reports/default-rm-onnx-int8/heads-in-float/fidelity.py models/default-rm \\
        all-quantised=runs/int8-all heads-in-float=runs/int8-heads-float > .../fidelity.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from reward_core.backends import OnnxBackend, TorchBackend, served_rewards  # noqa: E402
from reward_core.formatting import encode_conversations  # noqa: E402
from reward_core.forward import pad_batch, pad_token_id, plan_batches  # noqa: E402
from reward_core.loading import open_model_dir  # noqa: E402
from trainer.data import load_file  # noqa: E402

SETS = ["alpacaeval/dev", "alpacaeval/dev-balanced", "hh-harmless/dev", "truthfulqa/dev", "sanity/dev"]
BATCH = 16


def rewards(backend, files, conversations) -> np.ndarray:
    """The reward a caller gets for each conversation, in length-sorted batches of ``BATCH``."""
    encoded = encode_conversations(conversations, files.tokenizer, files.spec)
    out = np.empty(len(encoded), np.float64)
    pad = pad_token_id(files.tokenizer)
    for rows in plan_batches([len(e) for e in encoded], max_batch_tokens=2**62, max_batch_size=BATCH):
        out[rows] = served_rewards(backend.score_batch(pad_batch([encoded[i] for i in rows], pad)))
    return out


def main() -> int:
    source = Path(sys.argv[1])
    exports = dict(arg.split("=", 1) for arg in sys.argv[2:])
    data_root = ROOT.parent / "shared" / "data"
    files = open_model_dir(source)
    backends = {"float32": (TorchBackend(source, files.spec), files)}
    for name, path in exports.items():
        exported = open_model_dir(path)
        backends[name] = (OnnxBackend(path, exported.spec), exported)
    result: dict = {"source": str(source), "exports": exports, "sets": {}}
    for set_name in SETS:
        records = load_file(data_root / f"{set_name}.jsonl.gz").records
        conversations = [(r.prompt, a) for r in records for a in (r.best, r.worst)]
        scored = {name: rewards(b, f, conversations).reshape(len(records), 2) for name, (b, f) in backends.items()}
        base = scored["float32"]
        row = {"pairs": len(records)}
        for name in exports:
            r = scored[name]
            row[name] = {
                "same_winner_percent": round(100 * float(np.mean((r[:, 0] > r[:, 1]) == (base[:, 0] > base[:, 1]))), 2),
                "mean_abs_reward_difference": round(float(np.abs(r - base).mean()), 4),
                "accuracy_percent": round(100 * float(np.mean(r[:, 0] > r[:, 1])), 2),
            }
        row["float32_accuracy_percent"] = round(100 * float(np.mean(base[:, 0] > base[:, 1])), 2)
        result["sets"][set_name] = row
        print(f"{set_name}: {row}", file=sys.stderr, flush=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
