"""Does the answer steer a gated model's gate? In-process, on a model directory whose heads combine by
a gate (reward_core/objectives.py):

    python scripts/gate_probe.py models/default-rm [--data-root ../shared/data] [--n 200] > gate.json

The gate is meant to weigh the heads by what the prompt asks for. In an encoder it reads the
prompt's tokens, but those attend to the response in every block below, so the answer moves the
weights too. This measures by how much, per dev set:

* the gate's weights for the chosen and the rejected answer of each pair, and how far apart they
  are (the largest difference in one objective's weight; the share of pairs whose two answers get
  different top objectives);
* the accuracy as served, and with both answers of a pair combined by one mixture (the mean of
  their two weight vectors), so the answer cannot choose its judge: the share of pairs whose
  verdict changes is what the steering decides;
* on ``--n`` seeded prompts of each large set, the weights the chosen answer gets against those of
  the fixed non-answers of ``scripts/non_answer_probe.py``, and how often each non-answer
  out-scores the chosen answer as served and under the chosen answer's own mixture.

It prints one JSON object. The service does not return the gate's weights, so this loads the model
itself (reward_core, on the CPU) and reads them off the gate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from non_answer_probe import NON_ANSWERS, sampled_records  # noqa: E402
from reward_core.formatting import encode_conversations  # noqa: E402
from reward_core.forward import pad_token_id, reward_heads  # noqa: E402
from reward_core.loading import load_sequence_classifier, open_model_dir  # noqa: E402
from reward_core.objectives import combine_heads, gate_weights, objectives_of  # noqa: E402
from trainer.data import load_file  # noqa: E402
from trainer.scoring import length_sorted_chunks  # noqa: E402

SETS = ["sanity/dev", "hh-harmless/dev", "truthfulqa/dev", "alpacaeval/dev-balanced", "alpacaeval/dev"]
NON_ANSWER_SETS = ["alpacaeval/dev", "hh-harmless/dev", "truthfulqa/dev"]


class GatedScorer:
    """Each item's combined reward, each head's reward and the gate's weights, from one forward:
    the service's ``reward_heads`` and ``combine_heads``, with the gate's weights kept."""

    def __init__(self, model_dir: Path, max_tokens: int = 16384) -> None:
        self.files = open_model_dir(model_dir)
        self.model = load_sequence_classifier(self.files.path, self.files.spec).eval()
        self.objectives = objectives_of(self.model)
        if self.objectives is None or not self.objectives.gated:
            raise SystemExit(f"{model_dir}: not a model whose heads combine by a gate")
        self.names = list(self.objectives.names)
        self.pad = pad_token_id(self.files.tokenizer)
        self.max_tokens = max_tokens  # padded tokens per forward

    def chunks(self, conversations: list[tuple[list[dict], str]]):
        """The encoded conversations as length-sorted chunks, and the index back to input order."""
        encoded = encode_conversations(conversations, self.files.tokenizer, self.files.spec)
        return length_sorted_chunks(encoded, self.pad, self.max_tokens, "cpu")

    def score(self, conversations: list[tuple[list[dict], str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(combined [n], heads [n, H], gate weights [n, H]) in input order."""
        chunks, order = self.chunks(conversations)
        columns, weights = [], []
        with torch.inference_mode():
            for chunk in chunks:
                heads, features = reward_heads(self.model, self.files.spec.architecture, *chunk)
                columns.append(combine_heads(heads, self.objectives, self.model.reward_gate, features))
                weights.append(gate_weights(self.model.reward_gate, features, self.objectives.gate_temperature))
        columns, weights = torch.cat(columns)[order].float().numpy(), torch.cat(weights)[order].float().numpy()
        return columns[:, 0], columns[:, 1:], weights


def pct(mask: np.ndarray) -> float:
    return round(float(np.mean(mask)) * 100, 1)


def mean_weights(names: list[str], weights: np.ndarray) -> dict[str, float]:
    return {name: round(float(w), 3) for name, w in zip(names, weights.mean(axis=0))}


def pairs_section(scorer: GatedScorer, records: list) -> dict:
    conversations = [(r.prompt, r.responses[i]) for r in records for i in (r.ranking[0], r.ranking[-1])]
    combined, heads, weights = scorer.score(conversations)
    combined, heads, weights = combined.reshape(-1, 2), heads.reshape(-1, 2, heads.shape[1]), weights.reshape(-1, 2, weights.shape[1])
    served = combined[:, 0] > combined[:, 1]
    shared = weights.mean(axis=1, keepdims=True)  # one mixture for both answers
    one_mixture = (shared * heads).sum(axis=2)
    one_mixture_right = one_mixture[:, 0] > one_mixture[:, 1]
    apart = np.abs(weights[:, 0] - weights[:, 1]).max(axis=1)
    return {
        "pairs": len(records),
        "accuracy_served": pct(served),
        "accuracy_one_mixture_per_pair": pct(one_mixture_right),
        "verdicts_changed_by_the_answers_own_weights": pct(served != one_mixture_right),
        "heads_accuracy": {name: pct(heads[:, 0, k] > heads[:, 1, k]) for k, name in enumerate(scorer.names)},
        "gate_chosen": mean_weights(scorer.names, weights[:, 0]),
        "gate_rejected": mean_weights(scorer.names, weights[:, 1]),
        "gate_apart_median": round(float(np.median(apart)), 3),
        "gate_apart_p90": round(float(np.quantile(apart, 0.9)), 3),
        "top_objective_differs": pct(weights[:, 0].argmax(axis=1) != weights[:, 1].argmax(axis=1)),
    }


def non_answer_section(scorer: GatedScorer, records: list) -> dict:
    k = 1 + len(NON_ANSWERS)
    conversations = [(r.prompt, answer) for r in records for answer in [r.best, *NON_ANSWERS]]
    combined, heads, weights = scorer.score(conversations)
    combined, heads, weights = combined.reshape(-1, k), heads.reshape(-1, k, heads.shape[1]), weights.reshape(-1, k, weights.shape[1])
    judged_like_chosen = (weights[:, :1] * heads).sum(axis=2)  # every answer weighed as the chosen one is
    out: dict = {"prompts": len(records), "gate_chosen": mean_weights(scorer.names, weights[:, 0])}
    for j, answer in enumerate(NON_ANSWERS, start=1):
        out[answer] = {
            "gate": mean_weights(scorer.names, weights[:, j]),
            "beats_chosen_served": pct(combined[:, j] > combined[:, 0]),
            "beats_chosen_under_the_chosen_answers_weights": pct(judged_like_chosen[:, j] > judged_like_chosen[:, 0]),
        }
    return out


def probe_arguments(doc: str) -> argparse.Namespace:
    """The flags of this probe and of the experiments built on it (reports/default-rm-gate/)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--n", type=int, default=200, help="seeded prompts per set for the non-answers")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def non_answer_records(data_root: Path, name: str, n: int, seed: int) -> list:
    """The same seeded prompts as scripts/non_answer_probe.py."""
    return sampled_records(data_root / f"{name}.jsonl.gz", n, seed)


def main() -> None:
    args = probe_arguments(__doc__)
    scorer = GatedScorer(args.model_dir)
    result: dict = {"model": str(args.model_dir), "objectives": scorer.names, "pairs": {}, "non_answers": {}}
    for name in SETS:
        records = load_file(args.data_root / f"{name}.jsonl.gz").records
        groups = {"all": records}
        if name == "sanity/dev":
            for record in records:
                groups.setdefault(record.category or "(none)", []).append(record)
        result["pairs"][name] = {group: pairs_section(scorer, rows) for group, rows in groups.items()}
        print(f"{name}: done", file=sys.stderr, flush=True)
    for name in NON_ANSWER_SETS:
        result["non_answers"][name] = non_answer_section(scorer, non_answer_records(args.data_root, name, args.n, args.seed))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
